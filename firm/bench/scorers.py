"""Reward models on a FIRM-Bench-format benchmark: how well does a scorer's number rank the human judgements?

A scorer (PickScore, HPSv3, EditReward, a VLM judge, a FIRM critic as a scorer, ...) gives a number on its own scale,
so MAE against 1..5 human scores is meaningless for most of them. What is comparable across scorers and critics is the
rank agreement: for every report group (execution, consistency, instruction, quality, overall), the Spearman, Kendall
tau-b and Pearson correlations of the scorer's output with the reference scores, over the items it scored.

A scorer that outputs the item's own dimension (a critic scorer judging ``execution``) is read on that dimension;
every other scorer is read on its mix output (``score:``, default its primary), whatever the item's dimension.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from firm.bench.data import BenchItem
from firm.bench.evaluate import build_request
from firm.bench.metrics import correlations, groups_of
from firm.vocab import EDIT_DIMENSIONS

EDIT_TASK_DIMS = set(EDIT_DIMENSIONS)


@dataclass
class ScorerRun:
    """One scorer's values on a benchmark."""

    values: dict[str, float | None]  # item id -> the value read (None: missing)
    errors: dict[str, str] = field(default_factory=dict)  # item id -> why missing
    skipped: int = 0  # items of a task the scorer cannot score (edits for a text-to-image scorer, ...)
    wall_s: float = 0.0


def score_items(items: list[BenchItem], scorer: Any, *, batch_size: int = 8, progress: bool | None = None) -> ScorerRun:
    """Score every item the scorer can score (in batches of one task and dimension)."""
    import sys

    from tqdm import tqdm

    run = ScorerRun(values={})
    todo: dict[tuple[str, str], list[BenchItem]] = defaultdict(list)
    for it in items:
        kind = "edit" if it.dimension in EDIT_TASK_DIMS else "gen"
        if kind not in scorer.tasks:
            run.skipped += 1
            continue
        todo[(kind, it.dimension)].append(it)
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=sum(len(v) for v in todo.values()), desc=f"bench scorer {scorer.config.name}", disable=not show)
    t0 = time.perf_counter()
    try:
        for (_, dim), group in todo.items():
            output = dim if dim in scorer.outputs else scorer.primary
            for lo in range(0, len(group), batch_size):
                batch = group[lo : lo + batch_size]
                out = scorer([build_request(it) for it in batch])
                for i, it in enumerate(batch):
                    v = float(out.values[output][i])
                    run.values[it.id] = None if math.isnan(v) else v
                    if out.errors[i]:
                        run.errors[it.id] = out.errors[i]
                bar.update(len(batch))
    finally:
        bar.close()
    run.wall_s = time.perf_counter() - t0
    return run


def scorer_metrics(items: list[BenchItem], run: ScorerRun) -> dict[str, Any]:
    """Per report group: items, items scored, and the correlations of the values with the reference scores."""
    pairs: dict[str, tuple[list[float], list[float]]] = defaultdict(lambda: ([], []))
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for it in items:
        if it.id not in run.values:
            continue
        for g in groups_of(it):
            counts[g][0] += 1
            v = run.values[it.id]
            if v is not None:
                counts[g][1] += 1
                pairs[g][0].append(v)
                pairs[g][1].append(float(it.human_score))
    groups = {}
    for g, (n, n_scored) in counts.items():
        pred, human = pairs[g]
        groups[g] = {"n_items": n, "n_scored": n_scored, **correlations(pred, human)}
    return {"groups": groups, "skipped": run.skipped}


def scorer_table(scorers: dict[str, Any]) -> list[str]:
    """Markdown lines of the scorers' correlation table."""

    def f(x: float | None) -> str:
        return "—" if x is None else f"{x:.3f}"

    lines = [
        "### Reward models: rank agreement with the reference scores",
        "",
        "| Scorer | Output | Group | Scored | Spearman | Kendall τb | Pearson |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, s in scorers.items():
        for g, m in s["metrics"]["groups"].items():
            lines.append(
                f"| {label} | {s['output']} | {g} | {m['n_scored']}/{m['n_items']} | {f(m['spearman'])} | "
                f"{f(m['kendall'])} | {f(m['pearson'])} |"
            )
    lines += [
        "",
        "A scorer is read on the item's own dimension when it outputs it (a FIRM critic as a scorer), otherwise on "
        "its mix output; items of a task the scorer cannot score are left out.",
    ]
    return lines
