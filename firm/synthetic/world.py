"""The shapes world: objects, scenes, and a deterministic renderer.

A scene is a few flat-coloured shapes on a plain background, each in one cell of a 3x3 grid (at most one object
per cell, so that a position names an object unambiguously). Everything the critic has to recover from pixels is
designed to be recoverable exactly from a clean render:

- colours come from a small palette of well-separated RGB values (min pairwise distance is checked at import);
- shapes are drawn without anti-aliasing by default, so every pixel is either the background or a palette colour;
- each shape fills a square box of side ``shape_scale * cell`` centred in its cell, leaving a gap between cells.

Shapes are defined once, on the unit square ``[-1, 1]^2`` (:func:`unit_mask`); the renderer and the critic's shape
test use the same definitions.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------------------------------------------------
# Vocabulary

# Object colours. Chosen to be far apart in RGB (and from white/black/grey backgrounds) so that mild noise, blur and
# colour drift never turn one colour into another; `_check_palette` asserts the separation.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (150, 60, 190),
    "cyan": (30, 190, 210),
}

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "grey": (200, 200, 200),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")

GRID = 3  # the grid is 3x3: cells are numbered row-major, 0 = top-left ... 4 = centre ... 8 = bottom-right
CELL_NAMES: tuple[str, ...] = (
    "top-left",
    "top",
    "top-right",
    "left",
    "centre",
    "right",
    "bottom-left",
    "bottom",
    "bottom-right",
)
CROSS_ARM = 1 / 3  # half-width of a cross arm, in unit coordinates


def _check_palette(min_dist: float = 100.0) -> None:
    pairs = list(itertools.combinations(PALETTE.values(), 2))
    pairs += [(a, b) for a in PALETTE.values() for b in BACKGROUNDS.values()]
    for a, b in pairs:
        d = math.dist(a, b)
        if d < min_dist:  # pragma: no cover - guards edits to the palette
            raise AssertionError(f"palette colours {a} and {b} are only {d:.0f} apart (need >= {min_dist})")


_check_palette()


# --------------------------------------------------------------------------------------------------------------------
# Scenes


@dataclass(frozen=True, order=True)
class ShapeObject:
    """One shape: what it is, its colour, and its grid cell (0..8, row-major)."""

    cell: int
    colour: str
    shape: str

    def __post_init__(self) -> None:
        if not 0 <= self.cell < GRID * GRID:
            raise ValueError(f"cell must be in 0..{GRID * GRID - 1}, got {self.cell}")
        if self.colour not in PALETTE:
            raise ValueError(f"unknown colour {self.colour!r}; known: {', '.join(PALETTE)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; known: {', '.join(SHAPES)}")

    @property
    def position(self) -> str:
        return CELL_NAMES[self.cell]

    def describe(self) -> str:
        return f"{self.colour} {self.shape} @{self.position}"


@dataclass(frozen=True)
class Scene:
    """An immutable set of objects, at most one per cell, kept sorted by cell."""

    objects: tuple[ShapeObject, ...] = ()

    def __post_init__(self) -> None:
        objs = tuple(sorted(self.objects))
        cells = [o.cell for o in objs]
        if len(set(cells)) != len(cells):
            raise ValueError(f"a scene holds at most one object per cell, got cells {cells}")
        object.__setattr__(self, "objects", objs)

    def __len__(self) -> int:
        return len(self.objects)

    def at(self, cell: int) -> ShapeObject | None:
        """The object in ``cell``, or None."""
        for o in self.objects:
            if o.cell == cell:
                return o
        return None

    def free_cells(self) -> list[int]:
        used = {o.cell for o in self.objects}
        return [c for c in range(GRID * GRID) if c not in used]

    def without(self, cell: int) -> Scene:
        return Scene(tuple(o for o in self.objects if o.cell != cell))

    def with_object(self, obj: ShapeObject) -> Scene:
        """This scene with ``obj`` placed in its cell (replacing what was there)."""
        return Scene((*self.without(obj.cell).objects, obj))

    def describe(self) -> str:
        return ", ".join(o.describe() for o in self.objects) or "(empty)"

    def to_dict(self) -> dict:
        return {"objects": [{"cell": o.cell, "colour": o.colour, "shape": o.shape} for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(ShapeObject(int(o["cell"]), str(o["colour"]), str(o["shape"])) for o in d["objects"]))


# --------------------------------------------------------------------------------------------------------------------
# World settings and scene sampling


@dataclass
class WorldConfig:
    """What scenes look like. The critic needs none of this except ``size`` indirectly (it reads the image)."""

    size: int = 32  # canvas side in pixels (32 or 64 are the tested sizes; >= 24)
    colours: list[str] = field(default_factory=lambda: list(PALETTE))  # object colours in use (names in PALETTE)
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))  # shapes in use (names in SHAPES)
    background: str = "white"  # background colour name (in BACKGROUNDS)
    min_objects: int = 1  # fewest objects in a sampled scene
    max_objects: int = 3  # most objects in a sampled scene (<= 9)
    shape_scale: float = 0.75  # side of a shape's box as a fraction of the cell side
    antialias: bool = False  # 4x4 supersampled edges (colours blend with the background at edges)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.size < 24:
            raise ValueError(f"world.size must be >= 24 pixels (shapes become unrecognisable), got {self.size}")
        bad = [c for c in self.colours if c not in PALETTE]
        if bad or len(self.colours) < 2:
            raise ValueError(f"world.colours must be >= 2 names from {list(PALETTE)}, got {self.colours}")
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or len(self.shapes) < 2:
            raise ValueError(f"world.shapes must be >= 2 names from {list(SHAPES)}, got {self.shapes}")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"world.background must be one of {list(BACKGROUNDS)}, got {self.background!r}")
        if not 1 <= self.min_objects <= self.max_objects <= GRID * GRID:
            raise ValueError(
                f"need 1 <= world.min_objects <= world.max_objects <= 9, got {self.min_objects}, {self.max_objects}"
            )
        if not 0.3 <= self.shape_scale <= 0.9:
            raise ValueError(f"world.shape_scale must be in [0.3, 0.9], got {self.shape_scale}")


def random_object(rng: random.Random, world: WorldConfig, cell: int) -> ShapeObject:
    return ShapeObject(cell, rng.choice(world.colours), rng.choice(world.shapes))


def sample_scene(
    rng: random.Random, world: WorldConfig, n_objects: int | None = None, avoid_cells: tuple[int, ...] = ()
) -> Scene:
    """A random scene with ``n_objects`` objects (default: uniform in [min_objects, max_objects])."""
    n = rng.randint(world.min_objects, world.max_objects) if n_objects is None else n_objects
    cells = [c for c in range(GRID * GRID) if c not in avoid_cells]
    if n > len(cells):
        raise ValueError(f"cannot place {n} objects in {len(cells)} free cells")
    return Scene(tuple(random_object(rng, world, c) for c in rng.sample(cells, n)))


# --------------------------------------------------------------------------------------------------------------------
# Geometry shared by the renderer and the critic


def unit_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test of ``shape`` on unit coordinates ``u`` (right) and ``v`` (down), both in [-1, 1]."""
    au, av = np.abs(u), np.abs(v)
    inside_box = (au <= 1) & (av <= 1)
    if shape == "circle":
        m = u * u + v * v <= 1
    elif shape == "square":
        m = inside_box
    elif shape == "triangle":  # apex at the top, base at the bottom
        m = (au <= (v + 1) / 2) & (av <= 1)
    elif shape == "diamond":
        m = au + av <= 1
    elif shape == "cross":
        m = ((au <= CROSS_ARM) | (av <= CROSS_ARM)) & inside_box
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return m


def cell_centre(cell: int, size: int) -> tuple[float, float]:
    """Pixel coordinates (x, y) of the centre of ``cell``."""
    row, col = divmod(cell, GRID)
    step = size / GRID
    return (col + 0.5) * step, (row + 0.5) * step


def cell_box(cell: int, size: int) -> tuple[int, int, int, int]:
    """Pixel box ``(x0, y0, x1, y1)`` (exclusive ends) of ``cell``."""
    row, col = divmod(cell, GRID)
    edges = [round(i * size / GRID) for i in range(GRID + 1)]
    return edges[col], edges[row], edges[col + 1], edges[row + 1]


def cell_of(x: float, y: float, size: int) -> int:
    """The cell containing pixel coordinates (x, y) (centres of pixels are at +0.5)."""
    col = min(GRID - 1, max(0, int(x * GRID / size)))
    row = min(GRID - 1, max(0, int(y * GRID / size)))
    return row * GRID + col


def half_extent(size: int, shape_scale: float) -> float:
    """Half the side of a shape's box, in pixels."""
    return shape_scale * size / GRID / 2


# --------------------------------------------------------------------------------------------------------------------
# Rendering


def render_array(scene: Scene, world: WorldConfig | None = None) -> np.ndarray:
    """Render ``scene`` as a uint8 array ``(H, W, 3)``. Deterministic: the same scene always gives the same bytes."""
    world = world or WorldConfig()
    size, h = world.size, half_extent(world.size, world.shape_scale)
    ss = 4 if world.antialias else 1
    bg = np.array(BACKGROUNDS[world.background], dtype=np.float64)
    img = np.broadcast_to(bg, (size, size, 3)).copy()  # (H, W, 3)
    # Sub-pixel sample offsets (pixel centres when ss == 1).
    offs = (np.arange(ss) + 0.5) / ss
    for obj in scene.objects:
        cx, cy = cell_centre(obj.cell, size)
        x0, x1 = max(0, math.floor(cx - h) - 1), min(size, math.ceil(cx + h) + 1)
        y0, y1 = max(0, math.floor(cy - h) - 1), min(size, math.ceil(cy + h) + 1)
        xs = (np.arange(x0, x1)[:, None] + offs[None, :]).reshape(-1)  # (w*ss,)
        ys = (np.arange(y0, y1)[:, None] + offs[None, :]).reshape(-1)  # (h*ss,)
        u = (xs[None, :] - cx) / h
        v = (ys[:, None] - cy) / h
        cover = unit_mask(obj.shape, u, v).astype(np.float64)  # (h*ss, w*ss)
        cover = cover.reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))[..., None]  # (h, w, 1) coverage
        colour = np.array(PALETTE[obj.colour], dtype=np.float64)
        patch = img[y0:y1, x0:x1]
        img[y0:y1, x0:x1] = patch * (1 - cover) + colour * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render(scene: Scene, world: WorldConfig | None = None) -> Image.Image:
    """Render ``scene`` as an RGB PIL image of ``world.size`` x ``world.size`` pixels."""
    return Image.fromarray(render_array(scene, world), mode="RGB")


def with_world(world: WorldConfig | None = None, **changes) -> WorldConfig:
    """A copy of ``world`` (default settings when None) with ``changes`` applied and validated."""
    return replace(world or WorldConfig(), **changes)
