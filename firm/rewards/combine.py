"""Score normalisation and the Base-and-Bonus reward formulas (CME, QMA) plus naive baselines.

Critic scores are integers 1..5; :func:`normalize_score` maps them to [0, 1] with ``(s - 1) / 4``. The combiners
take normalised scores and return a reward in [0, 1]:

    CME = Execution   * (w1 + w2 * Consistency) / (w1 + w2)    w1 = 0.6, w2 = 0.4   (editing)
    QMA = Instruction * (w1 + w2 * Quality)     / (w1 + w2)    w1 = 0.4, w2 = 0.6   (generation)

The *base* (Execution, Instruction) gates the reward: an editor that copies its input (Execution 0, Consistency 1)
gets 0 under CME, while the plain sum ``0.5 * E + 0.5 * C`` pays it 0.5 (the "lazy editor" hack).

Every function works on Python numbers and on tensors. A missing score is NaN, and NaN in gives NaN out: a missing
judgement is never silently turned into a number.
"""

from __future__ import annotations

import math
from typing import TypeAlias

import torch

Score: TypeAlias = "float | int | None | torch.Tensor"


def _clamp01(x: float | torch.Tensor) -> float | torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.clamp(0.0, 1.0)  # clamp keeps NaN as NaN
    if math.isnan(x):
        return math.nan
    return min(1.0, max(0.0, x))


def _as_number(x: Score, what: str) -> float | torch.Tensor:
    if x is None:
        return math.nan
    if isinstance(x, torch.Tensor):
        return x if x.is_floating_point() else x.float()
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise TypeError(f"{what} must be a number, None or a tensor, got {type(x).__name__}: {x!r}")
    return float(x)


def _check_weights(w1: float, w2: float, formula: str) -> None:
    if w1 < 0 or w2 < 0 or w1 + w2 <= 0:
        raise ValueError(f"{formula}: weights must be >= 0 with a positive sum, got w1={w1}, w2={w2}")


def normalize_score(s: Score, lo: float = 1, hi: float = 5) -> float | torch.Tensor:
    """Map a critic score from ``[lo, hi]`` to ``[0, 1]``: ``(s - lo) / (hi - lo)``.

    Args:
        s: a score (int/float), ``None`` for a missing score (gives NaN), or a tensor (NaN entries stay NaN;
            integer tensors are converted to float32).
        lo: the lowest score of the rubric.
        hi: the highest score of the rubric.

    Returns:
        The normalised score; a float for numbers, a float tensor for tensors. Not clamped: out-of-range scores
        map outside [0, 1] (the combiners clamp).
    """
    if hi <= lo:
        raise ValueError(f"normalize_score: need hi > lo, got lo={lo}, hi={hi}")
    x = _as_number(s, "score")
    return (x - lo) / (hi - lo)


def base_and_bonus(base: Score, bonus: Score, w1: float, w2: float) -> float | torch.Tensor:
    """``base * (w1 + w2 * bonus) / (w1 + w2)``, clamped to [0, 1]; NaN in either input gives NaN."""
    _check_weights(w1, w2, "base_and_bonus")
    b, m = _as_number(base, "base"), _as_number(bonus, "bonus")
    return _clamp01(b * (w1 + w2 * m) / (w1 + w2))


def cme(execution: Score, consistency: Score, w1: float = 0.6, w2: float = 0.4) -> float | torch.Tensor:
    """Consistency-Modulated Execution: ``E * (w1 + w2 * C) / (w1 + w2)`` on normalised scores.

    Args:
        execution: normalised Execution score(s) in [0, 1] (NaN or None when missing).
        consistency: normalised Consistency score(s) in [0, 1].
        w1: weight of the part paid for execution alone.
        w2: weight of the part paid only when the rest of the image is kept.

    Returns:
        The reward in [0, 1] (NaN where an input is missing), a float or a tensor broadcast from the inputs.
    """
    _check_weights(w1, w2, "cme")
    return base_and_bonus(execution, consistency, w1, w2)


def qma(instruction: Score, quality: Score, w1: float = 0.4, w2: float = 0.6) -> float | torch.Tensor:
    """Quality-Modulated Alignment: ``I * (w1 + w2 * Q) / (w1 + w2)`` on normalised scores.

    Args:
        instruction: normalised Instruction-following score(s) in [0, 1] (NaN or None when missing).
        quality: normalised Quality score(s) in [0, 1].
        w1: weight of the part paid for instruction following alone.
        w2: weight of the part paid only for a good-looking image.

    Returns:
        The reward in [0, 1] (NaN where an input is missing), a float or a tensor.
    """
    _check_weights(w1, w2, "qma")
    return base_and_bonus(instruction, quality, w1, w2)


def weighted_sum(components: dict[str, Score], weights: dict[str, float]) -> float | torch.Tensor:
    """The naive baseline ``sum_k w_k * x_k / sum_k w_k`` (e.g. ``0.5 * E + 0.5 * C``), clamped to [0, 1].

    Weights are divided by their sum, so ``{execution: 1, consistency: 1}`` and ``{execution: 0.5,
    consistency: 0.5}`` are the same reward. NaN in any weighted component gives NaN.

    Args:
        components: normalised scores per dimension (numbers, None or tensors).
        weights: weight per dimension; every weighted dimension must be present in ``components``.
    """
    if not weights:
        raise ValueError("weighted_sum: give at least one weight")
    missing = [k for k in weights if k not in components]
    if missing:
        raise KeyError(f"weighted_sum: no component named {missing} (have: {sorted(components)})")
    if any(w < 0 for w in weights.values()) or sum(weights.values()) <= 0:
        raise ValueError(f"weighted_sum: weights must be >= 0 with a positive sum, got {weights}")
    total = sum(weights.values())
    out: float | torch.Tensor = 0.0
    for k, w in weights.items():
        out = out + (w / total) * _as_number(components[k], k)
    return _clamp01(out)
