"""RL LightningModules for flow-matching image models: Flow-GRPO and DiffusionNFT.

One ``training_step`` is one RL step on this rank's share of the batch (``data.batch_size`` samples; a prompt's G
copies may sit on different ranks):

1. **Rollout** in chunks of ``rollout_chunk`` samples; each chunk's images go to the critic on a worker thread
   while the next chunk is sampled (:mod:`firm.policies.scoring`).
2. **Advantages**: rewards and group labels are all-gathered, ``kernels.group_advantages`` normalises per prompt
   group over the whole world (NaN rewards excluded, advantage 0), each rank keeps its slice.
3. **Update** (manual optimisation): ``inner_epochs`` passes over the batch in optimizer steps of
   ``train_batch_size`` samples; each sample trains on ``timestep_fraction`` of its steps.

   * Flow-GRPO: ``kernels.step_log_prob`` of the stored transition under the current policy, then
     ``kernels.clipped_surrogate`` against the rollout log-prob, plus ``kl_beta`` x the KL of the step means to the
     reference (adapters disabled).
   * DiffusionNFT: re-noise the rollout's final sample, ``x_t = (1 - t) x0 + t noise``, and apply
     ``kernels.nft_loss`` with the current, old (sampling) and reference velocities; after the step the old adapter
     moves towards the trained one with decay ``min(decay_rate * step, decay_max)``.

Samples with a missing reward (and, optionally, samples of groups whose reward std is ~0) are masked out of the
loss; every rank still runs the same number of forward / backward passes so that DDP stays in step. A non-finite loss
skips the optimizer step on every rank (:meth:`FirmModule.finite_or_skip`), and so do non-finite gradients.

Checkpoints hold the adapters (trained and old), the optimizer state, the EMA, the RL step, RNG states and (through
the runner's ``StatefulDataLoader``) the data position; the frozen base weights are left out and re-loaded from
``policy.pretrained`` (a fingerprint catches a different base). All sampling randomness comes from generators
seeded by ``(seed, RL step, rank, ...)``, so a resumed run continues exactly.

``trainer.max_steps`` counts optimizer steps: ``inner_epochs x ceil(data.batch_size / train_batch_size)`` per RL
step (1 with the defaults).
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import kernels
from firm.config import component_field
from firm.critics.factory import build_critic
from firm.critics.types import CONSISTENCY, EXECUTION
from firm.module import FirmModule
from firm.policies.encoders import Conditioning
from firm.policies.policy import OLD_ADAPTER, FlowPolicy, PolicyConfig, pil_to_tensor, tensor_to_pil
from firm.policies.samplers import METHODS, sample, sde_window, step_coefs
from firm.policies.scoring import OverlappedScorer, build_requests
from firm.rewards.functions import FirmEditReward, FirmGenReward, RewardOutput, build_combiner

TASKS = ("gen", "edit")
ADV_SCALES = ("group", "batch", "none")


@dataclass
class SamplerConfig:
    """How rollouts are sampled."""

    num_steps: int = 10  # sampling steps per rollout (the paper: 10 for generation, 6 for editing)
    method: str = "sde"  # sde (Flow-GRPO) | cps | ode (Euler) | dpm2 (DPM-Solver++(2M), deterministic)
    noise_level: float = 0.7  # noise scale of the stochastic steps (sde: a in a*sqrt(s/(1-s)); cps: sin(a*pi/2))
    guidance_scale: float = 1.0  # classifier-free guidance scale; 1 turns CFG off
    sde_window_size: int = 0  # stochastic steps per rollout, consecutive (0: every step); ODE elsewhere
    sde_window_max_start: int | None = None  # the window starts uniformly in [0, this] (null: anywhere it fits)
    same_noise_in_group: bool = False  # all members of a prompt group start from the same initial noise


@dataclass
class RLConfig:
    """Settings shared by Flow-GRPO and DiffusionNFT."""

    name: str = "flow_rl"
    task: str = "gen"  # gen (text-to-image, GenRequest) | edit (instruction + source image, EditRequest)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    critic: Any = component_field("critics")  # the critic backend: {name: ..., **its settings}
    reward: Any = component_field("rewards")  # how scores become a reward: {name: cme | qma | ..., **weights}
    critic_dimensions: list[str] | None = None  # judgements to ask for (null: all of the task's, logged even if unused)
    critic_failure: str = "raise"  # a chunk whose critic call raises: raise | missing (counted as missing scores)
    rollout_chunk: int = 8  # samples per sampling chunk; a chunk is scored while the next one is sampled
    critic_queue: int = 2  # chunks allowed to wait for the critic before sampling blocks
    critic_threads: int = 1  # concurrent critic calls
    lr: float = 3e-4  # AdamW learning rate of the LoRA weights
    weight_decay: float = 1e-4  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    max_grad_norm: float | None = 1.0  # clip the gradient norm (null: no clipping)
    inner_epochs: int = 1  # passes over each rollout batch
    train_batch_size: int | None = None  # samples per optimizer step on each rank (null: the whole local batch)
    micro_batch_size: int | None = None  # samples per forward / backward (null: train_batch_size); memory only
    timestep_fraction: float = 1.0  # fraction of a sample's trainable steps used per epoch (a random subset)
    adv_clip_max: float = 5.0  # advantages are clipped to [-adv_clip_max, adv_clip_max]
    adv_scale: str = "group"  # advantage std: group (per prompt) | batch (all rewards of the step) | none
    adv_eps: float = 1e-4  # added to the std
    drop_zero_std_groups: bool = False  # leave out of the loss the groups whose reward std < zero_std_eps
    zero_std_eps: float = 1e-6  # what counts as zero std
    kl_beta: float = 1e-4  # weight of the KL to the reference policy (adapters disabled); 0 skips its forward
    ema_decay: float | None = None  # keep an EMA of the LoRA weights with this decay (null: none); exportable
    log_images_every: int = 0  # write a grid of samples every N RL steps (0: never); TensorBoard + PNG
    log_images_max: int = 16  # samples in the grid
    max_idle_rl_steps: int = 10  # stop with an error after this many RL steps in a row without an optimizer step
    seed: int = 0  # seeds initial noise, SDE noise, windows and timestep subsets (with the RL step and rank)


def _mix(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (same on every machine and run)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _gen(*parts: Any) -> torch.Generator:
    return torch.Generator().manual_seed(_mix(*parts))


@dataclass
class Rollout:
    """One rollout of this rank's batch."""

    cond: Conditioning
    uncond: Conditioning | None
    latents: torch.Tensor  # (B, T + 1, C, h, w) Flow-GRPO; (B, 2, C, h, w) first / final otherwise
    log_probs: torch.Tensor  # (B, T)
    sigmas: torch.Tensor  # (T + 1,)
    stochastic: torch.Tensor  # (T,) bool
    sigma_cap: float
    images: torch.Tensor  # (B, 3, H, W) in [0, 1], on the CPU
    reward: RewardOutput
    rollout_s: float
    critic_wait_s: float
    critic_failures: int


class FlowRLModule(FirmModule):
    """Shared machinery of the RL modules (rollout, critic overlap, advantages, checkpoints, logging)."""

    Config = RLConfig
    rollout_adapter: str | None = "default"  # which adapter samples the rollouts
    needs_old_adapter = False
    ddp_find_unused_parameters = False

    def __init__(self, config: RLConfig) -> None:
        super().__init__()
        # Frozen encoders stay in eval mode on purpose, and manual optimisation checkpoints after the step.
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        warnings.filterwarnings("ignore", message=".*ModelCheckpoint with manual optimization.*")
        self.config = c = config
        self.automatic_optimization = False
        self.strict_loading = False  # checkpoints leave out the frozen base weights
        if c.task not in TASKS:
            raise ValueError(f"module.task must be one of {TASKS}, got {c.task!r}")
        if c.sampler.method not in METHODS:
            raise ValueError(f"module.sampler.method must be one of {METHODS}, got {c.sampler.method!r}")
        if c.adv_scale not in ADV_SCALES:
            raise ValueError(f"module.adv_scale must be one of {ADV_SCALES}, got {c.adv_scale!r}")
        if not 0 < c.timestep_fraction <= 1:
            raise ValueError(f"module.timestep_fraction must be in (0, 1], got {c.timestep_fraction}")
        for key in ("rollout_chunk", "inner_epochs", "critic_queue", "critic_threads", "max_idle_rl_steps"):
            if getattr(c, key) < 1:
                raise ValueError(f"module.{key} must be >= 1, got {getattr(c, key)}")
        if c.task == "edit" and c.policy.family == "sd3":
            raise ValueError("module.task=edit needs an editing policy (policy.family: qwen_image_edit)")
        self.policy = FlowPolicy(c.policy, old_adapter=self.needs_old_adapter)
        reward_cls = FirmEditReward if c.task == "edit" else FirmGenReward
        combiner = build_combiner(c.reward)
        self.reward_fn = reward_cls(build_critic(c.critic), combiner, dimensions=c.critic_dimensions)
        self.rl_step = 0
        self.ema: dict[str, torch.Tensor] | None = None
        self._fresh = True  # no optimizer step since the last rollout: the policy *is* the sampling policy
        self._scorer: OverlappedScorer | None = None
        self._idle_rl_steps = 0

    # ---------------------------------------------------------------------------------------------------- Lightning

    @property
    def fsdp_wrap_modules(self) -> set[type]:
        return self.policy.fsdp_wrap_modules()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        c = self.config
        return torch.optim.AdamW(
            self.policy.trainable_parameters(),
            lr=c.lr,
            betas=tuple(c.betas),
            eps=c.adam_eps,
            weight_decay=c.weight_decay,
        )

    def on_fit_start(self) -> None:
        if self.config.ema_decay is not None and self.ema is None:
            self.ema = {n: p.detach().clone() for n, p in self.policy.named_adapter_parameters("default").items()}
        per_rl = self.optimizer_steps_per_rl_step()
        for cb in self.trainer.checkpoint_callbacks:
            every = getattr(cb, "_every_n_train_steps", 0)
            if every and every % per_rl:
                warnings.warn(
                    f"trainer.checkpoint_every_n_steps={every} is not a multiple of the {per_rl} optimizer steps per "
                    "RL step: some checkpoints will be skipped",
                    stacklevel=1,
                )

    def on_train_end(self) -> None:
        if self._scorer is not None:
            self._scorer.close()
            self._scorer = None

    def optimizer_steps_per_rl_step(self, local_batch: int | None = None) -> int:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        b = local_batch or getattr(getattr(dm, "config", None), "batch_size", None) or 1
        tb = self.config.train_batch_size or b
        return self.config.inner_epochs * math.ceil(b / min(tb, b))

    @property
    def scorer(self) -> OverlappedScorer:
        if self._scorer is None:
            c = self.config
            self._scorer = OverlappedScorer(
                self.reward_fn,
                self.reward_fn.dimensions,
                max_pending=c.critic_queue,
                threads=c.critic_threads,
                on_failure=c.critic_failure,
            )
        return self._scorer

    # ---------------------------------------------------------------------------------------------------- rollout

    def rollout_method(self) -> str:
        return self.config.sampler.method

    def initial_noise(self, groups: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) initial latents; per group (same on every rank) or per sample, seeded by the RL step."""
        c = self.config
        shape = self.policy.latent_shape()
        rows = []
        for i, g in enumerate(groups.tolist()):
            parts = (
                ("noise", c.seed, self.rl_step, "group", g)
                if c.sampler.same_noise_in_group
                else ("noise", c.seed, self.rl_step, "rank", self.global_rank, i)
            )
            rows.append(torch.randn(shape, generator=_gen(*parts)))
        return torch.stack(rows).to(self.device)

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> Rollout:
        c, s = self.config, self.config.sampler
        t0 = time.perf_counter()
        prompts, sources = batch["prompt"], batch["image"]
        images_in = sources if c.task == "edit" else None
        cond = self.policy.encode_prompts(prompts, images_in)
        uncond = self.policy.encode_negative(cond, images_in) if s.guidance_scale > 1 else None
        noise = self.initial_noise(batch["group"])
        sigmas = self.policy.sigmas(s.num_steps)
        method = self.rollout_method()
        window = sde_window(
            s.num_steps, s.sde_window_size, s.sde_window_max_start, _gen("window", c.seed, self.rl_step)
        )
        record = method in ("sde", "cps")
        scorer = self.scorer
        wait0, fail0 = scorer.wait_s, scorer.failures
        latents, log_probs, images = [], [], []
        traj = None
        b = noise.shape[0]
        for k, lo in enumerate(range(0, b, c.rollout_chunk)):
            sl = slice(lo, min(lo + c.rollout_chunk, b))
            cc = cond.index(sl)
            uc = uncond.index(sl) if uncond is not None else None

            def vfn(x: torch.Tensor, sig: torch.Tensor, cc=cc, uc=uc) -> torch.Tensor:
                return self.policy.velocity(x, sig, cc, guidance_scale=s.guidance_scale, uncond=uc)

            with self.policy.adapter(self.rollout_adapter):
                traj = sample(
                    vfn,
                    noise[sl],
                    sigmas,
                    method=method,
                    noise_level=s.noise_level,
                    stochastic=window,
                    generator=_gen("sde", c.seed, self.rl_step, self.global_rank, k),
                    record=record,
                )
            imgs = self.policy.decode(traj.final).cpu()  # (b, 3, H, W)
            pil = tensor_to_pil(imgs)
            reqs = build_requests(
                c.task,
                pil,
                prompts[sl],
                [str(x) for x in batch["key"][sl]],
                sources[sl] if c.task == "edit" else None,
                batch.get("checklist", [None] * b)[sl],
            )
            scorer.submit(reqs)
            latents.append(traj.latents)
            log_probs.append(traj.log_probs)
            images.append(imgs)
        reward = scorer.collect()
        return Rollout(
            cond=cond,
            uncond=uncond,
            latents=torch.cat(latents),
            log_probs=torch.cat(log_probs),
            sigmas=sigmas,
            stochastic=traj.stochastic,
            sigma_cap=traj.sigma_cap,
            images=torch.cat(images),
            reward=reward,
            rollout_s=time.perf_counter() - t0,
            critic_wait_s=scorer.wait_s - wait0,
            critic_failures=scorer.failures - fail0,
        )

    # ---------------------------------------------------------------------------------------------------- advantages

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        """All ranks' ``x`` concatenated along dim 0 (rank order)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return x
        g = self.all_gather(x)  # (W, B, ...)
        return g.reshape(-1, *x.shape[1:])

    def advantages(self, rewards: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        """Group-normalised advantages over the whole world and the training mask of this rank's samples."""
        c = self.config
        b = rewards.shape[0]
        all_r = self._gather(rewards.to(self.device, torch.float32))
        all_g = self._gather(groups.to(self.device, torch.int64))
        adv, stats = kernels.group_advantages(
            all_r, all_g, scale=c.adv_scale, eps=c.adv_eps, clip=c.adv_clip_max, return_stats=True
        )
        valid = ~torch.isnan(all_r)
        keep = valid.clone()
        per_std, per_count = stats.std[stats.index], stats.count[stats.index]
        zero_std = (per_count >= 2) & (per_std < c.zero_std_eps)
        if c.drop_zero_std_groups:
            keep &= ~zero_std
        rank = self.global_rank if self._trainer is not None else 0
        lo = rank * b
        n_groups = stats.labels.numel()
        g_zero = ((stats.count >= 2) & (stats.std < c.zero_std_eps)).float().sum()
        return {
            "adv": adv[lo : lo + b],
            "keep": keep[lo : lo + b],
            "global_keep": int(keep.sum()),
            "all_rewards": all_r,
            "all_adv": adv,
            "all_valid": valid,
            "zero_std_group_frac": float(g_zero) / max(n_groups, 1),
            "group_std_mean": float(torch.nan_to_num(stats.std, nan=0.0).mean()),
        }

    # ---------------------------------------------------------------------------------------------------- the step

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        t_step = time.perf_counter()
        roll = self.rollout(batch)
        adv = self.advantages(roll.reward.rewards, batch["group"])
        self._fresh = True
        t_upd = time.perf_counter()
        steps_before = self.global_step
        metrics = self.update(batch, roll, adv) if adv["global_keep"] > 0 else {"train/skipped_no_valid": 1.0}
        update_s = time.perf_counter() - t_upd
        # trainer.max_steps counts optimizer steps: RL steps without one (no valid reward, non-finite losses) do not
        # advance the run, so a critic that never answers must stop it rather than spin forever.
        self._idle_rl_steps = 0 if self.global_step > steps_before else self._idle_rl_steps + 1
        if self._idle_rl_steps >= self.config.max_idle_rl_steps:
            raise RuntimeError(
                f"{self._idle_rl_steps} RL steps in a row made no optimizer step (missing fraction of the last one: "
                f"{1 - adv['global_keep'] / max(adv['all_rewards'].numel(), 1):.2f}); is the critic answering? "
                "Raise module.max_idle_rl_steps to wait longer"
            )
        self.rl_step += 1
        self.after_update()
        metrics.update(self.rollout_metrics(roll, adv))
        world = self.trainer.world_size if self._trainer is not None else 1
        n = roll.images.shape[0] * world
        metrics.update(
            {
                "perf/rollout_s": roll.rollout_s,
                "perf/critic_wait_s": roll.critic_wait_s,
                "perf/update_s": update_s,
                "perf/step_s": time.perf_counter() - t_step,
                "perf/images_per_s": n / roll.rollout_s if roll.rollout_s > 0 else math.nan,
                "rl_step": float(self.rl_step),
            }
        )
        self.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=False, rank_zero_only=True)
        self.log("reward", metrics.get("reward/mean", math.nan), prog_bar=True, on_step=True, rank_zero_only=True)
        if self.config.log_images_every and self.rl_step % self.config.log_images_every == 0:
            self.log_samples(batch, roll, adv)

    def rollout_metrics(self, roll: Rollout, adv: dict[str, Any]) -> dict[str, float]:
        """Reward (and each component), missing rate, advantage and critic statistics of the whole world."""
        r = adv["all_rewards"]
        valid = adv["all_valid"]
        vr = r[valid]
        out = {
            "reward/mean": float(vr.mean()) if vr.numel() else math.nan,
            "reward/std": float(vr.std(unbiased=False)) if vr.numel() else math.nan,
            "reward/missing_frac": 1.0 - float(valid.float().mean()),
            "reward/critic_failures": float(roll.critic_failures),
            "adv/mean": float(adv["all_adv"].mean()),
            "adv/abs_mean": float(adv["all_adv"].abs().mean()),
            "adv/std": float(adv["all_adv"].std(unbiased=False)),
            "adv/max": float(adv["all_adv"].max()),
            "adv/min": float(adv["all_adv"].min()),
            "adv/zero_std_group_frac": adv["zero_std_group_frac"],
            "adv/group_std_mean": adv["group_std_mean"],
            "adv/trained_frac": adv["global_keep"] / max(r.numel(), 1),
        }
        comps = roll.reward.components
        if comps:
            names = sorted(comps)
            stacked = self._gather(torch.stack([comps[k] for k in names], dim=1).to(self.device))  # (N, K)
            for j, k in enumerate(names):
                col = stacked[:, j]
                ok = ~torch.isnan(col)
                out[f"reward/{k}"] = float(col[ok].mean()) if bool(ok.any()) else math.nan
                out[f"reward/{k}_missing_frac"] = 1.0 - float(ok.float().mean())
            if EXECUTION in comps and CONSISTENCY in comps:
                e, cns = stacked[:, names.index(EXECUTION)], stacked[:, names.index(CONSISTENCY)]
                ok = ~(torch.isnan(e) | torch.isnan(cns))
                lazy = (cns >= 0.75) & (e <= 0.25) & ok
                out["reward/lazy_editor_frac"] = float(lazy.sum()) / max(int(ok.sum()), 1)
        return out

    def update(self, batch: dict[str, Any], roll: Rollout, adv: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def after_update(self) -> None:
        """Called after each RL step's optimizer steps."""

    # --------------------------------------------------------------------------------------------------- update helpers

    def minibatches(self, b: int, epoch: int) -> list[torch.Tensor]:
        """This epoch's shuffled sample indices, split into optimizer-step minibatches."""
        c = self.config
        order = torch.randperm(b, generator=_gen("order", c.seed, self.rl_step, epoch, self.global_rank))
        tb = c.train_batch_size or b
        return [order[i : i + tb] for i in range(0, b, tb)]

    def micro_batches(self, idx: torch.Tensor) -> list[torch.Tensor]:
        mb = self.config.micro_batch_size or idx.numel()
        return [idx[i : i + mb] for i in range(0, idx.numel(), mb)]

    def timestep_subsets(self, b: int, candidates: torch.Tensor, epoch: int) -> torch.Tensor:
        """(B, n) per-sample random subsets of the candidate step indices, n = ceil(fraction * len(candidates))."""
        n = max(1, math.ceil(self.config.timestep_fraction * candidates.numel()))
        g = _gen("timesteps", self.config.seed, self.rl_step, epoch, self.global_rank)
        rows = [candidates[torch.randperm(candidates.numel(), generator=g)[:n]] for _ in range(b)]
        return torch.stack(rows)  # (B, n)

    def global_count(self, mask: torch.Tensor) -> float:
        """Number of ``True`` in ``mask`` over all ranks."""
        n = mask.sum().to(self.device, torch.float32)
        if self._trainer is not None and self.trainer.world_size > 1:
            n = self.trainer.strategy.reduce(n, reduce_op="sum")
        return float(n)

    def apply_optimizer_step(self, skipped: bool) -> dict[str, float]:
        """Clip, check and step (or skip) the optimizer; returns the gradient norm."""
        opt = self.optimizers()
        params = self.policy.trainable_parameters()
        out: dict[str, float] = {}
        if not skipped:
            grads = [p.grad for p in params if p.grad is not None]
            norm = (
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
                if grads
                else torch.zeros(())
            )
            finite = torch.isfinite(norm).float().to(self.device)
            if self._trainer is not None and self.trainer.world_size > 1:
                finite = self.trainer.strategy.reduce(finite, reduce_op="min")
            if float(finite) < 1.0:
                self.skipped_nonfinite += 1
                warnings.warn(
                    f"non-finite gradient at step {self.global_step}: optimizer step skipped",
                    RuntimeWarning,
                    stacklevel=2,
                )
                skipped = True
            else:
                out["train/grad_norm"] = float(norm)
                if self.config.max_grad_norm is not None:
                    self.clip_gradients(
                        opt, gradient_clip_val=self.config.max_grad_norm, gradient_clip_algorithm="norm"
                    )
        if skipped:
            opt.zero_grad(set_to_none=True)
            out["train/skipped_steps"] = 1.0
            return out
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._fresh = False
        if self.ema is not None:
            d = self.config.ema_decay
            with torch.no_grad():
                for name, p in self.policy.named_adapter_parameters("default").items():
                    self.ema[name].lerp_(p.detach(), 1.0 - d)
        return out

    # ---------------------------------------------------------------------------------------------------- images

    def log_samples(self, batch: dict[str, Any], roll: Rollout, adv: dict[str, Any]) -> None:
        """A grid of this rank-0 batch's samples (source | output for edits): PNG + TensorBoard + captions."""
        if self.global_rank != 0 or self._trainer is None:
            return
        n = min(self.config.log_images_max, roll.images.shape[0])
        outs = roll.images[:n]
        if self.config.task == "edit":
            src = pil_to_tensor(batch["image"][:n], outs.shape[-1])
            tiles = torch.stack([src, outs], dim=1).reshape(-1, *outs.shape[1:])  # (2n, 3, H, W) source, output
            nrow = 2 * max(1, int(math.sqrt(n)))
        else:
            tiles, nrow = outs, max(1, int(math.ceil(math.sqrt(n))))
        grid = make_grid(tiles, nrow=nrow, padding=2, pad_value=1.0)  # (3, H', W')
        run_dir = Path(self.trainer.default_root_dir)
        out_dir = run_dir / "samples"
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"step{self.rl_step:06d}"
        tensor_to_pil(grid[None])[0].save(out_dir / f"{stem}.png")
        rewards = roll.reward.rewards[:n].tolist()
        lines = [
            f"{i}\treward={r:.3f}\tadv={float(a):.3f}\t{p}"
            for i, (r, a, p) in enumerate(zip(rewards, adv["adv"][:n].tolist(), batch["prompt"][:n]))
        ]
        (out_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")
        for logger in self.loggers:
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_image"):
                exp.add_image("samples", grid, self.rl_step)

    # ---------------------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        sd = checkpoint.get("state_dict", {})
        checkpoint["state_dict"] = {k: v for k, v in sd.items() if "lora_" in k}
        rng: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "python": random.getstate(),
            "numpy": _numpy_state(),
        }
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        checkpoint["firm_rl"] = {
            "rl_step": self.rl_step,
            "fingerprint": self.policy.base_fingerprint(),
            "ema": None if self.ema is None else {k: v.detach().cpu() for k, v in self.ema.items()},
            "rng": rng,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("firm_rl")
        if state is None:
            raise ValueError("this checkpoint was not written by a FIRM RL module (no `firm_rl` entry)")
        fp = self.policy.base_fingerprint()
        if not torch.allclose(state["fingerprint"].double(), fp, rtol=1e-6, atol=1e-6):
            raise ValueError(
                "the checkpoint was trained on a different base model than policy.pretrained / policy.tiny now builds "
                f"(fingerprint {state['fingerprint'].tolist()} vs {fp.tolist()}); resume with the same policy settings"
            )
        own = {f"policy.{n}" for n, _ in self.policy.named_parameters() if "lora_" in n}
        missing = sorted(own - set(checkpoint.get("state_dict", {})))
        if missing:
            raise ValueError(f"the checkpoint lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
        self.rl_step = int(state["rl_step"])
        if state.get("ema") is not None:
            self.ema = {k: v.to(self.device) for k, v in state["ema"].items()}
        rng = state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "python" in rng:
            random.setstate(_as_tuple(rng["python"]))
        if "numpy" in rng:
            _set_numpy_state(rng["numpy"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


def _numpy_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _set_numpy_state(s: dict[str, Any]) -> None:
    np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(N, 3, H, W) images -> one (3, H', W') grid image, ``nrow`` images per row."""
    n, ch, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.full((ch, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


# ======================================================================================================================
# Flow-GRPO


@dataclass
class FlowGRPOConfig(RLConfig):
    """Flow-GRPO: SDE rollouts, clipped surrogate on the step log-probs, KL of step means to the reference."""

    name: str = "flow_grpo"
    clip_range: float = 1e-4  # PPO clip range of the probability ratio (Flow-GRPO uses ~1e-4)


class FlowGRPOModule(FlowRLModule):
    """Flow-GRPO (Liu et al., 2025) on a LoRA-adapted flow policy; see the module docstring."""

    Config = FlowGRPOConfig
    rollout_adapter = "default"

    def __init__(self, config: FlowGRPOConfig) -> None:
        if config.sampler.method not in ("sde", "cps"):
            raise ValueError(
                f"Flow-GRPO needs stochastic rollouts: module.sampler.method must be sde or cps, got "
                f"{config.sampler.method!r}"
            )
        if config.sampler.noise_level <= 0:
            raise ValueError("Flow-GRPO needs module.sampler.noise_level > 0 (log-probs of stochastic steps)")
        if not config.clip_range > 0:
            raise ValueError(f"module.clip_range must be > 0, got {config.clip_range}")
        super().__init__(config)

    def update(self, batch: dict[str, Any], roll: Rollout, adv: dict[str, Any]) -> dict[str, float]:
        c, s = self.config, self.config.sampler
        b = roll.latents.shape[0]
        dev = self.device
        latents = roll.latents.to(dev)  # (B, T+1, C, h, w)
        steps = torch.nonzero(roll.stochastic).flatten()  # trainable (stochastic) steps
        a, keep = adv["adv"].to(dev), adv["keep"].to(dev).float()
        sums: dict[str, float] = {}
        count = 0
        for epoch in range(c.inner_epochs):
            subsets = self.timestep_subsets(b, steps, epoch)  # (B, n)
            n_t = subsets.shape[1]
            for mb in self.minibatches(b, epoch):
                denom = self.global_count(keep[mb.to(dev)] > 0) * n_t
                world = self.trainer.world_size if self._trainer is not None else 1
                scale = world / max(denom, 1.0)
                skipped = False
                for j in range(n_t):
                    for micro in self.micro_batches(mb):
                        m = micro.to(dev)
                        idx = subsets[micro, j].to(dev)  # (b,) step of each sample
                        x = latents[m, idx]
                        x_next = latents[m, idx + 1]
                        sig, sig_next = roll.sigmas.to(dev)[idx], roll.sigmas.to(dev)[idx + 1]
                        coefs = step_coefs(s.method, sig, sig_next, s.noise_level, roll.sigma_cap)
                        cond = roll.cond.index(m)
                        uncond = roll.uncond.index(m) if roll.uncond is not None else None
                        v_ref = None
                        if c.kl_beta > 0:
                            with torch.no_grad(), self.policy.adapter(None):
                                v_ref = self.policy.velocity(
                                    x, sig, cond, guidance_scale=s.guidance_scale, uncond=uncond
                                )
                        v = self.policy.velocity(x, sig, cond, guidance_scale=s.guidance_scale, uncond=uncond)
                        logp, sq = kernels.step_log_prob(x, v, x_next, *coefs, ref_velocity=v_ref)
                        rollout_lp = roll.log_probs.to(dev)[m, idx]
                        # Before any update since the rollout the current policy *is* the sampling policy: use its
                        # own (detached) log-prob so the ratio is exactly 1, and log how far the rollout's was.
                        old = logp.detach() if self._fresh else rollout_lp
                        sur = kernels.clipped_surrogate(logp, old, a[m], c.clip_range)
                        kl = coefs[1] ** 2 * sq / (2 * coefs[2] ** 2) if sq is not None else torch.zeros_like(logp)
                        per = sur.loss + c.kl_beta * kl  # (b,)
                        w = keep[m]
                        loss = (per * w).sum() * scale  # this micro-batch's share of the minibatch mean
                        loss = self.finite_or_skip(loss)
                        if loss is None:
                            skipped = True
                            break
                        self.manual_backward(loss)
                        ratio = torch.exp(logp.detach() - old)
                        wsum = float(w.sum())
                        if wsum > 0:
                            for key, val in (
                                ("train/policy_loss", (sur.loss.detach() * w).sum() / wsum),
                                ("train/kl", (kl.detach() * w).sum() / wsum),
                                ("train/clip_frac", ((ratio - 1).abs() > c.clip_range).float().mul(w).sum() / wsum),
                                ("train/approx_kl", (0.5 * (logp.detach() - old) ** 2 * w).sum() / wsum),
                                ("train/ratio_mean", (ratio * w).sum() / wsum),
                                ("train/logp_rollout_gap", ((logp.detach() - rollout_lp).abs() * w).sum() / wsum),
                            ):
                                sums[key] = sums.get(key, 0.0) + float(val)
                            count += 1
                    if skipped:
                        break
                for k, v in self.apply_optimizer_step(skipped).items():
                    sums[k] = sums.get(k, 0.0) + v
        out = {k: v / max(count, 1) for k, v in sums.items() if not k.startswith(("train/grad_norm", "train/skipped"))}
        out.update({k: v for k, v in sums.items() if k.startswith(("train/grad_norm", "train/skipped"))})
        return out


# ======================================================================================================================
# DiffusionNFT


@dataclass
class DiffusionNFTConfig(RLConfig):
    """DiffusionNFT: deterministic rollouts with the old policy, negative-aware flow-matching loss."""

    name: str = "diffusion_nft"
    sampler: SamplerConfig = field(default_factory=lambda: SamplerConfig(method="dpm2", noise_level=0.0))
    beta: float = 1.0  # strength of the implicit positive / negative policies
    old_decay_rate: float = 0.001  # old-policy decay grows by this per RL step ...
    old_decay_max: float = 0.5  # ... up to this (DiffusionNFT: min(0.001 * step, 0.5))
    old_decay_start: int = 0  # RL steps with decay 0 (old = trained) before the decay starts growing


class DiffusionNFTModule(FlowRLModule):
    """DiffusionNFT (Zheng et al., 2025) on a LoRA-adapted flow policy; see the module docstring."""

    Config = DiffusionNFTConfig
    rollout_adapter = OLD_ADAPTER
    needs_old_adapter = True

    def __init__(self, config: DiffusionNFTConfig) -> None:
        if not config.beta > 0:
            raise ValueError(f"module.beta must be > 0, got {config.beta}")
        super().__init__(config)

    def old_decay(self, step: int) -> float:
        c = self.config
        if step < c.old_decay_start:
            return 0.0
        return min(c.old_decay_rate * (step - c.old_decay_start), c.old_decay_max)

    def after_update(self) -> None:
        self.policy.update_old(self.old_decay(self.rl_step))

    def update(self, batch: dict[str, Any], roll: Rollout, adv: dict[str, Any]) -> dict[str, float]:
        c = self.config
        dev = self.device
        x0 = roll.latents[:, -1].to(dev)  # (B, C, h, w)
        b = x0.shape[0]
        a, keep = adv["adv"].to(dev), adv["keep"].to(dev)
        r = (a.clamp(-c.adv_clip_max, c.adv_clip_max) / c.adv_clip_max / 2 + 0.5).clamp(0, 1)  # (B,)
        candidates = torch.arange(roll.sigmas.numel() - 1)  # every sampling sigma (not the final 0)
        sigmas = roll.sigmas.to(dev)
        sums: dict[str, float] = {}
        count = 0
        world = self.trainer.world_size if self._trainer is not None else 1
        for epoch in range(c.inner_epochs):
            subsets = self.timestep_subsets(b, candidates, epoch)  # (B, n)
            n_t = subsets.shape[1]
            g = _gen("renoise", c.seed, self.rl_step, epoch, self.global_rank)
            for mb in self.minibatches(b, epoch):
                denom = self.global_count(keep[mb.to(dev)]) * n_t
                scale = world / max(denom, 1.0)
                skipped = False
                for j in range(n_t):
                    for micro in self.micro_batches(mb):
                        m = micro.to(dev)
                        t = sigmas[subsets[micro, j].to(dev)]  # (b,)
                        noise = torch.randn(x0[m].shape, generator=g).to(dev)
                        tb = t.view(-1, 1, 1, 1)
                        x_t = (1 - tb) * x0[m] + tb * noise
                        cond = roll.cond.index(m)
                        with torch.no_grad():
                            with self.policy.adapter(OLD_ADAPTER):
                                v_old = self.policy.velocity(x_t, t, cond)
                            v_ref = None
                            if c.kl_beta > 0:
                                with self.policy.adapter(None):
                                    v_ref = self.policy.velocity(x_t, t, cond)
                        v = self.policy.velocity(x_t, t, cond)
                        w = keep[m]
                        n_valid = int(w.sum())
                        if n_valid:
                            sel = w.nonzero().flatten()
                            loss_m, st = kernels.nft_loss(
                                v[sel],
                                v_old[sel],
                                None if v_ref is None else v_ref[sel],
                                x_t[sel],
                                x0[m][sel],
                                t[sel],
                                r[m][sel],
                                beta=c.beta,
                                adv_clip_max=c.adv_clip_max,
                                kl_beta=c.kl_beta,
                            )
                            loss = loss_m * n_valid * scale
                        else:
                            loss = v.sum() * 0.0  # keeps every rank's backward count equal under DDP
                        loss = self.finite_or_skip(loss)
                        if loss is None:
                            skipped = True
                            break
                        self.manual_backward(loss)
                        if n_valid:
                            for key in ("policy", "kl", "loss_pos", "loss_neg"):
                                sums[f"train/{key}"] = sums.get(f"train/{key}", 0.0) + float(st[key].mean())
                            sums["train/r_mean"] = sums.get("train/r_mean", 0.0) + float(r[m][sel].mean())
                            count += 1
                    if skipped:
                        break
                for k, v in self.apply_optimizer_step(skipped).items():
                    sums[k] = sums.get(k, 0.0) + v
        out = {k: v / max(count, 1) for k, v in sums.items() if not k.startswith(("train/grad_norm", "train/skipped"))}
        out.update({k: v for k, v in sums.items() if k.startswith(("train/grad_norm", "train/skipped"))})
        out["train/old_decay"] = self.old_decay(self.rl_step + 1)
        return out
