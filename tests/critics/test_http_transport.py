"""The HTTP critic's long-lived transport: one event loop and one connection pool per critic, reused by every call
(chunks, threads, coroutines), closed by close() / ``with`` / garbage collection / interpreter exit."""

import asyncio
import gc
import pickle
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from firm.critics import EditRequest
from firm.critics.http import HTTPCritic
from tests.conftest import REPO
from tests.critics.servers import ScriptedServer, chat_answer

GOOD = chat_answer('{"reasoning": "fine", "score": 4}')


def _img():
    return Image.new("RGB", (16, 12), (255, 0, 0))


def _chunk(n=1, tag="a"):
    return [EditRequest(_img(), _img(), f"make square {tag}{i} blue", key=f"{tag}{i}") for i in range(n)]


def _critic(url, **kw):
    kw.setdefault("backoff_s", 0.01)
    kw.setdefault("model", "m")
    return HTTPCritic(HTTPCritic.Config(endpoints=[url], **kw))


class CountingServer(ScriptedServer):
    """A scripted server that also counts the TCP connections it accepted."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.connections = []
        self.httpd.verify_request = lambda request, address: self.connections.append(address) or True


def _loop_threads():
    return [t for t in threading.enumerate() if t.name.startswith("firm-http") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_leaked_loop_threads():
    before = set(_loop_threads())
    yield
    gc.collect()
    assert set(_loop_threads()) <= before, "an HTTP critic's loop thread outlived its test"


def test_chunks_and_calls_share_one_connection():
    """Chunks scored one after another (from the caller's thread and from a worker thread, as the RL loop does) and a
    free-form completion all go over the same keep-alive connection; each call used to open its own client."""
    with CountingServer(lambda b: (200, GOOD)) as srv:
        critic = _critic(srv.url, max_concurrency=1)  # one request at a time: one connection suffices
        assert all(r.complete for r in critic.score(_chunk(2, "a")))
        assert all(r.complete for r in critic.score(_chunk(2, "b")))
        with ThreadPoolExecutor(1) as pool:  # the RL loop scores on a worker thread
            assert all(r.complete for r in pool.submit(critic.score, _chunk(1, "c")).result())
        conv = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        assert critic.complete([conv]) == ['{"reasoning": "fine", "score": 4}']
        assert len(srv.bodies) == 4 + 4 + 2 + 1
        assert len(srv.connections) == 1, srv.connections
        critic.close()


def test_coroutine_calls_from_other_loops_share_the_pool_too():
    with CountingServer(lambda b: (200, GOOD)) as srv:
        with _critic(srv.url, max_concurrency=1) as critic:
            for tag in "ab":  # two asyncio.run loops of the caller's, one pool of the critic's
                [res] = asyncio.run(critic.ascore(_chunk(1, tag)))
                assert res.complete
            conv = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
            assert asyncio.run(critic.acomplete([conv])) == ['{"reasoning": "fine", "score": 4}']
        assert len(srv.connections) == 1, srv.connections


def test_close_stops_the_loop_thread_and_a_later_call_reopens():
    with CountingServer(lambda b: (200, GOOD)) as srv:
        critic = _critic(srv.url, max_concurrency=1)
        assert not critic.transport.started and critic.transport.thread is None  # nothing before the first call
        critic.score(_chunk())
        thread = critic.transport.thread
        assert thread.is_alive() and thread.daemon and thread in _loop_threads()
        critic.close()
        assert not thread.is_alive() and not critic.transport.started
        critic.close()  # idempotent
        assert critic.score(_chunk())[0].complete  # reopens: a new loop, a new pool
        second = critic.transport.thread
        assert second is not thread and second.is_alive()
        with critic:
            pass
        assert not second.is_alive()
        assert len(srv.connections) == 2  # one per pool


def test_a_dropped_critic_stops_its_thread():
    with ScriptedServer(lambda b: (200, GOOD)) as srv:
        critic = _critic(srv.url)
        critic.score(_chunk())
        thread = critic.transport.thread
        del critic
        gc.collect()
        assert not thread.is_alive()


def test_two_threads_score_at_once_on_the_one_loop():
    with CountingServer(lambda b: (200, GOOD), delay_s=0.05) as srv:
        with _critic(srv.url, max_concurrency=2) as critic:
            start = threading.Barrier(2)

            def chunk(tag):
                start.wait()
                return critic.score(_chunk(3, tag))

            with ThreadPoolExecutor(2) as pool:
                a, b = pool.map(chunk, "ab")
            assert [r.key for r in a] == ["a0", "a1", "a2"] and [r.key for r in b] == ["b0", "b1", "b2"]
            assert all(r.scores == {"execution": 4, "consistency": 4} for r in a + b)
            assert len(_loop_threads()) == 1
            assert critic.transport.inflight == {critic.endpoints[0]: 0}
            assert srv.max_active <= 4  # each call keeps its own bound (max_concurrency), as before the pool was shared
        assert len(srv.bodies) == 12 and len(srv.connections) <= 4


def test_a_blocking_call_from_inside_a_running_loop_still_works():
    with ScriptedServer(lambda b: (200, GOOD)) as srv, _critic(srv.url) as critic:

        async def notebook():
            return critic.score(_chunk())  # blocks this loop's thread; the requests run on the critic's loop

        assert asyncio.run(notebook())[0].complete


def test_errors_keep_their_kind_and_the_client_stays_usable():
    from firm.critics.http import CriticEndpointError, CriticRequestError

    state = {"status": 400}
    with ScriptedServer(lambda b: (state["status"], {"error": {"message": "nope"}})) as srv:
        with _critic(srv.url, max_retries=1) as critic:
            with pytest.raises(CriticRequestError, match="HTTP 400.*nope"):
                critic.score(_chunk())
            state["status"] = 503
            with pytest.raises(CriticEndpointError, match="failed after 2 attempts .*HTTP 503"):
                critic.score(_chunk())
            state["status"] = 200
            srv.respond = lambda b: (200, GOOD)
            assert critic.score(_chunk())[0].complete


def test_a_critic_pickles_and_the_copy_starts_its_own_loop(monkeypatch):
    monkeypatch.setenv("FIRM_TEST_CRITIC_KEY", "sekret")
    with ScriptedServer(lambda b: (200, GOOD)) as srv:
        with _critic(srv.url, api_key_env="FIRM_TEST_CRITIC_KEY", model=None) as critic:
            assert critic.api_key == "sekret"
            critic.score(_chunk())  # started, and the model name resolved
            data = pickle.dumps(critic)
            assert b"sekret" not in data  # the key is never written into a pickle; the copy reads the variable again
            copy = pickle.loads(data)
            with copy:
                assert not copy.transport.started and copy.model == "scripted"
                assert copy.score(_chunk())[0].complete
                assert copy.transport.thread is not critic.transport.thread
            assert srv.headers[-1]["Authorization"] == "Bearer sekret"


@pytest.mark.slow  # a subprocess
def test_interpreter_exit_without_close_is_quiet():
    """A critic left open at exit: its pool is closed and its thread joined, without a warning or a traceback."""
    script = (
        "import threading\n"
        "from PIL import Image\n"
        "from firm.critics import EditRequest\n"
        "from firm.critics.http import HTTPCritic\n"
        "from tests.critics.servers import ScriptedServer, chat_answer\n"
        "srv = ScriptedServer(lambda b: (200, chat_answer('{\"score\": 3}'))).__enter__()\n"
        "critic = HTTPCritic(HTTPCritic.Config(endpoints=[srv.url], model='m'))\n"
        "img = Image.new('RGB', (8, 8))\n"
        "res = threading.Thread(target=lambda: print(critic.score([EditRequest(img, img, 'x')])[0].scores))\n"
        "res.start(); res.join()\n"
    )
    cmd = [sys.executable, "-W", "error", "-c", script]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "{'execution': 3, 'consistency': 3}"
    assert done.stderr == "", done.stderr[-3000:]
