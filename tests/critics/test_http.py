"""OpenAI-compatible HTTP client against real local HTTP servers: answers, retries, failures, load balancing."""

import asyncio
import base64
import io

import pytest
from PIL import Image

from firm.critics import EditRequest, GenRequest, build_critic
from firm.critics.http import (
    CriticEndpointError,
    CriticRequestError,
    CriticTimeoutError,
    HTTPCritic,
    normalize_endpoint,
)
from tests.critics.servers import ScriptedServer, chat_answer, closed_port_url, prompt_text


def _img(color=(0, 0, 0)):
    return Image.new("RGB", (16, 12), color)


def _edit(key="a"):
    return EditRequest(_img((255, 0, 0)), _img((0, 0, 255)), "make the square blue", key=key)


def _critic(*urls, **kw):
    kw.setdefault("backoff_s", 0.01)
    return HTTPCritic(HTTPCritic.Config(endpoints=list(urls), **kw))


def _by_prompt(body):
    """Answers like a well-behaved critic: the right format for each judgement."""
    text = prompt_text(body)
    if "Judge EXECUTION" in text:
        return 200, chat_answer('```json\n{"reasoning": "the square is blue", "score": 5}\n```')
    if "Judge CONSISTENCY" in text:
        return 200, chat_answer('{"reasoning": "the border changed too", "score": "4"}')
    if "checklist of concrete" in text:
        return 200, chat_answer("1. two apples\n2. the apples are red")
    if "Requirements to check" in text:
        return 200, chat_answer("1. two apples: yes\n2. red: partly\n\\boxed{4}")
    return 200, chat_answer('{"aesthetics": 3, "technical_quality": 4, "structure_texture": 5, "reasoning": "ok"}')


def test_normalize_endpoint():
    assert normalize_endpoint("127.0.0.1:8000") == "http://127.0.0.1:8000/v1"
    assert normalize_endpoint("http://h:1/v1/chat/completions") == "http://h:1/v1"
    assert normalize_endpoint("https://api.example.com/openai/v1/") == "https://api.example.com/openai/v1"
    with pytest.raises(ValueError):
        normalize_endpoint("")


def test_scores_edits_and_generations_over_http(monkeypatch):
    monkeypatch.setenv("FIRM_CRITIC_API_KEY", "sekret")
    with ScriptedServer(_by_prompt, model="firm-edit") as srv:
        critic = build_critic({"name": "http", "endpoints": [srv.url]})
        gen_plain = GenRequest(_img(), "two red apples", key="g")
        gen_listed = GenRequest(_img(), "two red apples", checklist=["two apples"], key="h")
        res = critic.score([_edit(), gen_plain, gen_listed])
    assert res[0].scores == {"execution": 5, "consistency": 4}
    assert res[0].reasoning["execution"] == "the square is blue"
    assert res[1].scores == {"instruction": 4, "quality": 3}
    assert res[1].details["checklist"] == ["two apples", "the apples are red"]
    assert res[1].details["quality_aspects"] == {"aesthetics": 3, "technical": 4, "structure": 5}
    assert res[2].details["checklist"] == ["two apples"]
    # 2 edit judgements + 1 plan + 2 x 2 generation judgements; the model name came from GET /models
    assert len(srv.bodies) == 7 and {b["model"] for b in srv.bodies} == {"firm-edit"}
    body = next(b for b in srv.bodies if "Judge EXECUTION" in prompt_text(b))
    images = [p for p in body["messages"][0]["content"] if p["type"] == "image_url"]
    assert len(images) == 2 and images[0]["image_url"]["url"].startswith("data:image/png;base64,")
    png = base64.b64decode(images[1]["image_url"]["url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).getpixel((0, 0)) == (0, 0, 255)  # the edited image, second
    assert body["temperature"] == 0.0 and body["max_tokens"] == 1024
    assert srv.headers[0]["Authorization"] == "Bearer sekret"


def test_unparseable_answers_are_retried_then_missing_never_zero():
    calls = []

    def flaky(body):
        calls.append(body["temperature"])
        if len(calls) == 1:
            return 200, chat_answer("I think the edit is quite good overall.")  # no score
        return 200, chat_answer('{"reasoning": "fine", "score": 2}')

    with ScriptedServer(flaky) as srv:
        critic = _critic(srv.url, parse_retries=1, retry_temperature=0.9)
        [res] = critic.score([EditRequest(_img(), _img(), "x", dimensions=("execution",))])
    assert res.scores == {"execution": 2} and res.details["attempts"] == {"execution": 2}
    assert calls == [0.0, 0.9]  # the retry samples

    with ScriptedServer(lambda b: (200, chat_answer('{"reasoning": "great", "score": 9}'))) as srv:
        critic = _critic(srv.url, parse_retries=2)
        [res] = critic.score([_edit()])
    assert res.scores == {"execution": None, "consistency": None}
    assert "after 3 attempts" in res.errors["execution"] and "outside 1..5" in res.errors["execution"]
    assert critic.stats["parse_failures"] == 2 and len(srv.bodies) == 6


def test_endpoint_down_raises_a_clear_error_after_the_configured_retries():
    url = closed_port_url()
    # timeout_s bounds every attempt, so a client that hung instead of failing fast would still end (as a timeout)
    critic = _critic(url, max_retries=2, backoff_s=0.05, timeout_s=5.0, model="m")
    with pytest.raises(CriticEndpointError) as e:
        critic.score([EditRequest(_img(), _img(), "x", dimensions=("execution",))])
    assert not isinstance(e.value, CriticTimeoutError)  # refused at once: a connection error, not a timeout
    msg = str(e.value)
    assert url in msg and "failed after 3 attempts" in msg and "ConnectError" in msg
    assert e.value.endpoints == [url] * 3  # exactly 1 + max_retries attempts, all on the one endpoint


def test_server_errors_are_retried_with_backoff_then_named():
    with ScriptedServer(lambda b: (503, {"error": {"message": "overloaded"}})) as srv:
        critic = _critic(srv.url, max_retries=3, model="m")
        with pytest.raises(CriticEndpointError, match=r"failed after 4 attempts .*HTTP 503.*overloaded"):
            critic.score([EditRequest(_img(), _img(), "x", dimensions=("execution",))])
    assert len(srv.bodies) == 4


def test_transient_5xx_recovers():
    state = {"n": 0}

    def once_broken(body):
        state["n"] += 1
        return (500, "oops") if state["n"] == 1 else (200, chat_answer('{"score": 3}'))

    with ScriptedServer(once_broken) as srv:
        [res] = _critic(srv.url, model="m").score([EditRequest(_img(), _img(), "x", dimensions=("execution",))])
    assert res.scores == {"execution": 3}


def test_slow_endpoint_times_out():
    with ScriptedServer(lambda b: (200, chat_answer('{"score": 3}')), delay_s=2.0) as srv:
        critic = _critic(srv.url, timeout_s=0.3, max_retries=1, model="m")
        with pytest.raises(CriticTimeoutError, match=r"all 2 attempts timed out after 0.3 s"):
            critic.score([EditRequest(_img(), _img(), "x", dimensions=("execution",))])


def test_rejected_requests_fail_at_once_with_the_server_message():
    with ScriptedServer(lambda b: (400, {"error": {"message": "model 'm' does not exist"}})) as srv:
        with pytest.raises(CriticRequestError, match="HTTP 400.*does not exist"):
            _critic(srv.url, model="m", max_retries=5).score([_edit()])
    assert len(srv.bodies) <= 2  # not retried (the two judgements run concurrently)
    with ScriptedServer(lambda b: (401, {"detail": "bad key"})) as srv:
        with pytest.raises(CriticRequestError, match="check the API key"):
            _critic(srv.url, model="m").score([_edit()])


def test_load_is_spread_over_endpoints_and_a_dead_one_is_skipped():
    with ScriptedServer(_by_prompt) as a, ScriptedServer(_by_prompt) as b:
        critic = _critic(a.url, b.url, model="m", max_concurrency=4)
        res = critic.score([_edit(str(i)) for i in range(8)])
        assert all(r.complete for r in res)
        assert len(a.bodies) > 0 and len(b.bodies) > 0 and len(a.bodies) + len(b.bodies) == 16
        dead = closed_port_url()
        critic = _critic(dead, a.url, model="m", max_retries=2)
        res = critic.score([_edit(str(i)) for i in range(4)])
        assert all(r.complete for r in res)  # requests that hit the dead endpoint were retried on the live one


def test_concurrency_is_bounded():
    with ScriptedServer(_by_prompt, delay_s=0.05) as srv:
        critic = _critic(srv.url, model="m", max_concurrency=3)
        res = critic.score([_edit(str(i)) for i in range(6)])
    assert all(r.complete for r in res) and len(srv.bodies) == 12
    assert 1 <= srv.max_active <= 3


def test_sync_score_works_inside_a_running_event_loop():
    with ScriptedServer(_by_prompt) as srv:
        critic = _critic(srv.url, model="m")

        async def called_from_async_code():
            return critic.score([_edit()])  # blocking call made while a loop runs (e.g. in a notebook)

        [res] = asyncio.run(called_from_async_code())
        assert res.complete
        [res2] = asyncio.run(critic.ascore([_edit()]))
        assert res2.scores == res.scores


def test_config_validation():
    with pytest.raises(ValueError, match="at least one endpoint"):
        HTTPCritic(HTTPCritic.Config(endpoints=[]))
    with pytest.raises(ValueError, match="max_concurrency >= 1"):
        HTTPCritic(HTTPCritic.Config(max_concurrency=0))


def test_the_api_key_comes_from_the_environment_never_from_the_config(monkeypatch, tmp_path):
    import dataclasses

    from firm.config import save_config

    assert "api_key" not in {f.name for f in dataclasses.fields(HTTPCritic.Config)}
    with pytest.raises(ValueError, match="api_key"):
        build_critic({"name": "http", "api_key": "sekret"})  # a key in YAML is refused, not saved
    monkeypatch.setenv("MY_CRITIC_KEY", "from-env")
    monkeypatch.delenv("FIRM_CRITIC_API_KEY", raising=False)
    with ScriptedServer(lambda b: (200, chat_answer('{"score": 3}'))) as srv:
        critic = build_critic({"name": "http", "endpoints": [srv.url], "model": "m", "api_key_env": "MY_CRITIC_KEY"})
        critic.score([EditRequest(_img(), _img(), "x", dimensions=("execution",))])
        assert srv.headers[-1]["Authorization"] == "Bearer from-env"
        given = HTTPCritic(HTTPCritic.Config(endpoints=[srv.url], model="m"), api_key="given")  # e.g. --api-key
        given.score([EditRequest(_img(), _img(), "x", dimensions=("execution",))])
        assert srv.headers[-1]["Authorization"] == "Bearer given"
        anonymous = _critic(srv.url, model="m")  # $FIRM_CRITIC_API_KEY is unset: no header
        anonymous.score([EditRequest(_img(), _img(), "x", dimensions=("execution",))])
        assert "Authorization" not in srv.headers[-1]
    from omegaconf import OmegaConf

    save_config(OmegaConf.structured(critic.config), tmp_path / "config.yaml")
    assert "from-env" not in (tmp_path / "config.yaml").read_text()


def test_complete_answers_free_form_conversations_from_several_threads():
    """The public transport the curation teacher uses: images prepared and encoded, answers in order, and one client
    shared by threads (all on the critic's one event loop) keeps its in-flight counts consistent."""
    from concurrent.futures import ThreadPoolExecutor

    def echo(body):
        parts = body["messages"][0]["content"]
        text = next(p["text"] for p in parts if p["type"] == "text")
        png = base64.b64decode(next(p for p in parts if p["type"] == "image_url")["image_url"]["url"].split(",", 1)[1])
        size = Image.open(io.BytesIO(png)).size
        return 200, chat_answer(f"{text} {size[0]}x{size[1]} t={body['temperature']}")

    with ScriptedServer(echo, delay_s=0.01) as a, ScriptedServer(echo, delay_s=0.01) as b:
        critic = _critic(a.url, b.url, model="m", max_concurrency=3, max_image_pixels=64, temperature=0.0)
        convs = [
            [{"role": "user", "content": [{"type": "image", "image": _img()}, {"type": "text", "text": f"q{i}"}]}]
            for i in range(8)
        ]
        assert critic.complete(convs[:2], temperature=0.5) == ["q0 9x6 t=0.5", "q1 9x6 t=0.5"]  # 16x12 -> <= 64 px

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda i: critic.complete(convs[i : i + 2]), range(0, 8, 2)))
        assert answers == [[f"q{i} 9x6 t=0.0", f"q{i + 1} 9x6 t=0.0"] for i in range(0, 8, 2)]
        assert critic.transport.inflight == {critic.endpoints[0]: 0, critic.endpoints[1]: 0}
        assert len(a.bodies) > 0 and len(b.bodies) > 0 and len(a.bodies) + len(b.bodies) == 10
    assert critic.complete([]) == []


def test_retry_after_is_honoured_up_to_its_cap():
    from firm.critics.http import retry_after_s

    assert retry_after_s("7") == 7.0 and retry_after_s(" 1.5 ") == 1.5
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait
    assert retry_after_s(None) is None and retry_after_s("soon") is None and retry_after_s("nan") is None
    calls = []

    def respond(body):
        calls.append(1)
        if len(calls) == 1:
            return 429, {"error": {"message": "slow down"}}
        if len(calls) == 2:
            return 503, {"error": {"message": "busy"}}
        return 200, chat_answer('{"reasoning": "ok", "score": 3}')

    with ScriptedServer(respond) as srv:
        srv.extra_headers = {"Retry-After": "7"}
        critic = _critic(srv.url, retry_after_max_s=5.0, max_retries=3)
        waits = []

        async def record(seconds):
            waits.append(seconds)

        critic.transport._sleep = record
        [res] = critic.score([EditRequest(_img(), _img(), "x", dimensions=("execution",))])
    assert res.scores == {"execution": 3}
    assert waits == [5.0, 5.0]  # the server asked for 7 s each time; capped at retry_after_max_s (backoff 0.01 s)


def test_structured_outputs_and_logprobs_are_sent_per_judgement():
    with ScriptedServer(_by_prompt) as srv:
        vllm = _critic(srv.url, structured_outputs="vllm", expected_score=True, top_logprobs=4)
        vllm.score([_edit(), GenRequest(_img(), "two red apples", key="g")])
        bodies = {_kind(b): b for b in srv.bodies}
        fmt = _critic(srv.url, structured_outputs="response_format")
        srv.bodies.clear()
        fmt.score([GenRequest(_img(), "two red apples", checklist=["two apples"], key="g")])
        rf = {_kind(b): b for b in srv.bodies}
    schema = bodies["execution"]["structured_outputs"]["json"]
    assert list(schema["properties"]) == ["reasoning", "score"] and schema["properties"]["score"]["enum"] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert bodies["consistency"]["structured_outputs"]["json"] == schema
    assert set(bodies["quality"]["structured_outputs"]["json"]["required"]) == {
        "reasoning", "aesthetics", "technical_quality", "structure_texture"
    }  # fmt: skip
    assert bodies["instruction"]["structured_outputs"] == {"regex": r"[\s\S]*\\boxed\{[1-5]\}"}
    assert "structured_outputs" not in bodies["plan"] and "logprobs" not in bodies["plan"]
    assert all(bodies[k]["logprobs"] is True and bodies[k]["top_logprobs"] == 4 for k in ("execution", "quality"))
    assert rf["quality"]["response_format"]["type"] == "json_schema"
    assert rf["quality"]["response_format"]["json_schema"]["strict"] is True
    assert "response_format" not in rf["instruction"]  # a boxed answer is not JSON: sent unconstrained
    with pytest.raises(ValueError, match="structured_outputs must be one of off, vllm, response_format"):
        _critic(srv.url, structured_outputs="grammar")
    with pytest.raises(ValueError, match="top_logprobs must be in 0..20"):
        _critic(srv.url, top_logprobs=50)


def _kind(body):
    text = prompt_text(body)
    for needle, kind in [("Judge EXECUTION", "execution"), ("Judge CONSISTENCY", "consistency"),
                         ("checklist of concrete", "plan"), ("Requirements to check", "instruction")]:  # fmt: skip
        if needle in text:
            return kind
    return "quality"
