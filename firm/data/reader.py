"""Reading FIRM shards with webdataset: safe decoding, shuffling, rank/worker splitting, a corrupt-member policy.

Pipeline of :class:`ShardDataset` (one per rank; its copy in each DataLoader worker runs the same steps)::

    shard list --(shuffle, same seed on every rank)--> split by rank --> split by worker
      --> tar members (webdataset's tar iterator; only json + schema image members are read)
      --> group by key --> shuffle buffer --> decode (json + PIL only) + schema validation --> transform

- **No pickle.** Only the ``json`` member and image members named by the schema are read at all (a ``.pyd`` or
  ``.pickle`` member is skipped unread); JSON is parsed with :mod:`json`, images with PIL.
- **Disjoint splits.** Shards are dealt round-robin to the ``world_size * num_workers`` readers, after a shuffle that
  uses the same seed on every rank, so in one epoch every sample is read by exactly one (rank, worker). When there are
  fewer shards than readers (``split: auto`` falls back to it; ``split: sample`` forces it) every reader scans all
  shards and keeps every n-th sample instead (correct, but each reader reads all the bytes).
- **Corrupt members.** ``on_corrupt: skip`` drops a sample whose members are truncated or undecodable, logs a warning
  and counts it (:attr:`ShardDataset.stats`, shared across workers); a shard that ends early (truncated tar, also when
  cut exactly between two members) loses the sample it was cut in and the rest of that shard, and keeps every sample
  completed before the cut. ``on_corrupt: fail`` raises :class:`CorruptShardError` naming the shard and the sample.
  Whatever goes wrong while decoding one sample (bad JSON, JSON nested too deeply, an image that does not decode or
  has more than ``max_image_pixels`` pixels, a schema mismatch) is that sample's error under either policy.
- **Duplicate keys.** A key that appears again later in the same shard is a duplicate: the first sample is kept, the
  later one is dropped with a warning and counted (``stats["duplicates"]``). Keys are compared within a shard only.
- **Exact resume.** The dataset is ``Stateful`` for torchdata's ``StatefulDataLoader``: each worker's state is
  ``(epoch, records yielded, items yielded of the next record)``; the order of an epoch is a pure function of
  (seed, epoch, rank, worker), so a resumed worker regenerates it and skips what it had already yielded.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing as mp
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from firm.data.schema import MAX_IMAGE_PIXELS, Schema, SchemaError, decode_record, get_schema, member_suffixes
from firm.vocab import Task

log = logging.getLogger(__name__)

CORRUPT_POLICIES = ("skip", "fail")
SPLIT_MODES = ("auto", "shard", "sample")


class CorruptShardError(RuntimeError):
    """A shard holds a truncated or undecodable member and the policy is ``fail``; the message names the shard."""


@dataclass
class ReaderConfig:
    """How shards are read (a section of a DataModule's config)."""

    shuffle_buffer: int = 1000  # samples held for shuffling per worker (0 or 1: no sample shuffle)
    shuffle_shards: bool = True  # shuffle the shard order each epoch (same order on every rank before splitting)
    seed: int = 0  # seed of shard and sample shuffling; epoch, rank and worker are mixed in
    on_corrupt: str = "skip"  # skip (warn + count) | fail (raise naming the shard)
    split: str = "auto"  # auto | shard | sample: how readers (rank x worker) divide the data, see reader.py
    max_image_pixels: int | None = MAX_IMAGE_PIXELS  # larger images (width x height) are a corrupt sample; null: none

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Range checks (also run by the config loader, which names the file and the key)."""
        if self.on_corrupt not in CORRUPT_POLICIES:
            raise ValueError(f"on_corrupt: must be one of {CORRUPT_POLICIES}, got {self.on_corrupt!r}")
        if self.split not in SPLIT_MODES:
            raise ValueError(f"split: must be one of {SPLIT_MODES}, got {self.split!r}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer: must be >= 0, got {self.shuffle_buffer}")
        if self.max_image_pixels is not None and self.max_image_pixels < 1:
            raise ValueError(f"max_image_pixels: must be >= 1 or null (no cap), got {self.max_image_pixels}")


# --------------------------------------------------------------------------------------------------------------------
# Shard lists


def expand_shards(spec: str | Path | list[str | Path]) -> list[str]:
    """Shard URLs from a spec: a directory (its ``*.tar``), a glob, a brace pattern (``a-{000..009}.tar``), a shard
    prefix (``data/edit/raw`` for ``data/edit/raw-000000.tar`` ..., what ``firm data import --out`` was given), a
    ``pipe:``/URL, several of these joined by ``::``, or a list of these. Local patterns that match nothing are an
    error.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    out: list[str] = []
    for item in specs:
        for s in str(item).split("::"):
            if "://" in s or s.startswith("pipe:"):
                out += wds.shardlists.expand_urls(s)
            elif os.path.isdir(s):
                found = sorted(glob.glob(os.path.join(s, "**", "*.tar"), recursive=True))
                if not found:
                    raise FileNotFoundError(f"no *.tar shards under directory {s}")
                out += found
            else:
                out += _expand_local(s)
    return out


def _expand_local(s: str) -> list[str]:
    if not any(c in s for c in "*?[{") and not os.path.exists(s):
        # A shard prefix, as given to `firm data import --out` / ShardWriter: its `<prefix>-NNNNNN.tar` shards.
        prefixed = sorted(glob.glob(glob.escape(s) + "-[0-9][0-9][0-9][0-9][0-9][0-9].tar"))
        if prefixed:
            return prefixed
        raise FileNotFoundError(
            f"shard not found: {s} (neither a shard file, a folder of shards, nor a prefix with {s}-000000.tar ...)"
        )
    matched: list[str] = []
    for pattern in wds.shardlists.expand_urls(s):
        hits = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        missing = [h for h in hits if not os.path.isfile(h)]
        if missing:
            raise FileNotFoundError(f"shard not found: {missing[0]}")
        matched += hits
    if not matched:
        raise FileNotFoundError(f"no shards match {s!r}")
    return matched


# --------------------------------------------------------------------------------------------------------------------
# Rank / worker discovery


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(rank, world_size)``: as given, else from ``torch.distributed`` when initialised, else ``RANK`` /
    ``WORLD_SIZE`` from the environment, else ``(0, 1)``."""
    if rank is not None and world_size is not None:
        return rank, world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def worker_info(worker: int | None = None, num_workers: int | None = None) -> tuple[int, int]:
    """``(worker id, number of workers)`` of the current DataLoader worker (``(0, 1)`` in the main process)."""
    if worker is not None and num_workers is not None:
        return worker, num_workers
    info = get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


# --------------------------------------------------------------------------------------------------------------------
# Counters shared by the DataLoader workers


class ReadStats:
    """Counts of samples read and corrupt samples skipped, shared with DataLoader worker processes."""

    FIELDS = ("samples", "skipped", "truncated_shards", "duplicates")

    def __init__(self) -> None:
        self._values = {f: mp.Value("q", 0) for f in self.FIELDS}

    def add(self, field: str, n: int = 1) -> None:
        v = self._values[field]
        with v.get_lock():
            v.value += n

    def __getitem__(self, field: str) -> int:
        return int(self._values[field].value)

    def as_dict(self) -> dict[str, int]:
        return {f: self[f] for f in self.FIELDS}

    def reset(self) -> None:
        for v in self._values.values():
            with v.get_lock():
                v.value = 0

    def __repr__(self) -> str:
        return f"ReadStats({self.as_dict()})"


# --------------------------------------------------------------------------------------------------------------------
# Raw records of one shard


def iter_shard_records(
    url: str,
    *,
    suffixes: set[str] | None,
    on_corrupt: str = "skip",
    stats: ReadStats | None = None,
) -> Iterator[dict[str, Any]]:
    """Raw records ``{"__key__", "__url__", "<suffix>": bytes}`` of one shard, grouped by key.

    Members whose suffix is not in ``suffixes`` are skipped without being read (None reads every member's bytes,
    still never decoding them). A shard that cannot be opened or ends in the middle of a member loses the sample
    that member belongs to and the rest of the shard: counted in ``stats`` and warned about (``skip``), or raised as
    :class:`CorruptShardError` naming the shard and that sample's key (``fail``). Records completed before the damage
    are still yielded (under ``fail``, before the error is raised).
    """

    # The member whose bytes are being read: set when the tar iterator asks whether to read a member, cleared when
    # the member arrives. If the shard breaks while it is set, that member (and so its key) is the damaged one.
    reading: list[str | None] = [None]

    def select(fname: str) -> bool:
        reading[0] = fname
        if suffixes is None:
            return True
        _, suffix = base_plus_ext(fname)
        return suffix is not None and suffix.lower() in suffixes

    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return False  # stop reading this shard: a tar stream cannot resynchronise after a bad member

    current: dict[str, Any] | None = None
    seen: set[str] = set()  # keys yielded from this shard

    def first(record: dict[str, Any]) -> bool:
        """Whether ``record`` is the first of its key in this shard (a later one is warned about and counted)."""
        key = record["__key__"]
        if key in seen:
            log.warning("shard %s: sample key %r appears again; keeping the first, dropping this one", url, key)
            if stats is not None:
                stats.add("duplicates")
            return False
        seen.add(key)
        return True

    try:
        stream = _EndWatch(wds.gopen(url, "rb"))
    except Exception as e:  # noqa: BLE001 - any opener error means the shard is unreadable
        _corrupt(url, f"cannot open shard: {type(e).__name__}: {e}", on_corrupt, stats, truncated=True)
        return
    try:
        for member in tar_file_iterator(stream, handler=handler, select_files=select):
            reading[0] = None
            key, suffix = base_plus_ext(member["fname"])
            if key is None:
                continue
            suffix = suffix.lower()
            if current is not None and current["__key__"] != key:
                if first(current):
                    yield current
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            if suffix in current:
                _corrupt(url, f"sample {key!r}: duplicate member {suffix!r}", on_corrupt, stats)
                current = None
                continue
            current[suffix] = member["data"]
    except CorruptShardError:
        raise  # raised by _corrupt under on_corrupt: fail; its message is already the right one
    except Exception as e:  # noqa: BLE001 - header/stream errors raised by tarfile itself
        errors.append(e)
    finally:
        stream.close()
    if not errors and stream.ran_out:
        # tarfile ends quietly when the data stops at (or inside) a member header; a whole tar ends with zero blocks
        # before the file does, so running out of bytes means the shard was cut between two members.
        errors.append(EOFError("the shard ends without the end-of-archive marker (cut between two members)"))
    if errors:
        broken = base_plus_ext(reading[0])[0] if reading[0] is not None else None
        if broken is not None:
            lost = f"sample {broken!r} and whatever followed it"
        elif current is not None:
            lost = f"whatever followed sample {current['__key__']!r}"
        else:
            lost = "whatever followed"
        if current is not None and current["__key__"] != broken:
            # The damage starts after this record's members (e.g. inside the next sample's first member), so the
            # record holds every member the shard has for its key. If the damage hit a header between two of its
            # members instead (the broken key is then unknown), schema validation rejects it as incomplete.
            if first(current):
                yield current
        _corrupt(
            url,
            f"shard ends early or is damaged ({type(errors[0]).__name__}: {errors[0]}); lost {lost} in this shard",
            on_corrupt,
            stats,
            truncated=True,
            lost_sample=broken is not None,
        )
        return
    if current is not None and first(current):
        yield current


class _EndWatch:
    """A read-only file wrapper that notes whether a reader asked for bytes past the end of the data."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.ran_out = False

    def read(self, *args: Any) -> bytes:
        data = self._f.read(*args)
        if not data:
            self.ran_out = True
        return data

    def close(self) -> None:
        self._f.close()

    def __repr__(self) -> str:  # webdataset puts the stream's repr into its error messages
        return repr(self._f)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _corrupt(
    url: str,
    problem: str,
    policy: str,
    stats: ReadStats | None,
    *,
    truncated: bool = False,
    lost_sample: bool = True,
) -> None:
    if policy == "fail":
        raise CorruptShardError(f"corrupt shard {url}: {problem} (set on_corrupt: skip to skip such samples)")
    log.warning("skipping corrupt data in shard %s: %s", url, problem)
    if stats is not None:
        if lost_sample:
            stats.add("skipped")
        if truncated:
            stats.add("truncated_shards")


def iter_samples(
    shards: str | Path | list[str | Path],
    schema: str | Schema | None = None,
    *,
    on_corrupt: str = "skip",
    stats: ReadStats | None = None,
    decode_images: bool = True,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> Iterator[dict]:
    """Every sample of ``shards`` in file order, decoded and validated (single process, no shuffling).

    Handy for inspection, conversion and curation inputs. ``schema=None`` takes each sample's schema from its json.
    """
    suffixes = member_suffixes(schema)
    for url in expand_shards(shards):
        for record in iter_shard_records(url, suffixes=suffixes, on_corrupt=on_corrupt, stats=stats):
            sample = _decode(record, schema, on_corrupt, stats, decode_images, max_image_pixels)
            if sample is not None:
                if stats is not None:
                    stats.add("samples")
                yield sample


def _decode(
    record: dict,
    schema: str | Schema | None,
    on_corrupt: str,
    stats: ReadStats | None,
    decode_images: bool = True,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> dict | None:
    try:
        sample = decode_record(record, schema, decode_images=decode_images, max_image_pixels=max_image_pixels)
    except SchemaError as e:
        _corrupt(record["__url__"], str(e), on_corrupt, stats)
        return None
    except Exception as e:  # noqa: BLE001 - anything else that goes wrong with one sample is that sample's error
        problem = f"sample {record.get('__key__')!r}: {type(e).__name__}: {str(e)[:300]}"
        _corrupt(record["__url__"], problem, on_corrupt, stats)
        return None
    sample["__url__"] = record["__url__"]
    return sample


# --------------------------------------------------------------------------------------------------------------------
# The IterableDataset


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = (h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class ShardDataset(IterableDataset):
    """Samples of a shard set for one rank, split across that rank's DataLoader workers.

    Args:
        shards: shard spec (see :func:`expand_shards`) or list of URLs.
        schema: expected schema (None: whatever each sample's json says).
        config: shuffling, splitting and corrupt-member policy.
        transform: applied to each decoded sample in the worker (e.g. tokenisation); it returns one item, a list of
            items (e.g. one training example per judgement), or None to drop the sample.
        rank, world_size: override the distributed rank / world size (default: discovered, see :func:`dist_info`).
        stats: counters to share (a new :class:`ReadStats` by default).
    """

    def __init__(
        self,
        shards: str | Path | list[str | Path],
        schema: str | Schema | None = None,
        config: ReaderConfig | None = None,
        *,
        transform: Callable[[dict], Any] | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        stats: ReadStats | None = None,
    ) -> None:
        super().__init__()
        self.urls = expand_shards(shards)
        self.schema = get_schema(schema) if schema is not None else None
        self.config = config or ReaderConfig()
        self.transform = transform
        self._rank, self._world_size = rank, world_size
        self.stats = stats or ReadStats()
        self.epoch = 0
        # position in this epoch (by this worker): (records fully yielded, items yielded of the next record)
        self._yielded = (0, 0)
        self._resume: tuple[int, int, int] | None = None  # (epoch, records, items) set by load_state_dict

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order to produce (call before creating the iterator; ShardLoader does it)."""
        self.epoch = int(epoch)

    # -- Stateful protocol (torchdata): called inside each worker on its own copy of the dataset
    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "records": self._yielded[0], "items": self._yielded[1]}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = (int(state["epoch"]), int(state["records"]), int(state.get("items", 0)))

    # -- splitting
    def plan(self, worker: int | None = None, num_workers: int | None = None) -> tuple[list[str], int, int]:
        """``(shards, stride, offset)`` this reader handles in the current epoch: it reads ``shards`` and keeps
        the samples whose running index ``i`` satisfies ``i % stride == offset`` (stride 1 when splitting by shard).
        """
        rank, world = dist_info(self._rank, self._world_size)
        worker, num_workers = worker_info(worker, num_workers)
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside world size {world}")
        urls = list(self.urls)
        if self.config.shuffle_shards:
            random.Random(_mix(self.config.seed, self.epoch)).shuffle(urls)  # identical on every rank
        readers = world * num_workers
        me = rank * num_workers + worker
        mode = self.config.split
        if mode == "auto":
            mode = "shard" if len(urls) >= readers else "sample"
            if mode == "sample" and readers > 1 and me == 0 and self.epoch == 0:
                log.warning(
                    "%d shard(s) for %d readers (%d ranks x %d workers): every reader scans all shards and keeps "
                    "1/%d of the samples; write at least %d shards to split by shard",
                    len(urls),
                    readers,
                    world,
                    num_workers,
                    readers,
                    readers,
                )
        if mode == "shard":
            if len(urls) < readers:
                raise ValueError(
                    f"split: shard needs at least {readers} shards ({world} ranks x {num_workers} workers), "
                    f"got {len(urls)}; write more shards or use split: sample"
                )
            return urls[me::readers], 1, 0
        return urls, readers, me

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = worker_info()
        skip, skip_items = 0, 0
        if self._resume is not None:
            self.epoch, skip, skip_items = self._resume
            self._resume = None
        self._yielded = (skip, skip_items)
        rank, _ = dist_info(self._rank, self._world_size)
        urls, stride, offset = self.plan(worker, num_workers)
        suffixes = member_suffixes(self.schema)
        policy, stats = self.config.on_corrupt, self.stats

        def records() -> Iterator[dict]:
            i = 0
            for url in urls:
                for rec in iter_shard_records(url, suffixes=suffixes, on_corrupt=policy, stats=stats):
                    if i % stride == offset:
                        yield rec
                    i += 1

        stream: Iterator[dict] = records()
        if self.config.shuffle_buffer > 1:
            seed = _mix(self.config.seed, self.epoch, rank, worker, 1)
            stream = wds.filters.shuffle(
                bufsize=self.config.shuffle_buffer, initial=self.config.shuffle_buffer, seed=seed
            )(stream)
        n = 0
        for rec in stream:
            n += 1
            if n <= skip:  # resumed: these were yielded before the interruption (not decoded again)
                continue
            sample = _decode(rec, self.schema, policy, stats, max_image_pixels=self.config.max_image_pixels)
            if sample is None:
                continue
            if n > skip + 1 or not skip_items:
                stats.add("samples")
            items = [sample] if self.transform is None else self.transform(sample)
            if items is None:
                continue
            if not isinstance(items, list):
                items = [items]
            for j, item in enumerate(items):
                if n == skip + 1 and j < skip_items:  # resumed inside this record's list of items
                    continue
                # the state says: records before n are done, and j + 1 items of record n
                self._yielded = (n - 1, j + 1) if j + 1 < len(items) else (n, 0)
                yield item


def list_collate(batch: list[Any]) -> list[Any]:
    """Collate to a plain list (samples hold PIL images and strings)."""
    return batch


class ShardLoader:
    """Mixin for DataLoaders over a :class:`ShardDataset`: advances the dataset's epoch at every new iterator and
    keeps it in the loader's state so that a resumed run continues the same epoch."""

    _firm_epoch: int | None = None  # the next epoch to produce; None: start at the dataset's current epoch
    _firm_resumed_epoch: int | None = None

    def __iter__(self):  # type: ignore[override]
        if self._firm_resumed_epoch is not None:
            epoch, self._firm_resumed_epoch = self._firm_resumed_epoch, None
        elif self._firm_epoch is None:
            epoch = self.dataset.epoch  # type: ignore[attr-defined]
        else:
            epoch = self._firm_epoch
        self.dataset.set_epoch(epoch)  # type: ignore[attr-defined]
        self._firm_epoch = epoch + 1
        return super().__iter__()  # type: ignore[misc]

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        state = super().state_dict()  # type: ignore[misc]
        state["firm_epoch"] = self.dataset.epoch  # type: ignore[attr-defined]  # the epoch in progress
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:  # type: ignore[override]
        state = dict(state)
        self._firm_resumed_epoch = int(state.pop("firm_epoch", 0))
        super().load_state_dict(state)  # type: ignore[misc]


def make_loader(
    dataset: ShardDataset,
    batch_size: int,
    *,
    num_workers: int = 0,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    drop_last: bool = False,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> Any:
    """A torchdata ``StatefulDataLoader`` over ``dataset`` that advances its epoch and resumes mid-epoch exactly."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    class _Loader(ShardLoader, StatefulDataLoader):
        pass

    kwargs: dict[str, Any] = {}
    if num_workers > 0 and prefetch_factor is not None:
        kwargs["prefetch_factor"] = prefetch_factor
    return _Loader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn or list_collate,
        drop_last=drop_last,
        pin_memory=pin_memory,
        persistent_workers=False,  # workers are re-created each epoch and receive the new epoch number
        **kwargs,
    )


def rl_prompt_dataset(
    shards: str | Path | list[str | Path],
    config: ReaderConfig | None = None,
    *,
    task: str | None = None,
    transform: Callable[[dict], Any] | None = None,
    rank: int | None = None,
    world_size: int | None = None,
) -> ShardDataset:
    """RL prompts from ``rl_prompt`` shards: samples ``{"key", "prompt", "task", "source" (PIL or None), "meta"}``.

    The reader for :class:`firm.data.prompts.PromptDataModule`, which groups and places them across ranks.

    Args:
        task: keep only ``edit`` or ``generation`` prompts (None keeps both).
    """
    task = None if task is None else Task.parse(task).schema  # stored as edit | generation

    def _t(sample: dict) -> Any:
        if task is not None and sample["task"] != task:
            return None
        return transform(sample) if transform is not None else sample

    return ShardDataset(shards, "rl_prompt", config, transform=_t, rank=rank, world_size=world_size)


def load_rl_prompt_records(
    shards: str | Path | list[str | Path],
    *,
    task: str | None = None,
    decode_images: bool = False,
    on_corrupt: str = "skip",
) -> list[dict[str, Any]]:
    """All RL prompts of ``rl_prompt`` shards in memory, in file order, for map-style (index-based) samplers.

    Records look like ``{"key", "prompt", "task", "image", "checklist", "meta"}`` where ``image`` is the source image
    of an edit prompt (None for generation): still-encoded PNG/JPEG bytes by default (decode an item with
    :func:`firm.data.schema.decode_image` when it is drawn -- a few hundred KB per 512 px prompt instead of
    0.8 MB decoded), or a PIL image with ``decode_images=True``.

    Args:
        task: keep only ``edit`` or ``generation`` prompts (None keeps both).
    """
    task = None if task is None else Task.parse(task).schema  # stored as edit | generation
    out = []
    for s in iter_samples(shards, "rl_prompt", on_corrupt=on_corrupt, decode_images=decode_images):
        if task is not None and s["task"] != task:
            continue
        out.append(
            {
                "key": s["key"],
                "prompt": s["prompt"],
                "task": s["task"],
                "image": s["source"],
                "checklist": s["checklist"],
                "meta": s["meta"],
            }
        )
    return out
