"""CME / QMA / weighted sum: exact values at hand-computed points, clamping, NaN propagation, the lazy editor."""

import math

import pytest
import torch

from firm.config import ConfigError
from firm.registry import resolve
from firm.rewards import build_combiner, cme, normalize_score, qma, weighted_sum


@pytest.mark.parametrize("s,expected", [(1, 0.0), (2, 0.25), (3, 0.5), (4, 0.75), (5, 1.0)])
def test_normalize_score_maps_1_to_5_onto_unit_interval(s, expected):
    assert normalize_score(s) == expected


def test_normalize_score_tensor_none_and_custom_range():
    t = normalize_score(torch.tensor([1, 3, 5]))
    assert t.dtype == torch.float32 and t.tolist() == [0.0, 0.5, 1.0]
    assert math.isnan(normalize_score(None))
    assert normalize_score(7, lo=0, hi=10) == 0.7
    with pytest.raises(ValueError, match="hi > lo"):
        normalize_score(3, lo=5, hi=1)
    with pytest.raises(TypeError, match="score must be a number"):
        normalize_score("3")


# CME = E * (0.6 + 0.4 C); QMA = I * (0.4 + 0.6 Q)  (weights already sum to 1)
@pytest.mark.parametrize(
    "e,c,expected",
    [(1, 1, 1.0), (1, 0, 0.6), (0, 1, 0.0), (0.5, 0.5, 0.4), (0.75, 0.25, 0.525), (0.25, 0.75, 0.225)],
)
def test_cme_exact_values(e, c, expected):
    assert cme(e, c) == pytest.approx(expected, abs=1e-12)
    assert float(cme(torch.tensor(e, dtype=torch.float64), torch.tensor(c, dtype=torch.float64))) == pytest.approx(
        expected, abs=1e-12
    )


@pytest.mark.parametrize(
    "i,q,expected", [(1, 1, 1.0), (1, 0, 0.4), (0, 1, 0.0), (0.5, 0.5, 0.35), (0.75, 0.25, 0.4125)]
)
def test_qma_exact_values(i, q, expected):
    assert qma(i, q) == pytest.approx(expected, abs=1e-12)


def test_custom_weights_are_normalised_by_their_sum():
    # 0.5 * (1 + 1 * 0.5) / 2 = 0.375
    assert cme(0.5, 0.5, w1=1.0, w2=1.0) == pytest.approx(0.375)
    assert qma(0.5, 0.5, w1=3.0, w2=1.0) == pytest.approx(0.5 * 3.5 / 4)
    with pytest.raises(ValueError, match="weights must be >= 0"):
        cme(0.5, 0.5, w1=-1.0, w2=0.4)
    with pytest.raises(ValueError, match="positive sum"):
        qma(0.5, 0.5, w1=0.0, w2=0.0)


def test_lazy_copy_scores_zero_under_cme_but_half_under_plain_sum():
    # An editor that returns its input unchanged: Execution 1/5 -> 0, Consistency 5/5 -> 1.
    e, c = normalize_score(1), normalize_score(5)
    assert cme(e, c) == 0.0
    assert weighted_sum({"execution": e, "consistency": c}, {"execution": 0.5, "consistency": 0.5}) == 0.5


def test_results_are_clamped_to_unit_interval():
    assert cme(1.3, 1.0) == 1.0
    assert cme(-0.2, 1.0) == 0.0
    assert qma(torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])).tolist() == [1.0, 0.0]
    assert weighted_sum({"a": 2.0}, {"a": 1.0}) == 1.0


def test_nan_in_gives_nan_out_for_floats_none_and_tensors():
    nan = math.nan
    assert math.isnan(cme(nan, 1.0)) and math.isnan(cme(1.0, nan)) and math.isnan(cme(None, 0.5))
    assert math.isnan(qma(0.0, nan))  # a zero base with a missing bonus is still missing
    assert math.isnan(weighted_sum({"a": nan, "b": 1.0}, {"a": 0.5, "b": 0.5}))
    out = cme(torch.tensor([1.0, nan, 0.5]), torch.tensor([1.0, 1.0, nan]))
    assert out[0] == 1.0 and torch.isnan(out[1:]).all()


def test_weighted_sum_checks_its_inputs():
    with pytest.raises(KeyError, match="no component named"):
        weighted_sum({"execution": 1.0}, {"execution": 0.5, "consistency": 0.5})
    with pytest.raises(ValueError, match="at least one weight"):
        weighted_sum({"a": 1.0}, {})
    # weights are divided by their sum
    assert weighted_sum({"a": 1.0, "b": 0.0}, {"a": 3.0, "b": 1.0}) == 0.75


def test_registered_combiners_are_callable_on_component_dicts():
    comps = {
        "execution": torch.tensor([1.0, 0.0, 0.5, math.nan]),
        "consistency": torch.tensor([0.0, 1.0, 0.5, 1.0]),
    }
    out = build_combiner({"name": "cme"})(comps)
    assert out.shape == (4,) and out.dtype == torch.float32
    assert out[:3].tolist() == pytest.approx([0.6, 0.0, 0.4]) and torch.isnan(out[3])
    naive = build_combiner({"name": "weighted_sum"})(comps)
    assert naive[:3].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert build_combiner("execution_only")(comps)[:3].tolist() == [1.0, 0.0, 0.5]
    gen = build_combiner({"name": "qma", "w1": 0.4, "w2": 0.6})
    assert gen.inputs == ("instruction", "quality")
    assert gen({"instruction": torch.tensor([0.5]), "quality": torch.tensor([0.5])}).tolist() == pytest.approx([0.35])
    with pytest.raises(KeyError, match="missing"):
        gen(comps)


def test_combiner_configs_validate():
    with pytest.raises(ConfigError, match="reward: unknown key 'alpha'"):
        build_combiner({"name": "cme", "alpha": 1.0})
    with pytest.raises(ConfigError, match="reward: invalid value for 'w1'"):
        build_combiner({"name": "cme", "w1": "heavy"})
    with pytest.raises(ValueError, match="weights must be"):
        build_combiner({"name": "qma", "w1": -1.0})
    ws = resolve("rewards", "weighted_sum")
    c = ws(ws.Config(weights={"instruction": 1.0, "quality": 1.0}))
    assert c.inputs == ("instruction", "quality")


def test_combiners_have_a_readable_repr():
    from firm.rewards.combiners import Combiner

    class Halves(Combiner):  # a combiner without a Config
        inputs = ("execution",)

        def combine(self, execution):
            return execution / 2

    assert repr(Halves()) == "Halves()"
    assert repr(build_combiner({"name": "cme", "w1": 0.7})) == "CMEReward(CMEReward.Config(name='cme', w1=0.7, w2=0.4))"
