"""Datasets of the shapes world: training pairs for base models, and critic-labelled samples for curation.

- :class:`EditPairs` - ``(source, target, instruction)`` samples of one split (pretraining an editor; RL prompts).
- :class:`GenSamples` - ``(prompt, image, checklist)`` samples of one split (pretraining a generator; RL prompts).
- :func:`scored_edit_samples` / :func:`scored_gen_samples` - simulated model outputs of every quality (perfect,
  lazy copy, partial, over-edited, ...), optionally degraded in pixels, each scored by the rule critic (and by the
  ground truth), for reward-data curation and critic training.
- :func:`export_prompt_records` - a split's tasks as an RL prompt file (JSONL + source PNGs).

Images are PIL images, or with ``as_tensor=True`` float tensors ``(3, H, W)`` in [0, 1]; :func:`collate` batches
either (tensors are stacked, everything else kept as lists).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from firm.synthetic.critic import GroundTruthScorer, ShapesRuleCritic, task_request
from firm.synthetic.simulate import EDIT_MODES, GEN_MODES, degrade, simulate_edit, simulate_generation
from firm.synthetic.tasks import EditTask, GenTask, SplitConfig, edit_tasks, gen_tasks
from firm.synthetic.world import WorldConfig, render


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a float tensor ``(3, H, W)`` in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def from_tensor(x: torch.Tensor, value_range: tuple[float, float] = (0.0, 1.0)) -> Image.Image:
    """A ``(3, H, W)`` tensor with values in ``value_range`` (e.g. ``(-1, 1)`` for diffusion outputs) as an image."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) tensor, got shape {tuple(x.shape)}")
    lo, hi = value_range
    x = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    arr = (x.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(arr, mode="RGB")


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples: tensors stacked along a new first dim, other values gathered into lists."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    out: dict[str, Any] = {}
    for k in samples[0]:
        vals = [s[k] for s in samples]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


class EditPairs(Dataset):
    """The first ``length`` editing tasks of ``split``, as ``{source, target, instruction, kind, seed}`` samples.

    Args:
        length: number of tasks.
        split: ``"train"``, ``"test"`` or None (every task).
        world: scene settings (canvas size, colours, shapes, ...).
        split_config: how tasks are split (see :class:`~firm.synthetic.tasks.SplitConfig`).
        kinds: instruction kinds to draw from (default: all five).
        start: first seed to consider (use disjoint ranges for independent datasets of the same split).
        as_tensor: return ``(3, H, W)`` float tensors in [0, 1] instead of PIL images.
    """

    def __init__(
        self,
        length: int,
        split: str | None = "train",
        world: WorldConfig | None = None,
        split_config: SplitConfig | None = None,
        kinds: Sequence[str] | None = None,
        start: int = 0,
        as_tensor: bool = True,
    ) -> None:
        self.world = world or WorldConfig()
        self.as_tensor = as_tensor
        self.tasks: list[EditTask] = list(
            edit_tasks(split, world=self.world, split_config=split_config, kinds=kinds, start=start, limit=length)
        )

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        t = self.tasks[i]
        src, tgt = render(t.source, self.world), render(t.target, self.world)
        if self.as_tensor:
            src, tgt = to_tensor(src), to_tensor(tgt)
        return {"source": src, "target": tgt, "instruction": t.instruction, "kind": t.kind, "seed": t.seed}


class GenSamples(Dataset):
    """The first ``length`` generation tasks of ``split``, as ``{image, prompt, checklist, seed}`` samples.

    Arguments as for :class:`EditPairs`; ``exclusive_prob`` is the share of prompts ending in "and nothing else".
    """

    def __init__(
        self,
        length: int,
        split: str | None = "train",
        world: WorldConfig | None = None,
        split_config: SplitConfig | None = None,
        exclusive_prob: float = 0.5,
        start: int = 0,
        as_tensor: bool = True,
    ) -> None:
        self.world = world or WorldConfig()
        self.as_tensor = as_tensor
        self.tasks: list[GenTask] = list(
            gen_tasks(
                split,
                world=self.world,
                split_config=split_config,
                exclusive_prob=exclusive_prob,
                start=start,
                limit=length,
            )
        )

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, i: int) -> dict[str, Any]:
        t = self.tasks[i]
        img = render(t.scene, self.world)
        return {
            "image": to_tensor(img) if self.as_tensor else img,
            "prompt": t.prompt,
            "checklist": list(t.checklist),
            "seed": t.seed,
        }


# --------------------------------------------------------------------------------------------------------------------
# Critic-labelled samples


def _maybe_degrade(image: Image.Image, rng: random.Random, prob: float) -> tuple[Image.Image, str | None]:
    if rng.random() >= prob:
        return image, None
    kind, strength = rng.choice([("noise", 6.0), ("noise", 12.0), ("blur", 0.5), ("blur", 0.9), ("speckle", 2.0)])
    return degrade(image, kind, strength, seed=rng.randrange(2**31)), f"{kind}:{strength:g}"


def scored_edit_samples(
    limit: int,
    split: str | None = "train",
    *,
    world: WorldConfig | None = None,
    split_config: SplitConfig | None = None,
    modes: Sequence[str] = EDIT_MODES,
    degrade_prob: float = 0.0,
    critic: ShapesRuleCritic | None = None,
    seed: int = 0,
    start: int = 0,
) -> Iterator[dict[str, Any]]:
    """Editing samples with simulated outputs of random ``modes``, scored by the rule critic.

    Yields dicts ``{key, source, edited, instruction, mode, degradation, scores, reasoning, ground_truth, task}``:
    PIL images, the critic's 1..5 scores and reasoning per dimension, and the ground-truth scores of the (undegraded)
    output scene.
    """
    world = world or WorldConfig()
    critic = critic or ShapesRuleCritic()
    gt = GroundTruthScorer()
    rng = random.Random(f"firm.shapes.scored_edit:{seed}")
    for task in edit_tasks(split, world=world, split_config=split_config, start=start, limit=limit):
        mode = rng.choice(list(modes))
        scene = simulate_edit(task, mode, rng, world)
        image, how = _maybe_degrade(render(scene, world), rng, degrade_prob)
        req = task_request(task, image, world)
        res = critic.score([req])[0]
        yield {
            "key": task.key,
            "source": req.source,
            "edited": image,
            "instruction": task.instruction,
            "mode": mode,
            "degradation": how,
            "scores": dict(res.scores),
            "reasoning": dict(res.reasoning),
            "ground_truth": gt.score_edit(task, scene),
            "task": task.to_dict(),
        }


def scored_gen_samples(
    limit: int,
    split: str | None = "train",
    *,
    world: WorldConfig | None = None,
    split_config: SplitConfig | None = None,
    modes: Sequence[str] = GEN_MODES,
    degrade_prob: float = 0.0,
    critic: ShapesRuleCritic | None = None,
    seed: int = 0,
    start: int = 0,
) -> Iterator[dict[str, Any]]:
    """Generation samples with simulated outputs of random ``modes``, scored by the rule critic.

    Yields dicts ``{key, image, prompt, checklist, mode, degradation, scores, reasoning, ground_truth, task}``.
    """
    world = world or WorldConfig()
    critic = critic or ShapesRuleCritic()
    gt = GroundTruthScorer()
    rng = random.Random(f"firm.shapes.scored_gen:{seed}")
    for task in gen_tasks(split, world=world, split_config=split_config, start=start, limit=limit):
        mode = rng.choice(list(modes))
        scene = simulate_generation(task, mode, rng, world)
        image, how = _maybe_degrade(render(scene, world), rng, degrade_prob)
        res = critic.score([task_request(task, image, world)])[0]
        yield {
            "key": task.key,
            "image": image,
            "prompt": task.prompt,
            "checklist": list(task.checklist),
            "mode": mode,
            "degradation": how,
            "scores": dict(res.scores),
            "reasoning": dict(res.reasoning),
            "ground_truth": gt.score_gen(task, scene),
            "task": task.to_dict(),
        }


# --------------------------------------------------------------------------------------------------------------------
# Prompt files for RL


def export_prompt_records(
    out_dir: str | Path,
    task: str,
    n: int,
    split: str | None = "train",
    *,
    world: WorldConfig | None = None,
    split_config: SplitConfig | None = None,
    kinds: Sequence[str] | None = None,
    exclusive_prob: float = 0.5,
    start: int = 0,
) -> Path:
    """Write ``n`` tasks of ``split`` as an RL prompt file: ``out_dir/prompts.jsonl`` (+ ``out_dir/images/*.png``).

    One JSON record per line, in the RL prompt schema: ``{"prompt", "key", "checklist" (gen), "image" (edit: the
    source, relative to the file), "meta": the task as a dict}``. Returns the path of the JSONL file.
    """
    if task not in ("edit", "gen"):
        raise ValueError(f"task must be 'edit' or 'gen', got {task!r}")
    world = world or WorldConfig()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    path = out / "prompts.jsonl"
    if task == "edit":
        tasks = edit_tasks(split, world=world, split_config=split_config, kinds=kinds, start=start, limit=n)
    else:
        tasks = gen_tasks(
            split, world=world, split_config=split_config, exclusive_prob=exclusive_prob, start=start, limit=n
        )
    with open(path, "w", encoding="utf-8") as f:
        for t in tasks:
            rec: dict[str, Any] = {"key": t.key, "meta": {**t.to_dict(), "split": split, "size": world.size}}
            if isinstance(t, EditTask):
                img = f"images/{t.key}.png"
                render(t.source, world).save(out / img)
                rec.update(prompt=t.instruction, image=img)
            else:
                rec.update(prompt=t.prompt, checklist=list(t.checklist))
            f.write(json.dumps(rec) + "\n")
    return path
