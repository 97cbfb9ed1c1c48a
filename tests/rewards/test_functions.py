"""FirmEditReward / FirmGenReward: critic scores -> normalised components -> combined rewards, missing counted."""

import math

import pytest
import torch
from PIL import Image

from firm.critics import CriticResult, EditRequest, GenRequest
from firm.rewards import FirmEditReward, FirmGenReward


class TableCritic:
    """A critic answering from a table keyed by request key (None = unparseable output); records what it was asked."""

    def __init__(self, table):
        self.table = table
        self.asked = []

    def score(self, requests):
        self.asked.extend(requests)
        out = []
        for r in requests:
            row = self.table[r.key]
            scores = {d: row.get(d) for d in r.dimensions}
            errors = {d: "could not parse" for d, v in scores.items() if v is None}
            out.append(CriticResult(scores=scores, errors=errors, key=r.key))
        return out


def _img():
    return Image.new("RGB", (8, 8))


def _edits(keys):
    return [EditRequest(source=_img(), edited=_img(), instruction="make it red", key=k) for k in keys]


def test_edit_reward_combines_with_cme_and_counts_missing():
    critic = TableCritic(
        {
            "good": {"execution": 5, "consistency": 5},
            "lazy": {"execution": 1, "consistency": 5},
            "mid": {"execution": 3, "consistency": 3},
            "broken": {"execution": None, "consistency": 4},
            "outofrange": {"execution": 7, "consistency": 4},
        }
    )
    reward = FirmEditReward(critic)
    out = reward(_edits(["good", "lazy", "mid", "broken", "outofrange"]))
    assert out.rewards.dtype == torch.float32 and out.rewards.shape == (5,)
    assert out.rewards[:3].tolist() == pytest.approx([1.0, 0.0, 0.4])
    assert torch.isnan(out.rewards[3:]).all()
    assert out.missing == {"execution": 2, "consistency": 0}
    assert out.num_missing == 2 and out.valid.tolist() == [True, True, True, False, False]
    assert out.components["consistency"].tolist() == pytest.approx([1.0, 1.0, 0.5, 0.75, 0.75])
    assert [r.key for r in out.results] == ["good", "lazy", "mid", "broken", "outofrange"]
    m = out.metrics()
    assert m["reward/mean"] == pytest.approx(1.4 / 3) and m["reward/missing_frac"] == pytest.approx(0.4)
    assert m["reward/execution_missing_frac"] == pytest.approx(0.4)


def test_plain_sum_pays_the_lazy_editor_cme_does_not():
    critic = TableCritic({"lazy": {"execution": 1, "consistency": 5}})
    assert FirmEditReward(critic, {"name": "weighted_sum"})(_edits(["lazy"])).rewards.tolist() == [0.5]
    assert FirmEditReward(critic, {"name": "cme"})(_edits(["lazy"])).rewards.tolist() == [0.0]


def test_gen_reward_uses_qma_and_asks_for_the_configured_dimensions():
    critic = TableCritic({"a": {"instruction": 4, "quality": 2}})
    req = GenRequest(image=_img(), prompt="a red cube", checklist=["a cube", "it is red"], key="a")
    out = FirmGenReward(critic)([req])
    assert out.rewards.tolist() == pytest.approx([0.75 * (0.4 + 0.6 * 0.25)])
    only = FirmGenReward(critic, {"name": "instruction_only"}, dimensions=("instruction",))
    assert only([req]).rewards.tolist() == [0.75]
    assert critic.asked[-1].dimensions == ("instruction",)


def test_reward_rejects_mismatched_tasks_and_dimensions():
    critic = TableCritic({})
    with pytest.raises(ValueError, match="not judged for this task"):
        FirmEditReward(critic, {"name": "qma"})
    with pytest.raises(ValueError, match="add them to `dimensions`"):
        FirmEditReward(critic, "cme", dimensions=("execution",))
    with pytest.raises(TypeError, match="expected EditRequest"):
        FirmEditReward(critic)([GenRequest(image=_img(), prompt="x")])
    with pytest.raises(TypeError, match="score"):
        FirmEditReward(object())


def test_empty_batch_gives_empty_output():
    out = FirmEditReward(TableCritic({}))([])
    assert out.rewards.shape == (0,) and out.num_missing == 0 and math.isnan(out.metrics()["reward/mean"])
