"""Held-out evaluation of shapes-world policies: sample a policy on tasks, score the images with the rule critic.

Used by the recipes (firm/synthetic/recipes/): the pretraining module (how good is the base model?), the RL demo
report (base vs trained) and the reward ablation. Sampling is deterministic given ``(seed, task key)``: the initial
noise of a task is drawn from a generator seeded by both, so the base and the trained policy start from the *same*
noise on each task (a paired comparison), and a different evaluation seed draws different noise for every task.

Scores are normalised to [0, 1] (``(s - 1) / 4``); the headline reward is CME for editing and QMA for generation,
whatever reward a run trained on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from firm.critics.types import CONSISTENCY, EXECUTION, INSTRUCTION, QUALITY
from firm.eval.generate import sample_images
from firm.eval.items import PromptItem, PromptSet
from firm.eval.judges import FirmCriticJudge, Query
from firm.synthetic.critic import ShapesRuleCritic, task_request
from firm.synthetic.tasks import EditTask, GenTask, SplitConfig, edit_tasks, gen_tasks
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


def task_items(tasks: Sequence[EditTask | GenTask], world: WorldConfig) -> list[PromptItem]:
    """Shapes tasks as :class:`firm.eval.items.PromptItem` (edit sources rendered; the noise key is the task key)."""
    kind = task_kind(tasks)
    if kind == "edit":
        return [PromptItem(t.key, t.instruction, t.kind, source=render(t.source, world), key=t.key) for t in tasks]
    return [
        PromptItem(t.key, t.prompt, f"{len(t.spec.objects)}-objects", meta={"checklist": list(t.checklist)}, key=t.key)
        for t in tasks
    ]


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
    """Images a :class:`~firm.policies.policy.FlowPolicy` produces for ``tasks``: `firm eval`'s sampler
    (:func:`firm.eval.generate.sample_images`) on the tasks as prompt items.

    Args:
        policy: the flow policy.
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
    return sample_images(
        policy,
        task_items(tasks, world),
        seed=seed,
        num_steps=num_steps,
        method=method,
        guidance_scale=guidance_scale,
        adapter=adapter,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
    )


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
    judge = ShapesRuleJudge(ShapesRuleJudge.Config(), kind, critic=critic or ShapesRuleCritic())
    items = task_items(tasks, world)
    dims = TASK_DIMENSIONS[kind]
    comps = {d: np.full((len(seeds), len(tasks)), np.nan) for d in dims}
    reward = np.full((len(seeds), len(tasks)), np.nan)
    first: list[Image.Image] = []
    for i, seed in enumerate(seeds):
        images = sample_images(
            policy,
            items,
            seed=seed,
            num_steps=num_steps,
            method=method,
            guidance_scale=guidance_scale,
            adapter=adapter,
            batch_size=batch_size,
            progress=progress,
            desc=f"{desc} seed {seed}",
        )
        metrics = judge.judge_images(items, images)
        reward[i] = [math.nan if m[judge.headline] is None else m[judge.headline] for m in metrics]
        for d in dims:
            comps[d][i] = [math.nan if m[d] is None else m[d] for m in metrics]
        if i == 0:
            first = images
    return EvalResult(kind, [t.key for t in tasks], list(seeds), comps, reward, first)


def score_images(
    tasks: Sequence[EditTask | GenTask], images: Sequence[Image.Image], world: WorldConfig, critic: Any = None
) -> list[dict[str, int | None]]:
    """The rule critic's 1..5 scores of each (task, image) pair."""
    critic = critic or ShapesRuleCritic()
    return [dict(r.scores) for r in critic.score([task_request(t, im, world) for t, im in zip(tasks, images)])]


# --------------------------------------------------------------------------------------------------------------------
# `firm eval` plugins: the shapes world's prompt sets and judge (registered in firm.registry.EVAL_SETS / JUDGES)


class ShapesRuleJudge(FirmCriticJudge):
    """The shapes world's judge: FIRM's rubrics scored exactly by the pixel rule critic (CME / QMA headline)."""

    @dataclass
    class Config:
        name: str = "shapes_rule"
        critic: dict[str, Any] = field(default_factory=lambda: {"name": "shapes_rule"})  # the rule critic's settings
        reward: dict[str, Any] | None = None  # the combiner (null: cme for edits, qma for generation)
        use_expected: bool = False  # (the rule critic gives integer scores only)

    def judge_images(self, items: list[PromptItem], images: list[Image.Image]) -> list[dict[str, Any]]:
        """Metrics of ``images`` (one per item) in memory, without a cache (the demo's held-out evaluation)."""
        queries = [Query(f"mem/{it.id}", q, it, im) for it, im in zip(items, images, strict=True) for q in self.dims]
        preds = self.answer(queries)
        answers = [
            {
                q.qid: p
                for q, p in zip(queries[i * len(self.dims) : (i + 1) * len(self.dims)], preds[i * len(self.dims) :])
            }
            for i in range(len(items))
        ]
        return self.metrics_batch(items, answers)


class ShapesEditSet:
    """Held-out shapes-world editing tasks (the ``test`` split), exact ground truth for the rule critic."""

    @dataclass
    class Config:
        name: str = "shapes_edit"
        n_tasks: int = 64  # tasks in the set
        split_name: str = "test"  # which split (keep `test`: base models and RL never saw it)
        world: WorldConfig = field(default_factory=WorldConfig)  # scene settings
        split: SplitConfig = field(default_factory=SplitConfig)  # how tasks are split into train / test
        kinds: list[str] | None = None  # instruction kinds (null: all)

    task = "edit"

    def __init__(self, config: Any) -> None:
        self.config = config

    def tasks(self) -> list[EditTask | GenTask]:
        c = self.config
        return list(edit_tasks(c.split_name, world=c.world, split_config=c.split, kinds=c.kinds, limit=c.n_tasks))

    def load(self) -> PromptSet:
        return PromptSet(self.config.name, self.task, task_items(self.tasks(), self.config.world), "shapes world")


class ShapesGenSet(ShapesEditSet):
    """Held-out shapes-world generation tasks (the ``test`` split)."""

    @dataclass
    class Config:
        name: str = "shapes_gen"
        n_tasks: int = 64  # tasks in the set
        split_name: str = "test"  # which split
        world: WorldConfig = field(default_factory=WorldConfig)  # scene settings
        split: SplitConfig = field(default_factory=SplitConfig)  # how tasks are split into train / test
        exclusive_prob: float = 0.5  # share of prompts ending in "and nothing else"

    task = "gen"

    def tasks(self) -> list[EditTask | GenTask]:
        c = self.config
        return list(
            gen_tasks(
                c.split_name, world=c.world, split_config=c.split, exclusive_prob=c.exclusive_prob, limit=c.n_tasks
            )
        )
