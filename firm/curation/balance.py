"""Balancing the score histogram of curated data: how many rewrites to make, and which samples to keep.

Low scores are scarce in model outputs, and a critic trained on mostly-5 data learns to say 5. Balancing has two
steps, both deterministic functions of the scores and a seed (so a resumed run makes the same choices):

1. **Rewrites** (:func:`plan_rewrites`): with ``N`` scored samples, ``c_s`` of them at score ``s`` and target shares
   ``p_s``, the deficit is ``D = sum_s max(0, p_s * N - c_s)``. ``min(D, max_rewrite_fraction * N)`` samples are
   drawn from the scores that exceed their share (in proportion to the excess) and get an instruction / prompt
   their image does not satisfy; the rewritten samples are judged again and mostly land in the low scores.
2. **Selection** (:func:`select`): each score ``s`` with a positive share could support an output of
   ``M_s = c_s / p_s`` samples. The output size ``M`` is a quantile of the ``M_s``: with ``fill = 1`` it is their
   minimum (every score gets exactly its share; the scarcest score limits the size), with ``fill = 0.5`` their
   median (half of the scores reach their share, the scarcer ones contribute all they have), with ``fill = 0``
   their maximum (nothing is dropped). Score ``s`` keeps ``min(c_s, floor(M * p_s))`` samples. Scores with no
   samples at all are dropped from the target with a warning.

Within a score, samples are taken in the order of a seeded hash of their key.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

SCORES = (1, 2, 3, 4, 5)


@dataclass
class BalanceConfig:
    """Target score histogram and how to reach it."""

    enabled: bool = False  # balance the output (otherwise the scored shards are the output)
    dimension: str | None = None  # score to balance; None: execution (edit) / instruction (generation)
    target: dict[int, float] = field(default_factory=dict)  # share of each score 1..5 (normalised); empty: uniform
    rewrite: bool = True  # synthesise low scores by rewriting texts (needs teachers.rewriter)
    max_rewrite_fraction: float = 0.5  # rewrite at most this share of the scored samples
    fill: float = 1.0  # 1: exact target shares (scarcest score limits the size) ... 0: keep all; see balance.py
    max_samples: int | None = None  # cap on the balanced output
    seed: int = 0  # seed of the choices within a score

    def shares(self) -> dict[int, float]:
        """The target as normalised shares of 1..5."""
        raw = {int(k): float(v) for k, v in (self.target or {}).items()} or dict.fromkeys(SCORES, 1.0)
        bad = [k for k in raw if k not in SCORES]
        if bad or any(v < 0 or not math.isfinite(v) for v in raw.values()):
            raise ValueError(f"balance.target: keys must be scores 1..5 and shares >= 0, got {dict(raw)}")
        total = sum(raw.values())
        if total <= 0:
            raise ValueError("balance.target: the shares sum to 0")
        return {s: raw.get(s, 0.0) / total for s in SCORES}


def order_key(key: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def by_score(scores: Mapping[str, int | None]) -> dict[int, list[str]]:
    """Keys grouped by score (missing scores left out), each list in key order."""
    out: dict[int, list[str]] = {s: [] for s in SCORES}
    for k in sorted(scores):
        v = scores[k]
        if v in out:
            out[v].append(k)
    return out


def plan_rewrites(
    scores: Mapping[str, int | None], shares: Mapping[int, float], max_fraction: float, seed: int
) -> list[str]:
    """The keys to rewrite (see the module docstring)."""
    groups = by_score(scores)
    n = sum(len(v) for v in groups.values())
    if n == 0:
        return []
    deficit = sum(max(0.0, shares[s] * n - len(groups[s])) for s in SCORES)
    budget = min(int(round(deficit)), int(max_fraction * n))
    excess = {s: len(groups[s]) - shares[s] * n for s in SCORES if len(groups[s]) > shares[s] * n}
    total_excess = sum(excess.values())
    if budget <= 0 or total_excess <= 0:
        return []
    picks: list[str] = []
    for s, e in sorted(excess.items(), key=lambda kv: -kv[0]):  # highest scores first
        take = min(len(groups[s]), int(round(budget * e / total_excess)))
        picks += sorted(groups[s], key=lambda k: order_key(k, seed))[:take]
    return sorted(picks[:budget])


def select(
    scores: Mapping[str, int | None],
    shares: Mapping[int, float],
    seed: int,
    max_samples: int | None = None,
    fill: float = 1.0,
) -> set[str]:
    """The kept keys: the largest subset following ``shares`` (see the module docstring)."""
    groups = by_score(scores)
    active = {s: p for s, p in shares.items() if p > 0}
    empty = [s for s in active if not groups[s]]
    if empty:
        log.warning("balance: no sample has score %s; dropping it from the target", empty)
        active = {s: p for s, p in active.items() if groups[s]}
    if not active:
        return set()
    z = sum(active.values())
    active = {s: p / z for s, p in active.items()}
    if not 0.0 <= fill <= 1.0:
        raise ValueError(f"balance.fill must be in [0, 1], got {fill}")
    supports = sorted(len(groups[s]) / p for s, p in active.items())  # M_s
    m = supports[int(round((1.0 - fill) * (len(supports) - 1)))]
    if max_samples is not None:
        m = min(m, float(max_samples))
    keep: set[str] = set()
    for s, p in active.items():
        take = min(len(groups[s]), int(math.floor(m * p + 1e-9)))
        keep.update(sorted(groups[s], key=lambda k: order_key(k, seed))[:take])
    return keep
