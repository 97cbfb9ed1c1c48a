"""Hostile and broken critic answers: the parsers never raise, read a bounded part of the answer with bounded work,
and turn every bad answer into a missing score with a reason."""

import time

import pytest

from firm.critics import parsing
from firm.critics.parsing import (
    MAX_ANSWER_CHARS,
    MAX_NESTING,
    coerce_score,
    explain_boxed_score,
    explain_checklist,
    explain_json_score,
    explain_quality_scores,
    find_json,
)

EXPLAINERS = (explain_json_score, explain_boxed_score, explain_quality_scores, explain_checklist)


def _deep(depth: int, inner: str = "5") -> str:
    return "[" * depth + inner + "]" * depth


HOSTILE = {
    # The cases of the bug report.
    "score nested 5000 deep": '{"score": ' + _deep(5000) + "}",
    "score of 5000 digits": '{"score": ' + "5" * 5000 + "}",
    "score string of 5000 digits": '{"score": "' + "4" * 5000 + '"}',
    "20k unmatched {": "{" * 20_000,
    # Variations on the same themes.
    "20k unmatched [": "[" * 20_000,
    "nested objects 3000 deep, unclosed": '{"a": ' * 3000,
    "nested objects 3000 deep, closed": '{"a": ' * 3000 + "1" + "}" * 3000,
    "balanced braces 5000 deep": "{" * 5000 + "}" * 5000,
    "deep python literal": "{'score': " + _deep(3000, "4") + "}",
    "huge exponent": '{"score": 1e999999}',
    "score nan": '{"score": NaN}',
    "score inf string": '{"score": "inf"}',
    "label then whitespace": "score:" + " " * 30_000,
    "label star whitespace": "Score" + " " * 15_000 + "*" + " " * 15_000,
    "aspect then whitespace": "aesthetics:" + " " * 30_000 + "x",
    "boxed unclosed": "\\boxed{" + "a" * 30_000,
    "boxed repeated": "\\boxed{" * 10_000,
    "checklist trailing spaces": "1. x" + " " * 30_000 + "y",
    "quotes and braces": "{'\"" * 10_000,
    "escaped backslashes": '{"a": "' + "\\" * 30_000,
    "many small objects": '{"x": 1}' * 5_000,
    "lone surrogate": '{"score": "\ud800"}',
    "nul bytes": "\x00" * 30_000 + '{"score": 3}',
    "think tags only": "<think>" * 5_000,
    "very long answer": "a" * 200_000 + '{"score": 4}',
}


@pytest.mark.parametrize("name", list(HOSTILE))
@pytest.mark.parametrize("explain", EXPLAINERS, ids=lambda f: f.__name__)
def test_hostile_answers_never_raise_and_give_a_reason(explain, name):
    res = explain(HOSTILE[name])
    assert isinstance(res, parsing.ParseResult)
    if not res.ok:
        assert isinstance(res.reason, str) and res.reason
    for kind in (dict, list):
        value, why = find_json(HOSTILE[name], kind)
        assert (value is None) == (why is not None)


def test_the_reported_cases_are_missing_scores_with_the_reason():
    deep = explain_json_score(HOSTILE["score nested 5000 deep"])
    assert deep.value is None and f"nested deeper than {MAX_NESTING}" in deep.reason
    digits = explain_json_score(HOSTILE["score of 5000 digits"])
    assert digits.value is None and "outside 1..5" in digits.reason
    text = explain_json_score(HOSTILE["score string of 5000 digits"])
    assert text.value is None and "outside 1..5" in text.reason
    braces = explain_json_score(HOSTILE["20k unmatched {"])
    assert braces.value is None and braces.reason
    long = explain_json_score(HOSTILE["very long answer"])
    assert long.value is None and f"at most {MAX_ANSWER_CHARS}" in long.reason


def test_shallow_nesting_still_reads_and_non_finite_scores_are_rejected():
    assert explain_json_score('{"score": [[4]]}').value == 4
    assert explain_json_score('{"a": {"b": {"c": 1}}, "score": 3}').value == 3
    for text in ('{"score": 1e999999}', '{"score": NaN}', '{"score": "inf"}', '{"score": -Infinity}'):
        res = explain_json_score(text)
        assert res.value is None and res.reason, text


def test_a_long_thinking_block_does_not_count_against_the_answer_cap():
    text = "<think>" + "hmm " * 50_000 + "</think>" + '{"reasoning": "ok", "score": 2}'
    res = explain_json_score(text)
    assert res.value == 2
    start, end = res.spans["score"]
    assert text[start:end] == "2"  # spans still index the original text


@pytest.mark.parametrize(
    "value",
    [[[[[[[[[[4]]]]]]]]], "9" * 5000, 10**5000, float("nan"), float("inf"), {"a": 1}, object(), b"4", 4 + 0j],
    ids=lambda v: type(v).__name__,
)
def test_coerce_score_never_raises(value):
    score, why = coerce_score(value)
    assert (score is None) != (why is None)


def test_work_is_bounded_by_the_answer_length(monkeypatch):
    """The bound on work, not on wall time: every scanner step and every character handed to a decoder is counted,
    and the counts stay within a small multiple of the (capped) answer length, whatever the text."""
    seen: list[parsing._Work] = []
    real = parsing._Work

    def recording(n: int) -> parsing._Work:
        w = real(n)
        seen.append(w)
        return w

    monkeypatch.setattr(parsing, "_Work", recording)
    for name, text in HOSTILE.items():
        for explain in EXPLAINERS:
            seen.clear()
            explain(text)
            for w in seen:
                assert w.steps <= w.limit, (name, explain.__name__, w.steps)
                assert w.decoded <= parsing.DECODE_FACTOR * MAX_ANSWER_CHARS, (name, explain.__name__, w.decoded)


def test_coarse_time_sanity_on_100k_of_adversarial_text():
    texts = [v[:100_000] for v in HOSTILE.values()] + ["{" * 100_000, "{[" * 50_000]
    t0 = time.perf_counter()
    for text in texts:
        for explain in EXPLAINERS:
            explain(text)
    per_call = (time.perf_counter() - t0) / (len(texts) * len(EXPLAINERS))
    assert per_call < 1.0  # a coarse bound only: the design bound is the work test above
