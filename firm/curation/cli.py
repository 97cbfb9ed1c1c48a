"""`firm curate`: run a curation pipeline (heavy imports happen inside the handler)."""

from __future__ import annotations

import argparse


def _cmd_curate(args: argparse.Namespace) -> int:
    from firm.config import to_yaml
    from firm.curation.runner import load_curation, print_report, run_curation

    cfg = load_curation(args.experiment, list(args.overrides))
    if args.dry_run:
        print(to_yaml(cfg))
        return 0
    manifest = run_curation(cfg)
    print_report(manifest)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "curate",
        help="run a curation pipeline (difference-first / plan-then-score) from a YAML",
        description="Judge input samples with teacher models (difference-first for edits, plan-then-score for "
        "generations), optionally balance the score histogram, and write shards + manifest.json to "
        "<output_dir>/<name>/. Relaunching the same command resumes a killed run.",
    )
    p.add_argument("experiment", help="curation YAML (a path, or a name under experiments/)")
    p.add_argument("overrides", nargs="*", help="overrides such as source.count=100 concurrency.max_in_flight=16")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_curate)
