import itertools
from collections import deque

import numpy as np
import pytest
from PIL import Image

from firm.synthetic import PALETTE, SHAPES, Scene, WorldConfig, degrade, perceive, render
from firm.synthetic.perception import PerceptionSettings, as_array, label_components

from .conftest import Obj


@pytest.mark.parametrize("size,antialias", [(32, False), (32, True), (64, False), (64, True)])
def test_every_shape_colour_and_cell_is_recovered(size, antialias):
    world = WorldConfig(size=size, antialias=antialias)
    for cell, colour, shape in itertools.product(range(9), PALETTE, SHAPES):
        seen = perceive(render(Scene((Obj(cell, colour, shape),)), world)).objects
        assert [(o.cell, o.colour, o.shape) for o in seen] == [(cell, colour, shape)]


def test_full_scenes_are_recovered_on_other_backgrounds():
    scene = Scene(tuple(Obj(c, list(PALETTE)[c % 6], SHAPES[c % 5]) for c in range(9)))
    for bg in ("white", "black", "grey"):
        seen = perceive(render(scene, WorldConfig(background=bg))).objects
        assert sorted((o.cell, o.colour, o.shape) for o in seen) == [(o.cell, o.colour, o.shape) for o in scene.objects]


@pytest.mark.parametrize("kind,strength", [("noise", 8.0), ("noise", 16.0), ("blur", 0.6), ("speckle", 3)])
def test_mild_degradations_do_not_change_what_is_seen(kind, strength):
    world = WorldConfig()
    for cell, shape in itertools.product((0, 4, 7), SHAPES):
        for colour in PALETTE:
            scene = Scene(
                (Obj(cell, colour, shape), Obj((cell + 2) % 9, "blue" if colour != "blue" else "red", "square"))
            )
            seen = perceive(degrade(render(scene, world), kind, strength, seed=cell)).objects
            assert sorted((o.cell, o.colour, o.shape) for o in seen) == sorted(
                (o.cell, o.colour, o.shape) for o in scene.objects
            ), (kind, cell, colour, shape)


def _bfs_labels(classes: np.ndarray) -> np.ndarray:
    """Reference 8-connected labelling by breadth-first search (-1 for class 0)."""
    h, w = classes.shape
    labels = np.full((h, w), -1)
    n = 0
    for y, x in zip(*np.nonzero(classes != 0)):
        if labels[y, x] >= 0:
            continue
        labels[y, x] = n
        q = deque([(y, x)])
        while q:
            cy, cx = q.popleft()
            for dy, dx in itertools.product((-1, 0, 1), repeat=2):
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < h and 0 <= nx < w and labels[ny, nx] < 0 and classes[ny, nx] == classes[cy, cx]:
                    labels[ny, nx] = n
                    q.append((ny, nx))
        n += 1
    return labels


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.ravel().tolist(), b.ravel().tolist()))
    return len(pairs) == len({p[0] for p in pairs}) == len({p[1] for p in pairs})


def test_labeller_matches_a_bfs_reference():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.5, 0.8):
        classes = (rng.random((40, 40)) < density) * rng.integers(1, 4, (40, 40))
        classes = classes.astype(np.int8)
        labels, n = label_components(classes)
        ref = _bfs_labels(classes)
        assert n == ref.max() + 1
        assert _same_partition(labels, ref)
    # A long snake is one component.
    snake = np.zeros((31, 31), dtype=np.int8)
    snake[::2, :] = 1
    snake[1::4, -1] = 1
    snake[3::4, 0] = 1
    assert label_components(snake)[1] == 1


def test_unknown_colours_and_blobs():
    arr = np.full((32, 32, 3), 255, np.uint8)
    arr[12:20, 12:20] = (255, 140, 0)  # orange is not in the palette
    arr[1:9, 1:31] = PALETTE["red"]  # a long bar is no shape
    seen = {o.cell: o for o in perceive(arr).objects}
    assert seen[4].colour is None and seen[4].shape == "square"
    assert seen[1].colour == "red" and seen[1].shape is None


def test_tiny_specks_are_junk_not_objects():
    arr = np.full((32, 32, 3), 255, np.uint8)
    arr[5:7, 5:7] = PALETTE["blue"]
    p = perceive(arr)
    assert p.objects == [] and p.junk_pixels == 4


def test_input_checks():
    with pytest.raises(ValueError, match="square"):
        as_array(Image.new("RGB", (32, 40)))
    with pytest.raises(ValueError, match="at least 24"):
        as_array(Image.new("RGB", (16, 16)))
    f = np.ones((32, 32, 3), np.float32)  # float images in [0, 1] are accepted
    assert as_array(f).dtype == np.uint8 and as_array(f).max() == 255
    with pytest.raises(ValueError, match="shapes"):
        PerceptionSettings(shapes=["circle"])


def test_restricting_the_shape_vocabulary():
    img = render(Scene((Obj(4, "red", "diamond"),)))
    assert perceive(img).objects[0].shape == "diamond"
    assert perceive(img, PerceptionSettings(shapes=["circle", "square"])).objects[0].shape in ("circle", "square")
