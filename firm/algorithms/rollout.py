"""The rollout of one RL step: sample this rank's batch in chunks while the critic scores the previous chunk.

Each chunk's images go to the critic on a worker thread (:class:`firm.algorithms.scoring.OverlappedScorer`) as soon as
they are decoded, and the next chunk is sampled meanwhile. A :class:`Rollouter` holds what does not change between RL
steps (the policy, the scorer, the settings, which adapter samples); each call gets the step's place (RL step, rank,
device) and its stochastic steps (the algorithm's :meth:`~firm.algorithms.base.RLAlgorithm.sde_window` hook).
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
from firm.vocab import Task

if TYPE_CHECKING:
    from firm.algorithms.config import RLConfig
    from firm.algorithms.scoring import OverlappedScorer
    from firm.policies.policy import FlowPolicy


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


class Rollouter:
    """Samples, decodes and scores one rank's batch per RL step (see the module docstring).

    Args:
        policy: the flow policy that samples.
        scorer: hands each chunk's requests to the critic on a worker thread, and collects the rewards.
        config: the RL settings (``task``, ``sampler``, ``rollout_chunk``, ``critic_queue``, ``seed``).
        adapter: the LoRA adapter that samples (None: the base model).
        record_means: keep every stochastic step's mean too (GRPO-Guard).
    """

    def __init__(
        self,
        policy: FlowPolicy,
        scorer: OverlappedScorer,
        config: RLConfig,
        *,
        adapter: str | None = "default",
        record_means: bool = False,
    ) -> None:
        self.policy, self.scorer, self.config = policy, scorer, config
        self.adapter, self.record_means = adapter, record_means

    def initial_noise(self, groups: torch.Tensor, *, rl_step: int, rank: int, device: Any) -> torch.Tensor:
        """(B, C, h, w) initial latents; per group (same on every rank) or per sample, seeded by the RL step."""
        c = self.config
        shape = self.policy.latent_shape()
        rows = []
        for i, g in enumerate(groups.tolist()):
            if c.sampler.same_noise_in_group:
                parts = ("noise", c.seed, rl_step, "group", g)
            elif c.rng_streams == "sample":  # the sample's place in the step's global batch
                parts = ("noise", c.seed, rl_step, "sample", rank * len(groups) + i)
            else:
                parts = ("noise", c.seed, rl_step, "rank", rank, i)
            # float32 whatever the default dtype (Lightning's bf16-true sets bfloat16): latents stay float32 outside the
            # transformer's forward
            rows.append(torch.randn(shape, generator=generator(*parts), dtype=torch.float32))
        return torch.stack(rows).to(device)

    @torch.no_grad()
    def run(
        self,
        batch: dict[str, Any],
        *,
        rl_step: int,
        rank: int,
        device: Any,
        window: torch.Tensor,
        collect: bool = True,
    ) -> Rollout:
        """Sample, decode and score ``batch`` with the stochastic steps ``window`` ((T,) bool).

        With ``collect=False`` the chunks are left with the critic and ``reward`` is None: :meth:`collect` waits for
        them later (the asynchronous RL step samples rollout k + 1 while rollout k is scored and trained on).
        """
        c, s = self.config, self.config.sampler
        policy, scorer = self.policy, self.scorer
        t0 = time.perf_counter()
        prompts, sources = batch["prompt"], batch["image"]
        images_in = sources if c.task == Task.EDIT else None
        cond = policy.encode_prompts(prompts, images_in)
        uncond = policy.encode_negative(cond, images_in) if policy.needs_uncond(s.guidance_scale) else None
        noise = self.initial_noise(batch["group"], rl_step=rl_step, rank=rank, device=device)
        sigmas = policy.sigmas(s.num_steps)
        record = SAMPLERS[s.method].stochastic  # policy-gradient training needs every latent of the trajectory
        n_chunks = -(-noise.shape[0] // c.rollout_chunk)
        # asynchronous: the previous rollout's chunks may all still be queued; only this rollout's count against the
        # queue
        scorer.max_pending = c.critic_queue + (n_chunks if not collect else 0)
        wait0 = scorer.wait_s
        group = rl_step
        latents, log_probs, images, means = [], [], [], []
        traj = None
        b = noise.shape[0]
        for k, lo in enumerate(range(0, b, c.rollout_chunk)):
            sl = slice(lo, min(lo + c.rollout_chunk, b))
            cc = cond.index(sl)
            uc = uncond.index(sl) if uncond is not None else None

            def vfn(x: torch.Tensor, sig: torch.Tensor, cc=cc, uc=uc) -> torch.Tensor:
                return policy.velocity(x, sig, cc, guidance_scale=s.guidance_scale, uncond=uc)

            with policy.adapter(self.adapter):
                traj = sample(
                    vfn,
                    noise[sl],
                    sigmas,
                    method=s.method,
                    noise_level=s.noise_level,
                    stochastic=window,
                    generator=(
                        [
                            generator("sde", c.seed, rl_step, "sample", rank * b + i, device=device)
                            for i in range(lo, sl.stop)
                        ]
                        if c.rng_streams == "sample"
                        else generator("sde", c.seed, rl_step, rank, k, device=device)
                    ),
                    record=record,
                    deterministic=s.deterministic_solver,
                    log_prob=s.log_prob,
                    record_means=self.record_means,
                )
            imgs = policy.decode(traj.final).cpu()  # (b, 3, H, W)
            reqs = build_requests(
                c.task,
                to_pil(imgs),
                prompts[sl],
                [str(x) for x in batch["key"][sl]],
                sources[sl] if c.task == Task.EDIT else None,
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
        return self.collect(roll) if collect else roll

    def collect(self, roll: Rollout) -> Rollout:
        """Wait for the critic's scores of ``roll`` (counted as critic wait) and store them, with its failed chunks."""
        scorer = self.scorer
        wait0 = scorer.wait_s
        roll.reward = scorer.collect(roll.group)
        roll.critic_wait_s += scorer.wait_s - wait0
        roll.critic_failures = scorer.group_failures.pop(roll.group, 0)
        return roll
