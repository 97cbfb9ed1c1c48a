"""Critic client for OpenAI-compatible chat-completions endpoints (vLLM, SGLang, `firm critic serve`, ...).

Async and concurrent: every judgement is one ``POST {endpoint}/chat/completions`` with the images as base64 data
URLs; at most ``max_concurrency`` requests of a call are in flight, spread over several endpoints by picking the one
with the fewest requests in flight. Each request has a timeout; connection errors, timeouts, HTTP 429 and 5xx are
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

The transport lives in :mod:`firm.critics.transport` (:class:`ChatTransport`: retries, timeouts, endpoint
balancing, the API key, and one long-lived event loop with one connection pool per critic, reused by every call);
this module turns judgements into requests and answers into scores. ``score()`` is synchronous and works from plain
code, from several threads at once (the RL loop scores on worker threads) and from inside a running event loop;
``ascore()`` is the coroutine. ``complete()`` / ``acomplete()`` send free-form conversations through the same
transport and return the answer texts (the curation ``http`` teacher uses them). ``close()`` (or ``with``) stops the
client's loop thread and closes its connections; garbage collection and interpreter exit do it too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from firm.critics.base import PLAN, Completion, Job, PromptedCritic, now
from firm.critics.expected import expected_from_logprobs
from firm.critics.parsing import ParseResult
from firm.critics.prompts import PromptConfig, PromptSet
from firm.critics.structured import MODES as STRUCTURED_MODES
from firm.critics.structured import request_fields
from firm.critics.transport import (
    RETRYABLE_STATUS,
    ChatTransport,
    CriticEndpointError,
    CriticReplyError,
    CriticRequestError,
    CriticTimeoutError,
    Reply,
    chat_content,
    chat_reply,
    gather_all,
    normalize_endpoint,
    retry_after_s,
)
from firm.critics.types import CriticRequest, CriticResult
from firm.data.chat import prepare_messages
from firm.images import to_data_url as image_data_url  # public here too: clients build data URLs with it

log = logging.getLogger(__name__)

T = TypeVar("T")

__all__ = [
    "RETRYABLE_STATUS",
    "ChatTransport",
    "CriticEndpointError",
    "CriticReplyError",
    "CriticRequestError",
    "CriticTimeoutError",
    "HTTPCritic",
    "Reply",
    "chat_content",
    "chat_reply",
    "image_data_url",
    "normalize_endpoint",
    "retry_after_s",
    "to_openai_messages",
]


def to_openai_messages(messages: list[dict], fmt: str = "png", quality: int = 95, cache: dict | None = None) -> list:
    """Neutral messages (PIL images inline) -> OpenAI chat messages with data-URL images.

    ``cache`` (shared over calls) encodes an image object once. It keeps the image alive next to its URL: it is keyed
    by ``id()``, and the id of an image freed meanwhile (a prepared copy) could otherwise be reused by another one.
    """
    cache = {} if cache is None else cache
    out = []
    for m in messages:
        parts = []
        for c in m["content"]:
            if c["type"] == "image":
                img = c["image"]
                hit = cache.get(id(img))
                if hit is None or hit[0] is not img:
                    hit = cache[id(img)] = (img, image_data_url(img, fmt, quality))
                parts.append({"type": "image_url", "image_url": {"url": hit[1]}})
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
        max_concurrency: int = 32  # HTTP requests in flight at once per score()/complete() call, over all endpoints
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
        """A client for ``config.endpoints``. Nothing is connected, and no thread started, before the first call.

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
        if config.max_concurrency < 1 or config.max_retries < 0 or config.parse_retries < 0 or config.timeout_s <= 0:
            raise ValueError(
                "http critic: need max_concurrency >= 1, max_retries >= 0, parse_retries >= 0 and timeout_s > 0"
            )
        self.transport = ChatTransport.from_config(config, name=f"firm-http-{config.name}", api_key=api_key)
        self.endpoints = self.transport.endpoints

    @property
    def model(self) -> str | None:
        """The model name sent with each request (None until ``GET /models`` answered, when not configured)."""
        return self.transport.model

    @model.setter
    def model(self, value: str | None) -> None:
        self.transport.model = value

    @property
    def api_key(self) -> str | None:
        return self.transport.api_key

    @api_key.setter
    def api_key(self, value: str | None) -> None:
        self.transport.api_key = value or None

    def close(self) -> None:
        """Close the connection pool and stop the client's event-loop thread (idempotent; a later call reopens
        them). Also done when the critic is garbage-collected and at interpreter exit."""
        self.transport.close()

    def __enter__(self) -> HTTPCritic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests (coroutines on the transport's loop)

    async def chat(self, sem: asyncio.Semaphore, messages: list[dict], *, temperature: float) -> str:
        """One chat completion (OpenAI-format ``messages``); returns the answer text ('' when the server gave none).

        ``sem``: the call's bound on requests in flight (``self.transport.limit()``)."""
        return (await self.chat_reply(sem, messages, temperature=temperature)).text

    async def chat_reply(
        self,
        sem: asyncio.Semaphore,
        messages: list[dict],
        *,
        temperature: float,
        extra: dict[str, Any] | None = None,
    ) -> Reply:
        """One chat completion with its logprobs and finish reason; ``extra`` fields are added to the body."""
        fields = {
            "messages": messages,
            "max_tokens": self.config.max_tokens,
            "temperature": temperature,
            **(extra or {}),
            **self.config.extra_body,
        }
        return await self.transport.chat(sem, fields)

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
        sem: asyncio.Semaphore,
        messages: list[dict],
        *,
        temperature: float,
        extra: dict[str, Any] | None = None,
    ) -> tuple[Reply | None, str | None]:
        """``(reply, None)``, or ``(None, why)`` for the failures that cost only this conversation: replies that
        stayed malformed through every retry, and HTTP 413 (this request is over the server's limits)."""
        try:
            return await self.chat_reply(sem, messages, temperature=temperature, extra=extra), None
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

    async def _complete_job(self, sem: asyncio.Semaphore, job: Job, messages: list) -> Completion:
        start = now()
        reply, parsed, attempt = None, None, 0
        extra = self._job_fields(job)
        for attempt in range(1 + self.config.parse_retries):
            temperature = self.config.temperature if attempt == 0 else self.config.retry_temperature
            if attempt:
                self.stats["parse_retries"] += 1
            reply, why = await self._chat_or_reason(sem, messages, temperature=temperature, extra=extra)
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

    async def _complete(self, sem: asyncio.Semaphore, jobs: list[Job]) -> list[Completion]:
        if not jobs:
            return []
        cache: dict = {}
        fmt, q = self.config.image_format, self.config.jpeg_quality
        # image encoding is CPU work: keep it off the event loop (other calls share it)
        payloads = await asyncio.to_thread(lambda: [to_openai_messages(j.messages, fmt, q, cache) for j in jobs])
        out = await gather_all([self._complete_job(sem, j, p) for j, p in zip(jobs, payloads)])
        self.stats["jobs"] += len(jobs)
        return out

    async def _judge(
        self, requests: list[CriticRequest], plan_jobs: list[Job]
    ) -> tuple[list[Job], list[Completion], dict[int, Completion]]:
        """Plans, then judgements, on the transport's loop: ``(jobs, completions, plans)``."""
        sem = self.transport.limit()
        plans = dict(zip((j.index for j in plan_jobs), await self._complete(sem, plan_jobs)))
        jobs = await asyncio.to_thread(self.judgement_jobs, requests, plans)
        return jobs, await self._complete(sem, jobs), plans

    async def ascore(self, requests: Sequence[CriticRequest]) -> list[CriticResult]:
        """Coroutine version of :meth:`score` (from any event loop; the requests run on the client's own loop)."""
        requests = list(requests)
        plan_jobs = self.plan_jobs(requests)  # validates the requests
        jobs, comps, plans = await self.transport.arun(lambda: self._judge(requests, plan_jobs))
        return self.assemble(requests, jobs, comps, plans)

    def score(self, requests: Sequence[CriticRequest]) -> list[CriticResult]:
        """Judge every request (blocking). Missing scores are ``None``; unreachable endpoints raise.

        Safe from any thread, several at once, and from inside a running event loop; every call shares the
        critic's connection pool.

        Raises:
            CriticEndpointError: an endpoint stayed unreachable / failing after ``max_retries`` retries.
            CriticTimeoutError: every attempt of a request timed out.
            CriticRequestError: the server rejected a request (e.g. wrong API key or model name); not for HTTP 413,
                which costs only that judgement.
        """
        requests = list(requests)
        plan_jobs = self.plan_jobs(requests)  # validates the requests
        jobs, comps, plans = self.transport.run(lambda: self._judge(requests, plan_jobs))
        return self.assemble(requests, jobs, comps, plans)

    # ---- free-form completions (no prompts, no parsing)

    async def _complete_free(self, conversations: list[list[dict]], temperature: float | None) -> list[str]:
        fmt, q, max_px = self.config.image_format, self.config.jpeg_quality, self.config.max_image_pixels
        cache: dict = {}

        def payloads() -> list[list]:  # image preparation and encoding are CPU work: off the event loop
            return [to_openai_messages(prepare_messages(c, max_px), fmt, q, cache) for c in conversations]

        payload = await asyncio.to_thread(payloads)
        temp = self.config.temperature if temperature is None else temperature
        sem = self.transport.limit()

        async def one(p: list) -> str:
            reply, _ = await self._chat_or_reason(sem, p, temperature=temp)
            return "" if reply is None else reply.text  # no reply: an empty answer, which no parser accepts

        return await gather_all([one(p) for p in payload])

    async def acomplete(self, conversations: Sequence[list[dict]], *, temperature: float | None = None) -> list[str]:
        """Coroutine version of :meth:`complete`."""
        if not conversations:
            return []
        convs = list(conversations)
        return await self.transport.arun(lambda: self._complete_free(convs, temperature))

    def complete(self, conversations: Sequence[list[dict]], *, temperature: float | None = None) -> list[str]:
        """The endpoint's answer text to each conversation (neutral messages, PIL images inline), in order.

        Sent concurrently (at most ``max_concurrency`` in flight) with the client's retries, endpoint balancing,
        timeouts, image preparation (``max_image_pixels``) and encoding; ``max_tokens`` and ``extra_body`` from the
        config. ``temperature`` defaults to the config's. Nothing is parsed: an empty answer is ``""``, and so is a
        conversation whose replies stayed malformed through every retry or that the server refused as too large
        (HTTP 413; logged and counted in ``stats["reply_failures"]``). Blocking, safe from several threads at once
        and from inside a running event loop.

        Raises:
            CriticEndpointError, CriticTimeoutError, CriticRequestError: as :meth:`score`.
        """
        if not conversations:
            return []
        convs = list(conversations)
        return self.transport.run(lambda: self._complete_free(convs, temperature))
