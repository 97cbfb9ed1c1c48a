"""The worked example of docs/rl.md, "Adding an algorithm": a Flow-GRPO variant with only the upper ratio clip.

Registered as `asym_grpo` when an experiment names this file in `imports:`.
"""

from dataclasses import dataclass

import torch

from firm.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig, StepTerms
from firm.registry import register


@dataclass
class AsymGRPOConfig(FlowGRPOConfig):
    name: str = "asym_grpo"
    clip_high: float = 2e-4  # upper clip range of the ratio


class AsymGRPO(FlowGRPO):
    Config = AsymGRPOConfig

    def surrogate(self, t: StepTerms, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ratio = torch.exp(t.logp - t.old)
        clipped = ratio.clamp(max=1 + self.config.clip_high)
        return torch.maximum(-a * ratio, -a * clipped), ratio.detach()


register("modules", "asym_grpo", AsymGRPO, overwrite=True)
