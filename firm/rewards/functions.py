"""Reward functions for RL: ask a critic, normalise its 1..5 scores, combine them (CME / QMA / baselines).

``FirmEditReward(critic, combiner)(edit_requests)`` and ``FirmGenReward(critic, combiner)(gen_requests)`` return a
:class:`RewardOutput` with one reward per request (NaN where the critic gave no usable score), every normalised
component for logging, counts of missing scores and the critic's raw results.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from firm.config import build_component
from firm.critics.types import (
    EDIT_DIMENSIONS,
    GEN_DIMENSIONS,
    Critic,
    CriticResult,
    EditRequest,
    GenRequest,
    check_score,
)
from firm.rewards.combine import normalize_score
from firm.rewards.combiners import CMEReward, Combiner, QMAReward

log = logging.getLogger(__name__)


@dataclass
class RewardOutput:
    """Rewards for a batch of requests and everything needed to log and debug them.

    Attributes:
        rewards: (N,) float32 rewards in [0, 1]; NaN where a component the combiner needs is missing.
        components: per dimension, (N,) float32 normalised scores in [0, 1]; NaN where missing.
        missing: per dimension, how many of the N requests got no usable score.
        results: per request, in order: the critic's result (reasoning, raw output, errors, latency), or what the
            scorers of a reward mix report.
        terms: a reward mix's terms (scorer label -> (N,) scaled score), for GDPO advantages; empty otherwise.
    """

    rewards: torch.Tensor
    components: dict[str, torch.Tensor]
    missing: dict[str, int]
    results: list[Any] = field(default_factory=list)
    terms: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_missing(self) -> int:
        """Requests whose reward is NaN."""
        return int(torch.isnan(self.rewards).sum())

    @property
    def valid(self) -> torch.Tensor:
        """(N,) bool mask of requests with a reward."""
        return ~torch.isnan(self.rewards)

    def metrics(self, prefix: str = "reward/") -> dict[str, float]:
        """Scalars to log: mean reward and components over the scored samples, and missing fractions."""
        n = max(len(self.rewards), 1)
        out = {f"{prefix}mean": _nanmean(self.rewards), f"{prefix}missing_frac": self.num_missing / n}
        for k, v in self.components.items():
            out[f"{prefix}{k}"] = _nanmean(v)
            out[f"{prefix}{k}_missing_frac"] = self.missing[k] / n
        return out


def _nanmean(x: torch.Tensor) -> float:
    ok = ~torch.isnan(x)
    return float(x[ok].mean()) if bool(ok.any()) else math.nan


def build_combiner(config: Any) -> Combiner:
    """A combiner from its config: a registered ``Config`` instance, or a mapping with a ``name:`` key.

    Example: ``build_combiner({"name": "cme", "w1": 0.6, "w2": 0.4})``.
    """
    cls, conf = build_component("rewards", config, source="reward")
    return cls(conf)


class _CriticReward:
    kind: type = EditRequest
    all_dimensions: tuple[str, ...] = ()
    default_combiner: type = Combiner

    def __init__(
        self,
        critic: Critic,
        combiner: Combiner | Any | None = None,
        *,
        dimensions: Sequence[str] | None = None,
        score_range: tuple[int, int] = (1, 5),
        use_expected: bool = True,
    ) -> None:
        """
        Args:
            critic: any object with ``score(requests) -> list[CriticResult]`` (local model, HTTP client, rule critic).
            combiner: a combiner instance, or its config (``{"name": "cme", ...}``); default CME / QMA.
            dimensions: which judgements to ask the critic for. Default: every dimension of this task, so the
                components are logged even when the combiner uses fewer (e.g. ``execution_only``). Pass the
                combiner's ``inputs`` to save critic calls. Must include every input of the combiner.
            score_range: the rubric's lowest and highest score, for normalisation.
            use_expected: use a critic's expected scores (``details["expected_scores"]``, from the local
                backend's expected-score mode) instead of its integer scores when present.
        """
        if not callable(getattr(critic, "score", None)):
            raise TypeError(f"critic must have a score(requests) method, got {type(critic).__name__}")
        self.critic = critic
        if combiner is None:
            combiner = self.default_combiner()
        elif not callable(combiner):
            combiner = build_combiner(combiner)
        self.combiner = combiner
        inputs = tuple(getattr(combiner, "inputs", ()))
        self.dimensions = tuple(dimensions) if dimensions is not None else self.all_dimensions
        unknown = [d for d in (*self.dimensions, *inputs) if d not in self.all_dimensions]
        if unknown:
            raise ValueError(
                f"{type(self).__name__}: dimension(s) {unknown} are not judged for this task "
                f"(known: {list(self.all_dimensions)}); pick a combiner for this task"
            )
        lacking = [d for d in inputs if d not in self.dimensions]
        if lacking:
            raise ValueError(f"{type(self).__name__}: the combiner needs {lacking}; add them to `dimensions`")
        self.score_range = score_range
        self.use_expected = use_expected

    def __call__(self, requests: Sequence[Any]) -> RewardOutput:
        """Score ``requests`` with the critic and combine; one reward per request, in order."""
        requests = list(requests)
        for i, r in enumerate(requests):
            if not isinstance(r, self.kind):
                raise TypeError(
                    f"{type(self).__name__}: request {i} is a {type(r).__name__}, expected {self.kind.__name__}"
                )
        asked = [
            r if tuple(r.dimensions) == self.dimensions else dataclasses.replace(r, dimensions=self.dimensions)
            for r in requests
        ]
        results = self.critic.score(asked) if asked else []
        if len(results) != len(requests):
            raise RuntimeError(f"critic returned {len(results)} results for {len(requests)} requests")
        return self.combine_results(results)

    def _value(self, res: CriticResult, dim: str) -> float | None:
        """The score of ``dim``: the expected score when the critic gave one (and it is used), else the int."""
        score = check_score(res.scores.get(dim))
        if score is None:
            return None
        if self.use_expected:
            exp = res.details.get("expected_scores", {}).get(dim) if isinstance(res.details, dict) else None
            if isinstance(exp, (int, float)) and math.isfinite(exp):
                return float(exp)
        return float(score)

    def combine_results(self, results: Sequence[CriticResult]) -> RewardOutput:
        """Normalise and combine already computed critic results (e.g. cached or from another process)."""
        lo, hi = self.score_range
        components: dict[str, torch.Tensor] = {}
        missing: dict[str, int] = {}
        for dim in self.dimensions:
            raw = [self._value(res, dim) for res in results]  # None when absent or out of range
            missing[dim] = sum(v is None for v in raw)
            vals = torch.tensor([math.nan if v is None else float(v) for v in raw], dtype=torch.float32)
            components[dim] = normalize_score(vals, lo, hi)  # (N,)
        if results:
            rewards = self.combiner({k: components[k] for k in self.combiner.inputs}).to(torch.float32)
        else:
            rewards = torch.zeros(0, dtype=torch.float32)
        n_missing = int(torch.isnan(rewards).sum())
        if n_missing:
            log.warning(
                "%s: %d of %d rewards missing (%s)",
                type(self).__name__,
                n_missing,
                len(results),
                ", ".join(f"{k}: {v}" for k, v in missing.items() if v),
            )
        return RewardOutput(rewards=rewards, components=components, missing=missing, results=list(results))


class FirmEditReward(_CriticReward):
    """Editing reward: the critic judges Execution and Consistency; default combiner CME."""

    kind = EditRequest
    all_dimensions = EDIT_DIMENSIONS
    default_combiner = CMEReward


class FirmGenReward(_CriticReward):
    """Generation reward: the critic judges Instruction following and Quality; default combiner QMA."""

    kind = GenRequest
    all_dimensions = GEN_DIMENSIONS
    default_combiner = QMAReward
