import itertools

import numpy as np
import pytest

from firm.synthetic import PALETTE, SHAPES, Scene, WorldConfig, render_array
from firm.synthetic.world import BACKGROUNDS, cell_box, cell_of, sample_scene

from .conftest import Obj


def test_render_is_deterministic_and_colours_are_exact():
    scene = Scene((Obj(0, "red", "circle"), Obj(4, "blue", "square"), Obj(8, "green", "triangle")))
    a, b = render_array(scene), render_array(scene)
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    colours = {tuple(c) for c in a.reshape(-1, 3)}
    assert colours == {BACKGROUNDS["white"], PALETTE["red"], PALETTE["blue"], PALETTE["green"]}


@pytest.mark.parametrize("size", [32, 64])
def test_every_object_stays_inside_its_cell(size):
    world = WorldConfig(size=size)
    for cell, shape in itertools.product(range(9), SHAPES):
        arr = render_array(Scene((Obj(cell, "purple", shape),)), world)
        ys, xs = np.nonzero((arr != 255).any(-1))
        x0, y0, x1, y1 = cell_box(cell, size)
        assert len(xs) > 0.15 * (0.75 * size / 3) ** 2
        assert xs.min() > x0 and xs.max() < x1 - 1 and ys.min() > y0 and ys.max() < y1 - 1, (cell, shape)
        assert cell_of((xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2, size) == cell


def test_antialias_blends_only_with_the_background():
    arr = render_array(Scene((Obj(4, "red", "circle"),)), WorldConfig(antialias=True)).astype(float)
    bg, red = np.array([255.0] * 3), np.array(PALETTE["red"], float)
    alpha = ((arr - bg) @ (red - bg)) / ((red - bg) @ (red - bg))
    assert ((alpha > 0.05) & (alpha < 0.95)).any()  # some edge pixels are blends
    resid = np.linalg.norm(arr - bg - alpha[..., None] * (red - bg), axis=-1)
    assert resid.max() < 2.0  # and every pixel lies on the white-red segment


def test_scene_rules():
    with pytest.raises(ValueError, match="one object per cell"):
        Scene((Obj(0, "red", "circle"), Obj(0, "blue", "square")))
    with pytest.raises(ValueError, match="unknown colour"):
        Obj(0, "pink", "circle")
    with pytest.raises(ValueError, match="unknown shape"):
        Obj(0, "red", "star")
    with pytest.raises(ValueError, match="cell"):
        Obj(9, "red", "circle")
    s = Scene((Obj(4, "red", "circle"), Obj(0, "blue", "square")))
    assert [o.cell for o in s.objects] == [0, 4]  # kept sorted
    assert Scene.from_dict(s.to_dict()) == s
    assert s.with_object(Obj(4, "green", "cross")).at(4) == Obj(4, "green", "cross")
    assert s.without(0).at(0) is None and s.free_cells() == [1, 2, 3, 5, 6, 7, 8]


@pytest.mark.parametrize(
    "changes,match",
    [
        ({"size": 16}, "size"),
        ({"colours": ["red"]}, "colours"),
        ({"shapes": ["circle", "star"]}, "shapes"),
        ({"background": "pink"}, "background"),
        ({"min_objects": 4, "max_objects": 3}, "min_objects"),
        ({"shape_scale": 1.2}, "shape_scale"),
    ],
)
def test_world_config_rejects_bad_values(changes, match):
    with pytest.raises(ValueError, match=match):
        WorldConfig(**changes)


def test_sample_scene_respects_world():
    import random

    world = WorldConfig(colours=["red", "blue"], shapes=["circle", "square"], min_objects=2, max_objects=4)
    rng = random.Random(0)
    for _ in range(50):
        s = sample_scene(rng, world)
        assert 2 <= len(s) <= 4
        assert all(o.colour in ("red", "blue") and o.shape in ("circle", "square") for o in s.objects)


def test_other_backgrounds_render():
    arr = render_array(Scene((Obj(4, "yellow", "diamond"),)), WorldConfig(background="black"))
    assert tuple(arr[0, 0]) == (0, 0, 0) and tuple(arr[16, 16]) == PALETTE["yellow"]
