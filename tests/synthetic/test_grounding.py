"""The critic base's grounded questions: every answer is what the world says, in the critic's prompt layout."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from firm.synthetic.grounding import (
    EDIT_KINDS,
    GEN_KINDS,
    GroundingConfig,
    _question,
    caption,
    changed_cells,
    difference_report,
    grounding_items,
)
from firm.synthetic.world import Scene, ShapeObject, WorldConfig

SRC = Scene((ShapeObject(0, "red", "circle"), ShapeObject(4, "blue", "square")))
OUT = Scene((ShapeObject(0, "red", "circle"), ShapeObject(4, "green", "square"), ShapeObject(8, "cyan", "cross")))


def test_answers_follow_the_scenes():
    assert changed_cells(SRC, OUT) == [4, 8]
    assert changed_cells(SRC, SRC) == []
    assert caption(SRC) == "red circle top-left, blue square centre"
    assert caption(Scene()) == "empty"
    assert difference_report(SRC, OUT) == "centre: blue square to green square; bottom-right: nothing to cyan cross"
    assert difference_report(SRC, SRC) == "no change"
    rng = random.Random(0)
    seen = {}
    for _ in range(300):
        for kind in ("cell", "change", "count"):
            q, a = _question(rng, kind, SRC, OUT, [4])
            seen[q] = a
    assert seen["How many cells changed?"] == "2"
    assert seen["Did the centre cell change?"] == "yes, blue square to green square"
    assert seen["Did the top-left cell change?"] == "no"
    assert seen["What is in the bottom-right cell of the edited image?"] == "cyan cross"
    assert seen["What is in the bottom-right cell of the source image?"] == "nothing"
    assert seen["What is in the top-left cell of the source image?"] == "red circle"
    with pytest.raises(ValueError, match="unknown question kind"):
        _question(rng, "score", SRC, OUT, [])


def test_items_use_the_critic_layout_and_every_kind():
    cfg = GroundingConfig(sizes=[32], degrade_prob=0.0)
    items = list(itertools.islice(grounding_items(cfg, seed=1), 120))
    assert {k for k, _, _ in items} == set(EDIT_KINDS + GEN_KINDS)
    for kind, msgs, answer in items:
        content = msgs[0]["content"]
        images = [p["image"] for p in content if p["type"] == "image"]
        text = "".join(p["text"] for p in content if p["type"] == "text")
        assert content[-1]["type"] == "image"  # the images come last, as in the critic's proof prompts
        assert len(images) == (1 if kind in GEN_KINDS else 2)
        assert text.startswith("Prompt: " if kind in GEN_KINDS else "Instruction: ")
        assert "\nQuestion: " in text and answer and "score" not in answer
        assert all(im.size == (32, 32) for im in images)
    # the same seed gives the same items; the answers are a function of the images: a perfect copy has no change
    again = list(itertools.islice(grounding_items(cfg, seed=1), 120))
    assert [(k, a) for k, _, a in items] == [(k, a) for k, _, a in again]
    for kind, msgs, answer in items:
        if kind == "count":
            src, out = (p["image"] for p in msgs[0]["content"] if p["type"] == "image")
            same = np.array_equal(np.asarray(src), np.asarray(out))
            assert (answer == "0") == same


def test_items_walk_the_tasks_of_their_split():
    from firm.synthetic.tasks import edit_tasks

    world = WorldConfig(size=32)
    for split in ("train", "test"):
        items = grounding_items(GroundingConfig(sizes=[32], kinds=["count"], split=split), seed=0)
        shown = [m[0]["content"][0]["text"].split("\n")[0] for _, m, _ in itertools.islice(items, 20)]
        tasks = [f"Instruction: {t.instruction}" for t in itertools.islice(edit_tasks(split, world=world), 20)]
        assert shown == tasks
    with pytest.raises(ValueError, match="kinds"):
        next(grounding_items(GroundingConfig(kinds=["judge"]), seed=0))


def test_draw_weights_are_read_at_every_draw():
    weights = {k: 0.0 for k in EDIT_KINDS + GEN_KINDS}
    weights["count"] = 1.0
    items = grounding_items(GroundingConfig(sizes=[32]), seed=0, weights=weights)
    assert {next(items)[0] for _ in range(20)} == {"count"}
    weights.update(count=0.0, caption=1.0)  # a trainer changes the mix on the fly
    assert {next(items)[0] for _ in range(20)} == {"caption"}
