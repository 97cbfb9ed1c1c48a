"""MixGRPO (Li et al., 2025, "MixGRPO: Unlocking Flow-based GRPO Efficiency with Mixed ODE-SDE").

A window of ``window_size`` consecutive sampling steps is stochastic (SDE) and trained; every other step is a
deterministic ODE step and is not trained. The window slides along the trajectory as training goes on, from the
noisiest steps towards the clean ones (the paper's progressive strategy, Algorithm 1): its start at RL step ``k`` is

    l(k) = min(window_start + floor(k / shift_every) * window_stride, max_start),   max_start = T - window_size

(``wrap: true`` restarts it from ``window_start`` instead of stopping at the end). MixGRPO-Flash samples the steps
outside the window with a higher-order solver: ``module.sampler.deterministic_solver: dpm2`` (DPM-Solver++(2M),
restarted at first order after the window). The paper's settings: 25 sampling steps, window 4, stride 1, shift
every 25 iterations. The loss on the window steps is Flow-GRPO's (:mod:`firm.algorithms.flow_grpo`: clipped ratio
of the SDE log-probs, KL of step means); MixGRPO builds on DanceGRPO's SDE, FIRM uses Flow-GRPO's (docs/rl.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from firm.algorithms.config import SamplerConfig
from firm.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig


@dataclass
class MixGRPOConfig(FlowGRPOConfig):
    """MixGRPO: Flow-GRPO trained only on a sliding SDE window, ODE steps elsewhere."""

    name: str = "mix_grpo"
    sampler: SamplerConfig = field(
        default_factory=lambda: SamplerConfig(method="sde", noise_level=0.7, deterministic_solver="ode")
    )
    window_size: int = 4  # stochastic (and trained) steps per rollout (MixGRPO: 4 of 25)
    window_stride: int = 1  # steps the window moves per shift (MixGRPO: 1)
    shift_every: int = 25  # RL steps between shifts (MixGRPO: 25)
    window_start: int = 0  # first step of the window at RL step 0
    wrap: bool = False  # restart from window_start after reaching the end (false: stay at the end)

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.window_size <= self.sampler.num_steps:
            raise ValueError(
                f"window_size: must be in [1, sampler.num_steps={self.sampler.num_steps}], got {self.window_size}"
            )
        for key in ("window_stride", "shift_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.window_start <= self.sampler.num_steps - self.window_size:
            raise ValueError(
                f"window_start: must be in [0, {self.sampler.num_steps - self.window_size}], got {self.window_start}"
            )
        if self.sampler.sde_window_size:
            raise ValueError("mix_grpo places its own window: set module.window_size, not sampler.sde_window_size")


def window_start(rl_step: int, num_steps: int, c: MixGRPOConfig) -> int:
    """The first stochastic step of the window at ``rl_step`` (the formula of the module docstring)."""
    max_start = num_steps - c.window_size
    moved = (rl_step // c.shift_every) * c.window_stride
    if c.wrap:
        span = max_start - c.window_start + 1
        return c.window_start + moved % span
    return min(c.window_start + moved, max_start)


class MixGRPO(FlowGRPO):
    """MixGRPO on a LoRA-adapted flow policy; see the module docstring."""

    Config = MixGRPOConfig

    def sde_window(self, num_steps: int) -> torch.Tensor:
        lo = window_start(self.rl_step, num_steps, self.config)
        mask = torch.zeros(num_steps, dtype=torch.bool)
        mask[lo : lo + self.config.window_size] = True
        return mask

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201 - Lightning's signature
        out = super().training_step(batch, batch_idx)
        lo = window_start(self.rl_step - 1, self.config.sampler.num_steps, self.config)
        self.log("train/window_start", float(lo), on_step=True, on_epoch=False, rank_zero_only=True)
        return out
