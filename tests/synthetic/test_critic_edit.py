"""Rule critic on editing requests built by hand (scenes written out, pixels painted)."""

import numpy as np
import pytest
from PIL import Image

from firm.critics.types import CONSISTENCY, EXECUTION, Critic, EditRequest
from firm.synthetic import Scene, WorldConfig, degrade, render

from .conftest import Obj, paint

SRC = Scene(
    (Obj(0, "red", "circle"), Obj(2, "yellow", "diamond"), Obj(4, "blue", "square"), Obj(8, "green", "triangle"))
)
RECOLOUR = "make the red circle in the top-left purple"
DONE = SRC.with_object(Obj(0, "purple", "circle"))
ADD = "add a cyan cross at the bottom"
MOVE = "move the blue square from the centre to the left"
REMOVE = "remove the green triangle in the bottom-right"
REPLACE = "replace the yellow diamond in the top-right with a red cross"


def judge(critic, edited, instruction=RECOLOUR, source=SRC, world=None):
    src = source if isinstance(source, Image.Image) else render(source, world)
    out = edited if isinstance(edited, Image.Image) else render(edited, world)
    return critic.score([EditRequest(src, out, instruction, key="k")])[0]


def scores(critic, edited, instruction=RECOLOUR, source=SRC, world=None):
    r = judge(critic, edited, instruction, source, world)
    return r.scores[EXECUTION], r.scores[CONSISTENCY]


def test_is_a_critic(critic):
    assert isinstance(critic, Critic)


def test_perfect_edit_scores_5_5(critic):
    r = judge(critic, DONE)
    assert r.scores == {EXECUTION: 5, CONSISTENCY: 5}
    assert r.key == "k" and r.latency_s > 0 and r.complete
    assert "colour @top-left is purple (found purple)" in r.reasoning[EXECUTION]
    assert "none" in r.reasoning[CONSISTENCY]


def test_unchanged_copy_scores_1_5(critic):
    assert scores(critic, SRC) == (1, 5)


def test_edit_plus_one_unintended_recolour_scores_c4(critic):
    r = judge(critic, DONE.with_object(Obj(4, "cyan", "square")))
    assert r.scores == {EXECUTION: 5, CONSISTENCY: 4}
    assert "blue square @centre recoloured to cyan" in r.reasoning[CONSISTENCY]


@pytest.mark.parametrize(
    "extra",
    [
        [Obj(4, "cyan", "square"), Obj(2, "yellow", "cross")],  # recolour + reshape
        [Obj(4, "cyan", "square"), Obj(6, "red", "square"), Obj(2, "yellow", "cross")],  # + an added object
    ],
)
def test_edit_plus_two_or_three_unintended_changes_scores_c3(critic, extra):
    out = DONE
    for o in extra:
        out = out.with_object(o)
    assert scores(critic, out) == (5, 3)


def test_four_unintended_changes_score_c2_and_a_redrawn_scene_c1(critic):
    src = SRC.with_object(Obj(6, "cyan", "cross"))
    out = src.with_object(Obj(0, "purple", "circle"))
    out = out.with_object(Obj(2, "red", "diamond")).with_object(Obj(4, "blue", "circle"))
    out = out.without(8).with_object(Obj(5, "red", "cross"))
    assert scores(critic, out, source=src) == (5, 2)  # the cyan cross survived
    redrawn = Scene(
        (Obj(0, "purple", "circle"), Obj(1, "green", "square"), Obj(3, "blue", "cross"), Obj(7, "red", "diamond"))
    )
    e, c = scores(critic, redrawn)
    assert (e, c) == (5, 1)  # nothing of the source left


def test_moved_object_counts_once(critic):
    out = DONE.without(8).with_object(Obj(6, "green", "triangle"))
    r = judge(critic, out)
    assert r.scores[CONSISTENCY] == 4
    assert "moved to @bottom-left" in r.reasoning[CONSISTENCY]


def test_minor_drift_is_counted_in_clusters(critic):
    base = render(DONE)
    specks = [(12, 1), (1, 12), (28, 12), (12, 28), (22, 22), (10, 10)]  # background spots away from objects

    def with_specks(k, img=base):
        for y, x in specks[:k]:
            img = paint(img, y, x, 3, 3, (60, 60, 60))
        return img

    assert [scores(critic, with_specks(k))[1] for k in range(6)] == [5, 4, 4, 3, 3, 2]
    one_sig = render(DONE.with_object(Obj(4, "cyan", "square")))
    assert scores(critic, with_specks(2, one_sig))[1] == 4  # 1 significant + 2 minor
    assert scores(critic, with_specks(3, one_sig))[1] == 3  # 1 significant + 3 minor


def test_single_pixel_flicker_is_not_a_change(critic):
    out = render(DONE)
    for y, x in [(12, 1), (1, 12), (28, 12)]:
        out = paint(out, y, x, 1, 1, (0, 0, 0))
    assert scores(critic, out) == (5, 5)


@pytest.mark.parametrize(
    "kind,strength", [("noise", 4.0), ("noise", 8.0), ("noise", 12.0), ("blur", 0.5), ("jpeg", 5), ("colour_shift", 8)]
)
def test_perfect_edit_survives_mild_pixel_noise(critic, kind, strength):
    assert scores(critic, degrade(render(DONE), kind, strength, seed=1)) == (5, 5)


def test_blank_and_noise_outputs(critic):
    # A blank output removes all four objects (the red circle was only to be recoloured): nothing is left -> 1.
    assert scores(critic, Scene()) == (1, 1)
    # Removing the two other objects of a smaller scene is two significant changes -> 3.
    small = Scene((Obj(0, "red", "circle"), Obj(4, "blue", "square"), Obj(8, "green", "triangle")))
    assert scores(critic, Scene(), "remove the red circle in the top-left", source=small) == (5, 3)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    r = judge(critic, noise)
    assert r.scores == {EXECUTION: 1, CONSISTENCY: 1}
    assert "almost entirely different" in r.reasoning[CONSISTENCY]


@pytest.mark.parametrize(
    "instruction,out,expected",
    [
        # recolour: wrong new colour is an attempt (2); the object removed instead (1, and a consistency hit)
        (RECOLOUR, SRC.with_object(Obj(0, "cyan", "circle")), (2, 5)),
        (RECOLOUR, SRC.without(0), (1, 4)),
        (RECOLOUR, SRC.with_object(Obj(0, "purple", "square")), (5, 4)),  # recoloured but reshaped
        # add: 3 checks (present, colour, shape)
        (ADD, SRC.with_object(Obj(7, "cyan", "cross")), (5, 5)),
        (ADD, SRC.with_object(Obj(7, "red", "cross")), (3, 5)),
        (ADD, SRC.with_object(Obj(7, "red", "circle")), (2, 5)),
        (ADD, SRC.with_object(Obj(6, "cyan", "cross")), (1, 4)),  # wrong place
        # move: 4 checks (old cell empty, new cell present, colour, shape)
        (MOVE, SRC.without(4).with_object(Obj(3, "blue", "square")), (5, 5)),
        (MOVE, SRC.with_object(Obj(3, "blue", "square")), (4, 5)),
        (MOVE, SRC.without(4), (2, 5)),
        # remove
        (REMOVE, SRC.without(8), (5, 5)),
        (REMOVE, SRC.with_object(Obj(8, "red", "triangle")), (1, 5)),
        # replace: colour and shape both asked
        (REPLACE, SRC.with_object(Obj(2, "red", "cross")), (5, 5)),
        (REPLACE, SRC.with_object(Obj(2, "red", "diamond")), (3, 5)),
        (REPLACE, SRC.with_object(Obj(2, "blue", "circle")), (2, 5)),
        (REPLACE, SRC, (1, 5)),
    ],
)
def test_partial_execution_mapping(critic, instruction, out, expected):
    assert scores(critic, out, instruction) == expected


def test_64px_world():
    from firm.synthetic import ShapesRuleCritic

    world = WorldConfig(size=64)
    c = ShapesRuleCritic()
    assert scores(c, DONE, world=world) == (5, 5)
    assert scores(c, SRC, world=world) == (1, 5)
    assert scores(c, DONE.with_object(Obj(4, "cyan", "square")), world=world) == (5, 4)


def test_bad_requests_give_missing_scores_not_defaults(critic):
    r = judge(critic, DONE, instruction="make it pop")
    assert r.scores == {EXECUTION: None, CONSISTENCY: None} and not r.complete
    assert "cannot parse instruction" in r.errors[EXECUTION]
    r = judge(critic, render(DONE, WorldConfig(size=64)))
    assert r.scores[EXECUTION] is None and "wide" in r.errors[CONSISTENCY]
    r = critic.score([EditRequest(render(SRC), render(DONE), RECOLOUR, dimensions=(CONSISTENCY,))])[0]
    assert r.scores == {CONSISTENCY: 5}
    r = critic.score([EditRequest(render(SRC), render(DONE), RECOLOUR, dimensions=(EXECUTION, "quality"))])[0]
    assert r.scores == {EXECUTION: 5, "quality": None} and "not 'quality'" in r.errors["quality"]
    with pytest.raises(TypeError):
        critic.score(["not a request"])


def test_source_not_matching_the_instruction_is_flagged(critic):
    r = judge(critic, DONE, instruction="make the red circle in the top-right purple")
    assert "warning" in r.details and "yellow diamond" in r.details["warning"]


def test_scores_are_deterministic(critic):
    img = degrade(render(DONE.with_object(Obj(4, "cyan", "square"))), "noise", 10.0, seed=3)
    a, b = judge(critic, img), judge(critic, img)
    assert a.scores == b.scores and a.reasoning == b.reasoning
