"""The HTTP critic against endpoints that answer with structurally bad replies: retried like transport errors, then
a missing score with the reason for that judgement only; the good judgements of the same call are kept."""

import pytest
from PIL import Image

from firm.critics import EditRequest, ErrorKind
from firm.critics.http import CriticEndpointError, HTTPCritic, chat_content
from tests.critics.servers import ScriptedServer, chat_answer, prompt_text

GOOD = chat_answer('{"reasoning": "fine", "score": 4}')
BAD_REPLIES = {
    "no choices": (200, {"choices": []}),
    "not JSON": (200, "<html>502 Bad Gateway</html>"),
    "choices not a list": (200, {"choices": "oops"}),
    "no message": (200, {"choices": [{"index": 0}]}),
    "content is a number": (200, {"choices": [{"message": {"role": "assistant", "content": 5}}]}),
    "a JSON list": (200, [1, 2, 3]),
    "nested 5000 deep": (200, '{"choices": ' + "[" * 5000 + "]" * 5000 + "}"),
}


def _img(color=(0, 0, 0)):
    return Image.new("RGB", (16, 12), color)


def _critic(url, **kw):
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("model", "m")
    return HTTPCritic(HTTPCritic.Config(endpoints=[url], **kw))


def _edits(n=3):
    return [EditRequest(_img((255, 0, 0)), _img((0, 0, 255)), f"make square {i} blue", key=str(i)) for i in range(n)]


@pytest.mark.parametrize("name", list(BAD_REPLIES))
def test_a_bad_reply_costs_only_its_own_judgement(name):
    def respond(body):  # every Consistency judgement gets the bad reply; Execution answers well
        return BAD_REPLIES[name] if "Judge CONSISTENCY" in prompt_text(body) else (200, GOOD)

    with ScriptedServer(respond) as srv:
        critic = _critic(srv.url, max_retries=2, parse_retries=1)
        results = critic.score(_edits(3))  # raised CriticRequestError for the whole call before
    for r in results:
        assert r.scores["execution"] == 4  # the good replies of the same call are kept
        assert r.scores["consistency"] is None  # a missing score, never a substitute number
        assert "no usable reply from the endpoint" in r.errors["consistency"]
        assert "after 3 attempts" in r.errors["consistency"]
        assert r.errors["consistency"].startswith("no reply")  # not mistaken for an answer that failed to parse
        assert r.error_kinds == {"consistency": ErrorKind.NO_REPLY}
    assert critic.stats["reply_failures"] == 3 and critic.stats["parse_failures"] == 0
    n_cons = sum("Judge CONSISTENCY" in prompt_text(b) for b in srv.bodies)
    assert n_cons == 3 * 3  # each bad judgement was tried 1 + max_retries times (no parse retry without a text)


@pytest.mark.parametrize("name", ["no choices", "not JSON"])
def test_a_bad_reply_is_retried_like_a_transport_error(name):
    calls = []

    def respond(body):
        calls.append(1)
        return BAD_REPLIES[name] if len(calls) == 1 else (200, GOOD)

    with ScriptedServer(respond) as srv:
        critic = _critic(srv.url, max_retries=1)
        [res] = critic.score([EditRequest(_img(), _img(), "x", dimensions=("execution",))])
    assert res.scores == {"execution": 4} and len(srv.bodies) == 2
    assert critic.stats["reply_failures"] == 0


def test_free_form_completions_keep_the_good_answers():
    def respond(body):
        return (200, {"choices": []}) if "bad" in prompt_text(body) else (200, chat_answer("ok " + prompt_text(body)))

    with ScriptedServer(respond) as srv:
        critic = _critic(srv.url, max_retries=1)
        convs = [[{"role": "user", "content": [{"type": "text", "text": t}]}] for t in ("one", "bad", "two")]
        assert critic.complete(convs) == ["ok one", "", "ok two"]
    assert critic.stats["reply_failures"] == 1


def test_http_413_costs_only_that_judgement_and_other_4xx_still_raise():
    def respond(body):
        if "make square 1" in prompt_text(body):
            return 413, {"error": {"message": "prompt is 9000 tokens; this server accepts at most 4096"}}
        return 200, GOOD

    with ScriptedServer(respond) as srv:
        critic = _critic(srv.url)
        results = critic.score(_edits(3))
    assert [r.scores["execution"] for r in results] == [4, None, 4]
    assert "refused this request as too large" in results[1].errors["execution"]
    assert "9000 tokens" in results[1].errors["execution"]


def test_a_bad_models_listing_is_an_endpoint_error_not_a_missing_score():
    with ScriptedServer(lambda b: (200, GOOD)) as srv:
        critic = HTTPCritic(HTTPCritic.Config(endpoints=[srv.url], backoff_s=0.01, max_retries=1))
        srv.httpd.RequestHandlerClass.do_GET = lambda self: self._send(200, "not json")
        with pytest.raises(CriticEndpointError, match="set `model:`"):
            critic.score(_edits(1))


def test_chat_content_scrubs_lone_surrogates():
    text = chat_content({"choices": [{"message": {"content": "score \ud800 4"}}]})
    assert text.encode("utf-8")  # writable as UTF-8 (JSONL, shards)
    assert chat_content({"choices": [{"message": {"content": None}}]}) == ""
    assert chat_content({"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"text": 3}]}}]}) == "a"


def test_a_hostile_answer_text_is_a_missing_score_not_a_failed_call():
    deep = '{"score": ' + "[" * 5000 + "5" + "]" * 5000 + "}"

    def respond(body):
        return 200, chat_answer(deep if "Judge CONSISTENCY" in prompt_text(body) else '{"score": 3}')

    with ScriptedServer(respond) as srv:
        [res] = _critic(srv.url, parse_retries=0).score(_edits(1))  # raised RecursionError before
    assert res.scores == {"execution": 3, "consistency": None}
    assert "nested deeper than" in res.errors["consistency"]
