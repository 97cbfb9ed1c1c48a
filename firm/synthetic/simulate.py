"""Simulated model outputs: imperfect edits and generations (as scenes), and pixel degradations.

These stand in for a policy's outputs wherever one is needed without a model: tests of the critic, agreement
between the critic and the ground truth, negative examples for curation / critic training, and sanity baselines
for RL (the "lazy editor" is ``mode="copy"``).
"""

from __future__ import annotations

import io
import random

import numpy as np
from PIL import Image

from firm.synthetic.tasks import EditTask, GenTask
from firm.synthetic.world import Scene, ShapeObject, WorldConfig, random_object, sample_scene

# perfect: the target; copy: the source (the "lazy editor"); partial: the asked change done wrong in one way;
# wrong_object: an unasked change instead of the asked one; overedit_1 / overedit_n: the target plus 1 / 2-4 unasked
# changes; redraw: an unrelated scene; empty: nothing drawn.
EDIT_MODES = ("perfect", "copy", "partial", "wrong_object", "overedit_1", "overedit_n", "redraw", "empty")
GEN_MODES = ("perfect", "missing", "wrong_colour", "wrong_shape", "wrong_position", "extra", "random", "empty")
DEGRADATIONS = ("noise", "blur", "speckle", "colour_shift", "jpeg")


# --------------------------------------------------------------------------------------------------------------------
# Scene-level mistakes


def random_change(scene: Scene, rng: random.Random, world: WorldConfig, protected: tuple[int, ...] = ()) -> Scene:
    """``scene`` with one object-level change (recolour, reshape, remove, add or move) outside ``protected`` cells.

    Returns ``scene`` unchanged when no change is possible.
    """
    movable = [o for o in scene.objects if o.cell not in protected]
    free = [c for c in scene.free_cells() if c not in protected]
    options = []
    if movable:
        options += ["recolour", "reshape", "remove"]
        if free:
            options.append("move")
    if free:
        options.append("add")
    if not options:
        return scene
    kind = rng.choice(options)
    if kind == "add":
        return scene.with_object(random_object(rng, world, rng.choice(free)))
    o = rng.choice(movable)
    if kind == "remove":
        return scene.without(o.cell)
    if kind == "move":
        return scene.without(o.cell).with_object(ShapeObject(rng.choice(free), o.colour, o.shape))
    if kind == "recolour":
        return scene.with_object(ShapeObject(o.cell, rng.choice([c for c in world.colours if c != o.colour]), o.shape))
    return scene.with_object(ShapeObject(o.cell, o.colour, rng.choice([s for s in world.shapes if s != o.shape])))


def _partial(task: EditTask, rng: random.Random, world: WorldConfig) -> Scene:
    """The requested change, done wrong in one way."""
    e, src = task.edit, task.source
    others = lambda *ex: [x for x in world.colours if x not in ex]  # noqa: E731
    if e.kind == "recolour":
        wrong = others(e.old.colour, e.new.colour)
        return src.with_object(ShapeObject(e.old.cell, rng.choice(wrong), e.old.shape)) if wrong else src
    if e.kind == "remove":  # changed instead of removed
        return src.with_object(ShapeObject(e.old.cell, rng.choice(others(e.old.colour)), e.old.shape))
    if e.kind == "add":
        if rng.random() < 0.5:
            return src.with_object(ShapeObject(e.new.cell, rng.choice(others(e.new.colour)), e.new.shape))
        shape = rng.choice([s for s in world.shapes if s != e.new.shape])
        return src.with_object(ShapeObject(e.new.cell, e.new.colour, shape))
    if e.kind == "move":  # copied instead of moved
        return src.with_object(e.new)
    # replace: only one of the attributes changed (or the wrong shape)
    if e.new.colour != e.old.colour and rng.random() < 0.5:
        return src.with_object(ShapeObject(e.old.cell, e.new.colour, e.old.shape))
    wrong = [s for s in world.shapes if s not in (e.old.shape, e.new.shape)]
    return src.with_object(ShapeObject(e.old.cell, e.new.colour, rng.choice(wrong) if wrong else e.old.shape))


def simulate_edit(task: EditTask, mode: str, rng: random.Random, world: WorldConfig | None = None) -> Scene:
    """What an editor of a given failure ``mode`` (one of :data:`EDIT_MODES`) would produce for ``task``."""
    world = world or WorldConfig()
    if mode == "perfect":
        return task.target
    if mode == "copy":
        return task.source
    if mode == "partial":
        return _partial(task, rng, world)
    if mode == "wrong_object":
        return random_change(task.source, rng, world, protected=task.edit.affected_cells)
    if mode == "overedit_1":
        return random_change(task.target, rng, world, protected=task.edit.affected_cells)
    if mode == "overedit_n":
        scene = task.target
        for _ in range(rng.randint(2, 4)):
            scene = random_change(scene, rng, world, protected=task.edit.affected_cells)
        return scene
    if mode == "redraw":
        return sample_scene(rng, world)
    if mode == "empty":
        return Scene()
    raise ValueError(f"unknown edit mode {mode!r}; known: {', '.join(EDIT_MODES)}")


def simulate_generation(task: GenTask, mode: str, rng: random.Random, world: WorldConfig | None = None) -> Scene:
    """What a generator of a given failure ``mode`` (one of :data:`GEN_MODES`) would draw for ``task``."""
    world = world or WorldConfig()
    scene = task.scene
    o = rng.choice(scene.objects)
    if mode == "perfect":
        return scene
    if mode == "missing":
        return scene.without(o.cell)
    if mode == "wrong_colour":
        return scene.with_object(ShapeObject(o.cell, rng.choice([c for c in world.colours if c != o.colour]), o.shape))
    if mode == "wrong_shape":
        return scene.with_object(ShapeObject(o.cell, o.colour, rng.choice([s for s in world.shapes if s != o.shape])))
    if mode == "wrong_position":
        free = scene.free_cells()
        return scene.without(o.cell).with_object(ShapeObject(rng.choice(free), o.colour, o.shape)) if free else scene
    if mode == "extra":
        free = scene.free_cells()
        return scene.with_object(random_object(rng, world, rng.choice(free))) if free else scene
    if mode == "random":
        return sample_scene(rng, world)
    if mode == "empty":
        return Scene()
    raise ValueError(f"unknown generation mode {mode!r}; known: {', '.join(GEN_MODES)}")


# --------------------------------------------------------------------------------------------------------------------
# Pixel degradations


def _gaussian_kernel(sigma: float) -> np.ndarray:
    r = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(arr: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of an ``(H, W, C)`` array (edge-replicated borders)."""
    if sigma <= 0:
        return arr.copy()
    k = _gaussian_kernel(sigma)
    r = len(k) // 2
    x = np.pad(arr.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="edge")
    x = sum(k[i] * x[i : i + arr.shape[0]] for i in range(len(k)))  # (H, W + 2r, C): blur rows
    x = sum(k[i] * x[:, i : i + arr.shape[1]] for i in range(len(k)))  # (H, W, C): blur columns
    return x


def degrade(image: Image.Image, kind: str, strength: float, seed: int = 0) -> Image.Image:
    """``image`` with a pixel-level defect of ``kind`` (one of :data:`DEGRADATIONS`).

    ``strength`` means: noise - Gaussian sigma in 0..255 units; blur - Gaussian sigma in pixels; speckle - number of
    stray 2x2 blobs; colour_shift - RGB offset added to every pixel; jpeg - 100 minus the JPEG quality.
    """
    arr = np.asarray(image.convert("RGB")).astype(np.float64)
    rng = np.random.default_rng(seed)
    if kind == "noise":
        arr = arr + rng.normal(0.0, strength, arr.shape)
    elif kind == "blur":
        arr = gaussian_blur(arr, strength)
    elif kind == "speckle":
        h, w = arr.shape[:2]
        for _ in range(int(strength)):
            y, x = int(rng.integers(0, h - 1)), int(rng.integers(0, w - 1))
            arr[y : y + 2, x : x + 2] = rng.integers(0, 256, 3)
    elif kind == "colour_shift":
        arr = arr + np.array([strength, -strength, strength])
    elif kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=max(1, int(100 - strength)))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    else:
        raise ValueError(f"unknown degradation {kind!r}; known: {', '.join(DEGRADATIONS)}")
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="RGB")
