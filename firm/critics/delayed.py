"""A latency-injecting critic wrapper: another critic's judgements, answered ``seconds`` later.

An 8B vision-language judge takes seconds per batch of requests; the tiny CPU critics take milliseconds. Wrapping a
fast critic in ``delayed`` gives the RL step the timing of a slow one, for ``firm profile step`` and for tests of the
asynchronous rollout:

    critic: {name: delayed, inner: {name: image_stats}, seconds: 1.5}

Each ``score`` call sleeps ``seconds + per_request * len(requests)`` (on the critic's worker thread, so sampling and
training go on meanwhile) and then returns the inner critic's results unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from firm.config import component_field
from firm.critics.factory import build_critic
from firm.critics.types import CriticRequest, CriticResult


class DelayedCritic:
    """``inner``'s judgements after a fixed delay per call (registry name ``delayed``)."""

    @dataclass
    class Config:
        name: str = "delayed"
        inner: Any = component_field("critics")  # the critic whose answers are delayed: {name: ..., ...}
        seconds: float = 1.0  # added latency per score() call
        per_request: float = 0.0  # added latency per request of the call

    def __init__(self, config: Config) -> None:
        if config.seconds < 0 or config.per_request < 0:
            raise ValueError(f"delayed critic: latencies must be >= 0, got {config.seconds}, {config.per_request}")
        self.config = config
        self.inner = build_critic(config.inner)

    def score(self, requests: list[CriticRequest]) -> list[CriticResult]:
        time.sleep(self.config.seconds + self.config.per_request * len(requests))
        return self.inner.score(requests)
