"""Rule critic on generation requests: checklist scoring and the quality aspects."""

import pytest

from firm.critics.types import INSTRUCTION, QUALITY, GenRequest
from firm.synthetic import Scene, WorldConfig, degrade, render
from firm.synthetic.language import format_checklist, parse_prompt

from .conftest import Obj, paint

PROMPT = "a red circle in the top-left and a blue square in the centre, and nothing else"
RIGHT = Scene((Obj(0, "red", "circle"), Obj(4, "blue", "square")))


def judge(critic, image, prompt=PROMPT, checklist="plan", **kw):
    img = image if not isinstance(image, Scene) else render(image, kw.pop("world", None))
    items = format_checklist(parse_prompt(prompt)) if checklist == "plan" else checklist
    return critic.score([GenRequest(img, prompt, checklist=items, key="g", **kw)])[0]


def instruction(critic, scene, prompt=PROMPT):
    return judge(critic, scene, prompt).scores[INSTRUCTION]


def test_everything_right_scores_5(critic):
    r = judge(critic, RIGHT)
    assert r.scores == {INSTRUCTION: 5, QUALITY: 5}
    assert r.reasoning[INSTRUCTION].startswith("found: red circle @top-left; blue square @centre.")
    assert "9/9 checklist items" in r.reasoning[INSTRUCTION]


@pytest.mark.parametrize(
    "scene,expected",
    [
        (RIGHT.with_object(Obj(4, "green", "square")), 4),  # one colour off
        (RIGHT.with_object(Obj(0, "red", "triangle")), 4),  # one shape off
        (Scene((Obj(4, "red", "circle"), Obj(0, "blue", "square"))), 4),  # positions swapped: two details
        (RIGHT.with_object(Obj(8, "cyan", "cross")), 4),  # breaks "nothing else"
        (RIGHT.without(4), 3),  # one of two subjects missing
        (RIGHT.without(4).with_object(Obj(8, "green", "triangle")), 2),  # one subject missing, an extra object
        (Scene((Obj(0, "green", "triangle"), Obj(4, "green", "triangle"))), 1),  # other objects in the right places
        (Scene((Obj(8, "green", "triangle"),)), 1),  # irrelevant
        (Scene(), 1),  # blank
    ],
)
def test_generation_instruction_mapping(critic, scene, expected):
    assert instruction(critic, scene) == expected


def test_missing_objects_score_lower_than_complete(critic):
    prompt = "a red circle in the top-left, a blue square in the centre and a green cross at the bottom"
    full = RIGHT.with_object(Obj(7, "green", "cross"))
    got = [instruction(critic, s, prompt) for s in (full, full.without(7), full.without(7).without(4), Scene())]
    assert got == sorted(got, reverse=True) and got[0] == 5 and got[-1] == 1


def test_extra_objects_are_fine_without_nothing_else(critic):
    prompt = "a red circle in the top-left and a blue square in the centre"
    assert instruction(critic, RIGHT.with_object(Obj(8, "cyan", "cross")), prompt) == 5


def test_given_checklist_is_what_gets_scored(critic):
    r = judge(
        critic, RIGHT.with_object(Obj(4, "green", "square")), checklist=["object 1 is red", "object 2 is a square"]
    )
    assert r.scores[INSTRUCTION] == 5 and r.details["checklist"] == [
        ("object 1 is red", True),
        ("object 2 is a square", True),
    ]
    r = judge(critic, RIGHT, checklist=None)  # the critic plans its own checklist
    assert r.scores[INSTRUCTION] == 5 and len(r.details["checklist"]) == 9


def test_bad_text_gives_missing_scores(critic):
    r = judge(critic, RIGHT, prompt="a lovely sunset", checklist=None)
    assert r.scores == {INSTRUCTION: None, QUALITY: None} and "cannot parse prompt" in r.errors[INSTRUCTION]
    r = judge(critic, RIGHT, checklist=["object 1 is green"])
    assert r.scores[INSTRUCTION] is None and "contradicts" in r.errors[INSTRUCTION]


@pytest.mark.parametrize("size,antialias", [(32, False), (32, True), (64, False), (64, True)])
def test_clean_renders_have_quality_5(critic, size, antialias):
    r = judge(critic, RIGHT, world=WorldConfig(size=size, antialias=antialias))
    assert r.scores[QUALITY] == 5 and set(r.details["quality_aspects"].values()) == {5}


@pytest.mark.parametrize(
    "kind,strength,aspect,at_most",
    [
        ("noise", 16.0, "background", 3),
        ("noise", 16.0, "colour", 3),
        ("blur", 0.8, "edges", 3),
        ("blur", 1.5, "edges", 1),
        ("speckle", 8, "background", 3),
        ("colour_shift", 20, "colour", 3),
    ],
)
def test_degradations_lower_the_right_quality_aspect(critic, kind, strength, aspect, at_most):
    r = judge(critic, degrade(render(RIGHT), kind, strength, seed=0))
    assert r.details["quality_aspects"][aspect] <= at_most
    assert r.scores[QUALITY] <= at_most
    assert f"{aspect} " in r.reasoning[QUALITY]


def test_quality_gets_worse_with_more_noise(critic):
    q = [judge(critic, degrade(render(RIGHT), "noise", s, seed=0)).scores[QUALITY] for s in (0, 8, 16, 32)]
    assert q == sorted(q, reverse=True) and q[0] == 5 and q[-1] == 1


def test_off_palette_object_hurts_colour(critic):
    img = paint(render(RIGHT), 22, 22, 8, 8, (255, 140, 0))  # an orange square bottom-right
    r = judge(critic, img)
    assert r.details["quality_aspects"]["colour"] <= 4
    assert r.scores[INSTRUCTION] == 4  # an unknown object breaks "nothing else"
