"""Reward combiners: registered components that turn normalised critic scores into one reward per sample.

A combiner is built from its ``Config`` (``cls(config)``) and called as ``combiner(components) -> rewards`` where
``components`` maps a dimension name (``execution``, ``consistency``, ``instruction``, ``quality``) to a float
tensor of normalised scores, shape (N,), NaN where the critic gave no score. ``combiner.inputs`` names the
dimensions it needs, so a reward function asks the critic for exactly those. YAML picks one by name::

    reward: {name: cme, w1: 0.6, w2: 0.4}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from firm.critics.types import CONSISTENCY, EXECUTION, INSTRUCTION, QUALITY
from firm.rewards.combine import cme, qma, weighted_sum


def _stack_inputs(components: dict[str, torch.Tensor], inputs: tuple[str, ...], who: str) -> list[torch.Tensor]:
    missing = [k for k in inputs if k not in components]
    if missing:
        raise KeyError(f"{who} needs components {list(inputs)}; missing {missing} (got {sorted(components)})")
    return [torch.as_tensor(components[k], dtype=torch.float32) for k in inputs]


class Combiner:
    """Base class: subclasses set ``inputs`` and implement :meth:`combine` (and usually keep their ``config``)."""

    inputs: tuple[str, ...] = ()
    config: Any = None  # the subclass's Config instance, when it has one

    def __call__(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        """Rewards of shape (N,) in [0, 1], NaN where any needed component is NaN."""
        return self.combine(*_stack_inputs(components, self.inputs, type(self).__name__))

    def combine(self, *xs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config if self.config is not None else ''})"


class CMEReward(Combiner):
    """Consistency-Modulated Execution (editing): ``E * (w1 + w2 * C) / (w1 + w2)``."""

    @dataclass
    class Config:
        name: str = "cme"
        w1: float = 0.6  # share of the reward paid for executing the edit, whatever else changed
        w2: float = 0.4  # share paid only in proportion to consistency (nothing else changed)

    inputs = (EXECUTION, CONSISTENCY)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        cme(0.0, 0.0, self.config.w1, self.config.w2)  # validates the weights now, not at the first batch

    def combine(self, execution: torch.Tensor, consistency: torch.Tensor) -> torch.Tensor:
        return cme(execution, consistency, self.config.w1, self.config.w2)


class QMAReward(Combiner):
    """Quality-Modulated Alignment (generation): ``I * (w1 + w2 * Q) / (w1 + w2)``."""

    @dataclass
    class Config:
        name: str = "qma"
        w1: float = 0.4  # share of the reward paid for following the instruction, whatever the quality
        w2: float = 0.6  # share paid only in proportion to image quality

    inputs = (INSTRUCTION, QUALITY)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        qma(0.0, 0.0, self.config.w1, self.config.w2)

    def combine(self, instruction: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
        return qma(instruction, quality, self.config.w1, self.config.w2)


class WeightedSumReward(Combiner):
    """The naive baseline ``sum_k w_k x_k / sum_k w_k`` (ablations; open to the lazy-editor hack)."""

    @dataclass
    class Config:
        name: str = "weighted_sum"
        # weight per dimension (divided by their sum); e.g. {instruction: 0.5, quality: 0.5} for generation
        weights: dict[str, float] = field(default_factory=lambda: {EXECUTION: 0.5, CONSISTENCY: 0.5})

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self.weights = dict(self.config.weights)
        self.inputs = tuple(self.weights)
        weighted_sum(dict.fromkeys(self.inputs, 0.0), self.weights)  # validates the weights

    def __call__(self, components: dict[str, torch.Tensor]) -> torch.Tensor:
        xs = _stack_inputs(components, self.inputs, "WeightedSumReward")
        return weighted_sum(dict(zip(self.inputs, xs)), self.weights)


class ExecutionOnlyReward(Combiner):
    """Execution alone (editing baseline that ignores unintended changes)."""

    @dataclass
    class Config:
        name: str = "execution_only"

    inputs = (EXECUTION,)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def combine(self, execution: torch.Tensor) -> torch.Tensor:
        return execution.clamp(0.0, 1.0)


class InstructionOnlyReward(Combiner):
    """Instruction following alone (generation baseline that ignores image quality)."""

    @dataclass
    class Config:
        name: str = "instruction_only"

    inputs = (INSTRUCTION,)

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def combine(self, instruction: torch.Tensor) -> torch.Tensor:
        return instruction.clamp(0.0, 1.0)
