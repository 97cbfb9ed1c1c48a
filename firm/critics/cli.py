"""Critic subcommands: `firm critic score`, `firm critic serve` and `firm critic export`.

`firm critic bench` and `firm critic bench-convert` are registered by firm/bench/cli.py, where their code lives.

Heavy libraries (torch, transformers, litserve) are imported inside the handlers only.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
API_KEY_ENV = "FIRM_CRITIC_API_KEY"


# --------------------------------------------------------------------------------------------------------------------
# Reading a folder of items to score


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: each line must be a JSON object")
            yield n, row


def _image_path(folder: Path, rel: Any, where: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"{where}: needs an image path")
    p = (folder / rel).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{where}: image {p} not found")
    return p


def _find_image(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTS:
        for cand in (folder / f"{stem}{ext}", folder / f"{stem}{ext.upper()}"):
            if cand.is_file():
                return cand
    return None


def discover_edit_items(folder: str | Path, instruction: str | None = None) -> list[dict]:
    """Edit items ``{"key", "source", "edited", "instruction"}`` from a folder, in one of two layouts.

    1. ``pairs.jsonl``: one JSON object per line with ``source``, ``edited`` (paths relative to the folder),
       ``instruction`` and optionally ``key``.
    2. ``source/NAME.png`` and ``edited/NAME.png`` with the same names; the instruction of NAME comes from
       ``instructions.jsonl`` (lines ``{"name": NAME, "instruction": ...}``), else ``edited/NAME.txt``, else the
       ``instruction`` argument (one instruction for every pair).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    manifest = folder / "pairs.jsonl"
    items: list[dict] = []
    if manifest.is_file():
        for n, row in _read_jsonl(manifest):
            where = f"{manifest}:{n}"
            text = row.get("instruction", instruction)
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{where}: needs an 'instruction'")
            items.append(
                {
                    "key": str(row.get("key", n)),
                    "source": _image_path(folder, row.get("source"), where + " 'source'"),
                    "edited": _image_path(folder, row.get("edited"), where + " 'edited'"),
                    "instruction": text,
                }
            )
        return items
    src_dir, out_dir = folder / "source", folder / "edited"
    if not (src_dir.is_dir() and out_dir.is_dir()):
        raise FileNotFoundError(
            f"{folder}: expected pairs.jsonl, or source/ and edited/ subfolders with matching image names"
        )
    texts: dict[str, str] = {}
    inst_file = folder / "instructions.jsonl"
    if inst_file.is_file():
        for n, row in _read_jsonl(inst_file):
            if "name" not in row or not isinstance(row.get("instruction"), str):
                raise ValueError(f"{inst_file}:{n}: each line needs 'name' and 'instruction'")
            texts[str(row["name"])] = row["instruction"]
    edited = sorted(p for p in out_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not edited:
        raise FileNotFoundError(f"{out_dir}: no images ({', '.join(IMAGE_EXTS)})")
    for p in edited:
        name = p.stem
        src = _find_image(src_dir, name)
        if src is None:
            raise FileNotFoundError(f"{p}: no source image named {name}.* in {src_dir}")
        text = texts.get(name)
        if text is None and (out_dir / f"{name}.txt").is_file():
            text = (out_dir / f"{name}.txt").read_text(encoding="utf-8").strip()
        if text is None:
            text = instruction
        if not text:
            raise ValueError(
                f"no instruction for {name}: add it to {inst_file}, write {out_dir / (name + '.txt')}, "
                "or pass --instruction"
            )
        items.append({"key": name, "source": src, "edited": p, "instruction": text})
    return items


def discover_gen_items(folder: str | Path) -> list[dict]:
    """Generation items from ``prompts.jsonl``: lines ``{"image", "prompt", "checklist"?, "key"?}``."""
    folder = Path(folder)
    manifest = folder / "prompts.jsonl"
    if not manifest.is_file():
        raise FileNotFoundError(f"{folder}: expected prompts.jsonl with lines {{'image': ..., 'prompt': ...}}")
    items = []
    for n, row in _read_jsonl(manifest):
        where = f"{manifest}:{n}"
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}: needs a 'prompt'")
        checklist = row.get("checklist")
        if checklist is not None and not (isinstance(checklist, list) and all(isinstance(x, str) for x in checklist)):
            raise ValueError(f"{where}: 'checklist' must be a list of strings")
        items.append(
            {
                "key": str(row.get("key", n)),
                "image": _image_path(folder, row.get("image"), where + " 'image'"),
                "prompt": prompt,
                "checklist": checklist,
            }
        )
    return items


# --------------------------------------------------------------------------------------------------------------------
# Handlers


def _build_critic_from_args(args: argparse.Namespace):
    from firm.critics.http import HTTPCritic
    from firm.critics.local import LocalCritic
    from firm.critics.prompts import PromptConfig

    prompts = PromptConfig(**{k: v for k, v in (args.prompt or [])})
    if bool(args.endpoint) == bool(args.model):
        raise SystemExit("firm critic score: give either --endpoint URL (repeatable) or --model DIR")
    if args.endpoint:
        return HTTPCritic(
            HTTPCritic.Config(
                endpoints=list(args.endpoint),
                model=args.model_name,
                api_key_env=API_KEY_ENV,
                max_concurrency=args.concurrency,
                timeout_s=args.timeout,
                max_retries=args.retries,
                parse_retries=args.parse_retries,
                max_tokens=args.max_tokens,
                expected_score=args.expected_score,
                top_logprobs=args.top_logprobs,
                structured_outputs=args.structured_outputs,
                prompts=prompts,
            ),
            api_key=args.api_key,  # None: $FIRM_CRITIC_API_KEY
        )
    if args.structured_outputs != "off":
        raise SystemExit("firm critic score: --structured-outputs needs a served critic (--endpoint)")
    return LocalCritic(
        LocalCritic.Config(
            model=args.model,
            revision=args.revision,
            device=args.device,
            batch_size=args.batch_size,
            max_new_tokens=args.max_tokens,
            expected_score=args.expected_score,
            parse_retries=args.parse_retries,
            prompts=prompts,
        )
    )


def _prompt_override(spec: str) -> tuple[str, str]:
    from dataclasses import fields

    from firm.critics.prompts import PromptConfig

    names = [f.name for f in fields(PromptConfig)]
    name, sep, path = spec.partition("=")
    if not sep or name not in names:
        raise argparse.ArgumentTypeError(f"--prompt takes NAME=PATH with NAME one of {', '.join(names)}")
    return name, path


def _cmd_critic_score(args: argparse.Namespace) -> int:
    from PIL import Image
    from tqdm.auto import tqdm

    from firm.critics.types import EditRequest, GenRequest
    from firm.rewards import FirmEditReward, FirmGenReward, build_combiner

    if args.task == "gen":
        items = discover_gen_items(args.folder)
    else:
        items = discover_edit_items(args.folder, args.instruction)
    if args.limit:
        items = items[: args.limit]
    critic = _build_critic_from_args(args)
    dims = tuple(args.dimensions.split(",")) if args.dimensions else None
    reward_cls = FirmGenReward if args.task == "gen" else FirmEditReward
    combiner = build_combiner({"name": args.reward or ("qma" if args.task == "gen" else "cme")})
    reward = reward_cls(critic, combiner, dimensions=dims)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    totals: dict[str, list[float]] = {}
    missing: dict[str, int] = {}
    n_done = 0
    with out_path.open("w", encoding="utf-8") as f, tqdm(total=len(items), desc="scoring", unit="item") as bar:
        for s in range(0, len(items), args.chunk):
            chunk = items[s : s + args.chunk]
            if args.task == "gen":
                reqs = [
                    GenRequest(Image.open(it["image"]), it["prompt"], it["checklist"], key=it["key"]) for it in chunk
                ]
            else:
                reqs = [
                    EditRequest(Image.open(it["source"]), Image.open(it["edited"]), it["instruction"], key=it["key"])
                    for it in chunk
                ]
            out = reward(reqs)
            for i, (it, res) in enumerate(zip(chunk, out.results)):
                r = float(out.rewards[i])
                row = {
                    "key": it["key"],
                    "scores": res.scores,
                    "reward": None if math.isnan(r) else round(r, 6),
                    "reasoning": res.reasoning,
                    "raw": res.raw,  # the critic's answer per judgement, as written (see it when a score is null)
                    "errors": res.errors,
                    "details": res.details,
                    "latency_s": round(res.latency_s, 3),
                }
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                for d, v in res.scores.items():
                    if v is None:
                        missing[d] = missing.get(d, 0) + 1
                    else:
                        totals.setdefault(d, []).append(v)
                if not math.isnan(r):
                    totals.setdefault("reward", []).append(r)
            f.flush()
            n_done += len(chunk)
            bar.update(len(chunk))
    print(f"scored {n_done} items -> {out_path}")
    for k, vals in totals.items():
        print(f"  {k:<12} mean {sum(vals) / len(vals):.3f} over {len(vals)}")
    for k, n in missing.items():
        print(f"  {k:<12} missing {n} (unparseable critic output; see 'errors' in the JSONL)")
    return 0


def _cmd_serve_critic(args: argparse.Namespace) -> int:
    from firm.critics.server import access, build_server, serve

    host, api_key = access("firm critic serve", args.host, args.api_key, API_KEY_ENV)
    server = build_server(
        args.model,
        revision=args.revision,
        served_name=args.served_model_name,
        api_key=api_key,
        device=args.device,
        dtype=args.dtype,
        max_new_tokens=args.max_new_tokens,
        max_images=args.max_images,
        max_image_pixels=args.max_image_pixels or None,
        max_request_bytes=int(args.max_request_mb * 2**20) if args.max_request_mb else None,
        max_prompt_tokens=args.max_prompt_tokens or None,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout,
        workers_per_device=args.workers_per_device,
        timeout=args.timeout,
    )
    print(f"serving {args.model} at http://{host}:{args.port}/v1/chat/completions", flush=True)
    serve(server, host=host, port=args.port, log_level=args.log_level)  # SIGTERM / SIGINT stop every process
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from firm.critics.export import export_critic

    out = export_critic(args.run_dir, args.out_dir, checkpoint=args.checkpoint, merge_lora=not args.keep_lora)
    print(f"[firm critic export] wrote {out}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    critic = sub.noun("critic")
    s = critic.add_parser(
        "score",
        help="score a folder of edit pairs (or generated images) and write JSONL",
        description="Edit task: FOLDER holds pairs.jsonl, or source/ and edited/ with matching names "
        "(instructions from instructions.jsonl, edited/NAME.txt or --instruction). Gen task: FOLDER holds "
        "prompts.jsonl. Scores with a served critic (--endpoint) or a local checkpoint (--model).",
    )
    _score_arguments(s)
    s.set_defaults(func=_cmd_critic_score)

    p = critic.add_parser(
        "serve",
        help="serve a local critic behind an OpenAI-compatible /v1/chat/completions endpoint",
        description="Serve a critic checkpoint (a save_pretrained directory, Qwen3-VL family) with dynamic "
        "batching. Clients: `firm critic score --endpoint`, HTTPCritic, or any OpenAI-compatible client.",
    )
    p.add_argument(
        "--model", required=True, help="checkpoint directory (config.json, weights, processor files) or hub id"
    )
    p.add_argument("--revision", default=None, help="hub revision when --model is a hub id")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help=f"require this key as a Bearer token (default: ${API_KEY_ENV})")
    p.add_argument("--served-model-name", default=None, help="name in /v1/models (default: the folder name)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--max-batch-size", type=int, default=8, help="most requests answered by one generate call")
    p.add_argument("--batch-timeout", type=float, default=0.05, help="seconds to wait for a batch to fill")
    p.add_argument("--max-new-tokens", type=int, default=1024, help="cap on tokens generated per request")
    p.add_argument("--max-images", type=int, default=8, help="most images accepted in one request")
    p.add_argument(
        "--max-image-pixels",
        type=int,
        default=4096 * 4096,
        help="largest image accepted, in pixels (width x height); larger ones get HTTP 413 (default 4096x4096; 0: "
        "no limit)",
    )
    p.add_argument(
        "--max-request-mb",
        type=float,
        default=64.0,
        help="largest request body in MiB; larger requests get HTTP 413 (default 64; 0: no limit)",
    )
    p.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=8192,
        help="longest prompt text accepted, in tokens; longer prompts get HTTP 413 before any model work "
        "(default 8192; 0: no limit)",
    )
    p.add_argument("--workers-per-device", type=int, default=1, help="model copies per device")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may wait in the queue")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.set_defaults(func=_cmd_serve_critic)

    p = critic.add_parser(
        "export",
        help="export a trained critic run as a save_pretrained model + processor directory",
        description="Load the run's last checkpoint into the critic model (merging LoRA adapters) and write a "
        "directory that the local critic backend (and vLLM) load with from_pretrained.",
    )
    p.add_argument("run_dir", help="a `firm run` directory of a critic_sft experiment")
    p.add_argument("out_dir", help="output directory")
    p.add_argument("--checkpoint", help="a checkpoint file (default: RUN_DIR/checkpoints/last.ckpt)")
    p.add_argument("--keep-lora", action="store_true", help="write the LoRA adapter separately instead of merging")
    p.set_defaults(func=_cmd_export)


def _score_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("folder", help="folder with the images (see above)")
    s.add_argument("--out", required=True, help="output JSONL, one line per item")
    s.add_argument("--task", choices=("edit", "gen"), default="edit", help="edit pairs (default) or generated images")
    s.add_argument("--endpoint", action="append", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    s.add_argument("--model", help="local checkpoint directory or hub id (instead of --endpoint)")
    s.add_argument("--model-name", help="model name to request from the endpoint (default: its first model)")
    s.add_argument("--api-key", default=None, help=f"endpoint API key (default: ${API_KEY_ENV})")
    s.add_argument("--instruction", help="one instruction for every pair (layout 2 without instruction files)")
    s.add_argument("--dimensions", help="comma-separated judgements, e.g. execution,consistency (default: all)")
    s.add_argument("--reward", help="reward combiner (default cme for edit, qma for gen)")
    s.add_argument("--prompt", action="append", type=_prompt_override, metavar="NAME=PATH", help="template override")
    s.add_argument("--chunk", type=int, default=64, help="items sent to the critic at once (and written together)")
    s.add_argument("--limit", type=int, default=0, help="score only the first N items")
    s.add_argument("--concurrency", type=int, default=32, help="HTTP requests in flight")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds per HTTP request")
    s.add_argument("--retries", type=int, default=3, help="HTTP retries on connection errors, timeouts and 5xx")
    s.add_argument("--parse-retries", type=int, default=1, help="re-asks when an answer cannot be parsed")
    s.add_argument("--max-tokens", type=int, default=1024, help="generation budget per judgement")
    s.add_argument("--device", default="auto", help="local model device")
    s.add_argument("--batch-size", type=int, default=8, help="local model batch size")
    s.add_argument(
        "--expected-score",
        action="store_true",
        help="also compute expected scores (local: from the logits; endpoint: from logprobs / top_logprobs)",
    )
    s.add_argument("--top-logprobs", type=int, default=20, help="endpoint: alternatives per token asked for (0..20)")
    s.add_argument(
        "--structured-outputs",
        choices=("off", "vllm", "response_format"),
        default="off",
        help="endpoint: constrain answers to their parser's format (vLLM structured_outputs, or OpenAI "
        "response_format JSON schemas); only with templates that ask for the built-in formats",
    )
    s.add_argument("--revision", default=None, help="hub revision when --model is a hub id")
