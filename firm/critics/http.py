"""Critic client for OpenAI-compatible chat-completions endpoints (vLLM, SGLang, `firm critic serve`, ...).

Async and concurrent: every judgement is one ``POST {endpoint}/chat/completions`` with the images as base64 data
URLs; at most ``max_concurrency`` requests are in flight, spread over several endpoints by picking the one with
the fewest requests in flight. Each request has a timeout; connection errors, timeouts, HTTP 429 and 5xx are
retried with exponential backoff (on another endpoint when there is one; a ``Retry-After`` header lengthens the
wait to what the server asked for, up to ``retry_after_max_s``), and so are structurally bad replies (a
200 whose body is not JSON, or is not a chat completion: ``{"choices": []}``, no message, content that is not
text), within the same retry budget. When the budget is spent on transport errors the call raises
:class:`CriticEndpointError` naming the endpoint(s); a request the server rejects (other 4xx) raises
:class:`CriticRequestError` at once. Two failures cost only their own judgement instead, as a missing score with the
reason (counted in ``stats["reply_failures"]``), and the other judgements of the same call are kept: a judgement
whose replies stayed malformed after all retries, and one whose request the server refused as too large (HTTP 413:
a prompt or an image over the server's limits). Answers that cannot be parsed are asked again (sampling at
``retry_temperature``) up to ``parse_retries`` times, then give a ``None`` score with the reason.

Expected-score mode (``expected_score: true``) asks for ``logprobs`` / ``top_logprobs`` and returns, besides the
integer, the probability-weighted mean score at the score token (:mod:`firm.critics.expected`, the same formula as
the local critic's); ``structured_outputs`` sends a JSON schema or a regex that constrains each judgement's answer
to the format its parser reads (:mod:`firm.critics.structured`).

``score()`` is synchronous and works from plain code and from inside a running event loop (it then runs the
requests on a helper thread); ``ascore()`` is the coroutine. ``complete()`` / ``acomplete()`` send free-form
conversations through the same transport and return the answer texts (the curation ``http`` teacher uses them).
One client may be used from several threads at once (each call runs its own event loop).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import io
import itertools
import logging
import math
import os
import random
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from firm.critics.base import PLAN, Completion, Job, PromptedCritic, now
from firm.critics.expected import expected_from_logprobs
from firm.critics.parsing import ParseResult
from firm.critics.prompts import PromptConfig, PromptSet
from firm.critics.structured import MODES as STRUCTURED_MODES
from firm.critics.structured import request_fields
from firm.critics.types import CriticRequest, CriticResult
from firm.data.chat import prepare_messages

log = logging.getLogger(__name__)

RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}


class CriticEndpointError(RuntimeError):
    """An endpoint could not be reached, timed out, or kept failing after all retries."""

    def __init__(self, message: str, endpoints: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.endpoints = list(endpoints)


class CriticTimeoutError(CriticEndpointError):
    """Every attempt timed out."""


class CriticRequestError(RuntimeError):
    """The endpoint rejected the request (HTTP 4xx other than 408/429): a bug or a misconfiguration, not retried."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class CriticReplyError(CriticEndpointError):
    """The endpoint kept answering with replies that are not chat completions, through every retry."""


class _BadReply(ValueError):
    """A reply that is not what the API promises (retried like a transport error)."""


def _shown(data: Any, n: int = 200) -> str:
    try:
        text = data if isinstance(data, str) else repr(data)
    except RecursionError:
        return f"<{type(data).__name__} nested too deeply to show>"
    return text[:n] + ("..." if len(text) > n else "")


def chat_content(data: Any) -> str:
    """The answer text of a chat-completions reply (``""`` when the server gave none).

    Raises:
        _BadReply: the reply is not a chat completion (no choices, no message, content that is not text).
    """
    if not isinstance(data, dict):
        raise _BadReply(f"the reply is not a JSON object: {_shown(data)}")
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices:
        raise _BadReply(f"the reply has no choices: {_shown(data)}")
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    if not isinstance(message, dict):
        raise _BadReply(f"the first choice has no message: {_shown(choices[0])}")
    content = message.get("content")
    if isinstance(content, list):  # some servers answer in content parts
        texts = [p.get("text") for p in content if isinstance(p, dict)]
        content = "".join(t for t in texts if isinstance(t, str))
    if content is not None and not isinstance(content, str):
        raise _BadReply(f"the message content is {type(content).__name__}, not text: {_shown(content)}")
    # Lone surrogates ("\ud800" escapes) cannot be written as UTF-8 later (JSONL, shards): replace them here.
    return (content or "").encode("utf-8", "replace").decode("utf-8")


@dataclass
class Reply:
    """A chat completion's first choice: its text, ``logprobs.content`` entries (when asked for) and why it ended."""

    text: str
    logprobs: list | None = None
    finish_reason: str | None = None


def chat_reply(data: Any) -> Reply:
    """:func:`chat_content` plus the first choice's ``logprobs.content`` (None when absent) and ``finish_reason``.

    Raises:
        _BadReply: as :func:`chat_content`.
    """
    text = chat_content(data)
    choice = data["choices"][0]
    lp = choice.get("logprobs")
    content = lp.get("content") if isinstance(lp, dict) else None
    finish = choice.get("finish_reason")
    return Reply(text, content if isinstance(content, list) else None, finish if isinstance(finish, str) else None)


def retry_after_s(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (RFC 9110: a number of seconds or an HTTP date); None when the
    header is absent or unreadable, 0 for a date in the past."""
    if not value or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.timezone.utc)
        seconds = (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


def normalize_endpoint(url: str) -> str:
    """The API base URL (``.../v1``) from ``host:port``, ``http://host:port``, ``.../v1`` or ``.../completions``."""
    url = url.strip().rstrip("/")
    if not url:
        raise ValueError("empty endpoint URL")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/chat/completions"):
        url = url[: -len("/chat/completions")]
    parts = urlsplit(url)
    if not parts.hostname:
        raise ValueError(f"endpoint {url!r} has no host; use e.g. http://127.0.0.1:8000/v1")
    if parts.path in ("", "/"):
        url += "/v1"
    return url


def image_data_url(image: Any, fmt: str = "png", quality: int = 95) -> str:
    """A PIL image as a ``data:image/...;base64,...`` URL."""
    buf = io.BytesIO()
    fmt = fmt.lower()
    if fmt in ("jpg", "jpeg"):
        image.convert("RGB").save(buf, format="JPEG", quality=quality)
        mime = "jpeg"
    elif fmt == "png":
        image.save(buf, format="PNG")
        mime = "png"
    else:
        raise ValueError(f"image_format {fmt!r} unknown; use png or jpeg")
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(messages: list[dict], fmt: str = "png", quality: int = 95, cache: dict | None = None) -> list:
    """Neutral messages (PIL images inline) -> OpenAI chat messages with data-URL images."""
    cache = {} if cache is None else cache
    out = []
    for m in messages:
        parts = []
        for c in m["content"]:
            if c["type"] == "image":
                key = id(c["image"])
                if key not in cache:
                    cache[key] = image_data_url(c["image"], fmt, quality)
                parts.append({"type": "image_url", "image_url": {"url": cache[key]}})
            else:
                parts.append({"type": "text", "text": c["text"]})
        if m["role"] == "system" and all(p["type"] == "text" for p in parts):
            out.append({"role": "system", "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": m["role"], "content": parts})
    return out


class HTTPCritic(PromptedCritic):
    """A critic served behind one or more OpenAI-compatible ``/v1/chat/completions`` endpoints."""

    @dataclass
    class Config:
        name: str = "http"
        endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])  # API base URLs
        model: str | None = None  # model name sent with each request; None: the first id listed by GET /models
        api_key_env: str = "FIRM_CRITIC_API_KEY"  # name of the environment variable holding the API key, if any
        max_concurrency: int = 32  # HTTP requests in flight at once, over all endpoints
        timeout_s: float = 120.0  # limit for one HTTP request (connect + generate + read)
        max_retries: int = 3  # retries after a connection error, timeout, HTTP 408/429/5xx
        backoff_s: float = 0.5  # delay before the first retry; doubles at each retry (+-25% jitter)
        backoff_max_s: float = 10.0  # cap on one retry delay
        parse_retries: int = 1  # ask again (sampling) when the answer cannot be parsed, up to this many times
        temperature: float = 0.0  # first attempt: 0 = greedy
        retry_temperature: float = 0.7  # temperature of parse retries
        max_tokens: int = 1024  # generation budget per judgement (reasoning included)
        image_format: str = "png"  # png (lossless) | jpeg (smaller requests)
        jpeg_quality: int = 95  # when image_format is jpeg
        max_image_pixels: int | None = None  # downscale larger images to this many pixels before sending
        extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request (e.g. top_k for vLLM)
        expected_score: bool = False  # also return the probability-weighted mean score (logprobs at the score token)
        top_logprobs: int = 20  # alternatives per token asked for in expected-score mode (OpenAI and vLLM allow 0..20)
        structured_outputs: str = "off"  # off | vllm (structured_outputs: JSON schema / regex) | response_format
        retry_after_max_s: float = 60.0  # longest wait honoured from a Retry-After header (HTTP 429 / 503)
        prompts: PromptConfig = field(default_factory=PromptConfig)  # template files replacing the built-in ones

    def __init__(self, config: Config | None = None, *, api_key: str | None = None) -> None:
        """A client for ``config.endpoints``.

        Args:
            config: endpoints, limits, retries, prompts.
            api_key: sent as ``Authorization: Bearer ...``; None reads it from ``$<config.api_key_env>``. The key
                is never a config field, so it never lands in a saved config, a manifest or a run's meta.json.
        """
        config = config or self.Config()
        super().__init__(PromptSet(config.prompts), config.max_image_pixels, expected_score=config.expected_score)
        self.config = config
        if not config.endpoints:
            raise ValueError("http critic: give at least one endpoint URL in `endpoints:`")
        if config.structured_outputs not in STRUCTURED_MODES:
            raise ValueError(
                f"http critic: structured_outputs must be one of {', '.join(STRUCTURED_MODES)}, "
                f"got {config.structured_outputs!r}"
            )
        if not 0 <= config.top_logprobs <= 20:
            raise ValueError(f"http critic: top_logprobs must be in 0..20, got {config.top_logprobs}")
        if config.retry_after_max_s < 0:
            raise ValueError("http critic: retry_after_max_s must be >= 0")
        self.endpoints = [normalize_endpoint(u) for u in config.endpoints]
        if config.max_concurrency < 1 or config.max_retries < 0 or config.parse_retries < 0 or config.timeout_s <= 0:
            raise ValueError(
                "http critic: need max_concurrency >= 1, max_retries >= 0, parse_retries >= 0 and timeout_s > 0"
            )
        self.api_key = api_key or (os.environ.get(config.api_key_env) if config.api_key_env else None) or None
        self.model = config.model
        self._inflight = dict.fromkeys(self.endpoints, 0)  # guarded by _lock: calls may run on several threads
        self._rr = itertools.count()
        self._lock = threading.Lock()

    # ---- transport

    def _headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _pick(self, avoid: set[str]) -> str:
        """The endpoint with the fewest requests in flight (round-robin among ties), avoiding failed ones; counts
        the request as in flight there (the caller calls :meth:`_done` when it ends)."""
        pool = [e for e in self.endpoints if e not in avoid] or self.endpoints
        with self._lock:
            start = next(self._rr) % len(pool)
            rotated = pool[start:] + pool[:start]
            endpoint = min(rotated, key=lambda e: self._inflight[e])
            self._inflight[endpoint] += 1
        return endpoint

    def _done(self, endpoint: str) -> None:
        with self._lock:
            self._inflight[endpoint] -= 1

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def _delay(self, retry: int) -> float:
        d = min(self.config.backoff_s * (2**retry), self.config.backoff_max_s)
        return d * random.uniform(0.75, 1.25)

    async def _request(
        self,
        client: httpx.AsyncClient,
        sem: asyncio.Semaphore,
        method: str,
        path: str,
        body: Any = None,
        read: Callable[[Any], Any] | None = None,
    ) -> Any:
        """One API call with retries; returns the decoded JSON body, or ``read(body)`` (which raises
        :class:`_BadReply` for a reply to retry)."""
        tried: list[str] = []
        last: str = ""
        timeouts = bad_replies = 0
        last_was_bad_reply = False
        hint: float | None = None  # the server's Retry-After of the last answer, in seconds
        for attempt in range(1 + self.config.max_retries):
            if attempt:
                delay = self._delay(attempt - 1)
                if hint is not None:  # the server said how long to wait: at least that, up to retry_after_max_s
                    delay = max(delay, min(hint, self.config.retry_after_max_s))
                hint = None
                await self._sleep(delay)
            async with sem:
                endpoint = self._pick(set(tried[-1:]) if len(self.endpoints) > 1 else set())
                tried.append(endpoint)
                url = endpoint + path
                try:
                    resp = await client.request(method, url, json=body, timeout=self.config.timeout_s)
                except httpx.TimeoutException:
                    timeouts += 1
                    last = f"{url}: no answer within {self.config.timeout_s:g} s"
                    log.warning("critic endpoint %s timed out (attempt %d)", endpoint, attempt + 1)
                    continue
                except httpx.TransportError as e:
                    last = f"{url}: {type(e).__name__}: {e or 'connection failed'}"
                    log.warning("critic endpoint %s failed (attempt %d): %s", endpoint, attempt + 1, last)
                    continue
                finally:
                    self._done(endpoint)
            last_was_bad_reply = False
            if resp.status_code in RETRYABLE_STATUS:
                hint = retry_after_s(resp.headers.get("retry-after"))
                last = f"{url}: HTTP {resp.status_code}: {resp.text[:300]}"
                log.warning("critic endpoint %s answered HTTP %d (attempt %d)", endpoint, resp.status_code, attempt + 1)
                continue
            if resp.status_code in (401, 403):
                raise CriticRequestError(
                    f"{url} refused the request (HTTP {resp.status_code}): check the API key "
                    f"(${self.config.api_key_env}, or --api-key on the command line). Server said: {resp.text[:300]}",
                    resp.status_code,
                )
            if resp.status_code >= 400:
                raise CriticRequestError(
                    f"{url} rejected the request: HTTP {resp.status_code}: {resp.text[:500]}", resp.status_code
                )
            try:
                try:
                    data = resp.json()
                except (ValueError, RecursionError):
                    raise _BadReply(f"HTTP {resp.status_code} with a body that is not JSON: {resp.text[:200]!r}")
                return data if read is None else read(data)
            except _BadReply as e:
                bad_replies += 1
                last_was_bad_reply = True
                last = f"{url}: {e}"
                log.warning("critic endpoint %s gave a malformed reply (attempt %d): %s", endpoint, attempt + 1, e)
                continue
        names = ", ".join(dict.fromkeys(tried))
        n = 1 + self.config.max_retries
        if last_was_bad_reply:
            raise CriticReplyError(
                f"critic endpoint {names}: no usable reply after {n} attempts ({bad_replies} malformed; last: {last})",
                tried,
            )
        if timeouts == n:
            raise CriticTimeoutError(
                f"critic endpoint {names}: all {n} attempts timed out after {self.config.timeout_s:g} s each; "
                "raise timeout_s, lower max_concurrency, or check the server's load",
                tried,
            )
        raise CriticEndpointError(
            f"critic endpoint {names} failed after {n} attempts (last: {last}); check that the server is running "
            "and the URL is right (e.g. http://127.0.0.1:8000/v1)",
            tried,
        )

    async def _resolve_model(self, client: httpx.AsyncClient, sem: asyncio.Semaphore) -> str:
        if self.model is None:
            try:
                data = await self._request(client, sem, "GET", "/models")
            except CriticReplyError as e:  # no model name: every judgement would fail, so this one raises
                raise CriticEndpointError(f"{e}; set `model:` in the config to skip GET /models", e.endpoints) from None
            try:
                self.model = str(data["data"][0]["id"])
            except (KeyError, IndexError, TypeError):
                raise CriticRequestError(
                    f"{self.endpoints[0]}/models lists no model ({str(data)[:200]}); set `model:` in the config"
                ) from None
            log.info("critic model: %s", self.model)
        return self.model

    async def chat(
        self,
        client: httpx.AsyncClient,
        sem: asyncio.Semaphore,
        messages: list[dict],
        *,
        temperature: float,
    ) -> str:
        """One chat completion (OpenAI-format ``messages``); returns the answer text ('' when the server gave none)."""
        return (await self.chat_reply(client, sem, messages, temperature=temperature)).text

    async def chat_reply(
        self,
        client: httpx.AsyncClient,
        sem: asyncio.Semaphore,
        messages: list[dict],
        *,
        temperature: float,
        extra: dict[str, Any] | None = None,
    ) -> Reply:
        """One chat completion with its logprobs and finish reason; ``extra`` fields are added to the body."""
        body = {
            "model": await self._resolve_model(client, sem),
            "messages": messages,
            "max_tokens": self.config.max_tokens,
            "temperature": temperature,
            **(extra or {}),
            **self.config.extra_body,
        }
        return await self._request(client, sem, "POST", "/chat/completions", body, read=chat_reply)

    def _job_fields(self, job: Job) -> dict[str, Any]:
        """Request fields of a judgement: logprobs in expected-score mode, and its structured-output constraint."""
        if job.dimension == PLAN:
            return {}
        fields = request_fields(job.dimension, self.config.structured_outputs)
        if self.config.expected_score:
            fields.update(logprobs=True, top_logprobs=self.config.top_logprobs)
        return fields

    async def _chat_or_reason(
        self,
        client: httpx.AsyncClient,
        sem: asyncio.Semaphore,
        messages: list[dict],
        *,
        temperature: float,
        extra: dict[str, Any] | None = None,
    ) -> tuple[Reply | None, str | None]:
        """``(reply, None)``, or ``(None, why)`` for the failures that cost only this conversation: replies that
        stayed malformed through every retry, and HTTP 413 (this request is over the server's limits)."""
        try:
            return await self.chat_reply(client, sem, messages, temperature=temperature, extra=extra), None
        except CriticReplyError as e:
            why = f"no usable reply from the endpoint: {e}"
        except CriticRequestError as e:
            if e.status != 413:
                raise
            why = f"the endpoint refused this request as too large: {e}"
        self.stats["reply_failures"] += 1
        log.warning("critic judgement without a reply: %s", why[:300])
        return None, why

    # ---- scoring

    async def _complete_job(
        self, client: httpx.AsyncClient, sem: asyncio.Semaphore, job: Job, messages: list
    ) -> Completion:
        start = now()
        reply, parsed, attempt = None, None, 0
        extra = self._job_fields(job)
        for attempt in range(1 + self.config.parse_retries):
            temperature = self.config.temperature if attempt == 0 else self.config.retry_temperature
            if attempt:
                self.stats["parse_retries"] += 1
            reply, why = await self._chat_or_reason(client, sem, messages, temperature=temperature, extra=extra)
            if why is not None:  # a missing score with the reason; the other judgements of the call are kept
                return Completion(None, ParseResult(value=None, reason=why), attempt + 1, start, now())
            self.stats["generations"] += 1
            parsed = job.parser(reply.text)
            if parsed.ok:
                break
        comp = Completion(reply.text, parsed, attempt + 1, start, now())
        if reply.finish_reason == "length" and not parsed.ok:
            comp.notes.append("the answer was cut at max_tokens")
        if self.config.expected_score and parsed.ok and job.dimension != PLAN:
            for key, span in parsed.spans.items():
                value, why = expected_from_logprobs(reply.logprobs, reply.text, span)
                if value is not None:
                    comp.expected[key] = value
                else:
                    comp.notes.append(f"no expected score for {key}: {why}")
        return comp

    async def _complete(self, client: httpx.AsyncClient, sem: asyncio.Semaphore, jobs: list[Job]) -> list[Completion]:
        cache: dict = {}
        fmt, q = self.config.image_format, self.config.jpeg_quality
        # image encoding is CPU work: keep it off the event loop
        payloads = await asyncio.to_thread(lambda: [to_openai_messages(j.messages, fmt, q, cache) for j in jobs])
        tasks = [asyncio.ensure_future(self._complete_job(client, sem, j, p)) for j, p in zip(jobs, payloads)]
        try:
            out = await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        self.stats["jobs"] += len(jobs)
        return list(out)

    async def ascore(self, requests: Sequence[CriticRequest]) -> list[CriticResult]:
        """Coroutine version of :meth:`score`."""
        requests = list(requests)
        plan_jobs = self.plan_jobs(requests)  # validates the requests
        limits = httpx.Limits(max_connections=self.config.max_concurrency, max_keepalive_connections=32)
        sem = asyncio.Semaphore(self.config.max_concurrency)
        async with httpx.AsyncClient(headers=self._headers(), limits=limits) as client:
            plans = dict(zip((j.index for j in plan_jobs), await self._complete(client, sem, plan_jobs)))
            jobs = await asyncio.to_thread(self.judgement_jobs, requests, plans)
            comps = await self._complete(client, sem, jobs)
        return self.assemble(requests, jobs, comps, plans)

    def score(self, requests: Sequence[CriticRequest]) -> list[CriticResult]:
        """Judge every request (blocking). Missing scores are ``None``; unreachable endpoints raise.

        Raises:
            CriticEndpointError: an endpoint stayed unreachable / failing after ``max_retries`` retries.
            CriticTimeoutError: every attempt of a request timed out.
            CriticRequestError: the server rejected a request (e.g. wrong API key or model name); not for HTTP 413,
                which costs only that judgement.
        """
        return run_blocking(lambda: self.ascore(requests))

    # ---- free-form completions (no prompts, no parsing)

    async def acomplete(self, conversations: Sequence[list[dict]], *, temperature: float | None = None) -> list[str]:
        """Coroutine version of :meth:`complete`."""
        if not conversations:
            return []
        fmt, q, max_px = self.config.image_format, self.config.jpeg_quality, self.config.max_image_pixels
        cache: dict = {}

        def payloads() -> list[list]:  # image preparation and encoding are CPU work: off the event loop
            return [to_openai_messages(prepare_messages(c, max_px), fmt, q, cache) for c in conversations]

        payload = await asyncio.to_thread(payloads)
        temp = self.config.temperature if temperature is None else temperature
        limits = httpx.Limits(max_connections=self.config.max_concurrency, max_keepalive_connections=32)
        sem = asyncio.Semaphore(self.config.max_concurrency)
        async with httpx.AsyncClient(headers=self._headers(), limits=limits) as client:

            async def one(p: list) -> str:
                reply, _ = await self._chat_or_reason(client, sem, p, temperature=temp)
                return "" if reply is None else reply.text  # no reply: an empty answer, which no parser accepts

            tasks = [asyncio.ensure_future(one(p)) for p in payload]
            try:
                return list(await asyncio.gather(*tasks))
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    def complete(self, conversations: Sequence[list[dict]], *, temperature: float | None = None) -> list[str]:
        """The endpoint's answer text to each conversation (neutral messages, PIL images inline), in order.

        Sent concurrently (at most ``max_concurrency`` in flight) with the client's retries, endpoint balancing,
        timeouts, image preparation (``max_image_pixels``) and encoding; ``max_tokens`` and ``extra_body`` from the
        config. ``temperature`` defaults to the config's. Nothing is parsed: an empty answer is ``""``, and so is a
        conversation whose replies stayed malformed through every retry or that the server refused as too large
        (HTTP 413; logged and counted in ``stats["reply_failures"]``). Blocking, and safe to call from inside a
        running event loop.

        Raises:
            CriticEndpointError, CriticTimeoutError, CriticRequestError: as :meth:`score`.
        """
        return run_blocking(lambda: self.acomplete(conversations, temperature=temperature))


def run_blocking(make: Callable[[], Awaitable[Any]]) -> Any:
    """Run the coroutine made by ``make()`` to completion and return its result, from plain code or from inside a
    running event loop (a notebook, an async trainer: it then runs on a helper thread with its own loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="firm-http") as pool:
        return pool.submit(lambda: asyncio.run(make())).result()
