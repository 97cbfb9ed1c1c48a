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


# ---- joint balancing (balance.joint)

# Cells of a synthetic score table, {consistency: {execution: count}}: Consistency is mostly 5 with 2% at 1 and none at
# 2; Execution is bimodal (failed edits: 1, often with an untouched image, so Consistency 5) and tied to Consistency.
JOINT_TABLE = {
    1: {1: 16, 2: 10, 3: 6, 4: 4, 5: 4},
    3: {1: 50, 2: 40, 3: 40, 4: 15, 5: 15},
    4: {1: 40, 2: 30, 3: 60, 4: 90, 5: 80},
    5: {1: 450, 2: 30, 3: 30, 4: 90, 5: 900},
}
CONSISTENCY_TARGET = {1: 0.2, 2: 0.15, 3: 0.15, 4: 0.15, 5: 0.35}


def _joint_scores(scale=3):
    scores = {}
    for cons, row in JOINT_TABLE.items():
        for exe, n in row.items():
            for _ in range(n * scale):
                scores[f"k{len(scores):05d}"] = {"execution": exe, "consistency": cons}
    return scores


def _shares(scores, keep, dim):
    h = Counter(scores[k][dim] for k in keep)
    return {s: h[s] / len(keep) for s in range(1, 6)}


def test_joint_selection_follows_both_targets_where_one_dimension_does_not(caplog):
    from firm.curation.balance import RAKE_WARN, select_joint

    scores = _joint_scores()
    targets = BalanceConfig(joint={"consistency": CONSISTENCY_TARGET}).targets("execution")
    assert list(targets) == ["execution", "consistency"] and targets["execution"] == BalanceConfig().shares()
    keep = select_joint(scores, targets, seed=0)
    assert "no sample has consistency score [2]" in caplog.text
    # no sample has Consistency 2, so its share goes to the other scores in proportion
    wanted = {"execution": targets["execution"], "consistency": {1: 0.2, 2: 0.0, 3: 0.15, 4: 0.15, 5: 0.35}}
    wanted["consistency"] = {s: p / 0.85 for s, p in wanted["consistency"].items()}
    # Tolerance from the sizes: each of the K cells (score combinations) is rounded by less than one sample, so a
    # score's count is within K_s (its cells) of its share of the fitted size M, and the output size within K of M:
    # |share_s - p_s| < (K_s + p_s * K) / n, plus what the fit left (< RAKE_WARN, else it warns).
    cells = {(v["execution"], v["consistency"]) for v in scores.values()}
    n = len(keep)
    assert n > 200, n
    for i, dim in enumerate(("execution", "consistency")):
        got = _shares(scores, keep, dim)
        for s, p in wanted[dim].items():
            k_s = sum(1 for c in cells if c[i] == s)
            tol = (k_s + p * len(cells)) / n + RAKE_WARN
            assert abs(got[s] - p) < tol, (dim, s, got[s], p, tol)
            assert tol < 0.05
    # balancing Execution alone meets its own target exactly but leaves Consistency skewed
    plain = select({k: v["execution"] for k, v in scores.items()}, targets["execution"], seed=0)
    assert _shares(scores, plain, "execution") == pytest.approx(targets["execution"])
    off = _shares(scores, plain, "consistency")
    assert off[1] < 0.06 and abs(off[1] - wanted["consistency"][1]) > 0.15 and off[5] > 0.5


def test_joint_selection_is_reproducible_and_seeded():
    from firm.curation.balance import select_joint

    scores = _joint_scores(scale=1)
    targets = BalanceConfig(target={1: 1, 3: 1, 5: 2}, joint={"consistency": {1: 1, 4: 1, 5: 1}}).targets("execution")
    keep = select_joint(scores, targets, seed=7)
    assert select_joint(scores, targets, seed=7) == keep
    assert select_joint(dict(reversed(list(scores.items()))), targets, seed=7) == keep
    other = select_joint(scores, targets, seed=8)
    assert other != keep and abs(len(other) - len(keep)) <= 9  # 9 cells, each rounded up or down
    # only samples with a positive share in both dimensions, and with both scores, are eligible
    scores["no-consistency"] = {"execution": 1, "consistency": None}
    scores["no-scores"] = None
    eligible = {k for k, v in scores.items() if v and v["execution"] in (1, 3, 5) and v["consistency"] in (1, 4, 5)}
    assert select_joint(scores, targets, seed=7, fill=0.0) == eligible
    sizes = [len(select_joint(scores, targets, seed=7, fill=f)) for f in (0.0, 0.3, 0.6, 1.0)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[1] > sizes[-1]
    assert len(select_joint(scores, targets, seed=7, max_samples=40)) == 40
    assert len(select_joint(scores, targets, seed=7, fill=0.0, max_samples=40)) == 40


@pytest.mark.parametrize("fill,max_samples", [(1.0, None), (0.5, None), (0.0, None), (1.0, 7), (0.3, 25)])
def test_joint_without_joint_dimensions_is_select(fill, max_samples):
    from firm.curation.balance import select_joint

    scores = _joint_scores(scale=1)
    scores["missing"] = {"execution": None, "consistency": 5}
    cfg = BalanceConfig(target={1: 0.4, 2: 0.1, 4: 0.2, 5: 0.3}, joint={})
    targets = cfg.targets("execution")
    assert targets == {"execution": cfg.shares()}
    one = {k: v["execution"] for k, v in scores.items()}
    assert select_joint(scores, targets, 3, max_samples, fill) == select(one, cfg.shares(), 3, max_samples, fill)


def test_joint_targets_that_cannot_be_met_together_are_reported(caplog):
    from firm.curation.balance import select_joint

    # Consistency 1 occurs only with Execution 1: half the output at Consistency 1 but a tenth at Execution 1 is
    # impossible
    scores = {f"a{i}": {"execution": 1, "consistency": 1} for i in range(20)}
    scores |= {f"b{i}": {"execution": 5, "consistency": 5} for i in range(20)}
    targets = {"execution": {1: 0.1, 5: 0.9}, "consistency": {1: 0.5, 5: 0.5}}
    keep = select_joint(scores, targets, seed=0)
    assert "cannot all be met" in caplog.text and keep <= set(scores)


def test_bad_joint_settings_are_named(tmp_path):
    from firm.config import ConfigError
    from firm.curation.runner import load_curation, run_curation

    with pytest.raises(ValueError, match="balance.joint.execution: 'execution' is already the balanced dimension"):
        BalanceConfig(joint={"execution": {1: 1}}).targets("execution")
    with pytest.raises(ValueError, match=r"balance.joint.consistency: keys must be scores 1..5"):
        BalanceConfig(joint={"consistency": {0: 1, 5: 1}}).targets("execution")
    with pytest.raises(ValueError, match="balance.joint.consistency: the shares sum to 0"):
        BalanceConfig(joint={"consistency": {1: 0.0}}).targets("execution")
    assert BalanceConfig(joint={"consistency": {}}).targets("execution")["consistency"] == BalanceConfig().shares()
    yaml_path = tmp_path / "bad.yaml"
    yaml_path.write_text(
        f"name: bad_joint\noutput_dir: {tmp_path / 'runs'}\npipeline: difference_first\n"
        "source: {name: shapes_edit, count: 4, size: 32}\nteachers: {default: {name: shapes_rule}}\n"
        "balance: {enabled: true, rewrite: false, joint: {aesthetics: {1: 1, 5: 1}}}\nprogress: false\n"
    )
    with pytest.raises(ConfigError, match=r"balance.joint: \['aesthetics'\] not score\(s\) of difference_first"):
        run_curation(load_curation(yaml_path))
    yaml_path.write_text(yaml_path.read_text().replace("aesthetics: {1: 1, 5: 1}", "consistency: {7: 1}"))
    with pytest.raises(ConfigError, match="balance.joint.consistency: keys must be scores 1..5"):
        run_curation(load_curation(yaml_path))


def test_curation_run_balances_execution_and_consistency(tmp_path, capsys):
    """End to end with the shapes rule teacher: final/ is the joint selection of the scores and the manifest says
    which dimensions were balanced, with their targets and final histograms."""
    from firm.curation.balance import select_joint
    from firm.curation.runner import load_curation, print_report, run_curation
    from firm.data.reader import iter_samples

    yaml_path = tmp_path / "joint.yaml"
    yaml_path.write_text(
        f"name: joint_test\noutput_dir: {tmp_path / 'runs'}\npipeline: difference_first\n"
        "source: {name: shapes_edit, count: 36, size: 32}\nteachers: {default: {name: shapes_rule}}\n"
        "output: {max_count: 16}\nbalance:\n  enabled: true\n  rewrite: false\n  fill: 0.5\n"
        "  target: {1: 1, 5: 1}\n  joint: {consistency: {4: 1, 5: 1}}\nprogress: false\n"
    )
    m = run_curation(load_curation(yaml_path))
    run_dir = tmp_path / "runs" / "joint_test"
    scored = {
        s["key"]: {"execution": s["execution"], "consistency": s["consistency"]}
        for s in iter_samples(run_dir / "scored", "edit", decode_images=False)
    }
    targets = {"execution": {1: 0.5, 2: 0.0, 3: 0.0, 4: 0.0, 5: 0.5}, "consistency": {1: 0, 2: 0, 3: 0, 4: 0.5, 5: 0.5}}
    final = {s["key"] for s in iter_samples(run_dir / "final", "edit", decode_images=False)}
    assert final and final == select_joint(scored, targets, seed=0, fill=0.5)
    bal = m["balance"]
    assert bal["dimension"] == "execution" and bal["dimensions"] == ["execution", "consistency"]
    assert bal["targets"] == {k: pytest.approx(v) for k, v in targets.items()}
    for dim in ("execution", "consistency"):
        h = Counter(scored[k][dim] for k in final)
        assert {s: m["histograms"]["final"][dim][str(s)] for s in range(1, 6)} == {s: h[s] for s in range(1, 6)}
    saved = json.loads((run_dir / "manifest.json").read_text())
    assert saved["balance"]["dimensions"] == ["execution", "consistency"]
    assert saved["balance"]["targets"]["consistency"]["4"] == pytest.approx(0.5)
    print_report(m)
    assert "final: consistency" in capsys.readouterr().out
