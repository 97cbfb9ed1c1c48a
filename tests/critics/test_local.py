"""Local transformers backend on a tiny Qwen3-VL built from configs and loaded back with from_pretrained."""

import math

import pytest
import torch
from PIL import Image

from firm.config import ConfigError
from firm.critics import EditRequest, ErrorKind, GenRequest, build_critic
from firm.critics.local import Generation, LocalCritic
from firm.rewards import FirmEditReward, cme, normalize_score
from tests.critics.conftest import TAUGHT_INSTRUCTION, taught_images


def _img(color, size=(48, 40)):
    return Image.new("RGB", size, color)


def _requests():
    return [
        EditRequest(_img((255, 0, 0)), _img((0, 0, 255), (64, 64)), "make it blue", key="e1"),
        EditRequest(_img((0, 255, 0)), _img((0, 255, 0)), "add a hat to the dog", key="e2"),
        GenRequest(_img((9, 9, 9)), "a cat on a mat", checklist=["a cat", "a mat"], key="g1"),
        GenRequest(_img((200, 9, 9)), "two red apples", key="g2"),  # no checklist: the planner runs first
    ]


@pytest.mark.slow
def test_local_backend_scores_a_batch_end_to_end(tiny_vlm):
    critic = build_critic({"name": "local", "model": str(tiny_vlm), "max_new_tokens": 12, "batch_size": 3})
    assert isinstance(critic, LocalCritic) and critic.dtype == torch.float32 and critic.device.type == "cpu"
    results = critic.score(_requests())
    assert [r.key for r in results] == ["e1", "e2", "g1", "g2"]
    assert list(results[0].scores) == ["execution", "consistency"]
    assert list(results[2].scores) == ["instruction", "quality"]
    # Random weights emit gibberish: every score is missing, with the reason, never a default number.
    n_missing = 0
    for r in results:
        for dim, score in r.scores.items():
            assert score is None
            assert r.errors[dim].startswith(("unparseable output", "planner output unusable"))
            kind = ErrorKind.UNPARSEABLE if r.errors[dim].startswith("unparseable") else ErrorKind.NO_PLAN
            assert r.error_kinds[dim] is kind  # the kind that code counts, next to the message people read
            n_missing += 1
        assert r.latency_s > 0
    assert isinstance(results[0].raw["execution"], str) and results[0].raw["execution"]
    assert "plan" in results[3].raw  # the planner's raw answer is kept
    assert critic.stats["parse_failures"] + critic.stats["plan_failures"] == n_missing == 8
    assert critic.stats["requests"] == 4 and critic.stats["jobs"] == 8  # 7 judgements + 1 plan

    out = FirmEditReward(critic)(_requests()[:2])
    assert torch.isnan(out.rewards).all() and out.missing == {"execution": 2, "consistency": 2}


@pytest.mark.slow
def test_parse_failures_are_retried_by_sampling(tiny_vlm):
    critic = LocalCritic(LocalCritic.Config(model=str(tiny_vlm), max_new_tokens=8, parse_retries=2))
    [res] = critic.score(_requests()[:1])
    assert res.details["attempts"] == {"execution": 3, "consistency": 3}
    assert "after 3 attempts" in res.errors["execution"]
    assert critic.stats["parse_retries"] == 4 and critic.stats["generations"] == 6


def test_expected_score_is_the_probability_weighted_mean_at_the_score_token(tiny_vlm):
    critic = LocalCritic(LocalCritic.Config(model=str(tiny_vlm)))
    text = '{"reasoning": "ok", "score": 4}'
    ids = critic.tokenizer(text, add_special_tokens=False)["input_ids"]
    cand = critic._candidate_ids().tolist()
    col = {t: c for c, t in enumerate(cand)}
    digit_ids = [critic.tokenizer.convert_tokens_to_ids(d) for d in "12345"]
    j = ids.index(digit_ids[3])  # the step that wrote "4"
    logits = torch.full((len(ids), len(cand)), -1e4)
    probs = [0.1, 0.2, 0.3, 0.3, 0.1]
    for d, p in zip(digit_ids, probs):
        logits[j, col[d]] = math.log(p)
    span = (text.index("4"), text.index("4") + 1)
    value, why = critic._expected(Generation(text, ids, logits), span)
    assert why is None and value == pytest.approx(1 * 0.1 + 2 * 0.2 + 3 * 0.3 + 4 * 0.3 + 5 * 0.1)
    value, why = critic._expected(Generation(text, ids, None), span)
    assert value is None and "no logits" in why


@pytest.mark.slow
def test_taught_critic_scores_and_expected_scores_flow_into_the_reward(taught_vlm):
    path, prompts = taught_vlm
    critic = LocalCritic(LocalCritic.Config(model=str(path), prompts=prompts, max_new_tokens=24, expected_score=True))
    src, out = taught_images()
    req = EditRequest(src, out, TAUGHT_INSTRUCTION, key="taught")
    [res] = critic.score([req])
    assert res.scores == {"execution": 4, "consistency": 4}, res.raw
    assert res.reasoning["execution"] == "ok"
    exp = res.details["expected_scores"]
    assert set(exp) == {"execution", "consistency"} and all(1.0 <= v <= 5.0 for v in exp.values())
    reward = FirmEditReward(critic)([req])
    want = cme(normalize_score(exp["execution"]), normalize_score(exp["consistency"]))
    assert reward.rewards.tolist() == pytest.approx([want], abs=1e-6)
    assert reward.num_missing == 0
    plain = FirmEditReward(critic, use_expected=False)([req])
    assert plain.rewards.tolist() == pytest.approx([cme(0.75, 0.75)])


def test_local_config_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match="set `model:`"):
        LocalCritic(LocalCritic.Config())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LocalCritic(LocalCritic.Config(model=str(tmp_path)))
    with pytest.raises(ConfigError, match="critic: unknown key 'temperature'"):
        build_critic({"name": "local", "model": "x", "temperature": 1.0})
    with pytest.raises(ConfigError, match="Did you mean 'local'"):
        build_critic({"name": "locl"})


def test_bad_requests_are_rejected_before_any_generation(tiny_vlm):
    critic = LocalCritic(LocalCritic.Config(model=str(tiny_vlm)))
    with pytest.raises(ValueError, match="request 0 .*instruction is empty"):
        critic.score([EditRequest(_img((0, 0, 0)), _img((0, 0, 0)), "  ", key="k")])
    with pytest.raises(ValueError, match="cannot judge dimension"):
        critic.score([EditRequest(_img((0, 0, 0)), _img((0, 0, 0)), "x", dimensions=("quality",))])
    with pytest.raises(TypeError, match="must be a PIL.Image"):
        critic.score([GenRequest("not an image", "a cat", checklist=["a cat"])])
    assert critic.stats["generations"] == 0
