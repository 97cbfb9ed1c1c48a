"""Seeing shapes in pixels: colour segmentation, connected components and a shape test.

This is what the rule critic knows about an image; it never sees a :class:`~firm.synthetic.world.Scene`.

1. **Background.** The median colour of the one-pixel border (shapes never touch the border).
2. **Colour segmentation.** Every pixel is explained as a blend ``bg + alpha * (colour - bg)`` of the background and
   one palette colour. A pixel belongs to the colour with the smallest residual when ``alpha >= 0.5`` (so blurred or
   anti-aliased edges are cut at half coverage) and that residual is within ``colour_tolerance``; otherwise it is
   background when close to the background, else *unexplained* (off-palette colours, colour mixes, noise).
3. **Components.** 8-connected components of same-class pixels (a small vectorised labeller: min-label
   propagation plus pointer jumping). Components smaller than ``min_area_frac`` of an expected shape box are junk.
   Unexplained pixels next to a coloured object are its soft edge; larger unexplained components elsewhere are
   objects of an unknown colour.
4. **Shape test.** Each object's mask is compared with every shape of the world drawn into the object's bounding
   box (the same unit shapes the renderer uses, 3x3 supersampled), by soft IoU; the best match wins when its IoU
   is at least ``shape_iou_min`` and the box is roughly square and about the expected size, else the shape is
   unknown (``None``). The object's cell is the cell of its box centre.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from firm.synthetic.world import CELL_NAMES, GRID, PALETTE, SHAPES, cell_of, unit_mask

_COLOUR_NAMES = tuple(PALETTE)
_COLOURS = np.array([PALETTE[c] for c in _COLOUR_NAMES], dtype=np.float32)  # (K, 3)
BACKGROUND, UNEXPLAINED = 0, -1  # pixel classes; palette colour k is class k + 1

_NEIGHBOURS_8 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


@dataclass
class PerceptionSettings:
    """How the critic reads pixels (shared by :class:`~firm.synthetic.critic.ShapesRuleCritic`'s Config)."""

    colour_tolerance: float = 64.0  # max RGB distance of a pixel from a palette colour (or its blend with the bg)
    background_tolerance: float = 40.0  # max RGB distance of a background pixel from the estimated background
    object_scale: float = 0.75  # expected side of a shape's box as a fraction of a grid cell (world.shape_scale)
    min_area_frac: float = 0.15  # components smaller than this fraction of an expected box are junk, not objects
    shape_iou_min: float = 0.55  # a shape is recognised when its template's soft IoU reaches this
    max_aspect: float = 1.5  # boxes more elongated than this hold no recognisable shape
    max_extent: float = 1.6  # boxes larger than this many expected sides hold no recognisable shape (merged blobs)
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))  # the shapes to tell apart (world.shapes)

    def __post_init__(self) -> None:
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or len(self.shapes) < 2:
            raise ValueError(f"critic shapes must be >= 2 names from {list(SHAPES)}, got {list(self.shapes)}")
        for k in ("colour_tolerance", "background_tolerance", "object_scale", "min_area_frac"):
            if getattr(self, k) <= 0:
                raise ValueError(f"critic {k} must be > 0, got {getattr(self, k)}")


@dataclass
class SeenObject:
    """An object found in an image. ``colour``/``shape`` are None when not recognised."""

    cell: int
    colour: str | None
    shape: str | None
    area: int = 0  # pixels
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)  # x0, y0, x1, y1 (exclusive ends)
    iou: float = 1.0  # soft IoU with the best shape template
    label: int = -1  # component id in Perception.labels

    def describe(self) -> str:
        return f"{self.colour or 'unknown-colour'} {self.shape or 'blob'} @{CELL_NAMES[self.cell]}"

    def key(self) -> tuple[str | None, str | None]:
        return self.colour, self.shape


def split_by_cell(objects: list[SeenObject]) -> tuple[dict[int, SeenObject], list[SeenObject]]:
    """The first (largest) object per cell, and the extras crowded into a taken cell (``objects`` largest first)."""
    main: dict[int, SeenObject] = {}
    extras: list[SeenObject] = []
    for o in objects:
        if o.cell in main:
            extras.append(o)
        else:
            main[o.cell] = o
    return main, extras


@dataclass
class Perception:
    """Everything read from one image."""

    size: int
    background: np.ndarray  # (3,) estimated background colour
    classes: np.ndarray  # (H, W) int8: BACKGROUND, UNEXPLAINED or palette index + 1
    alpha: np.ndarray  # (H, W) float32: coverage of the pixel's colour over the background (1 inside objects)
    nearest_dist: np.ndarray  # (H, W) float32: distance to the pixel's palette colour (coloured pixels only)
    labels: np.ndarray  # (H, W) int32: component id, -1 for background
    objects: list[SeenObject]  # recognised objects (coloured or unknown colour), largest first
    junk_pixels: int  # pixels in components too small to be objects
    edge_pixels: int  # unexplained pixels on the soft edges of objects
    object_mask: np.ndarray = field(repr=False, default=None)  # (H, W) bool: pixels of objects

    def by_cell(self) -> tuple[dict[int, SeenObject], list[SeenObject]]:
        """The largest object in each cell, and the others (extra objects sharing a cell)."""
        return split_by_cell(self.objects)


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """An RGB uint8 array ``(H, W, 3)`` from a PIL image or array.

    Raises:
        ValueError: for images that are not square RGB(A)/greyscale or smaller than 24 pixels.
    """
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))
    else:
        arr = np.asarray(image)
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise ValueError(f"expected an (H, W, 3) image array, got shape {arr.shape}")
        arr = arr[..., :3]
        if arr.dtype != np.uint8:
            if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
                arr = arr * 255.0
            arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    h, w = arr.shape[:2]
    if h != w or h < 24:
        raise ValueError(f"the shapes world uses square images of at least 24x24 pixels, got {w}x{h}")
    return arr


def shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """``a`` shifted so that ``out[y, x] = a[y + dy, x + dx]`` (``fill`` outside)."""
    h, w = a.shape[:2]
    out = np.full_like(a, fill)
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[yd, xd] = a[ys, xs]
    return out


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation with a (2r+1)^2 square."""
    out = mask.copy()
    for _ in range(radius):
        grown = out.copy()
        for dy, dx in _NEIGHBOURS_8:
            grown |= shift(out, dy, dx, False)
        out = grown
    return out


def label_components(classes: np.ndarray, ignore: int = BACKGROUND) -> tuple[np.ndarray, int]:
    """8-connected components of equal-class pixels (pixels of class ``ignore`` get -1).

    Min-label propagation with pointer jumping; converges in a few vectorised passes on shapes-world images.

    Returns:
        ``(labels, n)``: ``labels`` (H, W) int32 in ``0..n-1`` (or -1), numbered in raster order of first pixel.
    """
    h, w = classes.shape
    fg = classes != ignore
    big = np.int64(h * w)
    lab = np.where(fg, np.arange(h * w, dtype=np.int64).reshape(h, w), big)
    while True:
        new = lab.copy()
        for dy, dx in _NEIGHBOURS_8:
            same = fg & (shift(classes, dy, dx, ignore) == classes)
            np.minimum(new, np.where(same, shift(lab, dy, dx, big), big), out=new)
        flat = new.ravel()
        idx = np.flatnonzero(fg)
        while True:  # pointer jumping: every label is a pixel of the same component with a smaller or equal label
            jumped = flat[flat[idx]]
            if np.array_equal(jumped, flat[idx]):
                break
            flat[idx] = jumped
        if np.array_equal(new, lab):
            break
        lab = new
    out = np.full((h, w), -1, dtype=np.int32)
    roots, inverse = np.unique(lab[fg], return_inverse=True)
    out[fg] = inverse.astype(np.int32)
    return out, len(roots)


# Template fits tried per shape: the box grown by 0, 0.5 or 1 pixel and its centre moved by up to a quarter pixel,
# because a shape sampled at pixel centres has a pixel box up to a pixel smaller than its true box.
_GROW = (0.0, 0.5, 1.0)
_SHIFT = (-0.25, 0.0, 0.25)


@functools.lru_cache(maxsize=4096)
def shape_templates(shape: str, w: int, h: int, ss: int = 3) -> np.ndarray:
    """Soft masks ``(T, h, w)`` in [0, 1] of ``shape`` fitted to a ``w`` x ``h`` box in ``T`` slightly different ways.

    Each is ``ss`` x ``ss`` supersampled; see ``_GROW`` and ``_SHIFT`` for the variants.
    """
    offs = (np.arange(ss) + 0.5) / ss
    xs = (np.arange(w)[:, None] + offs[None, :]).reshape(-1)  # (w*ss,)
    ys = (np.arange(h)[:, None] + offs[None, :]).reshape(-1)  # (h*ss,)
    out = []
    for grow in _GROW:
        for dx in _SHIFT:
            for dy in _SHIFT:
                u = (xs[None, :] - w / 2 - dx) / ((w + grow) / 2)
                v = (ys[:, None] - h / 2 - dy) / ((h + grow) / 2)
                m = unit_mask(shape, u, v).astype(np.float32)  # (h*ss, w*ss)
                out.append(m.reshape(h, ss, w, ss).mean(axis=(1, 3)))
    t = np.stack(out)  # (T, h, w)
    t.setflags(write=False)
    return t


def classify_shape(mask: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> tuple[str, float, dict[str, float]]:
    """The shape whose templates best match a binary ``mask`` cropped to its bounding box, by soft IoU.

    Returns:
        ``(best shape, its IoU, IoU per shape)``, each shape's IoU being the best over its template fits.
    """
    h, w = mask.shape
    m = mask.astype(np.float32)[None]  # (1, h, w)
    ious = {}
    for s in shapes:
        t = shape_templates(s, w, h)  # (T, h, w)
        inter = np.minimum(m, t).sum(axis=(1, 2))
        union = np.maximum(np.maximum(m, t).sum(axis=(1, 2)), 1e-6)
        ious[s] = float((inter / union).max())
    best = max(ious, key=ious.get)
    return best, ious[best], ious


# --------------------------------------------------------------------------------------------------------------------
# Perception


def palette_distance(x: np.ndarray) -> np.ndarray:
    """RGB distance ``(H, W)`` of each pixel of ``x`` ``(H, W, 3)`` to the nearest palette colour."""
    return np.linalg.norm(x.astype(np.float32)[:, :, None, :] - _COLOURS[None, None], axis=-1).min(-1)


def estimate_background(arr: np.ndarray) -> np.ndarray:
    """Median colour of the one-pixel border ``(3,)``."""
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]]).astype(np.float32)
    return np.median(border, axis=0)


def segment(arr: np.ndarray, bg: np.ndarray, cfg: PerceptionSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel class ``(H, W)``, coverage of its colour and distance to its palette colour (module docstring)."""
    x = arr.astype(np.float32)  # (H, W, 3)
    d = x - bg  # (H, W, 3)
    dirs = _COLOURS - bg  # (K, 3)
    norm2 = np.maximum((dirs * dirs).sum(-1), 1.0)  # (K,)
    alpha = np.einsum("hwc,kc->hwk", d, dirs) / norm2  # (H, W, K)
    pure = np.linalg.norm(x[:, :, None, :] - _COLOURS[None, None], axis=-1)  # (H, W, K)
    a = np.clip(alpha, 0.0, 1.0)
    resid = np.linalg.norm(d[:, :, None, :] - a[..., None] * dirs[None, None], axis=-1)  # (H, W, K)
    # Blends count up to full coverage; beyond it (over-saturated colours) the plain distance applies.
    eff = np.where(alpha > 1.0, pure, resid)
    eff = np.where(alpha >= 0.5, eff, np.inf)
    k = eff.argmin(-1)  # (H, W)
    best = np.take_along_axis(eff, k[..., None], -1)[..., 0]
    coloured = best <= cfg.colour_tolerance
    near_bg = np.linalg.norm(d, axis=-1) <= cfg.background_tolerance
    classes = np.where(coloured, k + 1, np.where(near_bg, BACKGROUND, UNEXPLAINED)).astype(np.int8)
    cov = np.take_along_axis(alpha, k[..., None], -1)[..., 0]
    cov = np.where(coloured, np.clip(cov, 0.0, 1.0), 0.0).astype(np.float32)
    dist = np.take_along_axis(pure, k[..., None], -1)[..., 0].astype(np.float32)
    return classes, cov, np.where(coloured, dist, 0.0).astype(np.float32)


def perceive(image: Image.Image | np.ndarray, cfg: PerceptionSettings | None = None) -> Perception:
    """Find the objects in ``image`` (see the module docstring for the method)."""
    cfg = cfg or PerceptionSettings()
    shapes = tuple(cfg.shapes)
    arr = as_array(image)
    size = arr.shape[0]
    bg = estimate_background(arr)
    classes, alpha, dist = segment(arr, bg, cfg)
    labels, n = label_components(classes)
    side = cfg.object_scale * size / GRID  # expected side of a shape's box, pixels
    min_area = max(3, int(round(cfg.min_area_frac * side * side)))

    flat = labels.ravel()
    fg = flat >= 0
    area = np.bincount(flat[fg], minlength=n)
    comp_class = np.zeros(n, dtype=np.int8)
    comp_class[flat[fg]] = classes.ravel()[fg]
    ys, xs = np.divmod(np.flatnonzero(fg), size)
    x0 = np.full(n, size)
    y0 = np.full(n, size)
    x1 = np.zeros(n, dtype=np.int64)
    y1 = np.zeros(n, dtype=np.int64)
    np.minimum.at(x0, flat[fg], xs)
    np.minimum.at(y0, flat[fg], ys)
    np.maximum.at(x1, flat[fg], xs + 1)
    np.maximum.at(y1, flat[fg], ys + 1)

    big = area >= min_area
    coloured_objects = big & (comp_class > 0)
    object_mask = np.append(coloured_objects, False)[labels]  # label -1 picks the appended False
    # Unexplained pixels hugging a coloured object are its soft edge, not an object of their own.
    edge_zone = dilate(object_mask, 2) & ~object_mask
    unexplained = classes == UNEXPLAINED
    edge = unexplained & edge_zone
    # Off-palette objects: large unexplained components, counted without their edge-zone pixels.
    off_area = np.bincount(flat[fg & ~edge.ravel()], minlength=n)
    off_objects = (comp_class == UNEXPLAINED) & (off_area >= min_area)
    keep = coloured_objects | off_objects
    object_mask = np.append(keep, False)[labels] & ~edge

    objects: list[SeenObject] = []
    for i in np.flatnonzero(keep):
        bx0, by0, bx1, by1 = int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i])
        w, h = bx1 - bx0, by1 - by0
        crop = (labels[by0:by1, bx0:bx1] == i) & ~edge[by0:by1, bx0:bx1]
        best, iou, _ = classify_shape(crop, shapes)
        plausible = max(w, h) / max(min(w, h), 1) <= cfg.max_aspect and max(w, h) <= cfg.max_extent * side
        shape = best if (iou >= cfg.shape_iou_min and plausible) else None
        colour = _COLOUR_NAMES[comp_class[i] - 1] if comp_class[i] > 0 else None
        cell = cell_of((bx0 + bx1) / 2, (by0 + by1) / 2, size)
        objects.append(SeenObject(cell, colour, shape, int(crop.sum()), (bx0, by0, bx1, by1), iou, int(i)))
    objects.sort(key=lambda o: -o.area)
    # Junk: pixels that are neither background, nor part of an object, nor on an object's soft edge.
    junk = int(((classes != BACKGROUND) & ~object_mask & ~dilate(object_mask, 2)).sum())
    return Perception(
        size=size,
        background=bg,
        classes=classes,
        alpha=alpha,
        nearest_dist=dist,
        labels=labels,
        objects=objects,
        junk_pixels=junk,
        edge_pixels=int(edge.sum()),
        object_mask=object_mask,
    )
