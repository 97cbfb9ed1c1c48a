"""Benchmark metrics: MAE (with bootstrap confidence intervals), correlations, parse failures, confusion matrices.

Every metric is computed over the *parsed* items of a group (items whose critic answer held a valid score); the
number of parsed items and the parse-failure rate are always reported next to it, because a critic that fails to
answer the hard items would otherwise look better than it is.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from firm.bench.data import EDIT_CONSISTENCY, EDIT_EXECUTION, GENERATION, BenchItem
from firm.bench.evaluate import Prediction

# Report order of the groups; a group appears only when the benchmark has items in it.
GROUPS = (
    EDIT_EXECUTION,
    EDIT_CONSISTENCY,
    "edit",  # execution and consistency items pooled (the paper's "overall" edit MAE)
    GENERATION,
    "generation/easy",
    "generation/hard",
    "overall",  # every item
)


def groups_of(item: BenchItem) -> list[str]:
    """The report groups an item counts in."""
    out = [item.task]
    if item.task in (EDIT_EXECUTION, EDIT_CONSISTENCY):
        out.append("edit")
    if item.split:
        out.append(f"{item.task}/{item.split}")
    out.append("overall")
    return out


def mae(pred: Sequence[float], human: Sequence[float]) -> float:
    """Mean absolute error."""
    if len(pred) != len(human) or not pred:
        raise ValueError(f"mae needs two equally long non-empty sequences, got {len(pred)} and {len(human)}")
    return float(np.mean(np.abs(np.asarray(pred, dtype=np.float64) - np.asarray(human, dtype=np.float64))))


def correlations(pred: Sequence[float], human: Sequence[float]) -> dict[str, float | None]:
    """Pearson, Spearman and Kendall (tau-b) correlations via torchmetrics.

    A correlation is ``None`` when it is undefined: fewer than 2 items, or either side constant.
    """
    from torchmetrics.functional import kendall_rank_corrcoef, pearson_corrcoef, spearman_corrcoef

    p = torch.as_tensor(np.asarray(pred, dtype=np.float64))
    h = torch.as_tensor(np.asarray(human, dtype=np.float64))
    if p.numel() < 2 or bool((p == p[0]).all()) or bool((h == h[0]).all()):
        return {"pearson": None, "spearman": None, "kendall": None}
    out = {
        "pearson": float(pearson_corrcoef(p, h)),
        "spearman": float(spearman_corrcoef(p, h)),
        "kendall": float(kendall_rank_corrcoef(p, h, variant="b")),
    }
    return {k: (v if math.isfinite(v) else None) for k, v in out.items()}


def bootstrap_mae_ci(
    abs_errors: Sequence[float], *, samples: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean of ``abs_errors`` (resampling items).

    Returns ``None`` for fewer than 2 items or ``samples == 0``.
    """
    err = np.asarray(abs_errors, dtype=np.float64)
    if err.size < 2 or samples <= 0:
        return None
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, err.size, size=(samples, err.size))  # (B, n)
    means = err[idx].mean(axis=1)  # (B,)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def confusion_matrix(pred: Sequence[int], human: Sequence[float]) -> list[list[int]]:
    """5x5 counts: row = human score rounded to the nearest integer (half up), column = predicted score."""
    m = [[0] * 5 for _ in range(5)]
    for p, h in zip(pred, human, strict=True):
        m[int(math.floor(h + 0.5)) - 1][int(p) - 1] += 1
    return m


def group_metrics(
    pairs: list[tuple[BenchItem, Prediction]], *, bootstrap_samples: int = 1000, level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Metrics of one group of (item, prediction) pairs."""
    parsed = [(it, p) for it, p in pairs if p.score is not None]
    n, k = len(pairs), len(parsed)
    out: dict[str, Any] = {
        "n_items": n,
        "n_parsed": k,
        "n_failed": n - k,
        "parse_failure_rate": (n - k) / n if n else None,
        "mae": None,
        "mae_ci": None,
        "exact_match": None,
        "mean_pred": None,
        "mean_human": None,
        "pearson": None,
        "spearman": None,
        "kendall": None,
    }
    if not parsed:
        return out
    pred = [float(p.score) for _, p in parsed]
    human = [it.human_score for it, _ in parsed]
    errs = np.abs(np.asarray(pred) - np.asarray(human))
    ci = bootstrap_mae_ci(errs, samples=bootstrap_samples, level=level, seed=seed)
    out.update(
        mae=float(errs.mean()),
        mae_ci=list(ci) if ci else None,
        exact_match=float(np.mean(np.asarray(pred) == np.asarray(human))),
        mean_pred=float(np.mean(pred)),
        mean_human=float(np.mean(human)),
    )
    out.update(correlations(pred, human))
    return out


def compute_metrics(
    items: list[BenchItem],
    predictions: dict[str, Prediction],
    *,
    bootstrap_samples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Per-group metrics plus the confusion matrix of every parsed item.

    Returns:
        ``{"groups": {group: metrics}, "confusion": 5x5 counts (rows human, columns predicted),
        "ci_level": level, "bootstrap_samples": n}``.
    """
    missing = [it.id for it in items if it.id not in predictions]
    if missing:
        raise ValueError(f"{len(missing)} item(s) have no prediction, e.g. {missing[:3]}")
    by_group: dict[str, list[tuple[BenchItem, Prediction]]] = {}
    for it in items:
        for g in groups_of(it):
            by_group.setdefault(g, []).append((it, predictions[it.id]))
    groups = {
        g: group_metrics(by_group[g], bootstrap_samples=bootstrap_samples, level=level, seed=seed)
        for g in GROUPS
        if g in by_group
    }
    parsed = [(it, predictions[it.id]) for it in items if predictions[it.id].score is not None]
    confusion = confusion_matrix([p.score for _, p in parsed], [it.human_score for it, _ in parsed])
    return {"groups": groups, "confusion": confusion, "ci_level": level, "bootstrap_samples": bootstrap_samples}
