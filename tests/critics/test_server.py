"""`firm critic serve` (LitServe) serving the tiny Qwen3-VL on 127.0.0.1, used through the HTTP client and raw HTTP."""

import asyncio
import base64
import io
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from firm.critics import EditRequest, GenRequest
from firm.critics.http import CriticRequestError, HTTPCritic, image_data_url
from tests.conftest import REPO
from tests.critics.servers import free_port, wait_healthy

pytestmark = pytest.mark.slow

KEY = "test-key-123"


@pytest.fixture(scope="module")
def served(tiny_vlm, tmp_path_factory):
    """Base URL of a real `firm critic serve` process serving the tiny random critic (API key KEY)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    env.pop("FIRM_CRITIC_API_KEY", None)
    cmd = [sys.executable, "-m", "firm", "critic", "serve", "--model", str(tiny_vlm), "--port", str(port)]
    cmd += ["--api-key", KEY, "--max-batch-size", "4", "--batch-timeout", "0.05", "--max-new-tokens", "8"]
    cmd += ["--max-image-pixels", "4096", "--max-request-mb", "1", "--max-prompt-tokens", "2048"]  # small limits
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc=proc, log_path=log_path, what="firm critic serve")
        yield url + "/v1"
    finally:
        # The server and its LitServe workers share the process group started above.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        except ProcessLookupError:
            pass


def _img(color, size=(48, 40)):
    return Image.new("RGB", size, color)


def _chat_body(image_url=None, text="Rate this edit.", **extra):
    content = [{"type": "text", "text": text}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    return {"model": "tiny-critic", "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def _auth():
    return {"Authorization": f"Bearer {KEY}"}


def test_http_client_scores_a_batch_through_the_served_critic(served):
    critic = HTTPCritic(HTTPCritic.Config(endpoints=[served], max_tokens=8, parse_retries=1), api_key=KEY)
    reqs = [
        EditRequest(_img((255, 0, 0)), _img((0, 0, 255), (64, 64)), "make it blue", key="e1"),
        EditRequest(_img((0, 255, 0)), _img((0, 255, 0)), "add a hat", key="e2"),
        GenRequest(_img((9, 9, 9)), "a cat", checklist=["a cat"], key="g1"),
    ]
    results = critic.score(reqs)
    assert critic.model == "tiny-critic"  # resolved from GET /v1/models
    assert [r.key for r in results] == ["e1", "e2", "g1"]
    for r in results:  # random weights: gibberish, so missing scores with reasons, never numbers
        for dim, score in r.scores.items():
            assert score is None
            assert r.errors[dim].startswith("unparseable output (after 2 attempts)")
            assert isinstance(r.raw[dim], str)
    assert critic.stats["parse_failures"] == 6 and critic.stats["generations"] == 12


def test_api_key_is_required(served):
    body = _chat_body()
    assert httpx.post(served + "/chat/completions", json=body, timeout=30).status_code == 401
    r = httpx.post(served + "/chat/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=30)
    assert r.status_code == 401 and "API key" in r.text
    assert httpx.get(served + "/models", timeout=30).status_code == 401
    assert httpx.get(served + "/models", headers=_auth(), timeout=30).json()["data"][0]["id"] == "tiny-critic"


def test_malformed_requests_get_4xx_with_a_message_and_the_server_keeps_serving(served):
    url = served + "/chat/completions"
    good_image = image_data_url(_img((1, 2, 3)))
    bad_png = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    png = base64.b64decode(image_data_url(_img((1, 2, 3), (32, 32))).split(",", 1)[1])
    truncated_png = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()
    cases = [
        (b'{"messages": [', 400, "JSON decode error"),
        (json.dumps({"messages": []}).encode(), 400, "at least 1"),
        (json.dumps(_chat_body("https://example.com/cat.png")).encode(), 400, "data:image/<format>;base64"),
        (json.dumps(_chat_body("data:image/png;base64,@@@")).encode(), 400, "not valid base64"),
        (json.dumps(_chat_body(good_image, n=2)).encode(), 400, "n must be 1"),
        (json.dumps(_chat_body(good_image, stream=True)).encode(), 400, "stream=true is not supported"),
        (json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "role"),
        (json.dumps(_chat_body(bad_png)).encode(), 415, "not PNG, JPEG or WEBP"),
        (json.dumps(_chat_body(truncated_png)).encode(), 400, "image does not decode"),
    ]
    headers = {**_auth(), "Content-Type": "application/json"}
    for raw, status, needle in cases:
        r = httpx.post(url, content=raw, headers=headers, timeout=60)
        assert r.status_code == status, (raw[:80], r.text[:300])
        assert needle in r.text, r.text[:300]
    ok = httpx.post(url, json=_chat_body(good_image), headers=_auth(), timeout=60)
    assert ok.status_code == 200
    assert isinstance(ok.json()["choices"][0]["message"]["content"], str)


def test_oversized_images_and_bodies_get_413_and_the_server_keeps_serving(served):
    url = served + "/chat/completions"
    big = _chat_body(image_data_url(_img((1, 2, 3), (80, 60))))  # 4800 pixels > --max-image-pixels 4096
    r = httpx.post(url, json=big, headers=_auth(), timeout=60)
    assert r.status_code == 413, r.text[:300]
    assert (
        "image is 80x60 = 4800 pixels; at most 4096 are accepted (--max-image-pixels)" in r.json()["error"]["message"]
    )
    huge = _chat_body(image_data_url(_img((1, 2, 3))), text="x" * (2 * 2**20))  # a 2 MiB body > 1 MiB
    r = httpx.post(url, json=huge, headers=_auth(), timeout=60)
    assert r.status_code == 413 and "too large" in r.text.lower()
    ok = httpx.post(url, json=_chat_body(image_data_url(_img((1, 2, 3), (64, 64)))), headers=_auth(), timeout=60)
    assert ok.status_code == 200


def test_a_bad_request_in_a_batch_does_not_fail_its_neighbours(served):
    url = served + "/chat/completions"
    good = _chat_body(image_data_url(_img((5, 5, 5))))
    bad = _chat_body("data:image/png;base64," + base64.b64encode(b"junk").decode())

    async def go():
        async with httpx.AsyncClient(headers=_auth(), timeout=120) as client:
            return await asyncio.gather(*[client.post(url, json=b) for b in [good, bad, good, good]])

    statuses = [r.status_code for r in asyncio.run(go())]
    assert statuses == [200, 415, 200, 200]


def test_concurrent_load_is_all_answered(served):
    url = served + "/chat/completions"
    n = 32

    async def go():
        async with httpx.AsyncClient(headers=_auth(), timeout=300) as client:
            bodies = [_chat_body(image_data_url(_img((i, 0, 0))), text=f"request {i}") for i in range(n)]
            return await asyncio.gather(*[client.post(url, json=b) for b in bodies])

    responses = asyncio.run(go())
    assert [r.status_code for r in responses] == [200] * n
    payloads = [r.json() for r in responses]
    assert len({p["id"] for p in payloads}) == n  # one distinct answer per request, none lost or duplicated
    assert all(isinstance(p["choices"][0]["message"]["content"], str) for p in payloads)


def test_cli_scores_a_folder_through_the_served_critic(served, tmp_path, capsys):
    from firm.cli import main

    for d in ("source", "edited"):
        (tmp_path / d).mkdir()
    for i in range(3):
        _img((i * 50, 0, 0)).save(tmp_path / "source" / f"{i:03d}.png")
        _img((0, 0, i * 50)).save(tmp_path / "edited" / f"{i:03d}.png")
    out = tmp_path / "scores.jsonl"
    args = ["critic", "score", str(tmp_path), "--out", str(out), "--endpoint", served, "--api-key", KEY]
    with pytest.raises(SystemExit) as e:
        main([*args, "--instruction", "make it blue", "--max-tokens", "8", "--parse-retries", "0"])
    assert e.value.code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in rows] == ["000", "001", "002"]
    assert all(r["reward"] is None and r["scores"]["execution"] is None and r["errors"] for r in rows)
    # the raw answers are in the JSONL, so that a run of null scores shows what the model said
    assert all(set(r["raw"]) == {"execution", "consistency"} and isinstance(r["raw"]["execution"], str) for r in rows)
    assert "missing 3" in capsys.readouterr().out
    assert Image.open(io.BytesIO((tmp_path / "edited" / "000.png").read_bytes())).size == (48, 40)


# --------------------------------------------------------------------------------------------------------------------
# Hostile requests: long prompts, other image formats, invalid parameters, docs, signals


def _encoded(fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    _img((10, 20, 30), (16, 16)).save(buf, format=fmt, **save)
    return buf.getvalue()


def _as_png_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_a_long_prompt_gets_413_before_any_model_work_and_the_server_keeps_serving(served):
    url = served + "/chat/completions"
    huge = _chat_body(text="x " * 400_000)  # 800 KB of text (under the 1 MiB body limit): rejected unread
    r = httpx.post(url, json=huge, headers=_auth(), timeout=60)
    assert r.status_code == 413, r.text[:300]
    assert "accepts at most 2048 (--max-prompt-tokens)" in r.json()["error"]["message"]
    words = _chat_body(text=" ".join(f"word{i}" for i in range(3000)))  # short in characters, long in tokens
    r = httpx.post(url, json=words, headers=_auth(), timeout=60)
    assert r.status_code == 413 and "tokens; this server accepts at most 2048" in r.text
    assert httpx.get(served.removesuffix("/v1") + "/health", timeout=10).status_code == 200
    assert httpx.post(url, json=_chat_body(text="short"), headers=_auth(), timeout=60).status_code == 200


def test_only_png_jpeg_and_webp_are_decoded(served):
    url = served + "/chat/completions"
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n"
    for name, data in [
        ("TIFF", _encoded("TIFF")),
        ("ICO", _encoded("ICO")),
        ("PCX", _encoded("PCX")),
        ("TGA", _encoded("TGA")),
        ("BMP", _encoded("BMP")),
        ("GIF", _encoded("GIF")),
        ("EPS", eps),
    ]:
        r = httpx.post(url, json=_chat_body(_as_png_url(data)), headers=_auth(), timeout=60)
        assert r.status_code == 415, (name, r.text[:300])  # was 200 for TIFF/ICO/PCX/TGA sent as image/png
        assert "not PNG, JPEG or WEBP" in r.text
    declared = "data:image/tiff;base64," + base64.b64encode(_encoded("TIFF")).decode()
    r = httpx.post(url, json=_chat_body(declared), headers=_auth(), timeout=60)
    assert r.status_code == 400 and "'tiff' is not accepted" in r.text
    for fmt in ("JPEG", "WEBP", "PNG"):
        data_url = f"data:image/{fmt.lower()};base64," + base64.b64encode(_encoded(fmt)).decode()
        r = httpx.post(url, json=_chat_body(data_url), headers=_auth(), timeout=60)
        assert r.status_code == 200, (fmt, r.text[:300])


def test_invalid_parameters_get_4xx_never_500(served):
    url = served + "/chat/completions"
    headers = {**_auth(), "Content-Type": "application/json"}
    body = json.dumps(_chat_body())
    raws = [
        body[:-1] + ', "temperature": NaN}',
        body[:-1] + ', "temperature": Infinity}',
        body[:-1] + ', "temperature": -Infinity}',
        body[:-1] + ', "temperature": "hot"}',
        body[:-1] + ', "temperature": 3}',
        body[:-1] + ', "max_tokens": 0}',
        body[:-1] + ', "max_tokens": "many"}',
        body[:-1] + ', "n": "x"}',
        body[:-1] + ', "stream": "maybe"}',
        json.dumps({"messages": [{"role": "user", "content": []}]}),
        json.dumps({"messages": [{"role": "user"}]}),
        json.dumps({"messages": "hi"}),
        json.dumps([1, 2]),
        json.dumps({"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}),
    ]
    for raw in raws:
        r = httpx.post(url, content=raw.encode(), headers=headers, timeout=60)
        assert 400 <= r.status_code < 500, (raw[-60:], r.status_code, r.text[:300])
    assert httpx.post(url, json=_chat_body(), headers=_auth(), timeout=60).status_code == 200


def test_docs_and_openapi_are_off(served):
    root = served.removesuffix("/v1")
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(root + path, timeout=10).status_code == 404
        assert httpx.get(root + path, headers=_auth(), timeout=10).status_code == 404


def _descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in os.listdir("/proc"):
        if not stat.isdigit():
            continue
        try:
            fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_stops_every_process_and_frees_the_port(tiny_vlm, tmp_path, sig):
    import socket

    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "firm", "critic", "serve", "--model", str(tiny_vlm), "--port", str(port)]
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        # its own session, so that the test can clean up whatever is left; the signal goes to the main process only
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, what="firm critic serve")
        started = _descendants(proc.pid)
        assert started, "LitServe starts worker processes"
        os.kill(proc.pid, sig)
        proc.wait(timeout=90)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in started if _alive(p)], log_path.read_text()[-3000:]
        with socket.socket() as s:  # the port is free again
            s.bind(("127.0.0.1", port))
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------------------------------
# The official openai client: errors, finish_reason, usage, logprobs, stop, seed, refused parameters


def _openai(served, key=KEY):
    import openai

    return openai.OpenAI(base_url=served, api_key=key, max_retries=0, timeout=60)


def _user(text="Rate this edit.", image=True):
    content = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_data_url(_img((7, 8, 9)))}})
    return [{"role": "user", "content": content}]


def test_openai_client_reads_answers_usage_finish_reason_and_logprobs(served):
    client = _openai(served)
    assert [m.id for m in client.models.list().data] == ["tiny-critic"]
    r = client.chat.completions.create(
        model="tiny-critic", messages=_user(), max_tokens=3, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = r.choices[0]
    n = r.usage.completion_tokens
    assert r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + n
    # cut at max_tokens: "length"; an answer that ended on its own: "stop"
    assert (choice.finish_reason, n) == ("length", 3) or (choice.finish_reason == "stop" and n < 3)
    tokens = choice.logprobs.content
    # the tokens' bytes spell the answer (a piece of a character that the answer never completes reads as U+FFFD)
    assert b"".join(bytes(t.bytes) for t in tokens).decode("utf-8", "replace") == choice.message.content
    for t in tokens:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0
        lps = [a.logprob for a in t.top_logprobs]
        assert lps == sorted(lps, reverse=True)
        assert t.logprob == pytest.approx(lps[0], abs=1e-5)  # greedy: the chosen token is the most likely one
    plain = client.chat.completions.create(model="tiny-critic", messages=_user(), max_tokens=3, temperature=0)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == choice.message.content


def test_stop_cuts_the_answer_and_seed_repeats_a_sample(served):
    client = _openai(served)
    full = client.chat.completions.create(model="tiny-critic", messages=_user(), max_tokens=8, temperature=0)
    text = full.choices[0].message.content
    if len(text) >= 3:  # random weights: cut the greedy answer before its last characters
        stop = text[len(text) // 2 :][:4]
        cut = client.chat.completions.create(
            model="tiny-critic", messages=_user(), max_tokens=8, temperature=0, stop=[stop]
        )
        assert cut.choices[0].message.content == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
    kw = dict(model="tiny-critic", messages=_user(), max_tokens=6, temperature=1.0, seed=1234)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b


def test_openai_client_sees_openai_format_errors_without_the_request_echoed(served):
    import openai

    client = _openai(served)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=_user(), max_tokens=2)
    assert e.value.status_code == 404 and "`gpt-4o` does not exist" in e.value.message
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.AuthenticationError) as e:
        _openai(served, key="wrong").chat.completions.create(model="tiny-critic", messages=_user(), max_tokens=2)
    assert "API key" in e.value.message
    refused = [
        ({"n": 2}, "n must be 1"),
        ({"stream": True}, "stream=true is not supported"),
        ({"response_format": {"type": "json_object"}}, "does not constrain decoding"),
        ({"frequency_penalty": 0.5}, "unsupported parameter(s): frequency_penalty"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "unsupported parameter(s): tools"),
        ({"top_logprobs": 2}, "top_logprobs needs logprobs=true"),
        ({"temperature": 7}, "temperature"),
    ]
    for extra, needle in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-critic", messages=_user(), max_tokens=2, **extra)
        assert e.value.status_code == 400 and needle in e.value.message, (extra, e.value.message)
    # a large invalid request gets a short answer: nothing of the request is echoed
    big = image_data_url(Image.effect_noise((64, 64), 100).convert("RGB"))
    body = _chat_body(big, temperature="hot", text="y" * 300_000)
    r = httpx.post(served + "/chat/completions", json=body, headers=_auth(), timeout=60)
    assert r.status_code == 400 and len(r.content) < 3000 and "temperature" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "invalid_request_error"
    ok = client.chat.completions.create(
        model="tiny-critic", messages=_user(), max_tokens=2, response_format={"type": "text"}
    )
    assert ok.choices[0].message.role == "assistant"


def test_http_critic_in_expected_score_mode_gets_logprobs_from_the_served_critic(served):
    critic = HTTPCritic(
        HTTPCritic.Config(endpoints=[served], max_tokens=8, parse_retries=0, expected_score=True, top_logprobs=5),
        api_key=KEY,
    )
    [res] = critic.score([EditRequest(_img((255, 0, 0)), _img((0, 0, 255)), "make it blue", key="e")])
    # random weights: no parseable score, so no expected score either, and no fallback number
    assert res.scores == {"execution": None, "consistency": None}
    assert "expected_scores" not in res.details and critic.stats["expected_fallbacks"] == 0
    # structured outputs are refused by this server with a clear message (it does not constrain decoding)
    strict = HTTPCritic(HTTPCritic.Config(endpoints=[served], structured_outputs="response_format"), api_key=KEY)
    with pytest.raises(CriticRequestError, match="HTTP 400.*does not constrain decoding"):
        strict.score([EditRequest(_img((255, 0, 0)), _img((0, 0, 255)), "make it blue")])


def test_access_takes_the_key_from_the_environment_and_warns_on_an_open_host(monkeypatch, capsys):
    from firm.critics.server import access

    monkeypatch.setenv("FIRM_TEST_KEY", "k1")
    assert access("firm x serve", "localhost", None, "FIRM_TEST_KEY") == ("127.0.0.1", "k1")
    assert access("firm x serve", "0.0.0.0", "given", "FIRM_TEST_KEY") == ("0.0.0.0", "given")
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("FIRM_TEST_KEY")
    assert access("firm x serve", "0.0.0.0", None, "FIRM_TEST_KEY") == ("0.0.0.0", None)
    assert "firm x serve: warning: serving on 0.0.0.0 without an API key" in capsys.readouterr().err
