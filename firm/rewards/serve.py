"""`firm reward serve`: one reward scorer behind HTTP, for scorers that need a Python environment of their own.

The official HPSv2 and ImageReward packages pin releases FIRM cannot share (an open_clip fork, BLIP on transformers
4.x; UniRL keeps each in its own environment). Serve such a scorer from its environment and score through it from the
training run with the ``remote`` scorer (:mod:`firm.rewards.scorers.remote`)::

    # in the scorer's environment (scripts/reward_venv.sh hpsv2 builds one)
    firm reward serve hpsv2 --config checkpoint=/ckpt/HPS_v2.1_compressed.pt --port 8101
    # in the experiment
    rewards:
      hps: {name: remote, url: "http://127.0.0.1:8101", outputs: [hpsv2]}

Any scorer of the ``scorers`` registry can be served (``--config key=value`` sets its Config), and so can the
official-package scorers of :mod:`firm.rewards.scorers.official` (``hpsv2``, ``image_reward``: :data:`OFFICIAL`,
registered here only) and scorers that a module named with ``--import`` registers.

The protocol (JSON)::

    POST /v1/score   {"requests": [{"task": "gen", "image": B64, "prompt": TEXT}
                                   | {"task": "edit", "source": B64, "edited": B64, "instruction": TEXT}, ...]}
      -> 200 {"scorer": NAME, "outputs": [...], "scores": {OUTPUT: [number | null, ...]},
              "errors": [null | REASON, ...], "details": [...]}
    GET /health      -> 200 once the scorer is loaded (open without the key)

Images are base64 PNG, JPEG or WebP (``gen`` requests may also carry ``checklist`` and ``key``). A missing score is
``null`` with its reason in ``errors``.

The server is `firm critic serve`'s (:mod:`firm.critics.server`): LitServe, bound to 127.0.0.1 unless told otherwise,
an optional API key (``Authorization: Bearer KEY`` or ``X-API-Key``), errors as ``{"error": {"message", ...}}`` that
never echo the request, no ``/docs`` or ``/openapi.json``, and SIGTERM / SIGINT stop every process it started. What a
client can make it hold and compute is bounded: a body over ``--max-request-mb`` gets HTTP 413 while it is read, and
so does a POST of more than ``--max-requests`` requests; within a POST, a request with a bad field, a text over
``--max-text-chars``, an image that is not PNG / JPEG / WebP (checked from its bytes: no other Pillow plugin sees
them), has more than ``--max-image-pixels`` pixels (from its header, before decoding) or does not decode is refused
alone: its scores are null with the reason, and the rest of the POST is scored.
"""

# No `from __future__ import annotations` here: LitServe and FastAPI read the request type from the annotation.

import argparse
import base64
import binascii
import importlib
import importlib.util
import json
import logging
import math
import sys
from dataclasses import dataclass
from typing import Any, Literal

import litserve as ls
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from firm.critics.server import CriticAPI, access, error_body, http_error_handler, serve, validation_error_handler
from firm.critics.types import EditRequest, GenRequest
from firm.images import MAX_IMAGE_PIXELS, ImageTooLargeError, UnsupportedImageError
from firm.images import decode as decode_image
from firm.rewards.scorers.remote import API_KEY_ENV, SCORE_PATH

log = logging.getLogger(__name__)

# Scorers that call an official package, registered in the served environment only (they are not in firm.registry:
# their packages are absent from FIRM's own environment).
OFFICIAL: dict[str, str] = {
    "hpsv2": "firm.rewards.scorers.official:HPSv2Scorer",
    "image_reward": "firm.rewards.scorers.official:ImageRewardScorer",
}

# Defaults of the limits. A POST is one batch of the remote scorer (16 by default); 256 leaves room for larger ones.
MAX_REQUESTS = 256
MAX_REQUEST_BYTES = 256 * 2**20  # 256 requests of 512 px PNG images fit well under it
# All images of one POST, decoded (RGB: 3 bytes a pixel): a few KB of flat-colour PNG can decode to 16 MP, so the body
# limit alone does not bound memory. 128 Mi pixels hold 256 edit requests of two 512 x 512 images.
MAX_POST_PIXELS = 128 * 2**20
MAX_TEXT_CHARS = 20_000  # a prompt or instruction; text scorers truncate to their context (77 tokens for CLIP)
MAX_DETAIL_CHARS = 2000  # a request's details that are not JSON are sent as their repr, cut at this length


class ScoreItem(BaseModel):
    """One request of a POST (validated alone: a bad one costs only itself)."""

    model_config = ConfigDict(extra="forbid")
    task: Literal["gen", "edit"]
    image: str | None = None
    prompt: str | None = None
    checklist: list[str] | None = None
    source: str | None = None
    edited: str | None = None
    instruction: str | None = None
    key: str | None = None

    @model_validator(mode="after")
    def _fields_of_task(self) -> "ScoreItem":
        need = ("image", "prompt") if self.task == "gen" else ("source", "edited", "instruction")
        other = ("source", "edited", "instruction") if self.task == "gen" else ("image", "prompt", "checklist")
        kind = "an edit request" if self.task == "edit" else "a gen request"
        absent = [k for k in need if getattr(self, k) is None]
        if absent:
            raise ValueError(f"{kind} needs {', '.join(absent)}")
        extra = [k for k in other if getattr(self, k) is not None]
        if extra:
            raise ValueError(f"{kind} has no {', '.join(extra)}")
        return self


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[Any] = Field(min_length=1)


@dataclass
class _Refused:
    """A POST that cannot be served at all (the HTTP status and the reason)."""

    message: str
    status: int = 400


@dataclass
class _Bad:
    """One request of a POST that cannot be scored, and why."""

    message: str


def _first_problem(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ()))
    msg = str(err.get("msg", "")).removeprefix("Value error, ")[:300]
    return f"{loc}: {msg}" if loc else msg


def _jsonable(d: Any) -> Any:
    """``d`` if JSON can carry it as it is (finite numbers), else its repr, cut."""
    try:
        json.dumps(d, allow_nan=False)
        return d
    except (TypeError, ValueError):
        return repr(d)[:MAX_DETAIL_CHARS]


class ScorerAPI(ls.LitAPI):
    """LitServe API: ``POST /v1/score`` batches in, one scorer's named scores out (one POST, one scorer call)."""

    def __init__(
        self,
        scorer_cls: type,
        config: Any,
        *,
        api_key: str | None = None,
        max_requests: int = MAX_REQUESTS,
        max_image_pixels: int | None = MAX_IMAGE_PIXELS,
        max_text_chars: int | None = MAX_TEXT_CHARS,
        max_post_pixels: int | None = MAX_POST_PIXELS,
    ) -> None:
        super().__init__(max_batch_size=1, api_path=SCORE_PATH)
        self.scorer_cls = scorer_cls
        self.config = config
        self.api_key = api_key
        self.max_requests = max_requests
        self.max_image_pixels = max_image_pixels
        self.max_text_chars = max_text_chars
        self.max_post_pixels = max_post_pixels
        self.scorer: Any = None  # set by setup(), in the inference worker

    def setup(self, device: str) -> None:
        self.scorer = self.scorer_cls(self.config)  # on config.device (the scorer's own setting)
        log.info("scorer %r loaded (outputs %s)", self.config.name, ", ".join(self.scorer.outputs))

    # The critic server's check: with a key set, every path but /health needs it (Bearer or X-API-Key).
    authorize = CriticAPI.authorize

    def _image(self, b64: str, field: str) -> Any:
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"{field}: not valid base64") from None
        try:
            return decode_image(data, self.max_image_pixels, limit_name="--max-image-pixels")
        except (ImageTooLargeError, UnsupportedImageError) as e:
            raise ValueError(f"{field}: {e}") from None
        except Exception as e:  # noqa: BLE001 - any decoding failure is the client's bad image
            why = "not an image format PIL can read" if isinstance(e, UnidentifiedImageError) else str(e)
            raise ValueError(f"{field}: image does not decode ({why})") from None

    def decode_item(self, raw: Any) -> EditRequest | GenRequest:
        try:
            item = ScoreItem.model_validate(raw)
        except ValidationError as e:
            raise ValueError(_first_problem(e)) from None
        text = item.prompt if item.task == "gen" else item.instruction
        cap = self.max_text_chars
        if cap and len(text) > cap:
            raise ValueError(f"the text is {len(text)} characters; this server takes at most {cap} (--max-text-chars)")
        if item.task == "gen":
            return GenRequest(self._image(item.image, "image"), item.prompt, item.checklist, key=item.key)
        source = self._image(item.source, "source")
        return EditRequest(source, self._image(item.edited, "edited"), item.instruction, key=item.key)

    def decode_request(self, request: ScoreBody) -> Any:
        n = len(request.requests)
        if n > self.max_requests:
            return _Refused(f"{n} requests in one POST; this server accepts at most {self.max_requests}", 413)
        items: list[Any] = []
        pixels, cap = 0, self.max_post_pixels
        for i, raw in enumerate(request.requests):
            try:
                item = self.decode_item(raw)
            except ValueError as e:
                items.append(_Bad(f"requests[{i}]: {e}"))
                continue
            images = (item.source, item.edited) if isinstance(item, EditRequest) else (item.image,)
            pixels += sum(im.width * im.height for im in images)
            if cap and pixels > cap:
                return _Refused(
                    f"the images of this POST decode to more than {cap} pixels (--max-post-pixels); send fewer", 413
                )
            items.append(item)
        return items

    def predict(self, items: Any) -> Any:
        if isinstance(items, _Refused):
            return items
        scorer = self.scorer
        name = self.config.name
        n = len(items)
        values = {k: [math.nan] * n for k in scorer.outputs}
        errors: list[str | None] = [None] * n
        details: list[Any] = [None] * n
        call_errors: list[str] = []  # model calls that raised: the client's critic_failure decides (not a bad item)
        todo = []
        for i, it in enumerate(items):
            if isinstance(it, _Bad):
                errors[i] = f"{name}: {it.message}"
            elif ("edit" if isinstance(it, EditRequest) else "gen") not in scorer.tasks:
                errors[i] = f"{name} scores {'/'.join(scorer.tasks)} requests; requests[{i}] is not one"
            else:
                todo.append(i)
        if todo:
            try:
                out = scorer([items[i] for i in todo])  # batches of config.batch_size; a failed batch is missing
            except Exception as e:  # noqa: BLE001 - the scorer's contract is broken; these requests are missing
                log.exception("scorer %r raised", name)
                for i in todo:
                    errors[i] = f"{name}: {type(e).__name__}: {e}"
                call_errors.append(f"{name}: {type(e).__name__}: {e}")
            else:
                call_errors.extend(out.call_errors)
                for j, i in enumerate(todo):
                    for k in scorer.outputs:
                        values[k][i] = float(out.values[k][j])
                    errors[i] = out.errors[j]
                    details[i] = _jsonable(out.details[j])
        return {
            "scorer": name,
            "outputs": list(scorer.outputs),
            "scores": {k: [v if math.isfinite(v) else None for v in col] for k, col in values.items()},
            "errors": errors,
            "details": details,
            "call_errors": call_errors,
        }

    def encode_response(self, output: Any) -> Any:
        if isinstance(output, _Refused):
            return JSONResponse(status_code=output.status, content=error_body(output.status, output.message))
        return output


def _resolve(name: str, imports: list[str]) -> None:
    """Make ``name`` resolvable in the ``scorers`` registry: import the modules of ``imports`` (which may register
    scorers), and register the official-package scorers of :data:`OFFICIAL` that are not registered yet."""
    from firm.registry import SCORERS, register

    for module in imports:
        importlib.import_module(module)
    for key, target in OFFICIAL.items():
        if key not in SCORERS:
            register("scorers", key, target)


def build_server(
    name: str,
    overrides: dict[str, Any] | None = None,
    *,
    imports: list[str] | None = None,
    api_key: str | None = None,
    max_requests: int = MAX_REQUESTS,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
    max_request_bytes: int | None = MAX_REQUEST_BYTES,
    max_text_chars: int | None = MAX_TEXT_CHARS,
    max_post_pixels: int | None = MAX_POST_PIXELS,
    timeout: float = 600.0,
) -> ls.LitServer:
    """A LitServer serving the scorer ``name`` (with ``overrides`` of its Config) at ``/v1/score``.

    The config is validated here, before any process starts (a ConfigError names the bad key); a scorer that needs a
    package (its ``requires``) this environment lacks is refused here too. The scorer is built in the inference
    worker. Run the server with :func:`firm.critics.server.serve`.
    """
    from firm.config import build_component

    _resolve(name, list(imports or []))
    where = f"firm reward serve {name}"
    cls, conf = build_component("scorers", {**(overrides or {}), "name": name}, source=where)
    absent = [p for p in getattr(cls, "requires", ()) if importlib.util.find_spec(p) is None]
    if absent:
        raise SystemExit(
            f"{where}: this Python ({sys.executable}) lacks the package(s) {', '.join(absent)} that the scorer "
            f"calls; serve it from an environment that has them (scripts/reward_venv.sh {name})"
        )
    if max_requests < 1:
        raise ValueError(f"max_requests must be >= 1, got {max_requests}")
    api = ScorerAPI(
        cls,
        conf,
        api_key=api_key,
        max_requests=max_requests,
        max_image_pixels=max_image_pixels,
        max_text_chars=max_text_chars,
        max_post_pixels=max_post_pixels,
    )
    server = ls.LitServer(
        api,
        accelerator="cpu" if str(conf.device) == "cpu" else "auto",
        devices=1,  # one scorer process; it runs on its config's device
        workers_per_device=1,
        timeout=timeout,
        max_payload_size=max_request_bytes,  # bytes; larger bodies get HTTP 413 while they are being read
        disable_openapi_url=True,  # no /openapi.json, /docs or /redoc
    )
    server.app.add_exception_handler(RequestValidationError, validation_error_handler)
    server.app.add_exception_handler(StarletteHTTPException, http_error_handler)
    return server


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings (dotted keys for nested settings, YAML values) as a nested mapping."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from firm.config import ConfigError

    bad = [x for x in items if "=" not in x or x.startswith("=")]
    if bad:
        raise ConfigError(f"firm reward serve: --config takes KEY=VALUE, got {bad[0]!r}")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist(list(items)), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"firm reward serve: --config: {e}") from None


def server_from_args(args: argparse.Namespace) -> tuple[ls.LitServer, str]:
    """The server `firm reward serve` runs for its parsed ``args``, and the address to bind."""
    host, api_key = access("firm reward serve", args.host, args.api_key, API_KEY_ENV)
    server = build_server(
        args.scorer,
        parse_overrides(args.config or []),
        imports=args.imports or [],
        api_key=api_key,
        max_requests=args.max_requests,
        max_image_pixels=args.max_image_pixels or None,
        max_request_bytes=int(args.max_request_mb * 2**20) if args.max_request_mb else None,
        max_text_chars=args.max_text_chars or None,
        max_post_pixels=args.max_post_pixels or None,
        timeout=args.timeout,
    )
    return server, host


def serve_from_args(args: argparse.Namespace) -> int:
    """Run the server of `firm reward serve` until SIGTERM / SIGINT (which stop every process)."""
    server, host = server_from_args(args)
    print(f"serving scorer {args.scorer} at http://{host}:{args.port}{SCORE_PATH}", flush=True)
    serve(server, host=host, port=args.port, log_level=args.log_level)
    return 0
