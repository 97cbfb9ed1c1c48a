"""Settings shared by every RL algorithm: how rollouts are sampled and how the shared RL step runs.

Each algorithm's own settings extend :class:`RLConfig` in its file (``flow_grpo.py``, ``diffusion_nft.py``, ...).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from firm.config import component_field
from firm.policies.policy import PolicyConfig
from firm.policies.samplers import DETERMINISTIC_SOLVERS, LOG_PROB_FORMS, SAMPLERS
from firm.vocab import Task

ADV_SCALES = ("group", "batch", "none")


@dataclass
class SamplerConfig:
    """How rollouts are sampled."""

    num_steps: int = 10  # sampling steps per rollout (the paper: 10 for generation, 6 for editing)
    method: str = "sde"  # sde (Flow-GRPO) | cps | ode (Euler) | dpm2 (DPM-Solver++(2M), deterministic)
    noise_level: float = 0.7  # noise scale of the stochastic steps (sde: a in a*sqrt(s/(1-s)); cps: sin(a*pi/2))
    guidance_scale: float = 1.0  # classifier-free guidance scale; 1 turns CFG off
    sde_window_size: int = 0  # stochastic steps per rollout, consecutive (0: every step); deterministic elsewhere
    sde_window_max_start: int | None = None  # the window starts uniformly in [0, this] (null: anywhere it fits)
    deterministic_solver: str = "ode"  # the steps outside the SDE window: ode (Euler) | dpm2 (MixGRPO-Flash)
    log_prob: str | None = None  # gaussian | residual (null: the method's Flow-GRPO form: sde gaussian, cps residual)
    same_noise_in_group: bool = False  # all members of a prompt group start from the same initial noise


@dataclass
class RLConfig:
    """Settings of the shared RL step (rollout, critic, advantages, optimizer), common to every algorithm."""

    name: str = "flow_rl"
    task: str = "gen"  # gen (text-to-image, GenRequest) | edit (instruction + source image, EditRequest)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    # The reward: either one FIRM critic (`critic` + `reward`, a shorthand for a mix of that critic alone) or a mix of
    # scorers (`rewards`: label -> {name: <scorer>, weight, score, scale, shift, ...}; firm/rewards/, docs/rewards.md).
    critic: Any = component_field("critics", optional=True)  # the critic backend: {name: ..., **its settings}
    reward: Any = component_field("rewards", optional=True)  # the critic's combiner: {name: cme | qma | ..., **weights}
    critic_dimensions: list[str] | None = None  # judgements to ask for (null: all of the task's, logged even if unused)
    rewards: dict[str, Any] = component_field("scorers", many=True)  # the scorers of a reward mix (instead of critic)
    reward_mix: str = "weighted"  # weighted (sum_k w_k * term_k, group advantages) | gdpo (per-term group z-scores)
    reward_failure: str = "skip"  # a failed score: skip (NaN, left out of its group) | stop (end the run)
    reward_parallel: bool = False  # call the mix's scorers at once, on threads (scorers on other devices or servers)
    critic_failure: str = "raise"  # a chunk whose critic / scorer call raises: raise | missing (counted as missing)
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
    drop_zero_adv: bool = False  # leave out of the loss the samples whose advantage is exactly 0 (Flow-GRPO does)
    zero_std_eps: float = 1e-6  # what counts as zero std
    kl_beta: float = 1e-4  # weight of the KL to the reference policy (adapters disabled); 0 skips its forward
    kl_fraction: float = 1.0  # share of each sample's trained steps that run the reference forward (KL reweighted)
    async_rollout: bool = False  # sample and score step k + 1 while training on step k (one step off-policy)
    ema_decay: float | None = None  # keep an EMA of the LoRA weights with this decay (null: none); exportable
    ema_warmup: bool = True  # EMA decay min((1 + n) / (10 + n), ema_decay) at optimizer step n, as the peers' EMA
    log_images_every: int = 0  # write a grid of samples every N RL steps (0: never); TensorBoard + PNG
    log_images_max: int = 16  # samples in the grid
    max_idle_rl_steps: int = 10  # stop with an error after this many RL steps in a row without an optimizer step
    num_threads: int | None = None  # torch CPU threads (null: torch's default); 1 is much faster on a busy CPU
    callbacks: dict[str, Any] = field(default_factory=dict)  # Lightning callbacks: {registry name: {settings} | null}
    seed: int = 0  # seeds initial noise, SDE noise, windows and timestep subsets (with the RL step and rank)
    # rank: each rank draws its samples' noise from its own streams (the default; the shipped runs' numbers).
    # sample: each sample's noise (initial, SDE, timestep subsets, NFT re-noising) comes from its own stream, keyed by
    # its position in the step's global batch, so N processes x batch B train exactly what 1 process x N*B trains.
    rng_streams: str = "rank"

    def validate(self) -> None:
        """Range checks that `firm run --dry-run` can make before anything is built."""
        s = self.sampler
        self.task = Task.parse(self.task).value  # gen | edit (also: generate, generation, t2i)
        if s.method not in SAMPLERS:
            raise ValueError(f"module.sampler.method must be one of {tuple(SAMPLERS)}, got {s.method!r}")
        if s.deterministic_solver not in DETERMINISTIC_SOLVERS:
            raise ValueError(
                f"module.sampler.deterministic_solver must be one of {DETERMINISTIC_SOLVERS}, "
                f"got {s.deterministic_solver!r}"
            )
        if s.log_prob is not None and s.log_prob not in LOG_PROB_FORMS:
            raise ValueError(f"module.sampler.log_prob must be one of {LOG_PROB_FORMS} or null, got {s.log_prob!r}")
        has_mix = any(v is not None for v in (self.rewards or {}).values())
        if self.critic is not None and has_mix:
            raise ValueError(
                "module: give either `critic:` + `reward:` or a `rewards:` mix, not both; put the critic in the mix as "
                "a scorer: rewards: {critic: {name: critic, critic: {...}, reward: {...}}} (or set critic: null)"
            )
        if self.critic is None and (self.reward is not None or self.critic_dimensions is not None):
            raise ValueError(
                "module.reward / critic_dimensions belong to module.critic; in a `rewards:` mix set them "
                "on the critic scorer"
            )
        from firm.rewards.mix import CALL_FAILURES, FAILURE_POLICIES, MIX_MODES

        for key, allowed in (
            ("reward_mix", MIX_MODES),
            ("reward_failure", FAILURE_POLICIES),
            ("critic_failure", CALL_FAILURES),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key}: must be one of {allowed}, got {getattr(self, key)!r}")
        if self.rng_streams not in ("rank", "sample"):
            raise ValueError(f"rng_streams: must be rank or sample, got {self.rng_streams!r}")
        if s.num_steps < 1:
            raise ValueError(f"module.sampler.num_steps must be >= 1, got {s.num_steps}")
        if self.adv_scale not in ADV_SCALES:
            raise ValueError(f"adv_scale: must be one of {ADV_SCALES}, got {self.adv_scale!r}")
        if not 0 < self.timestep_fraction <= 1:
            raise ValueError(f"timestep_fraction: must be in (0, 1], got {self.timestep_fraction}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: must be finite and > 0, got {self.lr}")
        if not (math.isfinite(self.kl_beta) and self.kl_beta >= 0):
            raise ValueError(f"kl_beta: must be finite and >= 0, got {self.kl_beta}")
        if not 0 < self.kl_fraction <= 1:
            raise ValueError(f"kl_fraction: must be in (0, 1], got {self.kl_fraction}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay: must be in [0, 1) or null, got {self.ema_decay}")
        for key in ("rollout_chunk", "inner_epochs", "critic_queue", "critic_threads", "max_idle_rl_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        from firm.config import build_component

        for name, spec in self.callbacks.items():  # an unknown callback or setting fails here, at --dry-run
            if spec is not None:
                build_component("callbacks", {**dict(spec), "name": name}, source=f"module.callbacks.{name}")
        for key in ("train_batch_size", "micro_batch_size", "num_threads"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1 or null, got {getattr(self, key)}")
