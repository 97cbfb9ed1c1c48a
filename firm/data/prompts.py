"""RL prompts: each step draws prompts, repeats each one G times (a group) and spreads the group over the ranks.

A prompt record is ``{"prompt": str, "image": path (editing), "key": str, "checklist": [str, ...]}``; only
``prompt`` is required (``image`` too for editing). Records come from an inline list in the YAML or from a JSONL
file (one record per line; image paths relative to the file).

Batches are built by :class:`GroupBatchSampler`: at RL step ``s`` it takes the next ``M = world * batch_size / G``
prompts of a seeded stream of epoch permutations, repeats each ``G`` times, shuffles the ``M * G`` slots with a
generator seeded by ``(seed, s)`` — the same on every rank — and gives rank ``r`` the slots
``[r * batch_size, (r + 1) * batch_size)``. Every sample carries its ``group`` (the prompt's slot in the step, equal
on all ranks), so group statistics can be computed after an all-gather. The sampler is a pure function of the step,
so a ``StatefulDataLoader`` fast-forwards it exactly on resume.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from firm.vocab import Task


def load_prompt_records(path: str | Path, *, task: str = "gen") -> list[dict[str, Any]]:
    """Read a JSONL prompt file; checks each record and resolves image paths relative to the file.

    Raises:
        FileNotFoundError: the file or a referenced image does not exist.
        ValueError: a line is not a JSON object with a non-empty ``prompt`` (and an ``image`` for editing).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            records.append(_check_record(rec, f"{path}:{lineno}", task, base=path.parent))
    if not records:
        raise ValueError(f"{path}: no prompt records")
    return records


def _check_record(rec: Any, where: str, task: str, base: Path | None = None) -> dict[str, Any]:
    if isinstance(rec, str):
        rec = {"prompt": rec}
    if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str) or not rec["prompt"].strip():
        raise ValueError(f"{where}: a prompt record needs a non-empty string `prompt`, got {rec!r}")
    unknown = sorted(set(rec) - {"prompt", "image", "key", "checklist", "meta"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; allowed: prompt, image, key, checklist, meta")
    out = dict(rec)
    if task == Task.EDIT:
        if not rec.get("image"):
            raise ValueError(f"{where}: editing prompts need an `image` (the source image to edit)")
    if rec.get("image"):
        img = Path(rec["image"])
        if not img.is_absolute() and base is not None:
            img = base / img
        if not img.is_file():
            raise FileNotFoundError(f"{where}: image not found: {img}")
        out["image"] = str(img)
    checklist = rec.get("checklist")
    if checklist is not None and (not isinstance(checklist, list) or not all(isinstance(c, str) for c in checklist)):
        raise ValueError(f"{where}: `checklist` must be a list of strings")
    return out


class PromptDataset(Dataset):
    """Prompt records; item ``(index, group)`` returns the record with its group label (images opened as RGB)."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        index, group = item
        rec = self.records[index]
        image = None
        if rec.get("image"):
            from PIL import Image

            with Image.open(rec["image"]) as im:
                image = im.convert("RGB")
        return {
            "prompt": rec["prompt"],
            "image": image,
            "key": str(rec.get("key", index)),
            "checklist": rec.get("checklist"),
            "meta": rec.get("meta"),
            "index": index,
            "group": group,
        }


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Lists for strings / images / checklists, (B,) int64 tensors for ``index`` and ``group``."""
    out: dict[str, Any] = {k: [it[k] for it in items] for k in ("prompt", "image", "key", "checklist", "meta")}
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.int64)
    out["group"] = torch.tensor([it["group"] for it in items], dtype=torch.int64)
    return out


class _EpochSetter:
    """What Lightning calls ``set_epoch`` on (``batch_sampler.sampler``): forwards the epoch to the batch sampler."""

    def __init__(self, owner: GroupBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.epoch = epoch


class GroupBatchSampler:
    """Batch sampler: per step, ``M`` prompts × ``G`` copies spread over ``num_replicas`` ranks.

    An epoch is :attr:`steps_per_epoch` steps (every prompt drawn about once); epoch ``e`` yields the steps
    ``[e * L, (e + 1) * L)`` of one endless seeded stream, so epochs continue the stream instead of repeating it.
    Having a length matters: Lightning does not pre-fetch from loaders with a length, so the loader's saved position
    is exactly the number of consumed batches and a resumed run continues with the right batch.

    Args:
        num_prompts: size of the prompt set.
        group_size: G, samples per prompt (across all ranks).
        batch_size: samples per rank per step; ``num_replicas * batch_size`` must be a multiple of G.
        num_replicas: world size.
        rank: this rank.
        seed: seeds the prompt order and the slot shuffle (independent of the experiment seed).
        shuffle: draw prompts in a random order each epoch (else in file order) and shuffle group members over
            ranks (else a group's members are consecutive).
    """

    def __init__(
        self,
        num_prompts: int,
        group_size: int,
        batch_size: int,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        if num_prompts < 1:
            raise ValueError("GroupBatchSampler: the prompt set is empty")
        if group_size < 1 or batch_size < 1:
            raise ValueError(
                f"GroupBatchSampler: group_size and batch_size must be >= 1, got {group_size}, {batch_size}"
            )
        total = num_replicas * batch_size
        if total % group_size:
            raise ValueError(
                f"world size x batch_size = {num_replicas} x {batch_size} = {total} images per step is not a multiple "
                f"of group_size={group_size}: set data.batch_size so that devices x batch_size is divisible by G"
            )
        if not 0 <= rank < num_replicas:
            raise ValueError(f"GroupBatchSampler: rank {rank} outside [0, {num_replicas})")
        self.num_prompts, self.group_size, self.batch_size = num_prompts, group_size, batch_size
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.prompts_per_step = total // group_size
        self._perm_cache: dict[int, torch.Tensor] = {}
        self.epoch = 0
        self.sampler = _EpochSetter(self)  # Lightning calls batch_sampler.sampler.set_epoch(epoch)

    def _epoch_perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perm_cache:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm = torch.randperm(self.num_prompts, generator=g)
            else:
                perm = torch.arange(self.num_prompts)
            self._perm_cache = {epoch: perm}  # keep one epoch
        return self._perm_cache[epoch]

    def step_slots(self, step: int) -> list[tuple[int, int]]:
        """The ``(prompt index, group)`` pairs of this rank at RL step ``step``."""
        m, n = self.prompts_per_step, self.num_prompts
        stream = range(step * m, (step + 1) * m)
        prompts = [int(self._epoch_perm(i // n)[i % n]) for i in stream]  # (M,)
        slots = [(prompts[g], g) for g in range(m) for _ in range(self.group_size)]  # (M * G,)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 7_919 + step + 1)
            order = torch.randperm(len(slots), generator=gen).tolist()
            slots = [slots[i] for i in order]
        lo = self.rank * self.batch_size
        return slots[lo : lo + self.batch_size]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        first = self.epoch * self.steps_per_epoch
        for step in range(first, first + self.steps_per_epoch):
            yield self.step_slots(step)

    @property
    def steps_per_epoch(self) -> int:
        """Steps to draw every prompt once (the last step of an epoch may start the next one)."""
        return math.ceil(self.num_prompts / self.prompts_per_step)


class _ResumableLoader(StatefulDataLoader):
    """A StatefulDataLoader that resumes a finished epoch as finished.

    A checkpoint written at the last batch of an epoch holds a loader state with every batch yielded. Loaded as is,
    the next ``iter()`` (the next epoch's) yields nothing, so the run silently skips a whole epoch of data. Here such a
    state is dropped: the next epoch starts at its first batch, as it did in the uninterrupted run."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if _batches_yielded(state_dict) >= len(self):
            return
        super().load_state_dict(state_dict)


def _batches_yielded(state: dict[str, Any]) -> int:
    """Batches of the current epoch a StatefulDataLoader state has yielded (in-process or with worker processes)."""
    if "_num_yielded" in state:  # num_workers == 0
        return int(state["_num_yielded"])
    snapshot = state.get("_snapshot") or {}  # num_workers > 0: the last snapshot plus the steps since it
    return int(snapshot.get("_snapshot_step", 0)) + int(state.get("_steps_since_snapshot", 0))


class PromptDataModule(L.LightningDataModule):
    """RL prompt batches of ``batch_size`` samples per rank, in groups of ``group_size`` copies of a prompt.

    The batch sampler places samples on ranks itself, so the Trainer must not inject a ``DistributedSampler``:
    ``use_distributed_sampler = False`` tells `firm run` (and should be passed to a hand-made ``Trainer``).
    """

    use_distributed_sampler = False

    @dataclass
    class Config:
        name: str = "prompts"
        task: str = "gen"  # gen (text-to-image) | edit (prompts are instructions with a source `image`)
        prompts: list[Any] | None = None  # inline prompts: strings, or records {prompt, image, key, checklist}
        path: str | None = None  # JSONL file of records (one per line); used when `prompts` is not given
        group_size: int = 16  # G: images per prompt per step, across all ranks (the group of the advantage)
        batch_size: int = 16  # images per rank per step; devices x batch_size must be a multiple of group_size
        shuffle: bool = True  # random prompt order per epoch, and group members spread over ranks
        seed: int = 0  # seed of the prompt order (independent of the experiment seed)
        num_workers: int = 0  # dataloader worker processes (they open source images)
        allow_group_of_one: bool = False  # G = 1 makes every group advantage zero: only for an algorithm without groups

        def validate(self) -> None:
            """Range checks (run by the config loader, which names the file and the key)."""
            self.task = Task.parse(self.task).value  # gen | edit (also: generate, generation, t2i)
            if self.group_size < 1:
                raise ValueError(f"group_size: must be >= 1, got {self.group_size}")
            if self.group_size == 1 and not self.allow_group_of_one:
                raise ValueError(
                    "group_size: 1 gives every sample a zero group advantage, so RL learns nothing; use >= 2 "
                    "(the reference setups use 12-16), or set allow_group_of_one: true for an algorithm without groups"
                )
            if self.batch_size < 1:
                raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
            if self.num_workers < 0:
                raise ValueError(f"num_workers: must be >= 0, got {self.num_workers}")

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        try:
            config.validate()  # the config loader runs it too; a Config built in code is checked here
        except ValueError as e:
            raise ValueError(f"data.{e}") from None
        if config.prompts is None and config.path is None:  # (a subclass may fill `path` before this runs)
            raise ValueError("data: give `prompts` (an inline list) or `path` (a JSONL file of prompt records)")
        self.dataset: PromptDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        c = self.config
        if c.prompts is not None:
            records = [_check_record(_plain(r), f"data.prompts[{i}]", c.task) for i, r in enumerate(c.prompts)]
            if not records:
                raise ValueError("data.prompts is empty")
        else:
            records = load_prompt_records(c.path, task=c.task)
        self.dataset = PromptDataset(records)

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def batch_sampler(self) -> GroupBatchSampler:
        self.setup()
        world, rank = self._world()
        c = self.config
        return GroupBatchSampler(len(self.dataset), c.group_size, c.batch_size, world, rank, c.seed, c.shuffle)

    def train_dataloader(self) -> StatefulDataLoader:
        self.setup()
        return _ResumableLoader(
            self.dataset,
            batch_sampler=self.batch_sampler(),
            collate_fn=collate_prompts,
            num_workers=self.config.num_workers,
        )


def _plain(rec: Any) -> Any:
    """OmegaConf containers from the YAML as plain Python objects."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(rec, (DictConfig, ListConfig)):
            return OmegaConf.to_container(rec, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return rec
