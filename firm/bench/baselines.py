"""Reference critics for benchmark tables: what a critic scores without looking at the images.

:class:`ConstantCritic` answers every judgement with a fixed score per dimension, e.g. the median of the training
labels. Its MAE is the floor a trained critic must beat to show that it learned more than the score prior.
"""

from __future__ import annotations

from dataclasses import dataclass

from firm.critics.types import (
    CONSISTENCY,
    EXECUTION,
    INSTRUCTION,
    QUALITY,
    SCORE_MAX,
    SCORE_MIN,
    CriticRequest,
    CriticResult,
)


class ConstantCritic:
    """The same score for every request, per dimension (a prior-only baseline; it never reads the images)."""

    @dataclass
    class Config:
        name: str = "constant"
        execution: int = 3  # score given for Execution
        consistency: int = 5  # score given for Consistency
        instruction: int = 3  # score given for Instruction following
        quality: int = 5  # score given for Quality

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self.scores = {
            EXECUTION: self.config.execution,
            CONSISTENCY: self.config.consistency,
            INSTRUCTION: self.config.instruction,
            QUALITY: self.config.quality,
        }
        bad = {k: v for k, v in self.scores.items() if not SCORE_MIN <= v <= SCORE_MAX}
        if bad:
            raise ValueError(f"constant critic: scores must be in {SCORE_MIN}..{SCORE_MAX}, got {bad}")

    def score(self, requests: list[CriticRequest]) -> list[CriticResult]:
        return [
            CriticResult(
                scores={d: self.scores[d] for d in r.dimensions},
                raw={d: f"constant {self.scores[d]}" for d in r.dimensions},
                key=r.key,
            )
            for r in requests
        ]
