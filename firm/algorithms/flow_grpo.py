"""Flow-GRPO (Liu et al., 2025, "Flow-GRPO: Training Flow Matching Models via Online RL"), with Flow-GRPO-Fast's SDE
window and the coefficients-preserving sampler (CPS, Wang & Yu, 2025).

Rollouts sample with the current policy through stochastic steps (``sde`` or ``cps``), recording every latent and
the behaviour log-prob of each stochastic step. Training recomputes the log-prob of the recorded transition
``x_t -> x_{t-1}`` under the current policy and minimises, per sample and trained step (reference:
flow_grpo/scripts/train_sd3.py, the inner loop; flow_grpo/diffusers_patch/sd3_sde_with_logprob.py)::

    ratio  = exp(logp - logp_old)
    policy = max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))
    kl     = mean_d((mu - mu_ref)^2) / (2 s^2)          # KL of the step means to the reference (adapters off)
    loss   = policy + kl_beta * kl

with ``s`` Flow-GRPO's ``std_dev_t``: ``noise_level * sqrt(sigma / (1 - sigma))`` for ``sde`` (the step std *without*
its ``sqrt(-dt)`` factor) and the whole step std for ``cps``. ``kl_form: step_variance`` divides by the full step
variance instead (the exact KL between the two Gaussian steps); that is ``1 / |dt|`` times larger on ``sde`` steps.
Log-probs default to Flow-GRPO's forms: the full Gaussian one on ``sde`` steps, the constant-free ``-(x - mu)^2`` on
``cps`` steps (``module.sampler.log_prob`` overrides it). Samples with a zero advantage are left out of the loss,
as Flow-GRPO filters them before training (``drop_zero_adv``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from firm import kernels
from firm.algorithms.advantages import Advantages
from firm.algorithms.base import Micro, RLAlgorithm
from firm.algorithms.config import RLConfig, SamplerConfig
from firm.algorithms.rollout import Rollout
from firm.policies.samplers import SAMPLERS, apply_step, kl_std, step_coefs, step_log_prob

KL_FORMS = ("flow_grpo", "step_variance")


@dataclass
class FlowGRPOConfig(RLConfig):
    """Flow-GRPO: stochastic rollouts, clipped surrogate on the step log-probs, KL of step means to the reference."""

    name: str = "flow_grpo"
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="sde", noise_level=0.7))
    clip_range: float = 1e-4  # PPO clip range of the probability ratio (Flow-GRPO: 1e-4)
    kl_form: str = "flow_grpo"  # flow_grpo (divide by 2 std_dev_t^2, as Flow-GRPO) | step_variance (by 2 std^2)
    drop_zero_adv: bool = True  # Flow-GRPO trains only on samples with a nonzero advantage

    def validate(self) -> None:
        super().validate()
        s = self.sampler
        if not SAMPLERS[s.method].stochastic:
            stochastic = [n for n, m in SAMPLERS.items() if m.stochastic]
            raise ValueError(
                f"{self.name} needs stochastic rollouts: module.sampler.method must be one of {stochastic}, "
                f"got {s.method!r}"
            )
        if s.noise_level <= 0:
            raise ValueError(f"{self.name} needs module.sampler.noise_level > 0 (log-probs of stochastic steps)")
        if not self.clip_range > 0:
            raise ValueError(f"clip_range: must be > 0, got {self.clip_range}")
        if self.kl_form not in KL_FORMS:
            raise ValueError(f"kl_form: must be one of {KL_FORMS}, got {self.kl_form!r}")


def step_mean_kl(
    method: str,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    coefs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    sq_dist: torch.Tensor,
    form: str = "flow_grpo",
) -> torch.Tensor:
    """(B,) KL of the step means to the reference from ``sq_dist = mean_d((v - v_ref)^2)``.

    ``mu - mu_ref = coef_v * (v - v_ref)``, so ``mean_d((mu - mu_ref)^2) = coef_v^2 * sq_dist``; ``flow_grpo`` divides
    by ``2 std_dev_t^2`` (flow_grpo/scripts/train_sd3.py, ``kl_loss``), ``step_variance`` by ``2 std^2``.
    """
    std = coefs[2]
    s = kl_std(method, sigma, sigma_next, std) if form == "flow_grpo" else std
    return coefs[1] ** 2 * sq_dist / (2 * s**2)


class StepTerms(NamedTuple):
    """What the current policy says about one recorded transition per sample (all (b,) float32)."""

    logp: torch.Tensor  # log-prob of x_{t-1} under the current policy (differentiable)
    old: torch.Tensor  # the behaviour log-prob the ratio divides by (detached)
    rollout_lp: torch.Tensor  # the log-prob recorded at rollout time
    kl: torch.Tensor  # KL of the step means to the reference (0 when kl_beta = 0)
    std: torch.Tensor  # the step std
    dt: torch.Tensor  # sigma_next - sigma (< 0)
    mean: torch.Tensor  # (b, C, h, w) the current policy's step mean (differentiable)
    mean_old: torch.Tensor | None  # (b, C, h, w) the behaviour step mean, when the rollout recorded it


@dataclass
class GRPOEpoch:
    """What every micro-batch of one epoch reads: the rollout's sigmas, copied to the device once per epoch."""

    sigmas: torch.Tensor  # (T + 1,)


class FlowGRPO(RLAlgorithm):
    """Flow-GRPO on a LoRA-adapted flow policy; see the module docstring."""

    Config = FlowGRPOConfig
    rollout_adapter = "default"

    def begin_epoch(self, roll: Rollout, adv: Advantages, epoch: int) -> GRPOEpoch:
        return GRPOEpoch(sigmas=roll.sigmas.to(self.device))

    def step_terms(
        self, roll: Rollout, ctx: GRPOEpoch, m: torch.Tensor, idx: torch.Tensor, kl_weight: float
    ) -> StepTerms:
        """Recompute the transition ``latents[m, idx] -> latents[m, idx + 1]`` under the current policy (and the
        reference's step mean when ``kl_weight > 0``)."""
        c, s, dev = self.config, self.config.sampler, self.device
        latents = roll.latents.to(dev)  # already there: the rollout samples on the device
        x, x_next = latents[m, idx], latents[m, idx + 1]
        sig, sig_next = ctx.sigmas[idx], ctx.sigmas[idx + 1]
        coefs = step_coefs(s.method, sig, sig_next, s.noise_level, roll.sigma_cap)
        cond = roll.cond.index(m)
        uncond = roll.uncond.index(m) if roll.uncond is not None else None
        v_ref = None
        if kl_weight > 0:
            with torch.no_grad(), self.policy.adapter(None):
                v_ref = self.policy.velocity(x, sig, cond, guidance_scale=s.guidance_scale, uncond=uncond)
        v = self.policy.velocity(x, sig, cond, guidance_scale=s.guidance_scale, uncond=uncond)
        form = s.log_prob or SAMPLERS[s.method].log_prob
        logp, sq = step_log_prob(form, x, v, x_next, coefs, ref_velocity=v_ref)
        rollout_lp = roll.log_probs.to(dev)[m, idx]
        # Before any update since the rollout the current policy *is* the sampling policy: use its own (detached)
        # log-prob so the ratio is exactly 1, and log how far the rollout's was.
        old = logp.detach() if self._fresh else rollout_lp
        kl = torch.zeros_like(logp) if sq is None else step_mean_kl(s.method, sig, sig_next, coefs, sq, c.kl_form)
        mean_old = roll.means.to(dev)[m, idx] if roll.means is not None else None
        return StepTerms(logp, old, rollout_lp, kl, coefs[2], sig_next - sig, apply_step(x, v, coefs), mean_old)

    def surrogate(self, t: StepTerms, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(b,) clipped policy loss and (b,) the ratio it used."""
        sur = kernels.clipped_surrogate(t.logp, t.old, a, self.config.clip_range)
        return sur.loss, torch.exp(t.logp.detach() - t.old)

    def micro_loss(
        self, roll: Rollout, adv: Advantages, ctx: GRPOEpoch, mic: Micro
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        c = self.config
        t = self.step_terms(roll, ctx, mic.m, mic.idx, mic.kl_weight)
        policy_loss, ratio = self.surrogate(t, adv.adv.to(self.device)[mic.m])
        w = mic.keep.float()
        loss_sum = ((policy_loss + mic.kl_weight * t.kl) * w).sum()
        lp = t.logp.detach()
        stats = {
            "train/policy_loss": (policy_loss.detach() * w).sum(),
            "train/kl": (t.kl.detach() * w).sum(),
            "train/clip_frac": (((ratio - 1).abs() > c.clip_range).float() * w).sum(),
            "train/approx_kl": (0.5 * (lp - t.old) ** 2 * w).sum(),
            "train/ratio_mean": (ratio * w).sum(),
            "train/logp_rollout_gap": ((lp - t.rollout_lp).abs() * w).sum(),
        }
        return loss_sum, stats, mic.n_keep
