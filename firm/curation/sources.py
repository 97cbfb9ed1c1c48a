"""Inputs of a curation run: samples to judge, streamed (never all in memory).

A source is iterable over sample dicts of the pipeline's schema (scores not needed; a given ``difference_report``
or ``checklist`` is reused instead of asking the teacher), and has ``total`` (number of samples, or None when
unknown) and ``source_id`` (for the manifest). Sources are registered in the ``curation_sources`` registry:
``shards`` (below), ``shapes_edit`` and ``shapes_gen`` (:mod:`firm.synthetic.curation`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from firm.data.reader import ReadStats, expand_shards, iter_samples


class ShardsSource:
    """Samples from FIRM shards (e.g. made by `firm data import`), in file order."""

    @dataclass
    class Config:
        name: str = "shards"
        path: str = "???"  # shard spec: folder, glob, brace pattern, several joined by ::
        schema: str = "edit"  # edit | generation (must match the pipeline)
        limit: int | None = None  # only the first N samples
        on_corrupt: str = "skip"  # skip (warn + count) | fail

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        if self.config.path in ("", "???"):
            raise ValueError("shards source: set source.path to the input shards")
        self.urls = expand_shards(self.config.path)
        self.total = self.config.limit
        self.stats = ReadStats()
        self.source_id = f"shards({self.config.path}, {len(self.urls)} shard(s))"

    def __iter__(self) -> Iterator[dict]:
        it = iter_samples(self.urls, self.config.schema, on_corrupt=self.config.on_corrupt, stats=self.stats)
        return itertools.islice(it, self.config.limit) if self.config.limit is not None else it
