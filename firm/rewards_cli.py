"""`firm reward serve NAME`: serve one reward scorer over HTTP, for instance from its own Python environment
(see docs/rewards.md and firm/rewards/serve.py).

This file sits beside firm/rewards/ rather than in it, as firm/kernels_cli.py does: importing anything of that package
imports torch, and the server litserve, which `firm --help` should not wait for. The defaults below are
firm.rewards.serve's limits, written out (a test checks that they agree).
"""

from __future__ import annotations

import argparse

API_KEY_ENV = "FIRM_REWARD_API_KEY"
MAX_REQUESTS = 256
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_REQUEST_BYTES = 256 * 2**20
MAX_TEXT_CHARS = 20_000
MAX_POST_PIXELS = 128 * 2**20


def _cmd_serve_reward(args: argparse.Namespace) -> int:
    from firm.rewards.serve import serve_from_args

    return serve_from_args(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.noun("reward").add_parser(
        "serve",
        help="serve one reward scorer over HTTP (e.g. from its own Python environment)",
        description="Serve a scorer of the `scorers` registry, an official-package scorer (hpsv2, image_reward) "
        "or one registered by an --import module at POST /v1/score. Clients: the `remote` scorer.",
    )
    p.add_argument("scorer", help="the scorer's registry name (e.g. pickscore, hpsv2, image_reward)")
    p.add_argument(
        "--config",
        action="append",
        metavar="KEY=VALUE",
        help="a setting of the scorer's Config (repeatable), e.g. --config checkpoint=/ckpt/HPS_v2.1.pt "
        "--config device=cuda",
    )
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        metavar="MODULE",
        help="import MODULE first (repeatable): a module that registers scorers of its own",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8100, help="port (default 8100)")
    p.add_argument("--api-key", default=None, help=f"require this key as a Bearer token (default: ${API_KEY_ENV})")
    p.add_argument(
        "--max-requests", type=int, default=MAX_REQUESTS, help=f"most requests in one POST (default {MAX_REQUESTS})"
    )
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=MAX_IMAGE_PIXELS,
        help="largest image accepted, in pixels (width x height); a larger one is refused alone (default 4096x4096; "
        "0: no limit)",
    )
    p.add_argument(
        "--max-request-mb",
        type=float,
        default=MAX_REQUEST_BYTES / 2**20,
        help=f"largest POST body in MiB; larger ones get HTTP 413 (default {MAX_REQUEST_BYTES // 2**20}; 0: no limit)",
    )
    p.add_argument(
        "--max-text-chars",
        type=int,
        default=MAX_TEXT_CHARS,
        help=f"longest prompt or instruction; a longer one is refused alone (default {MAX_TEXT_CHARS}; 0: no limit)",
    )
    p.add_argument(
        "--max-post-pixels",
        type=int,
        default=MAX_POST_PIXELS,
        help="all images of one POST, decoded, in pixels; more gets HTTP 413 (default 128 Mi; 0: no limit)",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a POST may wait in the queue")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.set_defaults(func=_cmd_serve_reward)
