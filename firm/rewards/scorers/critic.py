"""FIRM's critics as scorers, and a latency-injecting scorer wrapper.

:class:`CriticScorer` puts any critic backend (``local``, ``http``, ``shapes_rule``, ...) and its combiner (CME for
edits, QMA for generation, or a baseline) behind the scorer contract. Its outputs are the judged dimensions,
normalised to [0, 1] by ``(s - 1) / 4``, and the combined reward under the combiner's name (primary)::

    rewards:
      critic: {name: critic, critic: {name: http, endpoints: [...]}, reward: {name: cme}}

gives ``cme`` (used by the mix), ``execution`` and ``consistency``. The RL step's ``module.critic`` + ``module.reward``
sections are a shorthand for exactly this scorer, alone in the mix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from firm.config import component_field
from firm.critics.factory import build_critic
from firm.critics.types import EDIT_DIMENSIONS, GEN_DIMENSIONS
from firm.rewards.combiners import CMEReward, QMAReward
from firm.rewards.functions import FirmEditReward, FirmGenReward, build_combiner
from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, build_scorer
from firm.vocab import Task


def _combiner_name(combiner: Any) -> str:
    conf = getattr(combiner, "config", None)
    return str(getattr(conf, "name", None) or type(combiner).__name__.lower())


class CriticScorer(Scorer):
    """A FIRM critic and its combiner as one scorer (registry name ``critic``)."""

    concurrent = True  # as critics always were under critic_threads (an HTTP critic parallelises inside a call)

    @dataclass
    class Config(ScorerConfig):
        name: str = "critic"
        task: str = ""  # gen | edit; the RL step fills it in from module.task
        critic: Any = component_field("critics")  # the critic backend: {name: ..., **its settings}
        reward: Any = component_field("rewards", optional=True)  # its combiner (null: CME for edits, QMA for gen)
        dimensions: list[str] | None = None  # judgements to ask for (null: every dimension of the task)
        use_expected: bool = True  # use a critic's expected scores when it gives them (local expected-score mode)
        batch_size: int = 1 << 30  # the critic backend batches (and parallelises) its own calls

    def __init__(self, config: Config, *, critic: Any = None) -> None:
        super().__init__(config)
        if not config.task:
            raise ValueError("scorer 'critic': set task: gen or task: edit (the RL step sets it from module.task)")
        task = Task.parse(config.task)
        edit = task == Task.EDIT
        self.tasks = ("edit",) if edit else ("gen",)
        cls = FirmEditReward if edit else FirmGenReward
        combiner = build_combiner(config.reward) if config.reward is not None else (CMEReward if edit else QMAReward)()
        self.reward_fn = cls(
            critic if critic is not None else build_critic(config.critic),
            combiner,
            dimensions=config.dimensions,
            use_expected=config.use_expected,
        )
        self.combined = _combiner_name(combiner)
        dims = tuple(self.reward_fn.dimensions)
        if self.combined in dims or self.combined in (EDIT_DIMENSIONS + GEN_DIMENSIONS):
            raise ValueError(f"scorer 'critic': the combiner's name {self.combined!r} clashes with a dimension")
        self.outputs = (self.combined, *dims)

    @property
    def critic(self) -> Any:
        return self.reward_fn.critic

    def score_batch(self, requests: list[Any]) -> Scores:
        out = self.reward_fn(requests)
        errors = []
        for res in out.results:
            errs = getattr(res, "errors", {}) or {}
            errors.append("; ".join(f"{k}: {v}" for k, v in errs.items()) or None)
        values = {self.combined: out.rewards, **out.components}
        return Scores(values, errors, list(out.results))


class DelayedScorer(Scorer):
    """``inner``'s scores after a fixed delay per call (registry name ``delayed``): the timing of a slow reward model
    from a fast one, for ``firm profile step`` and the asynchronous-rollout tests. The mix weight and score choice of
    the wrapper apply; the inner scorer's are ignored."""

    @dataclass
    class Config(ScorerConfig):
        name: str = "delayed"
        inner: Any = component_field("scorers")  # the scorer whose answers are delayed: {name: ..., ...}
        seconds: float = 1.0  # added latency per call
        per_request: float = 0.0  # added latency per request of the call
        batch_size: int = 1 << 30

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.concurrent = True  # it sleeps; the inner scorer locks if it must
        if config.seconds < 0 or config.per_request < 0:
            raise ValueError(f"delayed scorer: latencies must be >= 0, got {config.seconds}, {config.per_request}")
        inner = config.inner
        self.inner = inner if isinstance(inner, Scorer) else build_scorer(inner, label="inner")
        self.outputs = self.inner.outputs
        self.tasks = self.inner.tasks

    def score_batch(self, requests: list[Any]) -> Scores:
        time.sleep(self.config.seconds + self.config.per_request * len(requests))
        return self.inner(requests)
