"""Resumable shard output: sealed shards + a journal of finished keys, so a killed run continues without redoing or
duplicating work.

A :class:`ShardSink` owns one folder::

    <dir>/<prefix>-000000.tar      sealed shards (complete; written as .tar.tmp and renamed when full)
    <dir>/<prefix>-000003.tar.tmp  the shard being written (deleted on restart: its samples are redone)
    <dir>/journal.jsonl            one line per sealed shard {"shard", "keys", "scores"}, one per failure {"failed"}

A key is *done* once it is in a sealed shard, and *failed* once its failure line is written (failures are journaled
at once, results only when their shard is sealed). On start the sink reconciles the journal with the folder:
unsealed ``.tmp`` shards are removed, a sealed shard the journal does not list (the process died between the rename
and the journal line) is read back and added, and a journal line whose shard is missing is dropped. So after any
kill, the done keys are exactly the keys of the sealed shards, each once.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from firm.data.reader import iter_samples
from firm.data.schema import get_schema
from firm.data.writer import TMP_SUFFIX, ShardWriter

log = logging.getLogger(__name__)

JOURNAL = "journal.jsonl"


class ShardSink:
    """Writes validated samples to sealed shards and journals finished and failed keys.

    Args:
        directory: the folder (created).
        prefix: shard file prefix.
        schema: sample schema of the shards.
        writer_kwargs: :class:`~firm.data.writer.ShardWriter` options (max_count, max_size, image_format, ...).
        extra_of: ``sample -> dict`` of small per-key facts to journal with each sealed key (e.g. its scores), so
            histograms can be computed without reading the shards.
    """

    def __init__(
        self,
        directory: str | Path,
        prefix: str,
        schema: str,
        writer_kwargs: dict[str, Any] | None = None,
        extra_of: Any = None,
    ) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.schema = get_schema(schema)
        self.writer_kwargs = dict(writer_kwargs or {})
        self.extra_of = extra_of or (lambda s: {})
        self.journal_path = self.dir / JOURNAL
        self.done: dict[str, dict] = {}  # key -> journaled facts (e.g. scores)
        self.shard_of: dict[str, str] = {}  # key -> shard file name
        self.failed: dict[str, str] = {}  # key -> reason
        self._pending: dict[str, dict] = {}
        self._recover()
        self._journal = open(self.journal_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.writer = ShardWriter(
            self.dir / prefix,
            self.schema,
            start_index=self._next_index(),
            on_seal=self._sealed,
            check_duplicates=True,
            **self.writer_kwargs,
        )

    # ---- recovery

    def _shards_on_disk(self) -> dict[str, Path]:
        pat = re.compile(rf"^{re.escape(self.prefix)}-(\d{{6}})\.tar$")
        return {p.name: p for p in sorted(self.dir.iterdir()) if pat.match(p.name)}

    def _next_index(self) -> int:
        idx = [int(n[len(self.prefix) + 1 : -4]) for n in self._shards_on_disk()]
        return max(idx) + 1 if idx else 0

    def _recover(self) -> None:
        for tmp in self.dir.glob(f"{self.prefix}-*.tar{TMP_SUFFIX}"):
            log.info("removing unsealed shard %s (its samples will be redone)", tmp)
            tmp.unlink()
        on_disk = self._shards_on_disk()
        listed: set[str] = set()
        lines: list[dict] = []
        if self.journal_path.is_file():
            with open(self.journal_path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    try:
                        lines.append(json.loads(line))
                    except ValueError:
                        # a line cut by the kill: the last one only; its shard (if sealed) is re-read below
                        log.warning("%s:%d: ignoring an incomplete journal line", self.journal_path, i)
        for entry in lines:
            if "failed" in entry:
                self.failed[entry["failed"]] = entry.get("reason", "")
            elif "shard" in entry:
                if entry["shard"] not in on_disk:
                    log.warning(
                        "journal lists %s but it is not in %s; its keys will be redone", entry["shard"], self.dir
                    )
                    continue
                listed.add(entry["shard"])
                for k in entry["keys"]:
                    self.done[k] = entry.get("facts", {}).get(k, {})
                    self.shard_of[k] = entry["shard"]
        repaired = []
        for name, path in on_disk.items():
            if name in listed:
                continue
            log.warning("sealed shard %s is not in the journal (interrupted run): reading its keys back", path)
            facts = {}
            for s in iter_samples(path, self.schema, decode_images=False):
                facts[s["key"]] = self.extra_of(s)
            repaired.append({"shard": name, "keys": list(facts), "facts": facts})
            for k, v in facts.items():
                self.done[k] = v
                self.shard_of[k] = name
        if repaired or lines:
            # rewrite the journal cleanly (drops cut lines and entries of missing shards)
            tmp = self.journal_path.with_suffix(".jsonl.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                for entry in lines:
                    if "failed" in entry or entry.get("shard") in listed:
                        f.write(json.dumps(entry) + "\n")
                for entry in repaired:
                    f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.journal_path)
        for k in self.done:
            self.failed.pop(k, None)  # a key redone after a failure (retry_failed) counts as done

    # ---- writing

    def write(self, sample: dict) -> None:
        """Add a finished sample (it counts as done once its shard is sealed)."""
        key = sample["key"]
        if key in self.done:
            raise ValueError(f"{key!r} is already in a sealed shard of {self.dir}")
        self._pending[key] = self.extra_of(sample)
        self.writer.write(sample)

    def fail(self, key: str, reason: str) -> None:
        """Record that ``key`` could not be produced (journaled at once)."""
        self.failed[key] = reason
        self._append({"failed": key, "reason": reason})

    def _sealed(self, path: str, keys: list[str]) -> None:
        name = Path(path).name
        facts = {k: self._pending.pop(k, {}) for k in keys}
        self._append({"shard": name, "keys": keys, "facts": facts})
        for k in keys:
            self.done[k] = facts[k]
            self.shard_of[k] = name
            self.failed.pop(k, None)

    def _append(self, entry: dict) -> None:
        self._journal.write(json.dumps(entry) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def shards(self) -> list[str]:
        return [str(p) for p in self._shards_on_disk().values()]

    def close(self) -> None:
        """Seal the open shard and close the journal."""
        try:
            self.writer.close()
        finally:
            self._journal.close()
