"""Parsers on realistic critic outputs: what real VLMs emit, good and malformed."""

import pytest

from firm.critics import (
    explain_boxed_score,
    explain_checklist,
    explain_json_score,
    explain_quality_scores,
    parse_boxed_score,
    parse_checklist,
    parse_json_score,
    parse_quality_scores,
)

# --------------------------------------------------------------------------------------------------------------------
# JSON scores (edit Execution / Consistency)

GOOD_JSON = [
    ('{"reasoning": "The sky is now purple as asked.", "score": 5}', 5),
    ('```json\n{\n  "reasoning": "The hat was added but it floats above the head.",\n  "score": 3\n}\n```', 3),
    ('Let me compare both images.\n\n{"reasoning": "Only the cup changed.", "score": 4}\n', 4),
    ('{"reasoning": "ok", "score": "4"}', 4),
    ('{"reasoning": "ok", "score": [2]}', 2),
    ('{"reasoning": "ok", "score": 4.0}', 4),
    ('{"reasoning": "ok", "score": "4/5"}', 4),
    ("{'reasoning': 'single quotes from a python-minded model', 'score': 2}", 2),
    ('{"reasoning": "trailing comma", "score": 1,}', 1),
    ('   \n\t{"Score": 5, "Reasoning": "caps"}  \n', 5),
    ("<think>The first image shows a dog. Hmm, score 2? No.</think>\n" + '{"reasoning": "fine", "score": 4}', 4),
    # an echoed format example before the real answer: the last object wins
    ('Format: {"reasoning": "...", "score": 1}\nAnswer: {"reasoning": "all good", "score": 5}', 5),
    # broken JSON (unescaped quotes in the reasoning) that still has a readable score
    ('{"reasoning": "the sign now says "OPEN" as asked", "score": 5}', 5),
    ("I checked everything.\nFinal Score: 3", 3),
    ("**Score:** 2", 2),
    ("The answer is \\boxed{4}", 4),
]


@pytest.mark.parametrize("text,expected", GOOD_JSON)
def test_parse_json_score_accepts_real_outputs(text, expected):
    assert parse_json_score(text) == expected
    res = explain_json_score(text)
    assert res.ok and res.reason is None
    start, end = res.spans["score"]
    assert text[start:end] == str(expected)  # the span points at the digit in the original text


BAD_JSON = [
    ("", "empty"),
    (None, "empty"),
    ('{"reasoning": "great edit", "score": 7}', "outside 1..5"),
    ('{"reasoning": "meh", "score": 0}', "outside 1..5"),
    ('{"reasoning": "between", "score": 3.5}', "not a whole number"),
    ('{"reasoning": "two", "score": [3, 4]}', "list of 2"),
    ('{"reasoning": "no", "score": "high"}', "not a number"),
    ('{"reasoning": "no", "score": null}', "not a number"),
    ('{"reasoning": "no", "score": true}', "not a number"),
    ('{"reasoning": "the edit looks good and I would rate it highly"}', "no JSON object with a 'score'"),
    ('{"reasoning": "truncated because max_tokens ran out, the edit is', "no JSON object"),
    ("I would give this a four.", "no JSON object"),
    ("<think>Let me think about the lighting and the", "unfinished <think>"),
]


@pytest.mark.parametrize("text,why", BAD_JSON)
def test_parse_json_score_rejects_with_a_reason(text, why):
    assert parse_json_score(text) is None
    res = explain_json_score(text)
    assert not res.ok and why in res.reason


def test_json_reasoning_is_extracted():
    res = explain_json_score('Thinking...\n```json\n{"reasoning": "The cat became a dog.", "score": 5}\n```')
    assert res.reasoning == "The cat became a dog."
    res = explain_json_score('The cat became a dog.\n{"score": 5}')
    assert res.reasoning == "The cat became a dog."


# A score on another scale is not a 1..5 score: "4/10" is a missing score with a reason, never a 4.
SCALED = [
    ("Score: 4/10", None),
    ("Score: 8/10", None),
    ("Score: 4/5", 4),
    ("Score: 4 out of 10", None),
    ("Final Rating: 4 out of 5", 4),
    ('{"reasoning": "ok", "score": "4/10"}', None),
    ('{"reasoning": "ok", "score": "3 out of 5"}', 3),
    ('{"reasoning": "an "unescaped" quote", "score": 8/10}', None),
    ("\\boxed{4/10}", None),
]


@pytest.mark.parametrize("text,expected", SCALED)
def test_a_score_on_another_scale_is_rejected(text, expected):
    parse = explain_boxed_score if "boxed" in text else explain_json_score
    res = parse(text)
    assert res.value == expected
    if expected is None:
        assert "/10 is on a scale of 10, not 1..5" in res.reason
    if "Score" in text or "Rating" in text:  # labelled lines are read the same way by both parsers
        assert explain_boxed_score(text).value == expected


def test_quality_aspect_on_another_scale_is_rejected():
    res = explain_quality_scores("Aesthetics: 8/10\nTechnical quality: 4/5\nStructure: 5")
    assert res.value is None and "aesthetics: score 8/10 is on a scale of 10" in res.reason
    assert explain_quality_scores("Aesthetics: 4/5\nTechnical quality: 4 out of 5\nStructure: 5").value == {
        "aesthetics": 4,
        "technical": 4,
        "structure": 5,
    }


# --------------------------------------------------------------------------------------------------------------------
# Boxed scores (generation instruction following)

GOOD_BOXED = [
    ("1. A red cube: satisfied.\n2. On a table: satisfied.\nAll requirements met.\n\\boxed{5}", 5),
    ("Requirement 1 partly met... \\boxed{ 3 }", 3),
    ("Overall: \\boxed{\\text{2}}", 2),
    ("So the score is $\\boxed{4}$.", 4),
    ("\\boxed{4/5}", 4),
    ("First I thought \\boxed{2} but on reflection \\boxed{3}", 3),
    ("boxed{1}", 1),
    ("1. cat: yes\n2. hat: no\n\nFinal Alignment Rating: 4", 4),
    ("**Final Rating:** 2", 2),
    ("<think>\\boxed{1}?</think> Everything is present. \\boxed{5}", 5),
]


@pytest.mark.parametrize("text,expected", GOOD_BOXED)
def test_parse_boxed_score_accepts_real_outputs(text, expected):
    assert parse_boxed_score(text) == expected
    res = explain_boxed_score(text)
    start, end = res.spans["score"]
    assert text[start:end] == str(expected)


BAD_BOXED = [
    ("", "empty"),
    ("\\boxed{6}", "outside 1..5"),
    ("\\boxed{3.5}", "not a whole number"),
    ("\\boxed{four}", "not a number"),
    ("All requirements are satisfied, a great image.", "no \\boxed"),
    ("Final Rating: 9", "outside 1..5"),
]


@pytest.mark.parametrize("text,why", BAD_BOXED)
def test_parse_boxed_score_rejects_with_a_reason(text, why):
    assert parse_boxed_score(text) is None
    assert why in explain_boxed_score(text).reason


# --------------------------------------------------------------------------------------------------------------------
# Quality (three aspects, min)

GOOD_QUALITY = [
    (
        '{"reasoning": "sharp, pleasant", "aesthetics": 4, "technical_quality": 5, "structure_texture": 3}',
        {"aesthetics": 4, "technical": 5, "structure": 3},
    ),
    (
        '```json\n{"aesthetic_quality": "4", "technical quality": 4, "structure_and_texture": [2]}\n```',
        {"aesthetics": 4, "technical": 4, "structure": 2},
    ),
    (
        '{"scores": {"aesthetics": {"score": 5, "reason": "x"}, "technical": {"score": 4}, "structure": {"score": 4}}}',
        {"aesthetics": 5, "technical": 4, "structure": 4},
    ),
    (
        "The colors are harmonious.\nAesthetics: 4\nTechnical Quality: 3/5\nStructure & Texture: 5",
        {"aesthetics": 4, "technical": 3, "structure": 5},
    ),
    (
        "- **Aesthetics**: 2\n- **Technical quality**: 2\n- **Structure and texture**: 1",
        {"aesthetics": 2, "technical": 2, "structure": 1},
    ),
]


@pytest.mark.parametrize("text,expected", GOOD_QUALITY)
def test_parse_quality_scores_accepts_real_outputs(text, expected):
    assert parse_quality_scores(text) == expected


def test_quality_spans_point_at_each_aspect_digit():
    text = '{"reasoning": "ok", "aesthetics": 4, "technical_quality": 5, "structure_texture": 3}'
    res = explain_quality_scores(text)
    assert {k: text[s:e] for k, (s, e) in res.spans.items()} == {"aesthetics": "4", "technical": "5", "structure": "3"}


BAD_QUALITY = [
    ('{"aesthetics": 4, "technical_quality": 5}', "missing quality aspect(s): structure"),
    ('{"aesthetics": 4, "technical_quality": 6, "structure_texture": 3}', "technical: score 6 is outside"),
    ("Aesthetics: 4\nTechnical: great\nStructure: 3", "missing quality aspect(s): technical"),
    ("A lovely picture overall.", "no aesthetics"),
    ("", "empty"),
]


@pytest.mark.parametrize("text,why", BAD_QUALITY)
def test_parse_quality_scores_rejects_with_a_reason(text, why):
    assert parse_quality_scores(text) is None
    assert why in explain_quality_scores(text).reason


# --------------------------------------------------------------------------------------------------------------------
# Planner checklists


def test_parse_checklist_numbered_bulleted_and_json():
    assert parse_checklist("1. A red cube\n2) on a wooden table\n3. no people") == [
        "A red cube",
        "on a wooden table",
        "no people",
    ]
    assert parse_checklist("Here you go:\n- a cat\n* wearing a **hat**\n") == ["a cat", "wearing a **hat"]
    assert parse_checklist('```json\n["a cat", "a hat"]\n```') == ["a cat", "a hat"]
    assert parse_checklist("A cat wearing a hat.") is None
    assert "no numbered" in explain_checklist("A cat wearing a hat.").reason


def test_shared_json_and_score_helpers():
    """The helpers curation reads teacher answers with (one implementation for critics and curation)."""
    from firm.critics.parsing import coerce_score, find_json

    assert find_json('Format: {"a": 1}\n```json\n{"a": 2, "b": [1, 2,],}\n```') == ({"a": 2, "b": [1, 2]}, None)
    assert find_json("<think>[0]</think> Items: ['x', 'y'] then [1, 2]", list) == ([1, 2], None)
    assert find_json('{"checklist": ["a", "b"]}', list) == (["a", "b"], None)
    assert find_json("no json here", list) == (None, "no JSON list found")
    assert find_json("<think>{'a': 1}", dict)[1] == "the output ends inside an unfinished <think> block"
    assert coerce_score(" 4/5 ") == (4, None) and coerce_score([3]) == (3, None)
    assert coerce_score("4/10")[0] is None and coerce_score(6)[1] == "score 6 is outside 1..5"


def test_score_range_and_quality_aspects_have_one_definition():
    import firm.critics as critics
    import firm.critics.types as types
    import firm.data.schema as schema
    import firm.vocab as vocab

    assert critics.QUALITY_ASPECTS is schema.QUALITY_ASPECTS is vocab.QUALITY_ASPECTS
    assert (types.SCORE_MIN, types.SCORE_MAX) == (schema.SCORE_MIN, schema.SCORE_MAX) == (1, 5)
    assert types.EDIT_DIMENSIONS is vocab.Task.EDIT.dimensions and types.GEN_DIMENSIONS is vocab.Task.GEN.dimensions
    assert set(parse_quality_scores('{"aesthetics": 4, "technical_quality": 3, "structure_texture": 5}')) == set(
        vocab.QUALITY_ASPECTS
    )


# ---- the released FIRM answer formats


def test_official_quality_answer_is_a_list_of_three_aspect_scores_whose_minimum_is_quality():
    text = '{"reasoning": "pleasant colours, a smeared hand", "score": [4, 3, 5]}'
    res = explain_quality_scores(text)
    assert res.value == {"aesthetics": 4, "technical": 3, "structure": 5} and min(res.value.values()) == 3
    assert res.reasoning == "pleasant colours, a smeared hand"
    assert {a: text[s:e] for a, (s, e) in res.spans.items()} == {"aesthetics": "4", "technical": "3", "structure": "5"}
    # broken JSON around it (an unescaped quote) still has a readable list
    broken = 'Looks fine.\n{"reasoning": "the "hands" are off", "score": [5, 2, 4]}'
    assert parse_quality_scores(broken) == {"aesthetics": 5, "technical": 2, "structure": 4}
    # anything else is still not a score
    assert parse_quality_scores('{"score": [4, 3]}') is None
    assert "outside 1..5" in explain_quality_scores('{"score": [4, 3, 6]}').reason
    assert parse_quality_scores('{"score": [4, "x", 5]}') is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("**Final Analysis**: all there.\n**Final Alignment Rating**: [4]\n\\boxed{[4]}", 4),
        ("\\boxed{[ 2 ]}", 2),
        ("\\boxed{{5}}", 5),
        # an unreadable box falls back to the labelled rating next to it
        ("Final Alignment Rating: [3]\n\\boxed{three}", 3),
        ("Final Alignment Rating: 2", 2),
    ],
)
def test_official_instruction_answers(text, expected):
    assert parse_boxed_score(text) == expected


def test_an_unreadable_box_without_a_labelled_rating_is_still_missing():
    res = explain_boxed_score("The image is fine. \\boxed{great}")
    assert res.value is None and "\\boxed{great}" in res.reason
    assert parse_boxed_score("\\boxed{[4, 5]}") is None
