"""Shared helpers for the shapes-world tests: hand-built scenes and images."""

import numpy as np
import pytest
from PIL import Image

from firm.synthetic import ShapeObject, ShapesRuleCritic, WorldConfig, render

Obj = (
    ShapeObject  # Obj(cell, colour, shape); cells: 0 top-left, 1 top, 2 top-right, 3 left, 4 centre, ... 8 bottom-right
)


def image(scene_or_image, world: WorldConfig | None = None) -> Image.Image:
    return scene_or_image if isinstance(scene_or_image, Image.Image) else render(scene_or_image, world)


def paint(img: Image.Image, y: int, x: int, h: int, w: int, rgb) -> Image.Image:
    """A copy of ``img`` with a solid ``h`` x ``w`` rectangle of colour ``rgb`` at (y, x)."""
    arr = np.asarray(img).copy()
    arr[y : y + h, x : x + w] = rgb
    return Image.fromarray(arr)


@pytest.fixture(scope="session")
def critic() -> ShapesRuleCritic:
    return ShapesRuleCritic()
