"""`firm serve-critic`: a local critic behind an OpenAI-compatible ``/v1/chat/completions`` endpoint (LitServe).

Requests are validated before they are queued (malformed JSON, unknown roles, images that are not base64 data
URLs, any parameter out of range, NaN and infinities included: HTTP 422 with the reason). Then, before any model
work and for that request only: a prompt whose text is longer than ``max_prompt_tokens`` tokens gets HTTP 413 (a
long text would otherwise hold the worker in prefill for minutes, the cost growing with the square of its length);
an image whose bytes are not PNG, JPEG or WEBP gets HTTP 415 (checked from the magic bytes; no other Pillow plugin
ever sees client bytes, so no TIFF, ICO, PCX, TGA or EPS/Ghostscript); an image larger than ``max_image_pixels``
HTTP 413 (checked from the image header, before decoding the pixels); an image that does not decode HTTP 400. A
request body over ``max_request_bytes`` gets HTTP 413 (read no further). Valid requests are
batched dynamically (up to ``max_batch_size``, waiting at most ``batch_timeout`` s to fill a batch) and answered by
one batched ``generate``. ``GET /v1/models`` lists the served name; ``GET /health`` (open without the key) says
when the model is loaded. There is no ``/docs`` or ``/openapi.json``.
The server binds 127.0.0.1 unless told otherwise; with an API key it expects ``Authorization: Bearer KEY`` (or
``X-API-Key: KEY``) on every request. On SIGTERM or SIGINT it stops every process it started (HTTP servers,
inference workers) and frees the port (:func:`serve`).

Only text and ``data:image/...;base64`` image parts are accepted (the server never fetches URLs); ``n`` must be 1
and streaming is not supported.
"""

# No `from __future__ import annotations` here: LitServe and FastAPI read the request type from the annotation.

import base64
import binascii
import hmac
import io
import logging
import multiprocessing as mp
import os
import re
import signal
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

import litserve as ls
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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


class ChatCompletionBody(BaseModel):
    """The subset of the OpenAI chat-completions request a critic needs; other OpenAI fields are ignored."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, allow_inf_nan=False)
    n: int = 1
    stream: bool = False

    @model_validator(mode="after")
    def _supported(self) -> "ChatCompletionBody":
        if self.n != 1:
            raise ValueError("n must be 1: this server returns one answer per request")
        if self.stream:
            raise ValueError("stream=true is not supported by firm serve-critic")
        if self.messages[-1].role == "assistant":
            raise ValueError("the last message must be from the user (or system), not the assistant")
        return self


# Defaults of the request limits: images up to 4096 x 4096 pixels (the critic downscales larger ones anyway; its
# image processor caps the pixels it encodes), request bodies up to 64 MiB (several such images as base64 PNG).
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REQUEST_BYTES = 64 * 2**20
# Default cap on the text tokens of one prompt. FIRM's built-in critic templates are under 500 tokens; 8192 leaves
# room for long instructions, checklists and custom templates while bounding prefill (its cost grows with the square).
MAX_PROMPT_TOKENS = 8192


@dataclass
class _Invalid:
    """A request that passed schema validation but cannot be served (e.g. an image that does not decode)."""

    message: str
    status: int = 400


class _ImageTooLarge(ValueError):
    pass


class _UnsupportedImage(ValueError):
    pass


def sniff_image_format(data: bytes) -> str | None:
    """``PNG``, ``JPEG`` or ``WEBP`` from the magic bytes at the start of ``data``; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def _decode_image(url: str, max_pixels: int | None = None) -> Image.Image:
    data = base64.b64decode(_DATA_URL.match(url).group("data"))
    fmt = sniff_image_format(data)
    if fmt is None:
        raise _UnsupportedImage(f"the image bytes are not PNG, JPEG or WEBP (they start with {data[:8]!r})")
    # formats=[fmt]: only that plugin reads the bytes. The header only: the size is known before any pixel is decoded
    img = Image.open(io.BytesIO(data), formats=[fmt])
    if max_pixels and img.width * img.height > max_pixels:
        raise _ImageTooLarge(
            f"image is {img.width}x{img.height} = {img.width * img.height} pixels; this server accepts at most "
            f"{max_pixels} (--max-image-pixels)"
        )
    img.load()
    return img.convert("RGB")


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
                    except _ImageTooLarge as e:
                        return _Invalid(f"messages[{i}].content[{j}]: {e}", status=413)
                    except _UnsupportedImage as e:
                        return _Invalid(f"messages[{i}].content[{j}]: {e}", status=415)
                    except Exception as e:  # noqa: BLE001 - any decoding failure is the client's bad image
                        why = "not an image format PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
                        return _Invalid(f"messages[{i}].content[{j}]: image does not decode ({why})")
            conv.append({"role": m.role, "content": parts})
        limit = request.max_completion_tokens or request.max_tokens or self.max_new_tokens
        return {
            "conversation": conv,
            "temperature": float(request.temperature or 0.0),
            "max_new_tokens": min(limit, self.max_new_tokens),
            "model": request.model or self.served_name,
        }

    def predict(self, x: Any) -> Any:
        items = x if self.max_batch_size > 1 else [x]
        outputs: list[Any] = [it if isinstance(it, _Invalid) else None for it in items]
        groups: dict[tuple[float, int], list[int]] = {}
        for i, it in enumerate(items):
            if not isinstance(it, _Invalid):
                groups.setdefault((it["temperature"], it["max_new_tokens"]), []).append(i)
        for (temperature, max_new), idx in groups.items():  # one generate per sampling setting
            t0 = time.perf_counter()
            gens = self.critic.generate(
                [items[i]["conversation"] for i in idx], temperature=temperature, max_new_tokens=max_new
            )
            dt = time.perf_counter() - t0
            for i, g in zip(idx, gens):
                outputs[i] = {"text": g.text, "completion_tokens": len(g.ids), "model": items[i]["model"], "s": dt}
        return outputs if self.max_batch_size > 1 else outputs[0]

    def encode_response(self, output: Any) -> Any:
        if isinstance(output, _Invalid):
            body = {"error": {"message": output.message, "type": "invalid_request_error", "code": output.status}}
            return JSONResponse(status_code=output.status, content=body)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": output["model"],
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": output["text"]}, "finish_reason": "stop"}
            ],
            "usage": {"completion_tokens": output["completion_tokens"]},
        }


def build_server(
    model_dir: str,
    *,
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
    from pathlib import Path

    from fastapi import Depends

    path = Path(model_dir).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; give a directory written by save_pretrained")
    name = served_name or path.resolve().name
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
    server.app.add_exception_handler(RequestValidationError, _validation_error)
    return server


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """HTTP 422 naming each invalid field. FastAPI's own handler echoes the invalid input, and an input such as
    NaN cannot be written as JSON: the client got HTTP 500 instead of the reason."""
    errors = [
        {"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
        for e in exc.errors()
    ]
    return JSONResponse(status_code=422, content={"detail": errors})


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
        log.warning("firm serve-critic: %s received, stopping", signal.Signals(signum).name)
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
