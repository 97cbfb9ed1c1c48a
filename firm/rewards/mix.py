"""The reward mix: several scorers' scores -> one reward per sample (and, for GDPO, one term per scorer).

Each scorer in the mix contributes one *term*: its chosen output (``score:``, default its primary), mapped by
``scale * score + shift`` (e.g. PickScore / 26 as Flow-GRPO does), with a weight. Two ways to turn terms into
advantages (``module.reward_mix``):

* ``weighted`` (default): the reward is ``sum_k weight_k * term_k`` and the RL step normalises it per prompt group as
  usual. This is the multi-reward dict of Flow-GRPO and DiffusionNFT (``multi_score`` in flow_grpo/rewards.py sums
  ``weight * score`` without dividing by the weights' sum). With one scorer of weight 1 it is that scorer's score.
* ``gdpo``: each term is normalised per prompt group first, then the weighted sum of those is normalised over the
  batch (GDPO, "Group reward-Decoupled Normalization Policy Optimization"; Flow-Factory's
  ``advantage_aggregation: gdpo``). The reward logged is still the weighted sum; :func:`gdpo_advantages` makes the
  advantages.

A score that could not be computed is NaN, and so is every reward it enters: the sample is left out of its group
and of the loss (``module.reward_failure: skip``, the default), or the run stops at the first one
(``reward_failure: stop``). A scorer call that raises (a dead endpoint, an out-of-memory error) makes the mix raise
for that chunk; the RL step's ``module.critic_failure`` then decides whether it stops the run (``raise``, the default)
or counts the chunk as missing (``missing``; logged as ``reward/critic_failures``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from firm.rewards.functions import RewardOutput
from firm.rewards.scorers.base import Scorer, Scores, build_scorer

log = logging.getLogger(__name__)

MIX_MODES = ("weighted", "gdpo")
FAILURE_POLICIES = ("skip", "stop")
CALL_FAILURES = ("raise", "missing")


class RewardStopped(RuntimeError):
    """A score failed and ``reward_failure: stop`` asks the run to end (never turned into a missing chunk)."""


@dataclass(frozen=True)
class Term:
    """One scorer's contribution to the mix."""

    label: str  # the scorer's key in ``module.rewards``
    output: str  # which of its outputs
    weight: float
    scale: float
    shift: float


def _with_task(spec: Any, task: str) -> Any:
    """A scorer section with ``task`` filled in where its scorer (or a wrapped ``inner`` one) is a critic."""
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if spec.get("name") == "critic" and not spec.get("task"):
            spec["task"] = task
        if isinstance(spec.get("inner"), Mapping):
            spec["inner"] = _with_task(spec["inner"], task)
    elif getattr(spec, "name", None) == "critic" and not getattr(spec, "task", ""):
        spec.task = task
    elif getattr(spec, "name", None) == "delayed" and getattr(spec, "inner", None) is not None:
        spec.inner = _with_task(spec.inner, task)
    return spec


class RewardMix:
    """Scorers -> rewards: ``mix(requests) -> RewardOutput`` (a drop-in for the critic reward functions).

    Args:
        scorers: label -> a built :class:`Scorer`.
        mode: ``weighted`` or ``gdpo`` (see the module docstring).
        on_failure: ``skip`` or ``stop`` for scores that failed.
        parallel: score with every scorer at once on threads (scorers on different devices, or remote ones).
    """

    def __init__(
        self,
        scorers: Mapping[str, Scorer],
        *,
        mode: str = "weighted",
        on_failure: str = "skip",
        parallel: bool = False,
    ) -> None:
        if not scorers:
            raise ValueError("the reward mix needs at least one scorer (module.rewards, or module.critic)")
        if mode not in MIX_MODES:
            raise ValueError(f"reward_mix: must be one of {MIX_MODES}, got {mode!r}")
        if on_failure not in FAILURE_POLICIES:
            raise ValueError(f"reward_failure: must be one of {FAILURE_POLICIES}, got {on_failure!r}")
        self.scorers = dict(scorers)
        self.mode, self.on_failure = mode, on_failure
        self.terms: list[Term] = []
        seen: dict[str, str] = {}
        for label, sc in self.scorers.items():
            c = sc.config
            self.terms.append(Term(label, sc.primary, float(c.weight), float(c.scale), float(c.shift)))
            for out in sc.outputs:
                if out in seen:
                    raise ValueError(
                        f"module.rewards: scorers {seen[out]!r} and {label!r} both output {out!r}; a mix can hold "
                        "one scorer per output name"
                    )
                seen[out] = label
        if all(t.weight == 0 for t in self.terms):
            raise ValueError("module.rewards: every weight is 0, so every reward would be 0")
        # A scorer of weight 0 is logged only: its scores (and failures) do not enter the reward.
        self.terms = [t for t in self.terms if t.weight != 0]
        self.dimensions = tuple(seen)  # every output, for logging and for missing chunks
        self.term_names = tuple(t.label for t in self.terms)
        self.weights = torch.tensor([t.weight for t in self.terms], dtype=torch.float32)
        self._pool = ThreadPoolExecutor(len(self.scorers), "firm-scorer") if parallel and len(scorers) > 1 else None

    @classmethod
    def build(cls, specs: Mapping[str, Any], *, task: str, **kwargs: Any) -> RewardMix:
        """A mix from ``module.rewards``-style sections (label -> ``{name: ..., **settings}``); null sections are
        left out, and critic scorers get the RL task."""
        scorers = {
            label: spec if isinstance(spec, Scorer) else build_scorer(_with_task(spec, task), label=label)
            for label, spec in specs.items()
            if spec is not None
        }
        return cls(scorers, **kwargs)

    @property
    def tasks(self) -> tuple[str, ...]:
        """The request kinds every scorer of the mix can score."""
        return tuple(t for t in ("gen", "edit") if all(t in s.tasks for s in self.scorers.values()))

    def _score_all(self, requests: list[Any]) -> dict[str, Scores]:
        if self._pool is None:
            return {label: sc(requests) for label, sc in self.scorers.items()}
        futs = {label: self._pool.submit(sc, requests) for label, sc in self.scorers.items()}
        return {label: f.result() for label, f in futs.items()}

    def __call__(self, requests: Sequence[Any]) -> RewardOutput:
        """Score ``requests`` with every scorer and mix; one reward per request, in order."""
        requests = list(requests)
        n = len(requests)
        outs = self._score_all(requests)
        failed = [(label, o.call_errors[0]) for label, o in outs.items() if o.call_errors]
        if failed:  # the caller decides: the RL step's critic_failure (raise, or a missing chunk)
            label, err = failed[0]
            raise RuntimeError(f"scorer {label!r} failed: {err}")
        components = {k: v for o in outs.values() for k, v in o.values.items()}
        terms = {t.label: t.scale * outs[t.label].values[t.output] + t.shift for t in self.terms}
        rewards = torch.zeros(n, dtype=torch.float32)
        for t in self.terms:
            rewards = rewards + t.weight * terms[t.label]  # NaN in any term gives NaN
        bad = torch.isnan(rewards)
        if bool(bad.any()):
            i = int(bad.nonzero()[0])
            why = "; ".join(f"{label}: {o.errors[i]}" for label, o in outs.items() if o.errors[i]) or "no score"
            if self.on_failure == "stop":
                raise RewardStopped(
                    f"{int(bad.sum())} of {n} rewards failed (request {i}: {why}); reward_failure=stop ends the run "
                    "(reward_failure=skip leaves such samples out of their group instead)"
                )
            log.warning("%d of %d rewards missing (request %d: %s)", int(bad.sum()), n, i, why)
        if len(outs) == 1:
            results = next(iter(outs.values())).details
        else:
            results = [{label: o.details[i] for label, o in outs.items()} for i in range(n)]
        missing = {k: int(torch.isnan(v).sum()) for k, v in components.items()}
        return RewardOutput(rewards=rewards, components=components, missing=missing, results=results, terms=terms)

    def close(self) -> None:
        """Stop the mix's threads and close every scorer that holds connections or threads of its own."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
        for sc in self.scorers.values():
            close = getattr(sc, "close", None)
            if callable(close):
                close()

    def __repr__(self) -> str:
        parts = ", ".join(f"{t.label}: {t.weight:g} x {t.output}" for t in self.terms)
        return f"RewardMix({self.mode}; {parts})"


def gdpo_advantages(
    terms: torch.Tensor,
    groups: torch.Tensor,
    weights: torch.Tensor,
    *,
    std_floor: float = 1e-6,
    zero_std_eps: float = 1e-6,
) -> torch.Tensor:
    """GDPO advantages of a whole batch: per-term group z-scores, weighted, summed, then z-scored over the batch.

    For term k of sample i in prompt group g: ``z_k = (r_k - mean_g(r_k)) / max(std_g(r_k), std_floor)``; then
    ``a = sum_k w_k z_k`` and ``A = (a - mean(a)) / max(std(a), std_floor)``, population stds throughout (as
    Flow-Factory's ``compute_gdpo``, flow_factory/advantage/advantage_processor.py). Samples with a missing term take
    no part in any statistic and get advantage 0. Computed in float64, and a term whose std within a group is below
    ``zero_std_eps`` gives that group exactly 0: a constant term carries no preference (in float32 its rounding noise,
    divided by the floor, would).

    Args:
        terms: (N, K) float, NaN where missing.
        groups: (N,) int prompt-group labels.
        weights: (K,) weights.

    Returns:
        (N,) float32 advantages.
    """
    out_device = terms.device
    terms = terms.to(torch.float64)
    valid = ~torch.isnan(terms).any(dim=1)
    adv = torch.zeros(terms.shape[0], dtype=torch.float64, device=terms.device)
    if not bool(valid.any()):
        return adv.to(torch.float32)
    r, g = terms[valid], groups[valid]
    _, inv = torch.unique(g, return_inverse=True)
    n_groups = int(inv.max()) + 1
    f64 = {"dtype": torch.float64, "device": r.device}
    count = torch.zeros(n_groups, **f64).index_add_(0, inv, torch.ones(inv.shape[0], **f64))
    mean = torch.zeros(n_groups, r.shape[1], **f64).index_add_(0, inv, r) / count[:, None]
    dev = r - mean[inv]
    std = (torch.zeros(n_groups, r.shape[1], **f64).index_add_(0, inv, dev * dev) / count[:, None]).sqrt()
    z = torch.where(std[inv] < zero_std_eps, torch.zeros_like(dev), dev / std.clamp_min(std_floor)[inv])
    a = (z * weights.to(z)).sum(dim=1)
    a = (a - a.mean()) / a.std(unbiased=False).clamp_min(std_floor)
    adv[valid] = a
    return adv.to(device=out_device, dtype=torch.float32)
