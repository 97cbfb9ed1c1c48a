"""Grounded questions about shapes-world images: the pretraining data of the tiny critic base.

The paper's critics are fine-tunes of a VLM that can already see and ground (Qwen3-VL-8B-Instruct). The shapes
world's analogue is a tiny Qwen3-VL pretrained on questions whose answers the world knows exactly. None of them asks
for a rubric score: they teach *seeing* (what is in a cell of an image), *grounding across images* (did that cell
change, and from what to what), *counting* changed cells, *captions* and *difference reports*. Every question is
asked in the critic's own prompt layout (the instruction or prompt first, the question, then the labelled images
last, as in ``experiments/critic/prompts/proof_*.txt``), so the fine-tune on judgements starts from the same
positions and words.

:func:`grounding_items` yields ``(kind, messages, answer)`` triples; the answers are short, canonical texts, so a
greedy answer is either exactly right or wrong.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from firm.synthetic.world import CELL_NAMES, GRID, Scene, WorldConfig, render

# Question kinds. Edit kinds show (source, edited); generation kinds show one image.
EDIT_KINDS = ("cell", "change", "count", "diff", "caption")
GEN_KINDS = ("gen_cell", "gen_caption")
KINDS = EDIT_KINDS + GEN_KINDS
IMAGE_MARKER = "<image>"
NOTHING = "nothing"


def object_name(scene: Scene, cell: int) -> str:
    """``"<colour> <shape>"`` of the object in ``cell``, or ``"nothing"``."""
    o = scene.at(cell)
    return f"{o.colour} {o.shape}" if o else NOTHING


def changed_cells(a: Scene, b: Scene) -> list[int]:
    """Cells whose content differs between two scenes, in reading order."""
    return [c for c in range(GRID * GRID) if a.at(c) != b.at(c)]


def caption(scene: Scene) -> str:
    """Every object with its cell, in reading order: ``"red circle top-left, blue square centre"`` or ``"empty"``."""
    return ", ".join(f"{o.colour} {o.shape} {o.position}" for o in scene.objects) or "empty"


def difference_report(source: Scene, edited: Scene) -> str:
    """Each changed cell, ``"<cell>: <before> to <after>"``, joined by ``"; "``; ``"no change"`` when none."""
    cells = changed_cells(source, edited)
    if not cells:
        return "no change"
    return "; ".join(f"{CELL_NAMES[c]}: {object_name(source, c)} to {object_name(edited, c)}" for c in cells)


def edit_messages(instruction: str, question: str, source: Image.Image, edited: Image.Image) -> list[dict]:
    """The critic's edit layout: instruction, question, then the labelled source and edited images."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"Instruction: {instruction}\nQuestion: {question}\nSource image: "},
                {"type": "image", "image": source},
                {"type": "text", "text": "\nEdited image: "},
                {"type": "image", "image": edited},
            ],
        }
    ]


def gen_messages(prompt: str, question: str, image: Image.Image) -> list[dict]:
    """The critic's generation layout: prompt, question, then the labelled image."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": f"Prompt: {prompt}\nQuestion: {question}\nImage: "},
                {"type": "image", "image": image},
            ],
        }
    ]


@dataclass
class GroundingConfig:
    """What the questions are about: world sizes, task split, simulated outputs, degradations, the kind mix."""

    sizes: list[int] = field(default_factory=lambda: [32, 64])  # canvas sizes (the critic resizes to its own)
    split: str = "train"  # task split the scenes come from (the held-out evaluation uses "test")
    degrade_prob: float = 0.25  # share of shown outputs with pixel noise or blur, as in the benchmark
    kinds: list[str] = field(default_factory=lambda: list(KINDS))  # question kinds, drawn uniformly
    focus_prob: float = 0.5  # share of cell / change questions about a cell that the instruction or a change names


def _question(
    rng: random.Random, kind: str, source: Scene, out: Scene, cells_of_interest: list[int], focus: float = 0.5
) -> tuple[str, str]:
    """(question, answer) for one question ``kind`` about a source and an output scene; ``focus``: the share of cell
    and change questions drawn from ``cells_of_interest`` (the instruction's cells, and changed cells)."""
    if kind in ("cell", "gen_cell"):
        pool = cells_of_interest if cells_of_interest and rng.random() < focus else list(range(GRID * GRID))
        occupied = [o.cell for o in out.objects]
        if kind == "gen_cell" or rng.random() < 0.5:
            scene, which = out, "edited"
        else:
            scene, which = source, "source"
            occupied = [o.cell for o in source.objects]
        # half the time an occupied cell, so "nothing" is not the easy majority answer
        if occupied and rng.random() < 0.5:
            pool = occupied
        cell = rng.choice(pool)
        where = "" if kind == "gen_cell" else f" of the {which} image"
        return f"What is in the {CELL_NAMES[cell]} cell{where}?", object_name(scene, cell)
    if kind == "change":
        changed = changed_cells(source, out)
        pool = sorted(set(changed + cells_of_interest))
        cell = rng.choice(pool) if pool and rng.random() < focus else rng.randrange(GRID * GRID)
        if source.at(cell) == out.at(cell):
            return f"Did the {CELL_NAMES[cell]} cell change?", "no"
        before, after = object_name(source, cell), object_name(out, cell)
        return f"Did the {CELL_NAMES[cell]} cell change?", f"yes, {before} to {after}"
    if kind == "count":
        return "How many cells changed?", str(len(changed_cells(source, out)))
    if kind == "diff":
        return "What changed?", difference_report(source, out)
    if kind == "caption":
        which = rng.choice(["source", "edited"])
        return f"Describe the {which} image.", caption(source if which == "source" else out)
    if kind == "gen_caption":
        return "Describe the image.", caption(out)
    raise ValueError(f"unknown question kind {kind!r}; known: {', '.join(KINDS)}")


def grounding_items(
    cfg: GroundingConfig, seed: int, start: int = 0, weights: dict[str, float] | None = None
) -> Iterator[tuple[str, list[dict], str]]:
    """Endless ``(kind, messages, answer)`` triples from tasks of ``cfg.split`` (task seeds from ``start`` on).

    ``weights`` (kind -> relative weight, default 1) is read at every draw, so a trainer may change it on the fly.
    """
    from firm.synthetic.data import _maybe_degrade
    from firm.synthetic.simulate import EDIT_MODES, GEN_MODES, simulate_edit, simulate_generation
    from firm.synthetic.tasks import edit_tasks, gen_tasks

    bad = [k for k in cfg.kinds if k not in KINDS]
    if bad or not cfg.kinds:
        raise ValueError(f"grounding kinds must be a non-empty subset of {list(KINDS)}, got {cfg.kinds}")
    rng = random.Random(f"firm.shapes.grounding:{seed}")
    worlds = {s: WorldConfig(size=s) for s in cfg.sizes}
    edits = {s: edit_tasks(cfg.split, world=w, start=start) for s, w in worlds.items()}
    gens = {s: gen_tasks(cfg.split, world=w, start=start) for s, w in worlds.items()}
    while True:
        kind = rng.choices(cfg.kinds, [weights.get(k, 1.0) for k in cfg.kinds])[0] if weights else rng.choice(cfg.kinds)
        size = rng.choice(cfg.sizes)
        world = worlds[size]
        if kind in GEN_KINDS:
            task = next(gens[size])
            scene = simulate_generation(task, rng.choice(GEN_MODES), rng, world)
            image, _ = _maybe_degrade(render(scene, world), rng, cfg.degrade_prob)
            question, answer = _question(rng, kind, Scene(), scene, [], cfg.focus_prob)
            yield kind, gen_messages(task.prompt, question, image), answer
            continue
        task = next(edits[size])
        out = simulate_edit(task, rng.choice(EDIT_MODES), rng, world)
        image, _ = _maybe_degrade(render(out, world), rng, cfg.degrade_prob)
        interest = sorted(set(task.edit.affected_cells))
        question, answer = _question(rng, kind, task.source, out, interest, cfg.focus_prob)
        yield kind, edit_messages(task.instruction, question, render(task.source, world), image), answer


def grounding_texts(n: int = 400, seed: int = 7) -> list[str]:
    """Question and answer texts (for training the base's tokenizer alongside the critic prompts)."""
    texts: list[str] = []
    items = grounding_items(GroundingConfig(sizes=[32]), seed=seed, start=7_000_000)
    for _ in range(n):
        _, msgs, answer = next(items)
        texts += [p["text"] for p in msgs[0]["content"] if p["type"] == "text"]
        texts.append(answer)
    return texts
