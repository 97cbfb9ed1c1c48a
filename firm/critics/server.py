"""`firm critic serve`: a local critic behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (LitServe).

An OpenAI-faithful subset: ``model`` (another name than the served one: HTTP 404 ``model_not_found``), ``messages``,
``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``stop``, ``seed``, ``logprobs`` /
``top_logprobs``, ``response_format`` of type ``text``, ``user``; answers carry ``finish_reason`` (``length`` when
cut at the token budget) and ``usage`` with ``prompt_tokens``. Any other request field is refused with HTTP 400
naming it (nothing is ignored silently), and so are ``n > 1`` and ``stream``. Every error is in OpenAI's format
``{"error": {"message", "type", "param", "code"}}`` and never echoes the request.

Requests are validated before they are queued (malformed JSON, unknown roles, images that are not base64 data
URLs, any parameter out of range, NaN and infinities included: HTTP 400 with the reason). Then, before any model
work and for that request only: a prompt whose text is longer than ``max_prompt_tokens`` tokens gets HTTP 413 (a
long text would otherwise hold the worker in prefill for minutes, the cost growing with the square of its length);
an image whose bytes are not PNG, JPEG or WEBP gets HTTP 415 (checked from the magic bytes; no other Pillow plugin
ever sees client bytes, so no TIFF, ICO, PCX, TGA or EPS/Ghostscript); an image larger than ``max_image_pixels``
HTTP 413 (checked from the image header, before decoding the pixels); an image that does not decode HTTP 400. A
request body over ``max_request_bytes`` gets HTTP 413 (read no further). Valid requests are
batched dynamically (up to ``max_batch_size``, waiting at most ``batch_timeout`` s to fill a batch) and answered by
one batched ``generate`` per group of equal settings. ``GET /v1/models`` lists the served name; ``GET /health``
(open without the key) says when the model is loaded. There is no ``/docs`` or ``/openapi.json``.
The server binds 127.0.0.1 unless told otherwise; with an API key it expects ``Authorization: Bearer KEY`` (or
``X-API-Key: KEY``) on every request. On SIGTERM or SIGINT it stops every process it started (HTTP servers,
inference workers) and frees the port (:func:`serve`).

Only text and ``data:image/...;base64`` image parts are accepted (the server never fetches URLs).
"""

# No `from __future__ import annotations` here: LitServe and FastAPI read the request type from the annotation.

import base64
import binascii
import hmac
import logging
import multiprocessing as mp
import os
import re
import signal
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import litserve as ls
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from firm.images import MAX_IMAGE_PIXELS, ImageTooLargeError, UnsupportedImageError
from firm.images import decode as decode_image

log = logging.getLogger(__name__)

_DATA_URL = re.compile(r"^data:image/(?P<fmt>[a-zA-Z0-9.+-]+);base64,(?P<data>.*)$", re.DOTALL)
# The image formats the server decodes (as the shard reader): declared in the data URL, and checked from the bytes.
IMAGE_MIME_TYPES = ("png", "jpeg", "jpg", "webp")


class ImageURL(BaseModel):
    url: str
    detail: str | None = None

    @field_validator("url")
    @classmethod
    def _data_url(cls, v: str) -> str:
        m = _DATA_URL.match(v)
        if not m:
            shown = v[:60] + ("..." if len(v) > 60 else "")
            raise ValueError(f"image_url must be a data:image/<format>;base64,<data> URL, got {shown!r}")
        if m.group("fmt").lower() not in IMAGE_MIME_TYPES:
            raise ValueError(f"image format {m.group('fmt')!r} is not accepted; send png, jpeg or webp")
        try:
            base64.b64decode(m.group("data"), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("image_url data is not valid base64") from None
        return v


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _has_payload(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs a 'text' field")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs an 'image_url' field")
        return self


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] = Field(min_length=1)


# OpenAI request fields this server reads, and those it accepts only at their no-op value (some clients send them).
SUPPORTED_FIELDS = (
    "model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stream", "logprobs",
    "top_logprobs", "seed", "stop", "response_format", "user",
)  # fmt: skip
NOOP_VALUES = {"frequency_penalty": (0, 0.0, None), "presence_penalty": (0, 0.0, None), "logit_bias": (None, {})}
MAX_STOP_STRINGS = 4  # as OpenAI
MAX_STOP_CHARS = 256  # longest stop string accepted
MAX_TOP_LOGPROBS = 20  # as OpenAI


class ChatCompletionBody(BaseModel):
    """The subset of the OpenAI chat-completions request this server implements; any other field is refused (HTTP
    400 naming it), so that nothing a client asks for is silently ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int | None = 1
    stream: bool | None = False
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    stop: str | list[str] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None  # the caller's end-user id: accepted, not used

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in SUPPORTED_FIELDS and k not in NOOP_VALUES]
            noop = [k for k, ok in NOOP_VALUES.items() if k in data and data[k] not in ok]
            bad = [str(k)[:40] for k in unknown + noop][:8]
            if bad:
                raise ValueError(
                    f"unsupported parameter(s): {', '.join(bad)}; firm critic serve implements "
                    f"{', '.join(SUPPORTED_FIELDS)} (frequency_penalty / presence_penalty only at 0, logit_bias empty)"
                )
        return data

    @model_validator(mode="after")
    def _supported(self) -> "ChatCompletionBody":
        if self.n not in (None, 1):
            raise ValueError("n must be 1: this server returns one answer per request")
        if self.stream:
            raise ValueError("stream=true is not supported by firm critic serve")
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must be from the user (or system), not the assistant")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP_STRINGS or any(not x or len(x) > MAX_STOP_CHARS for x in stops):
            raise ValueError(
                f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_CHARS} chars"
            )
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError(
                "response_format: only {'type': 'text'} is supported; this server does not constrain decoding "
                "(serve the critic with vLLM for JSON-schema or regex structured outputs)"
            )
        return self

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


# Defaults of the request limits: images up to firm.images.MAX_IMAGE_PIXELS (4096 x 4096; the critic downscales larger
# ones anyway), request bodies up to 64 MiB (several such images as base64 PNG).
MAX_REQUEST_BYTES = 64 * 2**20
# Default cap on the text tokens of one prompt. FIRM's built-in critic templates are under 500 tokens; 8192 leaves
# room for long instructions, checklists and custom templates while bounding prefill (its cost grows with the square).
MAX_PROMPT_TOKENS = 8192


@dataclass
class _Invalid:
    """A request that passed schema validation but cannot be served (e.g. an image that does not decode)."""

    message: str
    status: int = 400
    param: str | None = None  # the request field at fault
    code: str | None = None  # OpenAI's machine-readable error code, e.g. model_not_found


# OpenAI's error types by HTTP status (https://platform.openai.com/docs/guides/error-codes).
ERROR_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}
MAX_ERROR_CHARS = 2000  # an error message never echoes a request: it is cut at this length


def error_body(status: int, message: str, *, param: str | None = None, code: str | int | None = None) -> dict:
    """An OpenAI-format error: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "..."
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _decode_image(url: str, max_pixels: int | None = None) -> Image.Image:
    """The RGB image of a ``data:`` URL, decoded by firm.images (whitelisted formats, pixel cap from the header)."""
    data = base64.b64decode(_DATA_URL.match(url).group("data"))
    return decode_image(data, max_pixels, limit_name="--max-image-pixels").convert("RGB")


def _finite(x: float) -> float:
    """A log-probability as JSON can write it: -inf (a token the model gives no mass) becomes -9999.0, as vLLM."""
    return x if x > -9999.0 else -9999.0


def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table, which byte-level BPE vocabularies (Qwen's) are written in:
    bytes 33..126, 161..172 and 174..255 stand for themselves, the other 68 are mapped to code points 256 and up."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in kept:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    try:
        import json

        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except (ValueError, AttributeError):
        return False
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders", []) or []]
    return "ByteLevel" in kinds


class CriticAPI(ls.LitAPI):
    """LitServe API: OpenAI chat-completions in, answers of a :class:`~firm.critics.local.LocalCritic` out."""

    def __init__(
        self,
        model_dir: str,
        *,
        served_name: str,
        api_key: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 1024,
        max_images: int = 8,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        max_prompt_tokens: int | None = MAX_PROMPT_TOKENS,
        max_batch_size: int = 8,
        batch_timeout: float = 0.05,
    ) -> None:
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/v1/chat/completions")
        self.model_dir = model_dir
        self.served_name = served_name
        self.api_key = api_key
        self.device_choice = device
        self.dtype_choice = dtype
        self.max_new_tokens = max_new_tokens
        self.max_images = max_images
        self.max_image_pixels = max_image_pixels
        self.max_prompt_tokens = max_prompt_tokens
        self.tokenizer: Any = None  # set by setup()
        self.max_token_chars = 1  # the longest vocabulary entry, in characters (set by setup())
        self._byte_decoder: dict[str, int] | None = None  # byte-level BPE symbol -> byte (set by setup())

    def setup(self, device: str) -> None:
        from firm.critics.local import LocalCritic

        chosen = self.device_choice if self.device_choice != "auto" else (device or "auto")
        config = LocalCritic.Config(
            model=self.model_dir,
            device=chosen,
            dtype=self.dtype_choice,
            batch_size=self.max_batch_size,
            max_new_tokens=self.max_new_tokens,
        )
        self.critic = LocalCritic(config)
        self.set_tokenizer(self.critic.tokenizer)
        log.info("critic %s loaded on %s", self.model_dir, self.critic.device)

    def set_tokenizer(self, tokenizer: Any) -> None:
        """The tokenizer that counts prompt tokens. Each token spells at most ``max_token_chars`` characters (the
        longest vocabulary entry; a byte-level entry is never shorter than the text it decodes to), so a text longer
        than ``max_prompt_tokens * max_token_chars`` characters is over the cap without being tokenized."""
        self.tokenizer = tokenizer
        self.max_token_chars = max((len(t) for t in tokenizer.get_vocab()), default=1) or 1
        self._byte_decoder = _byte_decoder() if _is_byte_level(tokenizer) else None

    def prompt_problem(self, texts: list[str]) -> str | None:
        """Why the prompt made of ``texts`` is over ``max_prompt_tokens`` (None when it fits or there is no cap)."""
        cap = self.max_prompt_tokens
        if not cap or self.tokenizer is None:
            return None
        chars = sum(len(t) for t in texts)
        if chars <= cap:  # a token spells at least one character
            return None
        if chars > cap * self.max_token_chars:
            n = f"{chars} characters, more than {cap} tokens"
        else:
            tokens = sum(len(self.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts if t)
            if tokens <= cap:
                return None
            n = f"{tokens} tokens"
        return f"the prompt's text is {n}; this server accepts at most {cap} (--max-prompt-tokens)"

    def authorize(self, request: Request) -> None:
        """FastAPI dependency: with an API key set, require it as a Bearer token or an X-API-Key header."""
        if not self.api_key or request.url.path == "/health":  # liveness checks stay open
            return
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise HTTPException(status_code=401, detail="missing or wrong API key: send 'Authorization: Bearer KEY'")

    def decode_request(self, request: ChatCompletionBody) -> Any:
        if request.model is not None and request.model != self.served_name:
            return _Invalid(
                f"The model `{request.model[:100]}` does not exist; this server serves `{self.served_name}` "
                "(GET /v1/models)",
                status=404,
                param="model",
                code="model_not_found",
            )
        # Cheap checks first, before any image is decoded: the number of images and the prompt's length.
        texts, n_images = [], 0
        for m in request.messages:
            if isinstance(m.content, str):
                texts.append(m.content)
                continue
            for p in m.content:
                if p.type == "text":
                    texts.append(p.text)
                else:
                    n_images += 1
        if n_images > self.max_images:
            return _Invalid(f"{n_images} images in one request; this server accepts at most {self.max_images}")
        too_long = self.prompt_problem(texts)
        if too_long:
            return _Invalid(too_long, status=413)
        conv = []
        for i, m in enumerate(request.messages):
            parts = [{"type": "text", "text": m.content}] if isinstance(m.content, str) else []
            if not isinstance(m.content, str):
                for j, p in enumerate(m.content):
                    if p.type == "text":
                        parts.append({"type": "text", "text": p.text})
                        continue
                    try:
                        parts.append({"type": "image", "image": _decode_image(p.image_url.url, self.max_image_pixels)})
                    except ImageTooLargeError as e:
                        return _Invalid(f"messages[{i}].content[{j}]: {e}", status=413)
                    except UnsupportedImageError as e:
                        return _Invalid(f"messages[{i}].content[{j}]: {e}", status=415)
                    except Exception as e:  # noqa: BLE001 - any decoding failure is the client's bad image
                        why = "not an image format PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
                        return _Invalid(f"messages[{i}].content[{j}]: image does not decode ({why})")
            conv.append({"role": m.role, "content": parts})
        limit = request.max_completion_tokens or request.max_tokens or self.max_new_tokens
        temperature = float(request.temperature or 0.0)
        return {
            "conversation": conv,
            "settings": (  # requests with equal settings share one generate call
                temperature,
                min(limit, self.max_new_tokens),
                request.top_p,
                tuple(request.stop_strings()),
                request.seed if temperature > 0 else None,  # greedy answers do not depend on a seed
                (request.top_logprobs or 0) if request.logprobs else None,
            ),
            "model": self.served_name,
        }

    def predict(self, x: Any) -> Any:
        items = x if self.max_batch_size > 1 else [x]
        outputs: list[Any] = [it if isinstance(it, _Invalid) else None for it in items]
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            if not isinstance(it, _Invalid):
                groups.setdefault(it["settings"], []).append(i)
        for (temperature, max_new, top_p, stop, seed, logprobs), idx in groups.items():  # one generate per setting
            t0 = time.perf_counter()
            gens = self.critic.generate(
                [items[i]["conversation"] for i in idx],
                temperature=temperature,
                max_new_tokens=max_new,
                top_p=top_p,
                stop=list(stop),
                seed=seed,
                logprobs=logprobs,
            )
            dt = time.perf_counter() - t0
            for i, g in zip(idx, gens):
                outputs[i] = {
                    "text": g.text,
                    "finish_reason": g.finish_reason,
                    "prompt_tokens": g.prompt_tokens,
                    "completion_tokens": len(g.ids),
                    "logprobs": None if g.logprobs is None else self.logprobs_content(g.logprobs),
                    "model": items[i]["model"],
                    "s": dt,
                }
        return outputs if self.max_batch_size > 1 else outputs[0]

    # ---- logprobs in OpenAI's format

    def _token_text_bytes(self, token_id: int) -> tuple[str, list[int]]:
        """A token's text and its exact UTF-8 bytes (a byte-level BPE piece of a multi-byte character has bytes that
        are not a whole character; its text is then the replacement character, as OpenAI and vLLM write it)."""
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(piece, str) and self._byte_decoder is not None and all(c in self._byte_decoder for c in piece):
            raw = bytes(self._byte_decoder[c] for c in piece)
        else:
            raw = self.tokenizer.decode([token_id]).encode("utf-8")
        return raw.decode("utf-8", "replace"), list(raw)

    def logprobs_content(self, tokens: list) -> list[dict]:
        """``choices[0].logprobs.content`` for the kept tokens of an answer (special tokens left out: the answer
        text does not show them)."""
        special = set(getattr(self.tokenizer, "all_special_ids", []) or [])
        out = []
        for t in tokens:
            if t.id in special:
                continue
            text, raw = self._token_text_bytes(t.id)
            top = []
            for tid, lp in t.top:
                alt_text, alt_raw = self._token_text_bytes(tid)
                top.append({"token": alt_text, "logprob": _finite(lp), "bytes": alt_raw})
            out.append({"token": text, "logprob": _finite(t.logprob), "bytes": raw, "top_logprobs": top})
        return out

    def encode_response(self, output: Any) -> Any:
        if isinstance(output, _Invalid):
            body = error_body(output.status, output.message, param=output.param, code=output.code)
            return JSONResponse(status_code=output.status, content=body)
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": output["text"]},
            "logprobs": None if output["logprobs"] is None else {"content": output["logprobs"], "refusal": None},
            "finish_reason": output["finish_reason"],
        }
        prompt, completion = output["prompt_tokens"], output["completion_tokens"]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": output["model"],
            "choices": [choice],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }


def build_server(
    model_dir: str,
    *,
    revision: str | None = None,
    served_name: str | None = None,
    api_key: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    max_new_tokens: int = 1024,
    max_images: int = 8,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    max_request_bytes: int | None = MAX_REQUEST_BYTES,
    max_prompt_tokens: int | None = MAX_PROMPT_TOKENS,
    max_batch_size: int = 8,
    batch_timeout: float = 0.05,
    workers_per_device: int = 1,
    timeout: float = 600.0,
) -> ls.LitServer:
    """A LitServer serving ``model_dir`` at ``/v1/chat/completions`` (plus ``/v1/models`` and ``/health``).

    ``max_image_pixels`` (width x height of one image), ``max_request_bytes`` (request body) and
    ``max_prompt_tokens`` (text tokens of one prompt) bound what a client can make the server decode, hold and
    compute; None lifts a limit. The app has no ``/docs`` or ``/openapi.json``. Run it with :func:`serve`.
    """
    from fastapi import Depends

    from firm.critics.local import critic_checkpoint

    given = Path(model_dir).expanduser()
    path = critic_checkpoint(model_dir, revision, "firm critic serve")  # a directory, or a hub id fetched once
    name = served_name or (given.resolve().name if given.is_dir() else model_dir)
    api = CriticAPI(
        str(path),
        served_name=name,
        api_key=api_key,
        device=device,
        dtype=dtype,
        max_new_tokens=max_new_tokens,
        max_images=max_images,
        max_image_pixels=max_image_pixels,
        max_prompt_tokens=max_prompt_tokens,
        max_batch_size=max_batch_size,
        batch_timeout=batch_timeout,
    )
    accelerator = "cpu" if device == "cpu" else "auto"
    server = ls.LitServer(
        api,
        accelerator=accelerator,
        workers_per_device=workers_per_device,
        timeout=timeout,
        max_payload_size=max_request_bytes,  # bytes; larger bodies get HTTP 413 while they are being read
        disable_openapi_url=True,  # no /openapi.json, and so no /docs or /redoc (FastAPI needs the schema for them)
    )

    async def list_models() -> dict:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "firm"}]}

    server.app.add_api_route("/v1/models", list_models, methods=["GET"], dependencies=[Depends(api.authorize)])
    server.app.add_exception_handler(RequestValidationError, validation_error_handler)
    server.app.add_exception_handler(StarletteHTTPException, http_error_handler)
    return server


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """HTTP 400 in OpenAI's error format, naming each invalid field (OpenAI and vLLM answer 400, not FastAPI's 422).
    Nothing of the request is echoed (FastAPI's own handler returns the invalid input, a whole image included, and
    an input such as NaN cannot be written as JSON: the client got HTTP 500 instead of the reason)."""
    errors = exc.errors()
    parts, param = [], None
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        param = param or loc or None
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg[:300]}" if loc else msg[:300])
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    message = "invalid request: " + "; ".join(parts) + more
    return JSONResponse(status_code=400, content=error_body(400, message, param=param))


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Every other error (401, 404 of an unknown path, 413 of a body over the limit, 503, 504) in OpenAI's format."""
    message = exc.detail if isinstance(exc.detail, str) else "error"
    code = "invalid_api_key" if exc.status_code == 401 else None
    headers = getattr(exc, "headers", None)
    return JSONResponse(
        status_code=exc.status_code, content=error_body(exc.status_code, message, code=code), headers=headers
    )


def access(command: str, host: str, api_key: str | None, api_key_env: str) -> tuple[str, str | None]:
    """The address to bind and the API key of a served command (`firm critic serve`, `firm reward serve`): the key
    given, else ``$api_key_env``; a warning on stderr when a host other than this machine is served without a key."""
    key = api_key or os.environ.get(api_key_env) or None
    if host not in ("127.0.0.1", "localhost") and not key:
        print(
            f"{command}: warning: serving on {host} without an API key; anyone who can reach this port can use it "
            f"(set --api-key or ${api_key_env})",
            file=sys.stderr,
        )
    return ("127.0.0.1" if host == "localhost" else host), key


def serve(server: ls.LitServer, *, host: str, port: int, log_level: str = "warning") -> None:
    """Run ``server`` until SIGTERM or SIGINT, then stop every process it started and free the port.

    LitServe shuts its HTTP servers and inference workers down on KeyboardInterrupt only; a SIGTERM (``kill``,
    Docker, Kubernetes, SLURM) would end the main process alone and leave its forked HTTP servers serving the port.
    Here both signals become one KeyboardInterrupt in the main process (further signals are ignored while the
    shutdown runs), and any child process still alive afterwards is terminated, then killed.
    """
    main_pid = os.getpid()
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        if os.getpid() != main_pid:  # a forked child inherited this handler: end as the signal would
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if stopping:
            return
        stopping = True
        log.warning("firm critic serve: %s received, stopping", signal.Signals(signum).name)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        server.run(host=host, port=port, generate_client_file=False, log_level=log_level)
    except KeyboardInterrupt:
        pass
    finally:
        stopping = True
        for child in mp.active_children():
            child.terminate()
        deadline = time.monotonic() + 10
        for child in mp.active_children():
            child.join(timeout=max(0.0, deadline - time.monotonic()))
            if child.is_alive():
                child.kill()
                child.join(timeout=5)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
