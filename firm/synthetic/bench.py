"""A small synthetic FIRM-Bench from the procedural shapes world (runs on CPU in seconds).

Items mirror FIRM-Bench's three tasks, but the reference score is the world's **ground-truth rubric score** of the
simulated output scene (``firm.synthetic.critic.GroundTruthScorer``), not a human judgement:

- ``edit-execution`` / ``edit-consistency``: a task of the held-out split, an output simulated with a random failure
  mode (perfect, lazy copy, partial, wrong object, over-edit, redraw, empty), optionally degraded in pixels (noise or
  blur, which the rubrics do not count); execution and consistency items come from different tasks;
- ``generation``: a held-out prompt and a simulated drawing (perfect, missing / wrong / extra objects, ...), with its
  checklist; ``hard`` when difficulty = objects named + (1 if "nothing else" is required) is at least 3, else ``easy``.

Like FIRM-Bench, reference scores are balanced: at most ``ceil(n / 5)`` items per score value and task, drawn from a
pool of simulated outputs (when a score value is rare, the remaining places go to the others).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from firm.bench.data import EDIT_CONSISTENCY, EDIT_EXECUTION, GENERATION, BenchItem, write_benchmark
from firm.critics.types import CONSISTENCY, EXECUTION, INSTRUCTION


def _degrade(image, rng: random.Random, prob: float):
    from firm.synthetic.simulate import degrade

    if rng.random() >= prob:
        return image, None
    kind, strength = rng.choice([("noise", 6.0), ("noise", 12.0), ("blur", 0.5), ("blur", 0.9), ("speckle", 2.0)])
    return degrade(image, kind, strength, seed=rng.randrange(2**31)), f"{kind}:{strength:g}"


def _balanced(candidates, n: int):
    """Up to ``n`` (score, payload) pairs, at most ceil(n/5) per score, then filled from the rest in order."""
    cap = math.ceil(n / 5)
    counts: dict[int, int] = {}
    picked, rest = [], []
    for score, payload in candidates:
        if counts.get(score, 0) < cap and len(picked) < n:
            counts[score] = counts.get(score, 0) + 1
            picked.append((score, payload))
        else:
            rest.append((score, payload))
        if len(picked) >= n:
            break
    picked += rest[: n - len(picked)]
    return picked


def build_shapes_bench(
    out: str | Path,
    *,
    n_per_task: int = 40,
    seed: int = 0,
    size: int = 64,
    held_out: bool = True,
    degrade_prob: float = 0.25,
    pool_factor: int = 8,
) -> Path:
    """Write a synthetic benchmark with ``n_per_task`` items per task to ``out``.

    Args:
        out: the benchmark directory (``items.jsonl``, ``bench.json``, ``images/``).
        n_per_task: items per task (edit-execution, edit-consistency, generation).
        seed: seed of the simulated outputs and degradations (tasks come from the world's own seeds).
        size: image side in pixels.
        held_out: draw tasks from the world's ``test`` split (unseen by training data built from ``train``).
        degrade_prob: share of outputs degraded with noise or blur (not counted by the rubrics).
        pool_factor: simulated candidates per item, from which a balanced set of scores is drawn.
    """
    from firm.synthetic.critic import GroundTruthScorer
    from firm.synthetic.simulate import EDIT_MODES, GEN_MODES, simulate_edit, simulate_generation
    from firm.synthetic.tasks import edit_tasks, gen_tasks
    from firm.synthetic.world import WorldConfig, render

    if n_per_task < 1:
        raise ValueError(f"n_per_task must be >= 1, got {n_per_task}")
    out = Path(out).resolve()
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    world = WorldConfig(size=size)
    split = "test" if held_out else "train"
    gt = GroundTruthScorer()
    rng = random.Random(f"firm.bench.shapes:{seed}")
    pool = n_per_task * pool_factor

    def edit_candidates(dim: str, start: int):
        for task in edit_tasks(split, world=world, start=start, limit=pool):
            mode = rng.choice(EDIT_MODES)
            scene = simulate_edit(task, mode, rng, world)
            yield gt.score_edit(task, scene)[dim], (task, scene, mode)

    items: list[BenchItem] = []
    # Execution and consistency items use disjoint seed ranges, so no task appears in both.
    for task_name, dim, start in ((EDIT_EXECUTION, EXECUTION, 0), (EDIT_CONSISTENCY, CONSISTENCY, 10_000_000)):
        short = "exec" if dim == EXECUTION else "cons"
        for score, (task, scene, mode) in _balanced(edit_candidates(dim, start), n_per_task):
            key = f"{short}-{task.seed}"
            edited, how = _degrade(render(scene, world), rng, degrade_prob)
            render(task.source, world).save(img_dir / f"{key}_src.png")
            edited.save(img_dir / f"{key}_out.png")
            items.append(
                BenchItem(
                    key, task_name, float(score), task.instruction, source=img_dir / f"{key}_src.png",
                    edited=img_dir / f"{key}_out.png", meta={"mode": mode, "degradation": how, "seed": task.seed},
                )
            )  # fmt: skip

    def gen_candidates():
        for task in gen_tasks(split, world=world, start=0, limit=pool):
            mode = rng.choice(GEN_MODES)
            scene = simulate_generation(task, mode, rng, world)
            yield gt.score_gen(task, scene)[INSTRUCTION], (task, scene, mode)

    for score, (task, scene, mode) in _balanced(gen_candidates(), n_per_task):
        key = f"gen-{task.seed}"
        image, how = _degrade(render(scene, world), rng, degrade_prob)
        image.save(img_dir / f"{key}.png")
        difficulty = len(task.spec.objects) + int(task.spec.exclusive)
        items.append(
            BenchItem(
                key, GENERATION, float(score), prompt=task.prompt, image=img_dir / f"{key}.png",
                checklist=list(task.checklist), split="hard" if difficulty >= 3 else "easy",
                meta={"mode": mode, "degradation": how, "seed": task.seed, "difficulty": difficulty},
            )
        )  # fmt: skip
    write_benchmark(
        out,
        items,
        name=f"shapes-bench ({split} split, {size}px)",
        description="Synthetic FIRM-Bench from the shapes world; reference scores are ground-truth rubric scores, "
        "not human judgements",
        score_source="rubric",
    )
    return out
