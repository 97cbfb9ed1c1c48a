"""Benchmark metrics against values computed by hand."""

import math
from pathlib import Path

import pytest

from firm.bench.data import BenchItem
from firm.bench.evaluate import Prediction
from firm.bench.metrics import (
    bootstrap_mae_ci,
    compute_metrics,
    confusion_matrix,
    correlations,
    group_metrics,
    mae,
)

PRED = [1, 2, 3, 4, 5]
HUMAN = [2, 2, 5, 4, 3]


def test_mae_by_hand():
    # |1-2| + |2-2| + |3-5| + |4-4| + |5-3| = 1 + 0 + 2 + 0 + 2 = 5, over 5 items
    assert mae(PRED, HUMAN) == pytest.approx(1.0)
    assert mae([3], [4.5]) == pytest.approx(1.5)  # fractional reference (mean of raters)
    with pytest.raises(ValueError):
        mae([1, 2], [1])


def test_correlations_by_hand():
    c = correlations(PRED, HUMAN)
    # Pearson: dx = (-2,-1,0,1,2), dy = (-1.2,-1.2,1.8,0.8,-0.2): sum dx*dy = 4, sum dx^2 = 10, sum dy^2 = 6.8
    assert c["pearson"] == pytest.approx(4 / math.sqrt(10 * 6.8), abs=1e-6)
    # Spearman: human ranks with the tie averaged = (1.5,1.5,5,4,3): sum dr*ds = 5.5, sum ds^2 = 9.5
    assert c["spearman"] == pytest.approx(5.5 / math.sqrt(10 * 9.5), abs=1e-6)
    # Kendall tau-b: 6 concordant, 3 discordant, 1 pair tied in human only, 10 pairs: 3 / sqrt(10 * 9)
    assert c["kendall"] == pytest.approx(3 / math.sqrt(90), abs=1e-6)


def test_correlations_undefined_for_constant_or_single_items():
    assert correlations([3, 3, 3], [1, 2, 5]) == {"pearson": None, "spearman": None, "kendall": None}
    assert correlations([4], [2])["pearson"] is None


def test_bootstrap_ci():
    errs = [0, 1, 2, 0, 2, 1, 1, 0]
    lo, hi = bootstrap_mae_ci(errs, samples=2000, seed=1)
    assert lo <= sum(errs) / len(errs) <= hi
    assert 0 <= lo < hi <= 2
    assert bootstrap_mae_ci(errs, samples=2000, seed=1) == (lo, hi)  # seeded
    lo90, hi90 = bootstrap_mae_ci(errs, samples=2000, seed=1, level=0.5)
    assert lo <= lo90 and hi90 <= hi  # a narrower level gives a narrower interval
    assert bootstrap_mae_ci([1.0, 1.0, 1.0], samples=100) == (1.0, 1.0)
    assert bootstrap_mae_ci([1.0]) is None
    assert bootstrap_mae_ci(errs, samples=0) is None


def test_confusion_matrix_rows_are_rounded_reference():
    m = confusion_matrix([1, 5, 3, 3], [1, 4.5, 2.5, 2.4])
    assert m[0][0] == 1  # reference 1, predicted 1
    assert m[4][4] == 1  # reference 4.5 rounds half up to 5
    assert m[2][2] == 1  # 2.5 -> 3
    assert m[1][2] == 1  # 2.4 -> 2
    assert sum(map(sum, m)) == 4


def _item(i, task, score, split=None):
    p = Path("/nonexistent")
    if task == "generation":
        return BenchItem(f"i{i}", task, score, prompt="p", image=p, split=split)
    return BenchItem(f"i{i}", task, score, instruction="x", source=p, edited=p)


def test_parse_failures_are_counted_and_excluded():
    items = [_item(i, "edit-execution", h) for i, h in enumerate([2, 2, 5, 4, 3, 1])]
    preds = [Prediction(it.id, s) for it, s in zip(items, PRED + [None])]
    preds[-1].error = "no score found"
    m = group_metrics(list(zip(items, preds)), bootstrap_samples=200)
    assert (m["n_items"], m["n_parsed"], m["n_failed"]) == (6, 5, 1)
    assert m["parse_failure_rate"] == pytest.approx(1 / 6)
    assert m["mae"] == pytest.approx(1.0)  # the failure (reference 1) is not counted as any score
    assert m["exact_match"] == pytest.approx(2 / 5)
    assert m["mae_ci"][0] <= 1.0 <= m["mae_ci"][1]
    allfail = group_metrics([(items[0], Prediction("i0", None, "x"))])
    assert allfail["mae"] is None and allfail["parse_failure_rate"] == 1.0


def test_compute_metrics_groups():
    items = [
        _item(0, "edit-execution", 5),
        _item(1, "edit-execution", 3),
        _item(2, "edit-consistency", 4),
        _item(3, "generation", 2, "easy"),
        _item(4, "generation", 1, "hard"),
        _item(5, "generation", 5, "hard"),
    ]
    scores = [4, 3, 2, 2, 3, None]
    preds = {it.id: Prediction(it.id, s) for it, s in zip(items, scores)}
    r = compute_metrics(items, preds, bootstrap_samples=100)
    g = r["groups"]
    assert list(g) == [
        "edit-execution", "edit-consistency", "edit", "generation", "generation/easy", "generation/hard", "overall"
    ]  # fmt: skip
    assert g["edit-execution"]["mae"] == pytest.approx(0.5)  # |4-5|, |3-3|
    assert g["edit-consistency"]["mae"] == pytest.approx(2.0)
    assert g["edit"]["mae"] == pytest.approx(3 / 3)  # pooled: (1 + 0 + 2) / 3
    assert g["generation"]["mae"] == pytest.approx(1.0)  # (0 + 2) / 2, one failure excluded
    assert g["generation"]["n_failed"] == 1
    assert g["generation/hard"]["n_parsed"] == 1 and g["generation/hard"]["mae"] == pytest.approx(2.0)
    assert g["overall"]["mae"] == pytest.approx((1 + 0 + 2 + 0 + 2) / 5)
    assert sum(map(sum, r["confusion"])) == 5
    with pytest.raises(ValueError, match="no prediction"):
        compute_metrics(items, {})
