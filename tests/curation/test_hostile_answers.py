"""Hostile teacher answers (deep nesting, huge numbers, brace floods) cost only their own item: a failure or a
missing score with the reason, never an exception that stops the run (a relaunch would die at the same item)."""

import pytest

from firm.curation.parsing import parse_checklist_score, parse_difference_report, parse_edit_evaluation, parse_plan
from firm.curation.pipelines import DifferenceFirst, PlanThenScore
from firm.curation.prompts import CurationPrompts
from firm.synthetic.curation import ShapesEditSource, ShapesGenSource, ShapesRuleTeacher

DEEP = "[" * 5000 + "5" + "]" * 5000
HOSTILE_ANSWERS = [
    '{"obvious": ' + DEEP + ', "detailed": {}}',
    '{"execution": {"score": ' + DEEP + '}, "consistency": {"score": ' + "5" * 5000 + "}}",
    '{"score": ' + "5" * 5000 + "}",
    "{" * 20_000,
    "1." + "\n" * 30_000,
    "- " + " " * 30_000 + "\n",
]


class HostileTeacher:
    """Answers every request with one of the hostile texts (in turn)."""

    teacher_id = "hostile"

    def __init__(self):
        self.n = 0

    def generate(self, requests):
        out = []
        for _ in requests:
            out.append(HOSTILE_ANSWERS[self.n % len(HOSTILE_ANSWERS)])
            self.n += 1
        return out


@pytest.mark.parametrize("text", HOSTILE_ANSWERS, ids=range(len(HOSTILE_ANSWERS)))
def test_curation_parsers_never_raise(text):
    for parsed in (
        parse_difference_report(text),
        parse_edit_evaluation(text),
        parse_plan(text),
        parse_checklist_score(text, 3),
    ):
        value, why = parsed
        assert value is not None or (isinstance(why, str) and why)


def test_difference_first_survives_hostile_answers():
    items = list(ShapesEditSource(ShapesEditSource.Config(count=6)))
    pipe = DifferenceFirst({"reporter": HostileTeacher(), "evaluator": HostileTeacher()}, CurationPrompts())
    outs = pipe.process(items)  # raised RecursionError / ValueError before
    assert len(outs) == len(items)
    for o in outs:
        assert o.sample is None and o.error  # every report here is unreadable: a failure with the reason
    assert pipe.stats["failed.report"] == len(items)
    # readable reports, hostile evaluations: each judgement is a missing score with the reason, never a default
    pipe = DifferenceFirst({"reporter": ShapesRuleTeacher(), "evaluator": HostileTeacher()}, CurationPrompts())
    for o in pipe.process(items):
        assert o.error or (o.sample["execution"] is None and o.sample["consistency"] is None)


def test_plan_then_score_survives_hostile_answers():
    items = list(ShapesGenSource(ShapesGenSource.Config(count=6)))
    t = HostileTeacher()
    pipe = PlanThenScore({"planner": t, "scorer": t, "rewriter": t}, CurationPrompts(), quality=True)
    outs = pipe.process(items)
    assert len(outs) == len(items)
    for o in outs:
        assert o.error or o.sample["instruction"] is None
