"""Teacher-answer parsers, prompt templates, and the balancing arithmetic."""

import json
from collections import Counter

import pytest

from firm.critics.parsing import find_json
from firm.curation.balance import BalanceConfig, plan_rewrites, select
from firm.curation.parsing import (
    parse_checklist_score,
    parse_difference_report,
    parse_edit_evaluation,
    parse_plan,
    parse_rewrite,
)
from firm.curation.prompts import DEFAULT_TEMPLATES, CurationPromptConfig, CurationPrompts, template_hash

REPORT = {"obvious": ["the cup is red now"], "detailed": {"color": ["cup: white -> red"], "quantity": []}}


@pytest.mark.parametrize(
    "text",
    [
        json.dumps(REPORT),
        "Here is the report:\n```json\n" + json.dumps(REPORT) + "\n```\nDone.",
        "<think>I should check {colour}.</think>" + json.dumps(REPORT),
        'Format: {"obvious": ["..."]}\nAnswer: {"obvious": ["the cup is red now",], "detailed": {"Colour": '
        '["cup: white -> red"], "Quantity": "none"}}',
    ],
)
def test_difference_report_variants(text):
    report, why = parse_difference_report(text)
    assert why is None
    assert report["obvious"] == ["the cup is red now"] and report["detailed"] == {"color": ["cup: white -> red"]}


@pytest.mark.parametrize(
    "text,words",
    [
        ("", "empty"),
        ("The images differ in colour.", "no JSON object"),
        ('{"differences": 3}', "neither"),
        ('{"obvious": "x", "detailed": [1]}', "'detailed' must"),
    ],
)
def test_difference_report_failures_say_why(text, words):
    report, why = parse_difference_report(text)
    assert report is None and words in why


def test_edit_evaluation_keeps_the_readable_judgement():
    judged, why = parse_edit_evaluation(
        '{"execution": {"reasoning": "red as asked", "score": "5"}, "consistency": {"reasoning": "?", "score": 0}}'
    )
    assert why is None
    assert judged["execution"] == (5, "red as asked", None)
    score, _, problem = judged["consistency"]
    assert score is None and "outside 1..5" in problem
    assert parse_edit_evaluation('{"execution": {"score": 4.5}}')[0] is None  # nothing usable: a failure


def test_plan_forms():
    items, _ = parse_plan(
        '[{"category": "Main subject", "text": "two cats"}, {"category": "negatives", "text": "no dog"}]'
    )
    assert items == [
        {"category": "main_subject", "text": "two cats"},
        {"category": "negative_constraints", "text": "no dog"},
    ]
    items, _ = parse_plan('{"checklist": [{"requirement": "a red hat"}]}')
    assert items == [{"category": "other", "text": "a red hat"}]
    items, _ = parse_plan("Checklist:\n1. attributes: the hat is red\n2) a cat")
    assert items == [
        {"category": "attributes_actions", "text": "the hat is red"},
        {"category": "other", "text": "a cat"},
    ]
    assert parse_plan("nothing to plan")[0] is None


def test_checklist_score_and_rewrite():
    r, _ = parse_checklist_score(
        '{"items": [{"item": 1, "verdict": "Yes"}, {"item": 2, "verdict": "partially", "note": "pinkish"}], '
        '"reasoning": "mostly", "score": 4}',
        2,
    )
    assert r["score"] == 4 and r["complete"] and [i["verdict"] for i in r["items"]] == ["yes", "partly"]
    assert "2. partly: pinkish" in r["reasoning"]
    assert parse_checklist_score('{"items": [], "score": null}', 1)[0] is None
    assert parse_rewrite('{"instruction": " make it blue "}', "instruction") == ("make it blue", None)
    assert parse_rewrite('{"prompt": ""}', "prompt")[0] is None
    assert find_json("[1, 2] and [3]", list)[0] == [3]


def test_templates_render_and_overrides_are_checked(tmp_path, caplog):
    p = CurationPrompts()
    msgs = p.render("edit_evaluation", [], instruction="make it {blue} like {report}", report="- [color] x")
    text = msgs[0]["content"][-1]["text"]
    assert "make it {blue} like {report}" in text and '{"execution": {"reasoning"' in text  # one pass, no escapes
    assert set(p.hashes()) == set(DEFAULT_TEMPLATES) and all(len(h) == 16 for h in p.hashes().values())
    good = tmp_path / "plan.txt"
    good.write_text('Plan {prompt} as [{"category": ..}] ({category} is literal)')  # the critic's rule
    p2 = CurationPrompts(CurationPromptConfig(plan=str(good)))
    assert p2.hashes()["plan"] == template_hash(good.read_text()) != p.hashes()["plan"]
    assert p2.render("plan", [], prompt="a cat")[0]["content"][-1]["text"] == (
        'Plan a cat as [{"category": ..}] ({category} is literal)'
    )
    assert "{category} is not a placeholder of this template" in caplog.text
    bad = tmp_path / "bad.txt"
    bad.write_text('Plan {promt} as [{"category": ..}]')
    with pytest.raises(ValueError, match=r"prompts.plan .*bad.txt.*must contain \{prompt\}"):
        CurationPrompts(CurationPromptConfig(plan=str(bad)))
    with pytest.raises(FileNotFoundError, match="prompts.plan: template file"):
        CurationPrompts(CurationPromptConfig(plan=str(tmp_path / "missing.txt")))
    with pytest.raises(KeyError, match="no value for placeholder"):
        p.render("plan", [])


def test_shares_and_select_follow_the_target():
    shares = BalanceConfig(target={1: 1, 5: 1}).shares()
    assert shares == {1: 0.5, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.5}
    with pytest.raises(ValueError):
        BalanceConfig(target={6: 1.0}).shares()
    scores = {f"k{i}": s for i, s in enumerate([5] * 60 + [4] * 20 + [1] * 10 + [None] * 5)}
    keep = select(scores, BalanceConfig(target={1: 0.5, 4: 0.25, 5: 0.25}).shares(), seed=0)
    assert Counter(scores[k] for k in keep) == {1: 10, 4: 5, 5: 5}  # the scarce score limits the size
    half = select(scores, BalanceConfig(target={1: 1, 4: 1, 5: 1}).shares(), seed=0, fill=0.5)
    assert Counter(scores[k] for k in half) == {1: 10, 4: 20, 5: 20}  # median support: 1 under-filled
    assert len(select(scores, BalanceConfig().shares(), seed=0, fill=0.0)) == 90  # keep all scored
    assert select(scores, shares, seed=0) == select(dict(reversed(list(scores.items()))), shares, seed=0)
    assert select(scores, shares, seed=0) != select(scores, shares, seed=1)


def test_plan_rewrites_takes_from_the_surplus():
    scores = {f"k{i}": s for i, s in enumerate([5] * 80 + [4] * 10 + [1] * 10)}
    shares = BalanceConfig().shares()  # uniform: 20 each
    picks = plan_rewrites(scores, shares, max_fraction=0.5, seed=3)
    # deficit = (20-10) + 20 + 20 + (20-10) = 60, capped at 50; only score 5 has a surplus
    assert len(picks) == 50 and {scores[k] for k in picks} == {5}
    assert plan_rewrites(scores, shares, max_fraction=0.5, seed=3) == picks  # deterministic
    assert len(plan_rewrites(scores, shares, max_fraction=0.1, seed=3)) == 10
    assert plan_rewrites({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}, shares, 0.5, 0) == []  # already balanced
