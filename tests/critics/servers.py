"""Small real HTTP servers on 127.0.0.1 for client tests: scripted OpenAI-compatible answers, errors, slowness."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    url: str,
    *,
    proc: Any = None,
    thread: threading.Thread | None = None,
    log_path: Any = None,
    what: str = "the server",
    timeout: float = 180.0,
    poll: float = 0.5,
) -> None:
    """Wait until ``GET url/health`` answers 200. Fails the test, with the tail of ``log_path``, when the server's
    process (``proc``) or thread (``thread``) ends first, or after ``timeout`` seconds."""
    import httpx
    import pytest

    def tail() -> str:
        return log_path.read_text()[-4000:] if log_path is not None else ""

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{tail()}")
        if thread is not None and not thread.is_alive():
            pytest.fail(f"{what} stopped while starting:\n{tail()}")
        try:
            if httpx.get(url.rstrip("/") + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not become healthy in {timeout:.0f} s:\n{tail()}")
        time.sleep(poll)


def closed_port_url() -> str:
    """A URL where nothing listens (connections are refused)."""
    return f"http://127.0.0.1:{free_port()}/v1"


class ScriptedServer:
    """An OpenAI-compatible server whose answers come from ``respond(body) -> (status, json_or_text)``.

    Records every chat request body and the largest number of requests handled at once.
    """

    def __init__(self, respond: Callable[[dict], tuple[int, Any]], delay_s: float = 0.0, model: str = "scripted"):
        self.respond = respond
        self.delay_s = delay_s
        self.model = model
        self.bodies: list[dict] = []
        self.extra_headers: dict[str, str] = {}  # sent with every non-200 answer (e.g. Retry-After)
        self.headers: list[dict] = []
        self.active = 0
        self.max_active = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, payload: Any) -> None:
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status != 200:
                    for k, v in outer.extra_headers.items():
                        self.send_header(k, v)
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

            def do_GET(self):
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with outer._lock:
                    outer.bodies.append(body)
                    outer.headers.append(dict(self.headers))
                    outer.active += 1
                    outer.max_active = max(outer.max_active, outer.active)
                try:
                    if outer.delay_s:
                        time.sleep(outer.delay_s)
                    status, payload = outer.respond(body)
                    self._send(status, payload)
                finally:
                    with outer._lock:
                        outer.active -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chat_answer(text: str, model: str = "scripted") -> dict:
    """A chat-completions response body carrying ``text``."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
    }


def prompt_text(body: dict) -> str:
    """All text parts of a chat request, joined."""
    out = []
    for m in body.get("messages", []):
        c = m.get("content")
        if isinstance(c, str):
            out.append(c)
        else:
            out.extend(p.get("text", "") for p in c if p.get("type") == "text")
    return "\n".join(out)
