"""DiffusionNFT (Zheng et al., 2025, "DiffusionNFT: Online Diffusion Reinforcement with Forward Process").

Rollouts sample deterministically (DPM-Solver++(2M) by default) with the ``old`` adapter, a slowly moving copy of
the trained one. Training re-noises each rollout's final sample ``x0`` at a sampling noise level ``t``,
``x_t = (1 - t) x0 + t eps``, and fits the implicit positive and negative policies built from the current and old
velocities (reference: DiffusionNFT/scripts/train_nft_sd3.py, the training loop and ``return_decay``)::

    r      = clip(clip(A, -c, c) / c / 2 + 0.5, 0, 1)        # c = adv_clip_max
    v_pos  = beta v + (1 - beta) v_old;  v_neg = (1 + beta) v_old - beta v
    loss   = c / beta * [r |x_t - t v_pos - x0|^2 / w_pos + (1 - r) |x_t - t v_neg - x0|^2 / w_neg]
             + kl_beta * mean((v - v_ref)^2)

(``w`` the detached mean absolute error of each branch, fused in ``firm.kernels.nft_loss``). After each RL step the old
adapter moves towards the trained one: ``old <- decay * old + (1 - decay) * trained`` with
``decay = min(old_decay_rate * (n - old_decay_start), old_decay_max)`` (0 before the start), where ``n`` counts
optimizer steps as DiffusionNFT's ``global_step`` does (``old_decay_unit: rl_step`` counts RL steps instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from firm import kernels
from firm.algorithms.advantages import Advantages
from firm.algorithms.base import Micro, RLAlgorithm
from firm.algorithms.config import RLConfig, SamplerConfig
from firm.algorithms.rollout import Rollout
from firm.algorithms.state import generator
from firm.policies.policy import OLD_ADAPTER

DECAY_UNITS = ("optimizer_step", "rl_step")


@dataclass
class DiffusionNFTConfig(RLConfig):
    """DiffusionNFT: deterministic rollouts with the old policy, negative-aware flow-matching loss."""

    name: str = "diffusion_nft"
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="dpm2", noise_level=0.0))
    beta: float = 1.0  # strength of the implicit positive / negative policies
    old_decay_rate: float = 0.001  # old-policy decay grows by this per step ...
    old_decay_max: float = 0.5  # ... up to this (DiffusionNFT: min(0.001 * step, 0.5))
    old_decay_start: int = 0  # steps with decay 0 (old = trained) before the decay starts growing
    old_decay_unit: str = "optimizer_step"  # what the decay counts: optimizer_step (DiffusionNFT) | rl_step

    def validate(self) -> None:
        super().validate()
        if not self.beta > 0:
            raise ValueError(f"beta: must be > 0, got {self.beta}")
        if self.old_decay_unit not in DECAY_UNITS:
            raise ValueError(f"old_decay_unit: must be one of {DECAY_UNITS}, got {self.old_decay_unit!r}")
        if not 0 <= self.old_decay_max < 1:
            raise ValueError(f"old_decay_max: must be in [0, 1), got {self.old_decay_max}")


def old_policy_decay(step: int, rate: float, maximum: float, start: int = 0) -> float:
    """``min(rate * (step - start), maximum)``, 0 before ``start`` (DiffusionNFT's ``return_decay``)."""
    return 0.0 if step < start else min(rate * (step - start), maximum)


@dataclass
class NFTEpoch:
    """What every micro-batch of one epoch reads, on the device."""

    r: torch.Tensor  # (B,) the optimality probability of each sample: clipped advantage mapped to [0, 1]
    x0: torch.Tensor  # (B, C, h, w) the rollouts' final samples
    noise: torch.Generator  # the epoch's re-noising draws
    sigmas: torch.Tensor  # (T + 1,)
    epoch: int = 0  # this update epoch (keys the per-sample streams of rng_streams: sample)


class DiffusionNFT(RLAlgorithm):
    """DiffusionNFT on a LoRA-adapted flow policy; see the module docstring."""

    Config = DiffusionNFTConfig
    rollout_adapter = OLD_ADAPTER
    needs_old_adapter = True

    def old_decay(self, step: int) -> float:
        c = self.config
        return old_policy_decay(step, c.old_decay_rate, c.old_decay_max, c.old_decay_start)

    def after_update(self) -> dict[str, float]:
        n = self.global_step if self.config.old_decay_unit == "optimizer_step" else self.rl_step
        decay = self.old_decay(n)
        self.policy.update_old(decay)
        return {"train/old_decay": decay}

    def train_candidates(self, roll: Rollout) -> torch.Tensor:
        return torch.arange(roll.sigmas.numel() - 1)  # every sampling sigma (not the final 0)

    def begin_epoch(self, roll: Rollout, adv: Advantages, epoch: int) -> NFTEpoch:
        c = self.config
        a = adv.adv.to(self.device)
        return NFTEpoch(
            r=(a.clamp(-c.adv_clip_max, c.adv_clip_max) / c.adv_clip_max / 2 + 0.5).clamp(0, 1),
            x0=roll.latents[:, -1].to(self.device),
            noise=generator("renoise", c.seed, self.rl_step, epoch, self.global_rank, device=self.device),
            sigmas=roll.sigmas.to(self.device),
            epoch=epoch,
        )

    def micro_loss(
        self, roll: Rollout, adv: Advantages, ctx: NFTEpoch, mic: Micro
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        c, m = self.config, mic.m
        x0, r = ctx.x0[m], ctx.r[m]
        t = ctx.sigmas[mic.idx]  # (b,)
        if c.rng_streams == "sample":  # per sample and trained step, keyed by the place in the global batch
            base = self.global_rank * ctx.x0.shape[0]
            keys = zip(m.tolist(), mic.idx.tolist())  # a host read: this mode trades one sync for exactness
            gens = [generator("renoise", c.seed, self.rl_step, ctx.epoch, base + i, j) for i, j in keys]
            noise = torch.stack([torch.randn(x0.shape[1:], generator=g, dtype=torch.float32) for g in gens])
            noise = noise.to(self.device)
        else:
            noise = torch.randn(x0.shape, generator=ctx.noise, device=self.device, dtype=torch.float32)  # on the device
        tb = t.view(-1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * noise
        cond = roll.cond.index(m)
        with torch.no_grad():
            with self.policy.adapter(OLD_ADAPTER):
                v_old = self.policy.velocity(x_t, t, cond)
            v_ref = None
            if mic.kl_weight > 0:  # the reference forward only where its term is on
                with self.policy.adapter(None):
                    v_ref = self.policy.velocity(x_t, t, cond)
        v = self.policy.velocity(x_t, t, cond)
        n_valid = mic.n_keep
        if not n_valid:
            return v.sum() * 0.0, {}, 0  # keeps every rank's backward count equal
        args = [v, v_old, v_ref, x_t, x0, t, r]
        if n_valid < m.numel():  # gather the kept samples (skipped when all are kept)
            sel = mic.keep.nonzero().flatten()
            args = [None if a is None else a[sel] for a in args]
        loss, st = kernels.nft_loss(*args, beta=c.beta, adv_clip_max=c.adv_clip_max, kl_beta=mic.kl_weight)
        stats = {f"train/{k}": st[k].sum() for k in ("policy", "kl", "loss_pos", "loss_neg")}
        stats["train/r_mean"] = args[6].sum()
        return loss * n_valid, stats, n_valid
