"""The rollout of one RL step: sample this rank's batch in chunks while the critic scores the previous chunk.

Each chunk's images go to the critic on a worker thread (:class:`firm.algorithms.scoring.OverlappedScorer`) as soon as
they are decoded, and the next chunk is sampled meanwhile. Which steps are stochastic comes from the algorithm's
:meth:`~firm.algorithms.base.RLAlgorithm.sde_window` hook; which adapter samples from its ``rollout_adapter``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from firm.algorithms.scoring import build_requests
from firm.algorithms.state import generator
from firm.images import to_pil
from firm.policies.encoders import Conditioning
from firm.policies.samplers import SAMPLERS, sample
from firm.rewards.functions import RewardOutput

if TYPE_CHECKING:
    from firm.algorithms.base import RLAlgorithm


@dataclass
class Rollout:
    """One rollout of this rank's batch."""

    cond: Conditioning
    uncond: Conditioning | None
    latents: torch.Tensor  # (B, T + 1, C, h, w) when every latent is recorded; (B, 2, C, h, w) first / final otherwise
    log_probs: torch.Tensor  # (B, T) behaviour log-probs of the stochastic steps (0 elsewhere)
    sigmas: torch.Tensor  # (T + 1,)
    stochastic: torch.Tensor  # (T,) bool
    sigma_cap: float
    images: torch.Tensor  # (B, 3, H, W) in [0, 1], on the CPU
    reward: RewardOutput | None  # None until collected (asynchronous rollouts: while the critic still scores)
    rollout_s: float
    critic_wait_s: float
    critic_failures: int
    means: torch.Tensor | None = None  # (B, T, C, h, w) behaviour step means, when the algorithm records them
    group: int = 0  # the scorer group of this rollout's chunks (its RL step)


def initial_noise(module: RLAlgorithm, groups: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) initial latents; per group (same on every rank) or per sample, seeded by the RL step."""
    c = module.config
    shape = module.policy.latent_shape()
    rows = []
    for i, g in enumerate(groups.tolist()):
        parts = (
            ("noise", c.seed, module.rl_step, "group", g)
            if c.sampler.same_noise_in_group
            else ("noise", c.seed, module.rl_step, "rank", module.global_rank, i)
        )
        rows.append(torch.randn(shape, generator=generator(*parts)))
    return torch.stack(rows).to(module.device)


@torch.no_grad()
def run_rollout(module: RLAlgorithm, batch: dict[str, Any], *, collect: bool = True) -> Rollout:
    """Sample, decode and score this rank's batch (see the module docstring).

    With ``collect=False`` the chunks are left with the critic and ``reward`` is None: :func:`collect_rewards` waits
    for them later (the asynchronous RL step samples rollout k + 1 while rollout k is scored and trained on).
    """
    c, s = module.config, module.config.sampler
    policy = module.policy
    t0 = time.perf_counter()
    prompts, sources = batch["prompt"], batch["image"]
    images_in = sources if c.task == "edit" else None
    cond = policy.encode_prompts(prompts, images_in)
    uncond = policy.encode_negative(cond, images_in) if policy.needs_uncond(s.guidance_scale) else None
    noise = initial_noise(module, batch["group"])
    sigmas = policy.sigmas(s.num_steps)
    window = module.sde_window(s.num_steps)
    record = SAMPLERS[s.method].stochastic  # policy-gradient training needs every latent of the trajectory
    scorer = module.scorer
    n_chunks = -(-noise.shape[0] // c.rollout_chunk)
    # asynchronous: the previous rollout's chunks may all still be queued; only this rollout's count against the queue
    scorer.max_pending = c.critic_queue + (n_chunks if not collect else 0)
    wait0 = scorer.wait_s
    group = module.rl_step
    latents, log_probs, images, means = [], [], [], []
    traj = None
    b = noise.shape[0]
    for k, lo in enumerate(range(0, b, c.rollout_chunk)):
        sl = slice(lo, min(lo + c.rollout_chunk, b))
        cc = cond.index(sl)
        uc = uncond.index(sl) if uncond is not None else None

        def vfn(x: torch.Tensor, sig: torch.Tensor, cc=cc, uc=uc) -> torch.Tensor:
            return policy.velocity(x, sig, cc, guidance_scale=s.guidance_scale, uncond=uc)

        with policy.adapter(module.rollout_adapter):
            traj = sample(
                vfn,
                noise[sl],
                sigmas,
                method=s.method,
                noise_level=s.noise_level,
                stochastic=window,
                generator=generator("sde", c.seed, module.rl_step, module.global_rank, k, device=module.device),
                record=record,
                deterministic=s.deterministic_solver,
                log_prob=s.log_prob,
                record_means=module.records_means,
            )
        imgs = policy.decode(traj.final).cpu()  # (b, 3, H, W)
        reqs = build_requests(
            c.task,
            to_pil(imgs),
            prompts[sl],
            [str(x) for x in batch["key"][sl]],
            sources[sl] if c.task == "edit" else None,
            batch.get("checklist", [None] * b)[sl],
        )
        scorer.submit(reqs, group)
        latents.append(traj.latents)
        log_probs.append(traj.log_probs)
        images.append(imgs)
        if traj.means is not None:
            means.append(traj.means)
    rollout_s = time.perf_counter() - t0
    roll = Rollout(
        cond=cond,
        uncond=uncond,
        latents=torch.cat(latents),
        log_probs=torch.cat(log_probs),
        sigmas=sigmas,
        stochastic=traj.stochastic,
        sigma_cap=traj.sigma_cap,
        images=torch.cat(images),
        reward=None,
        rollout_s=rollout_s,
        critic_wait_s=scorer.wait_s - wait0,
        critic_failures=0,
        means=torch.cat(means) if means else None,
        group=group,
    )
    return collect_rewards(module, roll) if collect else roll


def collect_rewards(module: RLAlgorithm, roll: Rollout) -> Rollout:
    """Wait for the critic's scores of ``roll`` (counted as critic wait) and store them, with its failed chunks."""
    scorer = module.scorer
    wait0 = scorer.wait_s
    roll.reward = scorer.collect(roll.group)
    roll.critic_wait_s += scorer.wait_s - wait0
    roll.critic_failures = scorer.group_failures.pop(roll.group, 0)
    return roll
