import pytest

from firm.synthetic import (
    Edit,
    GenSpec,
    ParseError,
    edit_tasks,
    format_checklist,
    format_instruction,
    format_prompt,
    gen_tasks,
    parse_checklist,
    parse_instruction,
    parse_prompt,
)
from firm.synthetic.language import checklist_items

from .conftest import Obj


def test_instructions_round_trip_over_many_tasks():
    kinds = set()
    for t in edit_tasks(limit=300):
        assert parse_instruction(t.instruction) == t.edit
        kinds.add(t.kind)
    assert kinds == {"recolour", "remove", "add", "move", "replace"}


def test_prompts_and_checklists_round_trip_over_many_tasks():
    for t in gen_tasks(limit=300):
        spec = parse_prompt(t.prompt)
        assert spec == t.spec
        items = parse_checklist(list(t.checklist), spec)
        assert [(i.kind, i.index) for i in items] == [(i.kind, i.index) for i in checklist_items(spec)]


def test_templates_read_naturally():
    spec = GenSpec((Obj(0, "red", "circle"), Obj(4, "blue", "square")), exclusive=True)
    assert format_prompt(spec) == "a red circle in the top-left and a blue square in the centre, and nothing else"
    assert format_checklist(spec)[:4] == [
        "object 1 (a red circle in the top-left) is present",
        "object 1 is red",
        "object 1 is a circle",
        "object 1 is in the top-left",
    ]
    assert format_checklist(spec)[-1] == "there is nothing else"
    e = Edit("move", Obj(0, "red", "circle"), Obj(8, "red", "circle"))
    assert format_instruction(e) == "move the red circle from the top-left to the bottom-right"
    e = Edit("replace", Obj(3, "red", "circle"), Obj(3, "green", "triangle"))
    assert format_instruction(e) == "replace the red circle on the left with a green triangle"


def test_parsers_normalise_case_centre_and_full_stop():
    e = parse_instruction("  Make the RED circle in the Center BLUE. ")
    assert e == Edit("recolour", Obj(4, "red", "circle"), Obj(4, "blue", "circle"))
    spec = parse_prompt("A red circle in the top-left, a blue square at the top, and a green cross at the bottom.")
    assert [o.cell for o in spec.objects] == [0, 1, 7] and not spec.exclusive


@pytest.mark.parametrize(
    "text",
    [
        "make it nicer",
        "make the red circle in the top-left red",  # a no-op recolour
        "move the red circle from the top-left to the top-left",
        "remove the pink circle in the top-left",
        "add a red star in the centre",
        "replace the red circle in the top-left with a red circle",
        "",
    ],
)
def test_bad_instructions_raise_parse_error(text):
    with pytest.raises(ParseError):
        parse_instruction(text)


@pytest.mark.parametrize(
    "text",
    [
        "a red circle in the top-left and a blob",
        "a red circle in the top-left a blue square at the top",  # missing separator
        "a red circle in the top-left and a blue square in the top-left",  # two objects in one cell
        "nothing at all",
        "",
    ],
)
def test_bad_prompts_raise_parse_error(text):
    with pytest.raises(ParseError):
        parse_prompt(text)


def test_checklist_items_must_match_the_prompt():
    spec = parse_prompt("a red circle in the top-left")
    with pytest.raises(ParseError, match="contradicts"):
        parse_checklist(["object 1 is blue"], spec)
    with pytest.raises(ParseError, match="names 1 object"):
        parse_checklist(["object 2 is red"], spec)
    with pytest.raises(ParseError, match="nothing else"):
        parse_checklist(["there is nothing else"], spec)
    with pytest.raises(ParseError, match="cannot parse"):
        parse_checklist(["the image is pretty"], spec)
    assert [i.kind for i in parse_checklist(["Object 1 is red.", "object 1 is in the top-left"], spec)] == [
        "colour",
        "position",
    ]


def test_edit_validates_its_meaning():
    with pytest.raises(ValueError, match="recolour"):
        Edit("recolour", Obj(0, "red", "circle"), Obj(0, "red", "square"))
    with pytest.raises(ValueError, match="needs"):
        Edit("add", Obj(0, "red", "circle"), Obj(0, "red", "circle"))
    assert Edit("move", Obj(0, "red", "circle"), Obj(5, "red", "circle")).affected_cells == (0, 5)


def test_closed_vocabulary_covers_every_text():
    from firm.synthetic.language import tokenize, vocabulary

    vocab = set(vocabulary())
    for t in edit_tasks(limit=300):
        assert set(tokenize(t.instruction)) <= vocab, t.instruction
    for t in gen_tasks(limit=300):
        assert set(tokenize(t.prompt)) <= vocab, t.prompt
    assert tokenize("A red circle in the Center, and nothing else.") == [
        "a", "red", "circle", "in", "the", "centre", ",", "and", "nothing", "else"
    ]  # fmt: skip
