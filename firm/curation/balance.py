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

**Joint balancing** (:func:`select_joint`, ``balance.joint``): the primary dimension and each joint dimension
(e.g. Execution and Consistency) get their own target shares, and one subset has to follow all of them. Balancing
the dimensions one after the other does not work when they are correlated (a failed edit that leaves the image
untouched is Execution 1 and Consistency 5), so the samples are weighted first and selected after:

1. *Eligible samples*: a sample counts only if it has a score in every balanced dimension and every one of those
   scores has a positive share. A target score that no eligible sample has is dropped from its dimension's target
   (with a warning) and the rest renormalised, as in :func:`select`.
2. *Raking* (iterative proportional fitting): the eligible samples fall into cells, one per combination of
   scores. Starting from the observed cell frequencies, the weights of the cells are rescaled, one dimension
   after the other, so that the weighted histogram of that dimension equals its target, until every dimension
   matches (the result is the distribution closest to the data, in relative entropy, with the target
   histograms). All samples of a cell share one weight. When the targets cannot be met together (a score of one
   dimension only occurs with scores of another whose targets are too small), the fit stops after a fixed number
   of sweeps and a warning gives the largest remaining gap.
3. *Size and counts*: with ``pi_c`` the fitted share of cell ``c`` and ``n_c`` its samples, the cell could
   support an output of ``M_c = n_c / pi_c`` samples. As in :func:`select`, the output size ``M`` is the
   ``(1 - fill)`` quantile of the ``M_c`` (fill 1: their minimum, every dimension gets its target histogram;
   fill 0: their maximum, everything eligible is kept), capped at ``max_samples``, and cell ``c`` keeps
   ``t_c = min(n_c, M * pi_c)`` samples. ``t_c`` is rounded down or up at random (up with probability its
   fractional part, from a seeded hash of the cell), so with fill 1 a score's count is off its share of ``M`` by
   less than the number of cells holding that score. (Keeping each sample independently with probability
   ``t_c / n_c`` has the same expectation but adds binomial noise of order ``sqrt(t_c)`` per cell.)
   Like :func:`select` at fill 1, the fit is kept as it is, so the cell that can least afford its fitted share
   limits the size: a larger subset with the same histograms can exist, but only by giving up the fitted
   proportions between the cells (e.g. dropping combinations of scores); lower ``fill`` to keep more.
4. Within a cell, samples are taken in the order of the seeded hash of their key.

With a single dimension, :func:`select_joint` is :func:`select`.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

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
    # more dimensions balanced together with `dimension`, each with its target shares like `target` (empty:
    # uniform), e.g. {consistency: {1: 0.2, 3: 0.2, 5: 0.6}}; see select_joint in balance.py
    joint: dict[str, dict[int, float]] = field(default_factory=dict)

    def shares(self) -> dict[int, float]:
        """The target as normalised shares of 1..5."""
        return normalise_shares(self.target, "balance.target")

    def targets(self, primary: str) -> dict[str, dict[int, float]]:
        """Normalised target shares of every balanced dimension: ``primary`` (with ``target``) first, then the
        ``joint`` dimensions in their order."""
        out = {primary: self.shares()}
        for dim, target in (self.joint or {}).items():
            if dim == primary:
                raise ValueError(
                    f"balance.joint.{dim}: {dim!r} is already the balanced dimension (balance.dimension); "
                    "its target is balance.target"
                )
            out[dim] = normalise_shares(target, f"balance.joint.{dim}")
        return out


def normalise_shares(target: Mapping[int, float] | None, where: str) -> dict[int, float]:
    """Shares of 1..5 that sum to 1 (an empty target: uniform); ``where`` names the setting in errors."""
    raw = {int(k): float(v) for k, v in (target or {}).items()} or dict.fromkeys(SCORES, 1.0)
    bad = [k for k in raw if k not in SCORES]
    if bad or any(v < 0 or not math.isfinite(v) for v in raw.values()):
        raise ValueError(f"{where}: keys must be scores 1..5 and shares >= 0, got {dict(raw)}")
    total = sum(raw.values())
    if total <= 0:
        raise ValueError(f"{where}: the shares sum to 0")
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


RAKE_SWEEPS = 5000  # at most this many rounds of rescaling every dimension
RAKE_TOL = 1e-10  # stop when every weighted share is this close to its target
RAKE_WARN = 1e-3  # warn when a share is further than this from its target after the last sweep


def _uniform(seed: int, label: str) -> float:
    """A deterministic number in [0, 1) from the seed and a label."""
    return int(hashlib.sha256(f"{seed}:{label}".encode()).hexdigest()[:16], 16) / 2.0**64


def rake(counts: np.ndarray, targets: list[np.ndarray]) -> tuple[np.ndarray, float]:
    """Iterative proportional fitting: cell shares ``pi`` (zero where ``counts`` is) whose histogram along axis
    ``i`` is ``targets[i]``, starting from ``counts / counts.sum()``. Returns ``pi`` and the largest gap
    ``max_i max_s |sum(pi along axis i at s) - targets[i][s]|`` left when the fit stopped."""
    pi = counts / counts.sum()
    axes = range(counts.ndim)
    gap = math.inf
    for _ in range(RAKE_SWEEPS):
        for i, q in enumerate(targets):
            margin = pi.sum(axis=tuple(a for a in axes if a != i))
            factor = np.divide(q, margin, out=np.zeros_like(q), where=margin > 0)
            shape = [1] * counts.ndim
            shape[i] = -1
            pi *= factor.reshape(shape)
        gap = max(float(np.abs(pi.sum(axis=tuple(a for a in axes if a != i)) - q).max()) for i, q in enumerate(targets))
        if gap < RAKE_TOL:
            break
    return pi, gap


def select_joint(
    scores: Mapping[str, Mapping[str, int | None] | None],
    targets: Mapping[str, Mapping[int, float]],
    seed: int,
    max_samples: int | None = None,
    fill: float = 1.0,
) -> set[str]:
    """The kept keys: a subset whose histogram in every dimension of ``targets`` follows that dimension's shares
    (see the module docstring). ``scores`` maps each key to its scores by dimension; ``targets`` maps each balanced
    dimension to its shares of 1..5 (e.g. from :meth:`BalanceConfig.targets`)."""
    dims = list(targets)
    if not dims:
        raise ValueError("balance: no dimension to balance")
    if not 0.0 <= fill <= 1.0:
        raise ValueError(f"balance.fill must be in [0, 1], got {fill}")
    if len(dims) == 1:
        d = dims[0]
        return select({k: (v or {}).get(d) for k, v in scores.items()}, targets[d], seed, max_samples, fill)

    # 1. eligible samples, grouped by their cell (one score per dimension)
    cells: dict[tuple[int, ...], list[str]] = {}
    for key in sorted(scores):
        row = scores[key] or {}
        cell = tuple(row.get(d) for d in dims)
        if all(s in SCORES and targets[d].get(s, 0.0) > 0 for d, s in zip(dims, cell)):
            cells.setdefault(cell, []).append(key)
    if not cells:
        log.warning("balance: no sample has a score with a positive share in every dimension of %s", dims)
        return set()
    wanted: list[np.ndarray] = []
    for i, d in enumerate(dims):
        present = {c[i] for c in cells}
        active = {s: p for s, p in targets[d].items() if p > 0}
        empty = sorted(s for s in active if s not in present)
        if empty:
            log.warning("balance: no sample has %s score %s; dropping it from the target", d, empty)
        z = sum(p for s, p in active.items() if s in present)
        wanted.append(np.array([active.get(s, 0.0) / z if s in present else 0.0 for s in SCORES]))

    # 2. raking
    counts = np.zeros((len(SCORES),) * len(dims))
    for cell, keys in cells.items():
        counts[tuple(s - 1 for s in cell)] = len(keys)
    pi, gap = rake(counts, wanted)
    if gap > RAKE_WARN:
        log.warning(
            "balance: the targets of %s cannot all be met by these samples (a weighted share is still %.3f off its "
            "target); the selection follows them as closely as the fit got",
            dims,
            gap,
        )

    # 3. output size and the count of each cell
    share = {cell: float(pi[tuple(s - 1 for s in cell)]) for cell in cells}
    supports = sorted(len(keys) / share[cell] if share[cell] > 0 else math.inf for cell, keys in cells.items())
    m = supports[int(round((1.0 - fill) * (len(supports) - 1)))]
    if max_samples is not None:
        m = min(m, float(max_samples))
    take: dict[tuple[int, ...], int] = {}
    rounded_up: list[tuple[float, tuple[int, ...]]] = []
    for cell, keys in cells.items():
        t = float(len(keys)) if math.isinf(m) else min(len(keys), m * share[cell])
        whole = int(math.floor(t + 1e-9))
        u = _uniform(seed, f"cell:{cell}")
        take[cell] = whole
        if whole < len(keys) and u < t - whole:
            take[cell] += 1
            rounded_up.append((u, cell))
    if max_samples is not None:
        # the rounded-down counts sum to at most max_samples; give back round-ups (largest draw first) if needed
        over = sum(take.values()) - max_samples
        for _, cell in sorted(rounded_up, reverse=True)[: max(0, over)]:
            take[cell] -= 1

    # 4. which samples of each cell
    keep: set[str] = set()
    for cell, keys in cells.items():
        keep.update(sorted(keys, key=lambda k: order_key(k, seed))[: take[cell]])
    return keep
