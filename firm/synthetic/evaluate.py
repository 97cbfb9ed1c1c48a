"""Held-out evaluation of shapes-world policies: sample a policy on tasks, score the images with the rule critic.

Used by the pretraining module (how good is the base model?), the RL demo report (base vs trained) and the reward
ablation. Sampling is deterministic given ``(seed, task key)``: the initial noise of a task is drawn from a generator
seeded by both, so the base and the trained policy start from the *same* noise on each task (a paired comparison),
and a different evaluation seed draws different noise for every task.

Scores are normalised to [0, 1] (``(s - 1) / 4``); the headline reward is CME for editing and QMA for generation,
whatever reward a run trained on.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from firm.critics.types import CONSISTENCY, EXECUTION, INSTRUCTION, QUALITY
from firm.rewards.combiners import CMEReward, QMAReward
from firm.rewards.functions import FirmEditReward, FirmGenReward
from firm.synthetic.critic import ShapesRuleCritic, task_request
from firm.synthetic.tasks import EditTask, GenTask
from firm.synthetic.world import WorldConfig, render

TASK_DIMENSIONS = {"edit": (EXECUTION, CONSISTENCY), "gen": (INSTRUCTION, QUALITY)}
HEADLINE = {"edit": "cme", "gen": "qma"}


def task_kind(tasks: Sequence[EditTask | GenTask]) -> str:
    """``"edit"`` or ``"gen"`` for a non-empty list of tasks of one kind."""
    if not tasks:
        raise ValueError("no tasks to evaluate")
    kinds = {"edit" if isinstance(t, EditTask) else "gen" for t in tasks}
    if len(kinds) != 1:
        raise ValueError("tasks mix editing and generation; evaluate them separately")
    return kinds.pop()


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") & ((1 << 63) - 1)


@torch.no_grad()
def sample_tasks(
    policy: Any,
    tasks: Sequence[EditTask | GenTask],
    world: WorldConfig,
    *,
    seed: int,
    num_steps: int,
    method: str = "dpm2",
    adapter: str | None = None,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
    progress: bool = False,
    desc: str = "sampling",
) -> list[Image.Image]:
    """Images a :class:`~firm.policies.policy.FlowPolicy` produces for ``tasks`` (deterministic sampler).

    Args:
        policy: the flow policy (``encode_prompts`` / ``velocity`` / ``decode`` / ``adapter``).
        tasks: editing tasks (the policy gets the rendered source and the instruction) or generation tasks.
        world: renders edit sources.
        seed: evaluation seed; task ``k``'s initial noise is seeded by ``(seed, k.key)``.
        num_steps: sampling steps.
        method: a deterministic sampler of :mod:`firm.policies.samplers` (``dpm2`` or ``ode``).
        adapter: ``None`` for the base model (adapters disabled), ``"default"`` for the trained adapter.
        batch_size: tasks per sampling batch.
        guidance_scale: classifier-free guidance (1: off).
        progress: show a progress bar.
        desc: its label.
    """
    from firm.policies.samplers import DETERMINISTIC_SOLVERS, sample

    if method not in DETERMINISTIC_SOLVERS:
        raise ValueError(
            f"evaluation samples deterministically: method must be one of {DETERMINISTIC_SOLVERS}, got {method!r}"
        )
    kind = task_kind(tasks)
    sigmas = policy.sigmas(num_steps)
    shape = policy.latent_shape()
    out: list[Image.Image] = []
    starts = range(0, len(tasks), batch_size)
    for lo in tqdm(starts, desc=desc, disable=not progress, leave=False):
        chunk = tasks[lo : lo + batch_size]
        if kind == "edit":
            prompts, sources = [t.instruction for t in chunk], [render(t.source, world) for t in chunk]
        else:
            prompts, sources = [t.prompt for t in chunk], None
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator().manual_seed(_seed_of("eval", seed, t.key))) for t in chunk]
        ).to(policy.device)  # (b, C, h, w)
        with policy.adapter(adapter):
            cond = policy.encode_prompts(prompts, sources)
            uncond = policy.encode_negative(cond, sources) if policy.needs_uncond(guidance_scale) else None

            def vfn(x: torch.Tensor, sig: torch.Tensor, cond=cond, uncond=uncond) -> torch.Tensor:
                return policy.velocity(x, sig, cond, guidance_scale=guidance_scale, uncond=uncond)

            traj = sample(vfn, noise, sigmas, method=method, noise_level=0.0, record=False)
        images = policy.decode(traj.final).cpu()  # (b, 3, H, W) in [0, 1]
        arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (b, H, W, 3)
        out.extend(Image.fromarray(a, mode="RGB") for a in arr)
    return out


@dataclass
class EvalResult:
    """Scores of one policy on one task set under several evaluation seeds.

    Attributes:
        task: ``"edit"`` or ``"gen"``.
        keys: task keys, in order.
        seeds: the evaluation seeds (rows of every array).
        components: per critic dimension, (S, N) scores normalised to [0, 1] (NaN where the critic gave none).
        reward: (S, N) the headline reward (CME for editing, QMA for generation), NaN where a component is missing.
        images: the images of the first seed (for grids), in task order.
    """

    task: str
    keys: list[str]
    seeds: list[int]
    components: dict[str, np.ndarray]
    reward: np.ndarray
    images: list[Image.Image] = field(default_factory=list)

    def seed_means(self) -> dict[str, list[float]]:
        """Per seed, the mean over tasks of the reward and each component (missing scores left out)."""
        out = {"reward": [_nanmean(r) for r in self.reward]}
        for k, v in self.components.items():
            out[k] = [_nanmean(r) for r in v]
        return out

    def summary(self) -> dict[str, Any]:
        """``{reward, <components>}`` means over tasks and seeds, plus per-seed means, their std and missing rates."""
        per_seed = self.seed_means()
        out: dict[str, Any] = {k: float(np.mean(v)) for k, v in per_seed.items()}
        out["per_seed"] = per_seed
        out["seed_std"] = {k: _std(v) for k, v in per_seed.items()}
        out["n_tasks"] = len(self.keys)
        out["seeds"] = list(self.seeds)
        out["missing_frac"] = float(np.isnan(self.reward).mean())
        if self.task == "edit":
            out["lazy_frac"] = self.lazy_fraction()
        return out

    def lazy_fraction(self) -> float:
        """Editing: share of outputs that look like the lazy editor (execution <= 0.25, consistency >= 0.75)."""
        e, c = self.components[EXECUTION], self.components[CONSISTENCY]
        ok = ~(np.isnan(e) | np.isnan(c))
        return float(((e <= 0.25) & (c >= 0.75) & ok).sum() / max(int(ok.sum()), 1))


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else math.nan


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); 0 for a single value."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def evaluate_policy(
    policy: Any,
    tasks: Sequence[EditTask | GenTask],
    world: WorldConfig,
    *,
    seeds: Sequence[int],
    num_steps: int,
    method: str = "dpm2",
    adapter: str | None = None,
    critic: ShapesRuleCritic | None = None,
    batch_size: int = 64,
    guidance_scale: float = 1.0,
    progress: bool = False,
    desc: str = "eval",
) -> EvalResult:
    """Sample ``policy`` on ``tasks`` once per seed and score every image with the rule critic.

    Returns:
        An :class:`EvalResult` (normalised components, headline reward, first seed's images).
    """
    kind = task_kind(tasks)
    critic = critic or ShapesRuleCritic()
    if kind == "edit":
        reward_fn: Any = FirmEditReward(critic, CMEReward())
    else:
        reward_fn = FirmGenReward(critic, QMAReward())
    dims = TASK_DIMENSIONS[kind]
    comps = {d: np.full((len(seeds), len(tasks)), np.nan) for d in dims}
    reward = np.full((len(seeds), len(tasks)), np.nan)
    first: list[Image.Image] = []
    for i, seed in enumerate(seeds):
        images = sample_tasks(
            policy,
            tasks,
            world,
            seed=seed,
            num_steps=num_steps,
            method=method,
            adapter=adapter,
            batch_size=batch_size,
            guidance_scale=guidance_scale,
            progress=progress,
            desc=f"{desc} seed {seed}",
        )
        out = reward_fn([task_request(t, im, world) for t, im in zip(tasks, images)])
        reward[i] = out.rewards.double().numpy()
        for d in dims:
            comps[d][i] = out.components[d].double().numpy()
        if i == 0:
            first = images
    return EvalResult(kind, [t.key for t in tasks], list(seeds), comps, reward, first)


def score_images(
    tasks: Sequence[EditTask | GenTask], images: Sequence[Image.Image], world: WorldConfig, critic: Any = None
) -> list[dict[str, int | None]]:
    """The rule critic's 1..5 scores of each (task, image) pair."""
    critic = critic or ShapesRuleCritic()
    return [dict(r.scores) for r in critic.score([task_request(t, im, world) for t, im in zip(tasks, images)])]
