"""Seeded generation and editing tasks, and train/test splits that keep held-out tasks unseen.

A task is a pure function of ``(seed, world)``: ``make_edit_task(7)`` is the same task on every machine. Splits are
a pure function of the task's *content* (never of the seed), so a task can never be in two splits:

- ``mode: hash`` puts a task in ``test`` when a hash of its canonical text falls below ``test_fraction``;
- ``mode: combo`` holds out (colour, shape) combinations: a task that mentions one (in its prompt, instruction,
  source or target) is ``test``, every other task is ``train`` — so test tasks ask for combinations the policy
  never produced in training (compositional generalisation).

:func:`edit_tasks` / :func:`gen_tasks` walk the seeds from ``start`` and yield the tasks of one split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from PIL import Image

from firm.synthetic.language import (
    EDIT_KINDS,
    Edit,
    GenSpec,
    format_checklist,
    format_instruction,
    format_prompt,
)
from firm.synthetic.world import (
    GRID,
    Scene,
    ShapeObject,
    WorldConfig,
    random_object,
    render,
    sample_scene,
)

SPLITS = ("train", "test")


@dataclass
class SplitConfig:
    """How tasks are assigned to the train and test splits."""

    mode: str = "hash"  # hash: by a hash of the task's content | combo: by held-out (colour, shape) combinations
    test_fraction: float = 0.2  # mode=hash: share of tasks in the test split
    heldout_combos: list[str] = field(default_factory=list)  # mode=combo: "colour shape" pairs; [] = default_combos

    def __post_init__(self) -> None:
        if self.mode not in ("hash", "combo"):
            raise ValueError(f"split.mode must be 'hash' or 'combo', got {self.mode!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"split.test_fraction must be in (0, 1), got {self.test_fraction}")


def default_combos(world: WorldConfig) -> list[str]:
    """One held-out colour per shape, spread over the palette: ``["<colour> <shape>", ...]``."""
    n = len(world.colours)
    return [f"{world.colours[(2 * i + 1) % n]} {s}" for i, s in enumerate(world.shapes)]


# --------------------------------------------------------------------------------------------------------------------
# Tasks


@dataclass(frozen=True)
class EditTask:
    """An editing task: apply ``instruction`` (meaning ``edit``) to ``source``; ``target`` is the right answer."""

    seed: int
    source: Scene
    edit: Edit
    instruction: str
    target: Scene

    @property
    def kind(self) -> str:
        return self.edit.kind

    @property
    def key(self) -> str:
        return f"edit-{self.seed}"

    def source_image(self, world: WorldConfig | None = None) -> Image.Image:
        return render(self.source, world)

    def target_image(self, world: WorldConfig | None = None) -> Image.Image:
        return render(self.target, world)

    def canonical(self) -> str:
        """A text that identifies the task's content (used for hashing into splits and deduplication)."""
        return f"edit|{self.source.describe()}|{self.instruction}"

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "kind": self.kind,
            "instruction": self.instruction,
            "source": self.source.to_dict(),
            "target": self.target.to_dict(),
        }


@dataclass(frozen=True)
class GenTask:
    """A generation task: draw ``prompt`` (meaning ``spec``); ``scene`` is the right answer."""

    seed: int
    spec: GenSpec
    prompt: str
    checklist: tuple[str, ...]

    @property
    def scene(self) -> Scene:
        return Scene(self.spec.objects)

    @property
    def key(self) -> str:
        return f"gen-{self.seed}"

    def target_image(self, world: WorldConfig | None = None) -> Image.Image:
        return render(self.scene, world)

    def canonical(self) -> str:
        return f"gen|{self.prompt}"

    def to_dict(self) -> dict:
        return {
            "seed": self.seed,
            "prompt": self.prompt,
            "checklist": list(self.checklist),
            "scene": self.scene.to_dict(),
            "exclusive": self.spec.exclusive,
        }


Task = EditTask | GenTask


def apply_edit(scene: Scene, edit: Edit) -> Scene:
    """The scene after ``edit``.

    Raises:
        ValueError: when the edit does not fit the scene (the named object is absent, or the target cell is taken).
    """
    if edit.old is not None and scene.at(edit.old.cell) != edit.old:
        raise ValueError(f"{edit.kind}: the scene has no {edit.old.describe()} (has: {scene.describe()})")
    out = scene.without(edit.old.cell) if edit.old is not None else scene
    if edit.new is not None:
        if out.at(edit.new.cell) is not None:
            raise ValueError(f"{edit.kind}: cell {edit.new.position} is already taken in {scene.describe()}")
        out = out.with_object(edit.new)
    return out


def _rng(kind: str, seed: int) -> random.Random:
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"task seeds are non-negative ints, got {seed!r}")
    return random.Random(f"firm.shapes.{kind}:{seed}")  # str seeds hash with sha512: stable across runs/platforms


def sample_edit(rng: random.Random, source: Scene, kind: str, world: WorldConfig) -> Edit:
    """A random edit of ``kind`` that fits ``source``."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; known: {', '.join(EDIT_KINDS)}")
    free = source.free_cells()
    if kind == "add":
        if not free:
            raise ValueError("add: the scene is full")
        return Edit(kind, new=random_object(rng, world, rng.choice(free)))
    if not source.objects:
        raise ValueError(f"{kind}: the scene is empty")
    old = rng.choice(source.objects)
    if kind == "remove":
        return Edit(kind, old=old)
    if kind == "recolour":
        colour = rng.choice([c for c in world.colours if c != old.colour])
        return Edit(kind, old, ShapeObject(old.cell, colour, old.shape))
    if kind == "move":
        if not free:
            raise ValueError("move: the scene is full")
        return Edit(kind, old, ShapeObject(rng.choice(free), old.colour, old.shape))
    new_shape = rng.choice([s for s in world.shapes if s != old.shape])
    return Edit(kind, old, ShapeObject(old.cell, rng.choice(world.colours), new_shape))


def make_edit_task(seed: int, world: WorldConfig | None = None, kinds: Sequence[str] | None = None) -> EditTask:
    """The editing task of ``seed``: a random source scene and a random instruction of one of ``kinds``."""
    world = world or WorldConfig()
    kinds = list(kinds or EDIT_KINDS)
    rng = _rng("edit", seed)
    kind = rng.choice(kinds)
    # add/move need a free cell; keep the source below 9 objects.
    max_n = min(world.max_objects, GRID * GRID - 1)
    source = sample_scene(rng, world, rng.randint(min(world.min_objects, max_n), max_n))
    edit = sample_edit(rng, source, kind, world)
    return EditTask(seed, source, edit, format_instruction(edit), apply_edit(source, edit))


def make_gen_task(seed: int, world: WorldConfig | None = None, exclusive_prob: float = 0.5) -> GenTask:
    """The generation task of ``seed``: a random scene, described as a prompt (with "nothing else" at random)."""
    world = world or WorldConfig()
    rng = _rng("gen", seed)
    scene = sample_scene(rng, world)
    objects = list(scene.objects)
    rng.shuffle(objects)  # prompts name objects in random order
    spec = GenSpec(tuple(objects), exclusive=rng.random() < exclusive_prob)
    return GenTask(seed, spec, format_prompt(spec), tuple(format_checklist(spec)))


# --------------------------------------------------------------------------------------------------------------------
# Splits


def _combos_of(task: Task) -> set[str]:
    if isinstance(task, EditTask):
        objs = [*task.source.objects, *task.target.objects]
    else:
        objs = list(task.spec.objects)
    return {f"{o.colour} {o.shape}" for o in objs}


def split_of(task: Task, split: SplitConfig | None = None, world: WorldConfig | None = None) -> str:
    """``"train"`` or ``"test"``: the split ``task`` belongs to (a function of its content only)."""
    split = split or SplitConfig()
    if split.mode == "combo":
        held = set(split.heldout_combos or default_combos(world or WorldConfig()))
        return "test" if _combos_of(task) & held else "train"
    h = int.from_bytes(hashlib.sha256(task.canonical().encode()).digest()[:8], "big") / 2**64
    return "test" if h < split.test_fraction else "train"


def _walk(
    make: Callable[[int], Task],
    split_name: str | None,
    split: SplitConfig | None,
    world: WorldConfig | None,
    start: int,
    limit: int | None,
) -> Iterator[Task]:
    if split_name is not None and split_name not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split_name!r}")
    seed, found, misses = start, 0, 0
    while limit is None or found < limit:
        task = make(seed)
        seed += 1
        if split_name is None or split_of(task, split, world) == split_name:
            found, misses = found + 1, 0
            yield task
        else:
            misses += 1
            if misses > 100_000:
                raise RuntimeError(f"no {split_name} task in 100000 consecutive seeds: check the split settings")


def edit_tasks(
    split: str | None = None,
    *,
    world: WorldConfig | None = None,
    split_config: SplitConfig | None = None,
    kinds: list[str] | None = None,
    start: int = 0,
    limit: int | None = None,
) -> Iterator[EditTask]:
    """Editing tasks of ``split`` (all tasks when None), from seed ``start`` on, at most ``limit`` of them."""
    yield from _walk(lambda s: make_edit_task(s, world, kinds), split, split_config, world, start, limit)


def gen_tasks(
    split: str | None = None,
    *,
    world: WorldConfig | None = None,
    split_config: SplitConfig | None = None,
    exclusive_prob: float = 0.5,
    start: int = 0,
    limit: int | None = None,
) -> Iterator[GenTask]:
    """Generation tasks of ``split`` (all tasks when None), from seed ``start`` on, at most ``limit`` of them."""
    yield from _walk(lambda s: make_gen_task(s, world, exclusive_prob), split, split_config, world, start, limit)
