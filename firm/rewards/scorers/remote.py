"""The ``remote`` scorer: a scorer served by `firm reward serve` (often from a Python environment of its own).

Some scorers' official packages cannot share FIRM's environment (HPSv2's open_clip fork and ImageReward's BLIP pin
old torchvision / transformers releases); UniRL runs each in a separate one. Serve such a scorer from its environment
(:mod:`firm.rewards.serve`, scripts/reward_venv.sh) and score through it from the training run::

    rewards:
      hps: {name: remote, url: "http://127.0.0.1:8101", outputs: [hpsv2], scale: 3.0}

Each batch of ``batch_size`` requests is one ``POST {url}/v1/score`` carrying the images as base64 PNG (lossless:
the server scores the same pixels) and the prompt, or the source, edited image and instruction of an edit. The
answer's scores come back by output name, NaN (with the server's reason in :attr:`Scores.errors`) for a request the
server could not score. A server that cannot be reached, times out or answers HTTP 408/429/5xx is tried again
``retries`` times (exponential backoff, a ``Retry-After`` header honoured up to ``backoff_max_s``); then, or at once
for any other refusal (a wrong API key, a body over the server's limit), the whole batch is missing with the reason.

The API key is read from the environment variable named by ``api_key_env`` (never a config field, so it never lands
in a saved config), or given to the constructor.
"""

from __future__ import annotations

import base64
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from firm.critics.types import EditRequest, GenRequest
from firm.images import encode
from firm.rewards.scorers.base import TASKS, Scorer, ScorerConfig, Scores, request_task

# The wire protocol, shared with firm.rewards.serve.
SCORE_PATH = "/v1/score"
API_KEY_ENV = "FIRM_REWARD_API_KEY"
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


def encode_image(image: Any) -> str:
    """A PIL image as base64 PNG (lossless, fast compression: the bytes only cross a local link)."""
    _, data = encode(image, "png", png_compress_level=1)
    return base64.b64encode(data).decode("ascii")


def encode_request(r: EditRequest | GenRequest) -> dict[str, Any]:
    """One request as the JSON object `firm reward serve` takes."""
    if request_task(r) == "edit":
        out = {"task": "edit", "source": encode_image(r.source), "edited": encode_image(r.edited)}
        out["instruction"] = r.instruction
    else:
        out = {"task": "gen", "image": encode_image(r.image), "prompt": r.prompt}
        if r.checklist is not None:
            out["checklist"] = list(r.checklist)
    if r.key is not None:
        out["key"] = str(r.key)
    return out


class RemoteError(RuntimeError):
    """The server could not be reached, or refused or garbled a batch."""


class RemoteScorer(Scorer):
    """Scores from a `firm reward serve` server: one POST per batch, the server's named scores back."""

    concurrent = True  # POSTs to a server, which queues them

    @dataclass
    class Config(ScorerConfig):
        name: str = "remote"
        url: str = ""  # base URL of the server, e.g. http://127.0.0.1:8101 (or its full .../v1/score URL)
        outputs: list[str] = field(default_factory=list)  # served outputs to return, primary first (e.g. [hpsv2])
        tasks: list[str] = field(default_factory=lambda: list(TASKS))  # request kinds sent (gen, edit)
        api_key_env: str = API_KEY_ENV  # environment variable holding the server's API key (unset: no key sent)
        timeout: float = 300.0  # seconds for one POST (connect, scoring a batch, reply)
        retries: int = 2  # further tries after a connection error, timeout or HTTP 408/429/5xx
        backoff_s: float = 0.5  # wait before the first retry; doubles at each retry
        backoff_max_s: float = 10.0  # cap on one wait (a Retry-After header included)

        def validate(self) -> None:
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"url: the server's http(s) URL is required, got {self.url!r}")
            if not self.outputs or len(set(self.outputs)) != len(self.outputs):
                raise ValueError("outputs: list the served scorer's outputs to return (distinct, primary first)")
            if not self.tasks or any(t not in TASKS for t in self.tasks):
                raise ValueError(f"tasks: a non-empty subset of {list(TASKS)}, got {list(self.tasks)}")
            if not (self.timeout > 0 and self.retries >= 0 and self.backoff_s >= 0 and self.backoff_max_s >= 0):
                raise ValueError("need timeout > 0, retries >= 0, backoff_s >= 0 and backoff_max_s >= 0")

    def __init__(self, config: Config, *, api_key: str | None = None) -> None:
        super().__init__(config)
        config.validate()
        self.outputs = tuple(config.outputs)
        self.tasks = tuple(config.tasks)
        base = config.url.rstrip("/")
        self.endpoint = base if base.endswith(SCORE_PATH) else base + SCORE_PATH
        self._api_key = api_key or (os.environ.get(config.api_key_env) if config.api_key_env else None) or None
        self._client: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # the connection pool and lock stay behind
        state = dict(self.__dict__)
        state["_client"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _http(self) -> Any:
        import httpx

        with self._lock:
            if self._client is None:
                headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
                self._client = httpx.Client(timeout=self.config.timeout, headers=headers)
            return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def score_batch(self, requests: list[Any]) -> Scores:
        body = {"requests": [encode_request(r) for r in requests]}
        data = self._post(body)
        return self._parse(data, len(requests))

    def _post(self, body: dict) -> Any:
        import httpx

        from firm.critics.transport import retry_after_s

        cfg = self.config
        client = self._http()
        last = ""
        for attempt in range(cfg.retries + 1):
            wait = min(cfg.backoff_s * 2**attempt, cfg.backoff_max_s)
            try:
                reply = client.post(self.endpoint, json=body)
            except httpx.TimeoutException as e:
                last = f"timed out after {cfg.timeout:g} s ({type(e).__name__})"
            except httpx.TransportError as e:
                last = f"cannot connect ({type(e).__name__}: {e})"
            else:
                if reply.status_code == 200:
                    try:
                        return reply.json()
                    except ValueError:
                        raise RemoteError(f"reward server {self.endpoint}: the reply is not JSON") from None
                message = _error_message(reply)
                if reply.status_code not in RETRYABLE_STATUS:
                    status = reply.status_code
                    raise RemoteError(f"reward server {self.endpoint} refused the batch: HTTP {status}: {message}")
                last = f"HTTP {reply.status_code}: {message}"
                asked = retry_after_s(reply.headers.get("retry-after"))
                if asked is not None:
                    wait = min(max(wait, asked), cfg.backoff_max_s)
            if attempt < cfg.retries:
                time.sleep(wait)
        tries = cfg.retries + 1
        raise RemoteError(f"reward server {self.endpoint} failed {tries} time(s); last: {last}")

    def _parse(self, data: Any, n: int) -> Scores:
        where = f"reward server {self.endpoint}"
        if not isinstance(data, dict) or not isinstance(data.get("scores"), dict):
            raise RemoteError(f"{where}: malformed reply (no 'scores' object)")
        scores, errors, details = data["scores"], data.get("errors"), data.get("details")
        missing = [k for k in self.outputs if k not in scores]
        if missing:
            served = ", ".join(map(str, scores)) or "none"
            name = data.get("scorer")
            raise RemoteError(f"{where} serves {name!r} with outputs {served}; {missing} are not among them")
        if not isinstance(errors, list) or len(errors) != n:
            raise RemoteError(f"{where}: malformed reply ('errors' must list one entry per request)")
        values = {}
        for k in self.outputs:
            col = scores[k]
            if not isinstance(col, list) or len(col) != n:
                raise RemoteError(f"{where}: malformed reply (scores[{k!r}] must hold {n} values)")
            if any(v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in col):
                raise RemoteError(f"{where}: malformed reply (scores[{k!r}] holds a non-number)")
            values[k] = torch.tensor([math.nan if v is None else float(v) for v in col], dtype=torch.float32)
        errors = [None if e is None else str(e) for e in errors]
        if not isinstance(details, list) or len(details) != n:
            details = [None] * n
        # the served scorer's model calls that raised: this side's critic_failure decides, as for a local scorer
        call_errors = [f"{where}: {e}" for e in data.get("call_errors") or []]
        return Scores(values, errors, details, call_errors)


def _error_message(reply: Any) -> str:
    """The reason a server gave: its ``{"error": {"message"}}`` body (the critic server's format), else the text."""
    try:
        body = reply.json()
        message = body["error"]["message"] if isinstance(body.get("error"), dict) else body.get("detail") or body
    except (ValueError, AttributeError, KeyError, TypeError):
        message = reply.text
    return str(message)[:500]
