"""`firm data import|inspect`: reward-data shards (heavy imports happen inside the handlers)."""

from __future__ import annotations

import argparse
import re
import sys

_SIZE_RE = re.compile(r"^\s*([0-9.]+)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def parse_size(text: str) -> float:
    """Bytes from ``"500MB"``, ``"1.5GB"``, ``"200k"`` or a plain number (powers of 1000)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"cannot read size {text!r}: use e.g. 500MB, 1GB or a number of bytes")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return float(m.group(1)) * scale


def _cmd_import(args: argparse.Namespace) -> int:
    from firm.data.importers import DataImportError, import_samples

    try:
        report = import_samples(
            args.source,
            args.out,
            args.schema,
            on_error=args.on_error,
            extra_to_bag=args.extra_to_bag,
            image_format=args.image_format,
            jpeg_quality=args.jpeg_quality,
            max_count=args.max_count,
            max_size=args.max_size,
        )
    except DataImportError as e:
        print(f"firm data import: error: {e}", file=sys.stderr)
        return 1
    print(report.summary())
    for s in report.shards:
        print(f"  {s}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from firm.data.inspect import inspect_shards
    from firm.data.reader import CorruptShardError

    try:
        report = inspect_shards(args.shards, args.out, num_render=args.render, schema=args.schema)
    except (FileNotFoundError, CorruptShardError, ValueError) as e:
        print(f"firm data inspect: error: {e}", file=sys.stderr)
        return 1
    print(report.text())
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """`firm data import` and `firm data inspect` (see docs/data.md)."""
    dsub = sub.noun("data")
    p = dsub.add_parser(
        "import",
        help="import a JSONL (image paths) or a folder into validated shards",
        description="Import reward data from a JSONL file whose rows hold the schema's fields (image fields are "
        "file paths relative to the JSONL) or from a folder of <key>.<field>.<ext> files, into WebDataset shards "
        "<OUT>-NNNNNN.tar. Every sample is validated; errors name the row and the field.",
    )
    p.add_argument("source", help="a .jsonl file or a folder")
    p.add_argument("--schema", required=True, choices=["edit", "generation", "rl_prompt"], help="sample schema")
    p.add_argument("--out", required=True, help="shard path prefix, e.g. data/edit/train")
    p.add_argument("--image-format", default="png", choices=["png", "jpg"], help="png (lossless, default) or jpg")
    p.add_argument("--jpeg-quality", type=int, default=95, help="JPEG quality when --image-format jpg")
    p.add_argument("--max-count", type=int, default=10_000, help="samples per shard (default 10000)")
    p.add_argument("--max-size", type=parse_size, default=1e9, help="bytes per shard, e.g. 500MB (default 1GB)")
    p.add_argument("--on-error", default="fail", choices=["fail", "skip"], help="stop at a bad row, or skip it")
    p.add_argument(
        "--extra-to-bag",
        action="store_true",
        help="keep fields outside the schema under provenance (meta for rl_prompt) instead of failing",
    )
    p.set_defaults(func=_cmd_import)

    p = dsub.add_parser(
        "inspect",
        help="counts, score histograms and rendered samples of shards",
        description="Count the samples of a shard set, print score histograms, and with --out write "
        "report.json, histograms.png and a few samples rendered to PNG.",
    )
    p.add_argument("shards", nargs="+", help="shards: a folder, a glob, a brace pattern (a-{000..009}.tar) or files")
    p.add_argument("--out", default=None, help="folder for report.json, histograms.png and samples/*.png")
    p.add_argument("--render", type=int, default=4, help="how many samples to render (default 4)")
    p.add_argument("--schema", default=None, choices=["edit", "generation", "rl_prompt"], help="expected schema")
    p.set_defaults(func=_cmd_inspect)
