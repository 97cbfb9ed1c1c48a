"""Expected-score mode: the shared formula, locating the score token in OpenAI logprobs, and the HTTP critic's
expected scores against a real local server that answers with logprobs (fallbacks counted, never a default)."""

import math

import pytest
import torch
from PIL import Image

from firm.critics import EditRequest, GenRequest
from firm.critics.expected import expected_from_logprobs, expected_score
from firm.critics.http import HTTPCritic
from firm.critics.local import Generation, LocalCritic
from firm.rewards import FirmEditReward, cme, normalize_score
from tests.critics.servers import ScriptedServer, chat_answer, prompt_text


def _entry(token, lp, top=()):
    return {
        "token": token,
        "logprob": lp,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in top],
    }


def _content(text_tokens, score_index, top):
    """Logprob entries spelling ``text_tokens``; the one at ``score_index`` lists ``top`` as its alternatives."""
    return [_entry(t, -0.1, top if i == score_index else ()) for i, t in enumerate(text_tokens)]


def test_expected_score_is_the_weighted_mean_renormalised_over_the_given_scores():
    probs = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.3, 5: 0.1}
    want = sum(k * p for k, p in probs.items())
    assert expected_score({k: math.log(p) for k, p in probs.items()}) == pytest.approx(want)
    # raw logits shifted by a constant give the same value (softmax is shift-invariant)
    assert expected_score({k: math.log(p) + 17.0 for k, p in probs.items()}) == pytest.approx(want)
    # only two scores listed: renormalised over those two
    assert expected_score({4: math.log(0.3), 5: math.log(0.1)}) == pytest.approx((4 * 0.3 + 5 * 0.1) / 0.4)
    assert expected_score({3: -1e308 * 10}) is None  # -inf only
    assert expected_score({}) is None


def test_the_score_token_is_found_by_bytes_and_its_alternatives_are_read():
    tokens = ['{"', "reasoning", '":', ' "', "ok", '",', ' "', "score", '":', " 4", "}"]
    text = "".join(tokens)
    span = (text.index("4"), text.index("4") + 1)
    top = [(" 4", math.log(0.6)), (" 5", math.log(0.3)), (" 3", math.log(0.05)), ("4", math.log(0.05))]
    content = _content(tokens, 9, top)
    content[9]["logprob"] = math.log(0.6)
    value, why = expected_from_logprobs(content, text, span)
    # " 4" and "4" are different tokens: only the written token's own variants (" 1".." 5") count
    assert why is None and value == pytest.approx((4 * 0.6 + 5 * 0.3 + 3 * 0.05) / 0.95)
    # vLLM also lists the end-of-turn token, which the answer text does not show
    with_eos = [*content, _entry("<|im_end|>", -0.001)]
    assert expected_from_logprobs(with_eos, text, span) == (value, None)
    # but tokens that spell something else before the answer's end are refused
    assert expected_from_logprobs(with_eos[1:], text, span)[0] is None


def test_locating_fails_with_a_reason_never_a_guess():
    text = '{"score": 4}'
    span = (text.index("4"), text.index("4") + 1)
    assert expected_from_logprobs(None, text, span) == (None, "the reply has no logprobs")
    value, why = expected_from_logprobs(_content(['{"score": ', "9}"], 1, ()), text, span)
    assert value is None and "do not spell the answer" in why
    # "4}" holds one digit: it is the score token; with no alternatives listed, all the mass is on the written 4
    value, why = expected_from_logprobs(_content(['{"', "score", '": ', "4}"], 3, ()), text, span)
    assert why is None and value == 4.0
    value, why = expected_from_logprobs(_content(['{"', "score", '": ', "44", "}"], 3, ()), '{"score": 44}', span)
    assert value is None and "not a token of its own" in why
    value, why = expected_from_logprobs([{"token": 3}], text, span)
    assert value is None and "neither token text nor bytes" in why


def test_multibyte_text_is_located_by_bytes():
    text = 'é {"score": 3}'
    raw = text.encode()
    # a byte-level tokenizer splits "é" into two pieces whose token texts are not characters
    pieces = [raw[:1], raw[1:2], raw[2:13], raw[13:14], raw[14:]]
    content = [{"token": p.decode("utf-8", "replace"), "logprob": -0.2, "bytes": list(p), "top_logprobs": []}
               for p in pieces]  # fmt: skip
    content[3]["top_logprobs"] = [{"token": "3", "logprob": math.log(0.5)}, {"token": "2", "logprob": math.log(0.5)}]
    content[3]["logprob"] = math.log(0.5)
    span = (text.index("3"), text.index("3") + 1)
    value, why = expected_from_logprobs(content, text, span)
    assert why is None and value == pytest.approx(2.5)


def test_local_and_http_critics_compute_the_same_value_from_the_same_distribution(tiny_vlm):
    """The local critic reads logits of the five score tokens; the HTTP critic reads top_logprobs; one formula."""
    critic = LocalCritic(LocalCritic.Config(model=str(tiny_vlm)))
    text = '{"reasoning": "ok", "score": 4}'
    ids = critic.tokenizer(text, add_special_tokens=False)["input_ids"]
    cand = critic._candidate_ids().tolist()
    col = {t: c for c, t in enumerate(cand)}
    digit_ids = [critic.tokenizer.convert_tokens_to_ids(d) for d in "12345"]
    j = ids.index(digit_ids[3])
    raw = [2.0, -1.0, 0.5, 3.0, 1.0]  # raw logits of "1".."5"
    logits = torch.full((len(ids), len(cand)), -1e4)
    for d, v in zip(digit_ids, raw):
        logits[j, col[d]] = v
    span = (text.index("4"), text.index("4") + 1)
    local, why = critic._expected(Generation(text, ids, logits), span)
    assert why is None
    # the same distribution as a server reports it: log-softmax over the vocabulary (here: these five)
    norm = math.log(sum(math.exp(v) for v in raw))
    tokens = [critic.tokenizer.decode([i]) for i in ids]
    content = _content(tokens, j, [(str(k + 1), v - norm) for k, v in enumerate(raw)])
    content[j]["logprob"] = raw[3] - norm
    http, why = expected_from_logprobs(content, text, span)
    assert why is None and http == pytest.approx(local, abs=1e-9)
    assert local == pytest.approx(sum((k + 1) * math.exp(v - norm) for k, v in enumerate(raw)))


# ---- the HTTP critic in expected-score mode, against a real local server


def _img(color=(0, 0, 0)):
    return Image.new("RGB", (16, 12), color)


def _with_logprobs(text, top_at_score):
    """A chat answer whose logprobs spell ``text`` one character a token; the score digit lists ``top_at_score``."""
    body = chat_answer(text)
    digit_at = max(text.rfind(d) for d in "12345")
    content = []
    for i, ch in enumerate(text):
        top = top_at_score if i == digit_at else [(ch, -0.01)]
        own = next((v for t, v in top if t == ch), -0.01)
        content.append(_entry(ch, own, top))
    body["choices"][0]["logprobs"] = {"content": content}
    return body


def test_http_expected_scores_flow_into_the_reward_and_missing_logprobs_fall_back_counted():
    seen = []

    def respond(body):
        seen.append(body)
        text = prompt_text(body)
        if "Judge EXECUTION" in text:  # p(4) = 0.5, p(5) = 0.5 -> 4.5
            half = math.log(0.5)
            return 200, _with_logprobs('{"reasoning": "done", "score": 4}', [("4", half), ("5", half)])
        return 200, chat_answer('{"reasoning": "same", "score": 5}')  # Consistency: no logprobs in the reply

    with ScriptedServer(respond) as srv:
        critic = HTTPCritic(HTTPCritic.Config(endpoints=[srv.url], expected_score=True, top_logprobs=5))
        req = EditRequest(_img((255, 0, 0)), _img((0, 0, 255)), "make it blue", key="k")
        out = FirmEditReward(critic)([req])
    [res] = out.results
    assert all(b["logprobs"] is True and b["top_logprobs"] == 5 for b in seen)
    assert res.scores == {"execution": 4, "consistency": 5}
    assert res.details["expected_scores"] == {"execution": pytest.approx(4.5), "consistency": 5.0}
    assert res.details["expected_fallbacks"] == ["consistency"]
    assert "no expected score for score: the reply has no logprobs" in res.details["notes"]["consistency"]
    assert critic.stats["expected_fallbacks"] == 1
    assert out.rewards.tolist() == pytest.approx([cme(normalize_score(4.5), 1.0)])


def test_http_quality_expected_score_is_the_minimum_over_the_aspects():
    answer = '{"reasoning": "fine", "score": [4, 3, 5]}'  # the released FIRM-Gen Quality format

    def respond(body):
        body_out = chat_answer(answer)
        content = []
        for i, ch in enumerate(answer):
            if ch == "3":  # technical: p(3) = 0.75, p(2) = 0.25 -> 2.75
                content.append(_entry("3", math.log(0.75), [("3", math.log(0.75)), ("2", math.log(0.25))]))
            elif ch in "45" and answer[i - 1] in "[ ":
                content.append(_entry(ch, 0.0, [(ch, 0.0)]))
            else:
                content.append(_entry(ch, -0.01))
        body_out["choices"][0]["logprobs"] = {"content": content}
        return 200, body_out

    with ScriptedServer(respond) as srv:
        critic = HTTPCritic(HTTPCritic.Config(endpoints=[srv.url], expected_score=True))
        [res] = critic.score([GenRequest(_img(), "a cat", checklist=["a cat"], key="g", dimensions=("quality",))])
    assert res.scores == {"quality": 3}
    assert res.details["quality_aspects"] == {"aesthetics": 4, "technical": 3, "structure": 5}
    assert res.details["expected_scores"]["quality"] == pytest.approx(2.75)
    assert "expected_fallbacks" not in res.details
