"""The hallucinating critic: deterministic, the rule critic when every probability is 0, and biased the way a general
VLM judge is (consistency hallucinated on over-edits, execution credited on copies, worse MAE on a benchmark)."""

import random

import numpy as np
import pytest

from firm.critics.types import CONSISTENCY, EXECUTION
from firm.synthetic.critic import ShapesRuleCritic, task_request
from firm.synthetic.hallucinating import ShapesHallucinatingCritic
from firm.synthetic.simulate import simulate_edit
from firm.synthetic.tasks import edit_tasks
from firm.synthetic.world import WorldConfig, render

WORLD = WorldConfig(size=32)
ZERO = dict(p_miss=0.0, p_lenient=0.0, p_copy_credit=0.0, p_noise=0.0)


def _requests(mode: str, n: int = 40, seed: int = 0):
    rng = random.Random(seed)
    return [task_request(t, render(simulate_edit(t, mode, rng, WORLD), WORLD), WORLD) for t in edit_tasks(
        "test", world=WORLD, limit=n)]  # fmt: skip


def _mean(results, dim):
    return float(np.mean([r.scores[dim] for r in results if r.scores[dim] is not None]))


def test_deterministic_per_request_content():
    reqs = _requests("partial", 12) + _requests("overedit_1", 12)
    a = [r.scores for r in ShapesHallucinatingCritic().score(reqs)]
    b = [r.scores for r in ShapesHallucinatingCritic().score(reqs[::-1])][::-1]  # another order, another instance
    assert a == b
    other_seed = [r.scores for r in ShapesHallucinatingCritic(ShapesHallucinatingCritic.Config(seed=1)).score(reqs)]
    assert other_seed != a


def test_all_probabilities_zero_is_the_rule_critic():
    reqs = [*_requests("partial", 8), *_requests("copy", 8), *_requests("overedit_n", 8), *_requests("redraw", 8)]
    rule = ShapesRuleCritic().score(reqs)
    hall = ShapesHallucinatingCritic(ShapesHallucinatingCritic.Config(**ZERO)).score(reqs)
    assert [r.scores for r in hall] == [r.scores for r in rule]
    assert all("noise model: unchanged" in r.reasoning[EXECUTION] for r in hall)


def test_defaults_inflate_consistency_on_overedits_and_execution_on_copies():
    rule, hall = ShapesRuleCritic(), ShapesHallucinatingCritic()
    over = _requests("overedit_n", 40)
    r, h = rule.score(over), hall.score(over)
    seen = [i for i, x in enumerate(r) if x.scores[CONSISTENCY] < 5]  # the rule critic sees unrequested changes ...
    assert len(seen) > 20
    r, h = [r[i] for i in seen], [h[i] for i in seen]
    missed = sum(x.scores[CONSISTENCY] >= 4 and "missed" in x.reasoning[CONSISTENCY] for x in h)
    assert missed > 0.4 * len(seen)  # ... the hallucinating one mostly does not (p_miss = 0.6)
    assert _mean(h, CONSISTENCY) > _mean(r, CONSISTENCY) + 0.5
    copies = _requests("copy", 40)
    r, h = rule.score(copies), hall.score(copies)
    assert _mean(r, EXECUTION) == pytest.approx(1.0)
    credited = [x for x in h if "unchanged output credited" in x.reasoning[EXECUTION]]
    assert 0.25 * len(copies) < len(credited) < 0.75 * len(copies)  # p_copy_credit = 0.5
    assert _mean(h, EXECUTION) > 1.7
    assert any("rule critic: execution 1" in x.reasoning[EXECUTION] for x in credited)


def test_validate_rejects_bad_knobs():
    with pytest.raises(ValueError, match="p_miss"):
        ShapesHallucinatingCritic(ShapesHallucinatingCritic.Config(p_miss=1.5))


def test_mae_on_a_shapes_benchmark_is_clearly_worse(tmp_path):
    from firm.bench.data import load_benchmark
    from firm.bench.evaluate import build_request
    from firm.bench.metrics import mae
    from firm.synthetic.bench import build_shapes_bench

    bench = load_benchmark(build_shapes_bench(tmp_path / "bench", n_per_task=20, seed=0))
    items = [it for it in bench.items if it.task.startswith("edit")]
    reqs = [build_request(it) for it in items]
    truth = [it.human_score for it in items]

    def critic_mae(critic):
        res = critic.score(reqs)
        return mae([r.scores[it.dimension] for r, it in zip(res, items)], truth)

    rule_mae, hall_mae = critic_mae(ShapesRuleCritic()), critic_mae(ShapesHallucinatingCritic())
    assert rule_mae < 0.3
    assert hall_mae > rule_mae + 0.3


def test_the_general_teacher_labels_like_the_hallucinating_critic():
    """The uncurated arm's teacher (shapes_general) answers edit evaluations with the noisy judge's scores."""
    import json

    from firm.curation.teachers import TeacherRequest
    from firm.synthetic.curation import ShapesGeneralTeacher, ShapesRuleTeacher

    reqs = _requests("overedit_n", n=20) + _requests("copy", n=20)
    asks = [
        TeacherRequest("edit_evaluation", [], [r.source, r.edited], {"instruction": r.instruction}, f"k{i}")
        for i, r in enumerate(reqs)
    ]
    rule = [json.loads(t) for t in ShapesRuleTeacher().generate(asks)]
    general = [json.loads(t) for t in ShapesGeneralTeacher().generate(asks)]
    judge = ShapesHallucinatingCritic().score(reqs)
    for g, j in zip(general, judge):
        for d in (EXECUTION, CONSISTENCY):
            assert g[d]["score"] == j.scores[d]
    # it differs from the rule teacher where a general judge does: higher consistency on over-edits
    cons = lambda answers: np.mean([a[CONSISTENCY]["score"] for a in answers[:20]])  # noqa: E731
    assert cons(general) > cons(rule) + 0.5
    # and with every probability 0 it is the rule teacher
    zero = ShapesGeneralTeacher(ShapesGeneralTeacher.Config(judge=dict(ZERO)))
    scores = lambda answers: [[a[d]["score"] for d in (EXECUTION, CONSISTENCY)] for a in answers]  # noqa: E731
    assert scores([json.loads(t) for t in zero.generate(asks)]) == scores(rule)
