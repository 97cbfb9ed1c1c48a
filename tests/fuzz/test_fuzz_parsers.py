"""Fuzzing the critic-answer parsers: any string (and strings built from the pieces hostile answers are made of)
is parsed without raising, within the work bounds, into a valid score or a failure with a reason."""

from hypothesis import given
from hypothesis import strategies as st

from firm.critics import parsing
from firm.critics.parsing import (
    coerce_score,
    explain_boxed_score,
    explain_checklist,
    explain_json_score,
    explain_quality_scores,
    find_json,
)
from firm.curation.parsing import parse_checklist_score, parse_difference_report, parse_edit_evaluation, parse_plan

PIECES = [
    "{",
    "}",
    "[",
    "]",
    '"',
    "'",
    "\\",
    ":",
    ",",
    " ",
    "\n",
    "\t",
    "score",
    "Score",
    "rating",
    '"score"',
    "'score'",
    "aesthetics",
    "technical quality",
    "structure & texture",
    "\\boxed{",
    "\\text{",
    "<think>",
    "</think>",
    "/5",
    "/10",
    " out of ",
    "**",
    "1. ",
    "- ",
    "NaN",
    "Infinity",
    "-",
    ".",
    "e9",
    "0",
    "1",
    "3",
    "5",
    "9" * 30,
    "null",
    "true",
    "reasoning",
    "obvious",
    "detailed",
    "execution",
    "consistency",
    "\ud800",
    "\x00",
    "é",
    "İ",
    "{'a': 1}",
    '{"score": 4}',
    '{"score": [',
    '"a": ',
    "}" * 5,
    "{" * 5,
    "[" * 40,
]
hostile_text = st.lists(st.sampled_from(PIECES), max_size=120).map("".join)
any_text = st.one_of(st.text(max_size=400), hostile_text, st.binary(max_size=200).map(lambda b: b.decode("latin-1")))
EXPLAINERS = (explain_json_score, explain_boxed_score, explain_quality_scores, explain_checklist)


def _check(res, text):
    assert isinstance(res, parsing.ParseResult)
    assert (res.value is None) == (res.reason is not None)
    for start, end in res.spans.values():
        assert 0 <= start < end <= len(text)


@given(any_text)
def test_critic_parsers_never_raise(text):
    for explain in EXPLAINERS:
        _check(explain(text), text)
    score = explain_json_score(text).value
    assert score is None or (isinstance(score, int) and 1 <= score <= 5)
    quality = explain_quality_scores(text).value
    assert quality is None or all(1 <= v <= 5 for v in quality.values())
    for kind in (dict, list):
        value, why = find_json(text, kind)
        assert (value is None) != (why is None) and (value is None or isinstance(value, kind))


@given(any_text)
def test_work_stays_within_its_bounds(text):
    seen = []
    real = parsing._Work

    class Recording(real):
        def __init__(self, n):
            super().__init__(n)
            seen.append(self)

    parsing._Work = Recording
    try:
        for explain in EXPLAINERS:
            explain(text)
    finally:
        parsing._Work = real
    for w in seen:
        assert w.steps <= w.limit and w.decoded <= w.decode_limit


@given(any_text)
def test_curation_parsers_never_raise(text):
    for value, why in (
        parse_difference_report(text),
        parse_edit_evaluation(text),
        parse_plan(text),
        parse_checklist_score(text, 3),
    ):
        assert value is not None or (isinstance(why, str) and why)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@given(json_values)
def test_coerce_score_never_raises_and_never_invents_a_score(value):
    score, why = coerce_score(value)
    assert (score is None) != (why is None)
    assert score is None or (isinstance(score, int) and 1 <= score <= 5)
