"""GRPO-Guard (Wang et al., 2025, "GRPO-Guard: Mitigating Implicit Over-Optimization in Flow Matching via Regulated
Clipping"): Flow-GRPO with a normalised per-step ratio and per-step gradient reweighting.

On a Gaussian step with std ``s`` the observed ``x' = mu_old + s eps``, so Flow-GRPO's log-ratio is
``logp - logp_old = -mean_d(eps * delta) / s - mean_d(delta^2) / (2 s^2)`` with ``delta = mu_old - mu`` (mean over
latent dims). The second term is a bias ``<= 0`` and the first has a spread ``~ 1 / s``: the ratio sits left of 1 and
its width changes from step to step, so positive-advantage samples rarely reach the upper clip bound. GRPO-Guard's
regulated clipping (the formulas as VeRL-Omni's ``grpo_guard`` loss mode writes them) therefore

* **RatioNorm**: adds the bias back and scales by the step std,
  ``ratio = exp((logp - logp_old + b) * s)`` with ``b = mean_d((mu - mu_old)^2) / (2 s^2)``;
  this equals ``exp(-mean_d(eps * delta))``: centred on 1, with a comparable spread at every step;
* **gradient reweighting**: divides each step's clipped loss by ``|dt|`` (``(sqrt(-dt))^2``), so that every noise
  level contributes a comparable gradient:
  ``loss = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) / |dt| + kl_beta * kl``.

``s`` is the whole step std (Flow-GRPO's ``std_dev_t * sqrt(-dt)``) and ``mu_old`` the behaviour policy's step mean,
which the rollout records for this algorithm. The log-prob must be the Gaussian form (``sde`` or ``cps`` with
``sampler.log_prob: gaussian``): the algebra above needs its ``1 / (2 s^2)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from firm.algorithms.flow_grpo import FlowGRPO, FlowGRPOConfig, StepTerms
from firm.policies.samplers import SAMPLERS


@dataclass
class GRPOGuardConfig(FlowGRPOConfig):
    """GRPO-Guard: Flow-GRPO with RatioNorm and 1 / |dt| gradient reweighting."""

    name: str = "grpo_guard"
    reweight: bool = True  # divide each step's clipped loss by |dt| (GRPO-Guard's gradient reweighting)

    def validate(self) -> None:
        super().validate()
        form = self.sampler.log_prob or SAMPLERS[self.sampler.method].log_prob
        if form != "gaussian":
            raise ValueError(
                f"grpo_guard's RatioNorm needs the Gaussian log-prob; module.sampler.method={self.sampler.method!r} "
                f"uses {form!r} (set module.sampler.log_prob: gaussian)"
            )


def guard_ratio(
    logp: torch.Tensor, logp_old: torch.Tensor, mean: torch.Tensor, mean_old: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """(b,) RatioNorm ratio ``exp((logp - logp_old + b) * std)``, ``b = mean_d((mean - mean_old)^2) / (2 std^2)``.

    ``mean`` (differentiable) and ``mean_old``: (b, ...) step means of the current and behaviour policy; ``std``: (b,).
    """
    b = logp.shape[0]
    bias = (mean - mean_old).reshape(b, -1).float().pow(2).mean(1) / (2 * std.float() ** 2)
    return torch.exp((logp - logp_old + bias) * std.float())


def guard_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    mean: torch.Tensor,
    mean_old: torch.Tensor,
    std: torch.Tensor,
    dt: torch.Tensor,
    adv: torch.Tensor,
    clip_range: float,
    *,
    reweight: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b,) GRPO-Guard's clipped loss on the RatioNorm ratio (divided by ``|dt|`` with ``reweight``), and the ratio."""
    ratio = guard_ratio(logp, logp_old, mean, mean_old, std)
    loss = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_range, 1 + clip_range))
    if reweight:
        loss = loss / (-dt)
    return loss, ratio.detach()


class GRPOGuard(FlowGRPO):
    """GRPO-Guard on a LoRA-adapted flow policy; see the module docstring."""

    Config = GRPOGuardConfig
    records_means = True  # the rollout keeps the behaviour step means mu_old

    def surrogate(self, t: StepTerms, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        eps = self.config.clip_range
        if self._fresh:  # the current policy is the behaviour policy: ratio exactly 1
            mean_old, logp_old = t.mean.detach(), t.logp.detach()
        elif t.mean_old is None:
            raise RuntimeError("grpo_guard needs the rollout's behaviour step means; the rollout recorded none")
        else:
            mean_old, logp_old = t.mean_old, t.rollout_lp
        return guard_loss(t.logp, logp_old, t.mean, mean_old, t.std, t.dt, a, eps, reweight=self.config.reweight)
