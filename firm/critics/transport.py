"""The wire under the HTTP critic: one long-lived client for OpenAI-compatible chat-completions endpoints.

:class:`ChatTransport` owns one asyncio event loop, run on a daemon thread it starts at first use, and one
``httpx.AsyncClient`` (one connection pool) created on that loop. Every call of its owner (``HTTPCritic.score``,
``complete``, and their coroutines) runs its requests there, so keep-alive connections are reused from one call, or
one rollout chunk, to the next instead of being opened anew for each. Blocking calls submit their coroutine to the
loop (:meth:`ChatTransport.run`) and may come from any thread, several at once (the RL loop scores on worker
threads), and from inside a running event loop; coroutine calls from another loop await the same work
(:meth:`ChatTransport.arun`).

What one request does (:meth:`ChatTransport.request`): it goes to the endpoint with the fewest requests in flight
(round-robin among ties) and has a timeout. Connection errors, timeouts, HTTP 408/429/5xx and structurally bad
replies (a 200 whose body is not JSON, or not a chat completion) are retried with exponential backoff, on another
endpoint when there is one; a ``Retry-After`` header lengthens the wait to what the server asked, up to
``retry_after_max_s``. When the budget is spent the call raises :class:`CriticEndpointError` (or
:class:`CriticTimeoutError`, :class:`CriticReplyError`) naming the endpoint(s); a request the server rejects (other
4xx) raises :class:`CriticRequestError` at once. Each call bounds its own requests in flight with the semaphore from
:meth:`ChatTransport.limit` (``max_concurrency``), as before the client was shared.

Lifecycle: :meth:`ChatTransport.close` (or ``with``, or garbage collection, or interpreter exit) closes the pool,
stops the loop and joins its thread; a later call starts them again. A transport pickles without its loop (a new
one starts where it is used), and a forked child starts its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import functools
import logging
import math
import os
import random
import threading
import weakref
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

log = logging.getLogger(__name__)

T = TypeVar("T")

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


_on_loop = threading.local()  # .client: the connection pool of the loop running on this thread


def _new_client(keepalive: int) -> httpx.AsyncClient:
    # Each call's semaphore bounds its requests in flight (as before the client was shared), so the pool itself is
    # unbounded; it keeps up to ``keepalive`` idle connections open between calls.
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=keepalive))


class _LoopThread:
    """An event loop running forever on a daemon thread, with one ``httpx.AsyncClient`` made on it.

    Holds no reference to its transport (``make_client`` must not either), so that the transport's finalizer can
    stop it when the transport is collected."""

    def __init__(self, name: str, make_client: Callable[[], httpx.AsyncClient]) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.client: httpx.AsyncClient | None = None
        self._closing = False
        self._lock = threading.Lock()  # orders submissions against stop()
        ready = threading.Event()
        failed: list[BaseException] = []

        def main() -> None:
            asyncio.set_event_loop(self.loop)
            try:
                try:
                    self.client = _on_loop.client = make_client()
                except BaseException as e:  # noqa: BLE001 - re-raised in the starting thread
                    failed.append(e)
                    return
                finally:
                    ready.set()
                self.loop.run_forever()
                self.loop.run_until_complete(self._drain())
            finally:
                asyncio.set_event_loop(None)
                self.loop.close()

        self.thread = threading.Thread(target=main, name=name, daemon=True)
        self.thread.start()
        ready.wait()
        if failed:
            self.thread.join()
            raise failed[0]

    async def _drain(self) -> None:
        """After the loop stopped: cancel what still runs, close the pool, the async generators and the executor."""
        me = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks() if t is not me]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.client is not None:
            await self.client.aclose()
        await self.loop.shutdown_asyncgens()
        await self.loop.shutdown_default_executor()

    @property
    def alive(self) -> bool:
        return self.pid == os.getpid() and not self._closing and self.thread.is_alive()

    def submit(self, coro: Awaitable[T]) -> concurrent.futures.Future[T]:
        with self._lock:
            if self._closing:
                coro.close()  # type: ignore[attr-defined]
                raise RuntimeError("the HTTP client was closed while the call was starting")
            return asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]

    def stop(self) -> None:
        """Stop the loop (its pool is closed on the way out) and join its thread; idempotent; no-op when forked."""
        if self.pid != os.getpid():
            return
        with self._lock:
            if self._closing:
                return
            self._closing = True
            try:
                self.loop.call_soon_threadsafe(self.loop.stop)
            except RuntimeError:  # the loop is already closed
                return
        if threading.current_thread() is not self.thread:
            self.thread.join()


class ChatTransport:
    """A long-lived client for one or more OpenAI-compatible API base URLs: retries, timeouts, endpoint balancing,
    the API key, and one event loop with one connection pool shared by every call (see the module docstring).

    Args:
        endpoints: API base URLs (``host:port``, ``http://host:port/v1``, ...).
        model: model name sent with each chat request; None: the first id listed by ``GET /models``, on first use.
        api_key: sent as ``Authorization: Bearer ...`` when given.
        api_key_env: the variable the key came from, named in the error message of an HTTP 401/403.
        max_concurrency: requests in flight at once per :meth:`limit` (one per call of the owner).
        timeout_s: limit for one HTTP request (connect + generate + read).
        max_retries: retries after a connection error, timeout, HTTP 408/429/5xx or a malformed reply.
        backoff_s: delay before the first retry; doubles at each retry (+-25% jitter), up to ``backoff_max_s``.
        retry_after_max_s: longest wait honoured from a ``Retry-After`` header.
        name: the loop thread's name.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        model: str | None = None,
        api_key: str | None = None,
        api_key_env: str = "",
        max_concurrency: int = 32,
        timeout_s: float = 120.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 10.0,
        retry_after_max_s: float = 60.0,
        name: str = "firm-http",
    ) -> None:
        if not endpoints:
            raise ValueError("give at least one endpoint URL")
        self.endpoints = [normalize_endpoint(u) for u in endpoints]
        self.model = model
        self.api_key = api_key or None
        self.api_key_env = api_key_env
        self.max_concurrency = max_concurrency
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_max_s = retry_after_max_s
        self.name = name
        self._init_runtime()

    @classmethod
    def from_config(cls, config: Any, *, name: str, api_key: str | None = None) -> ChatTransport:
        """A transport from a client's config with the usual fields (``endpoints``, ``model``, ``api_key_env``,
        ``max_concurrency``, ``timeout_s``, ``max_retries``, ``backoff_s``, ``backoff_max_s``, ``retry_after_max_s``;
        the HTTP critic's and the VLM judges'). The key: ``api_key``, else the variable ``api_key_env`` names."""
        env = config.api_key_env
        return cls(
            config.endpoints,
            model=config.model,
            api_key=api_key or (os.environ.get(env) if env else None) or None,
            api_key_env=env,
            max_concurrency=config.max_concurrency,
            timeout_s=config.timeout_s,
            max_retries=config.max_retries,
            backoff_s=config.backoff_s,
            backoff_max_s=config.backoff_max_s,
            retry_after_max_s=config.retry_after_max_s,
            name=name,
        )

    def _init_runtime(self) -> None:
        self.inflight = dict.fromkeys(self.endpoints, 0)  # guarded by _lock
        self._rr = 0
        self._lock = threading.Lock()
        self._loop: _LoopThread | None = None
        self._finalizer: weakref.finalize | None = None

    # ---- pickling: the loop, its thread and the locks stay behind; a new loop starts at first use

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for k in ("inflight", "_rr", "_lock", "_loop", "_finalizer"):
            state.pop(k, None)
        state["api_key"] = None  # never written into a pickle: the copy reads it again from api_key_env
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.api_key = (os.environ.get(self.api_key_env) or None) if self.api_key_env else None
        self._init_runtime()

    # ---- the loop

    def _running(self) -> _LoopThread:
        """The loop thread, started on first use (again after :meth:`close`, or in a forked child)."""
        loop = self._loop
        if loop is not None and loop.alive:
            return loop
        if loop is not None and loop.pid != os.getpid():
            # a forked child: the parent's loop thread may have held the lock at the fork, and it never runs here
            self._lock = threading.Lock()
        with self._lock:
            loop = self._loop
            if loop is None or not loop.alive:
                if loop is not None and loop.pid != os.getpid():  # forked: the parent's loop thread is not here
                    if self._finalizer is not None:
                        self._finalizer.detach()
                    self.inflight = dict.fromkeys(self.endpoints, 0)
                loop = _LoopThread(self.name, functools.partial(_new_client, max(32, self.max_concurrency)))
                self._loop = loop
                # Closes the pool and joins the thread when the transport is collected or at interpreter exit.
                self._finalizer = weakref.finalize(self, loop.stop)
            return loop

    @property
    def started(self) -> bool:
        """Whether the loop thread is running (it starts at the first call)."""
        return self._loop is not None and self._loop.alive

    @property
    def thread(self) -> threading.Thread | None:
        """The loop thread (None before the first call)."""
        return None if self._loop is None else self._loop.thread

    def run(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run the coroutine made by ``make()`` on the transport's loop and wait for its result (blocking).

        Works from any thread, several at once, and from inside another running event loop. An interrupt while
        waiting (Ctrl-C) cancels the call's requests."""
        loop = self._running()
        if threading.current_thread() is loop.thread:
            raise RuntimeError("a blocking HTTP critic call from its own event loop; await the coroutine instead")
        fut = loop.submit(make())
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    async def arun(self, make: Callable[[], Awaitable[T]]) -> T:
        """Await the coroutine made by ``make()`` on the transport's loop, from any event loop (cancellation
        propagates)."""
        loop = self._running()
        if asyncio.get_running_loop() is loop.loop:
            return await make()
        return await asyncio.wrap_future(loop.submit(make()))

    def close(self) -> None:
        """Close the connection pool, stop the loop and join its thread. Idempotent; a later call starts anew.

        Calls still running on other threads are cancelled (they raise ``CancelledError``)."""
        with self._lock:
            finalizer, self._finalizer, self._loop = self._finalizer, None, None
        if finalizer is not None:
            finalizer()

    def __enter__(self) -> ChatTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests (on the loop)

    @property
    def client(self) -> httpx.AsyncClient:
        """The connection pool; only for coroutines running on the transport's loop (see :meth:`run`)."""
        client = getattr(_on_loop, "client", None)
        if client is None:
            raise RuntimeError("the HTTP client is used only on its transport's event loop: go through run()/arun()")
        return client

    def limit(self) -> asyncio.Semaphore:
        """A new bound of ``max_concurrency`` requests in flight, for one call's requests."""
        return asyncio.Semaphore(self.max_concurrency)

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h

    def _pick(self, avoid: set[str]) -> str:
        """The endpoint with the fewest requests in flight (round-robin among ties), avoiding failed ones; counts
        the request as in flight there (the caller calls :meth:`_done` when it ends)."""
        pool = [e for e in self.endpoints if e not in avoid] or self.endpoints
        with self._lock:
            start = self._rr % len(pool)
            self._rr += 1
            rotated = pool[start:] + pool[:start]
            endpoint = min(rotated, key=lambda e: self.inflight[e])
            self.inflight[endpoint] += 1
        return endpoint

    def _done(self, endpoint: str) -> None:
        with self._lock:
            self.inflight[endpoint] -= 1

    async def _sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def _delay(self, retry: int) -> float:
        d = min(self.backoff_s * (2**retry), self.backoff_max_s)
        return d * random.uniform(0.75, 1.25)

    async def request(
        self,
        sem: asyncio.Semaphore,
        method: str,
        path: str,
        body: Any = None,
        read: Callable[[Any], Any] | None = None,
    ) -> Any:
        """One API call with retries; returns the decoded JSON body, or ``read(body)`` (which raises
        :class:`_BadReply` for a reply to retry). ``sem`` bounds the requests in flight (see :meth:`limit`)."""
        client = self.client
        tried: list[str] = []
        last: str = ""
        timeouts = bad_replies = 0
        last_was_bad_reply = False
        hint: float | None = None  # the server's Retry-After of the last answer, in seconds
        for attempt in range(1 + self.max_retries):
            if attempt:
                delay = self._delay(attempt - 1)
                if hint is not None:  # the server said how long to wait: at least that, up to retry_after_max_s
                    delay = max(delay, min(hint, self.retry_after_max_s))
                hint = None
                await self._sleep(delay)
            async with sem:
                endpoint = self._pick(set(tried[-1:]) if len(self.endpoints) > 1 else set())
                tried.append(endpoint)
                url = endpoint + path
                try:
                    resp = await client.request(method, url, json=body, headers=self.headers(), timeout=self.timeout_s)
                except httpx.TimeoutException:
                    timeouts += 1
                    last = f"{url}: no answer within {self.timeout_s:g} s"
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
                    f"(${self.api_key_env}, or --api-key on the command line). Server said: {resp.text[:300]}",
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
        n = 1 + self.max_retries
        if last_was_bad_reply:
            raise CriticReplyError(
                f"critic endpoint {names}: no usable reply after {n} attempts ({bad_replies} malformed; last: {last})",
                tried,
            )
        if timeouts == n:
            raise CriticTimeoutError(
                f"critic endpoint {names}: all {n} attempts timed out after {self.timeout_s:g} s each; "
                "raise timeout_s, lower max_concurrency, or check the server's load",
                tried,
            )
        raise CriticEndpointError(
            f"critic endpoint {names} failed after {n} attempts (last: {last}); check that the server is running "
            "and the URL is right (e.g. http://127.0.0.1:8000/v1)",
            tried,
        )

    async def resolve_model(self, sem: asyncio.Semaphore) -> str:
        """The model name: the configured one, or the first id ``GET /models`` lists (asked once)."""
        if self.model is None:
            try:
                data = await self.request(sem, "GET", "/models")
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

    async def chat(self, sem: asyncio.Semaphore, fields: dict[str, Any]) -> Reply:
        """One ``POST /chat/completions`` whose body is ``{"model": ..., **fields}``; returns its first choice.

        Raises:
            CriticReplyError: the replies stayed malformed through every retry.
            CriticEndpointError, CriticTimeoutError, CriticRequestError: as :meth:`request`.
        """
        body = {"model": await self.resolve_model(sem), **fields}
        return await self.request(sem, "POST", "/chat/completions", body, read=chat_reply)


async def gather_all(coros: list[Awaitable[T]]) -> list[T]:
    """All results in order; the first failure cancels the others (and waits for them) before it propagates."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
