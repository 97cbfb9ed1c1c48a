"""`firm critic bench` and `firm critic bench-convert`: critics on FIRM-Bench (or any benchmark directory).

`firm critic score|serve|export` are registered by firm/critics/cli.py. `firm shapes export-bench` (the synthetic shapes
benchmark) belongs to the shapes plugin: firm/synthetic/cli.py.

Heavy libraries are imported inside the handlers so that `firm --help` stays fast.
"""

from __future__ import annotations

import argparse


def _cmd_bench(args: argparse.Namespace) -> int:
    from firm.bench.evaluate import BenchEvaluationError
    from firm.bench.run import load_bench_config, run_bench
    from firm.config import ConfigError

    experiment, overrides = args.experiment, list(args.overrides)
    if experiment is not None and "=" in experiment and not experiment.endswith((".yaml", ".yml")):
        overrides.insert(0, experiment)
        experiment = None
    if experiment is None and args.data is None:
        raise ConfigError("firm critic bench needs an experiment YAML, or --data DIR --critic NAME")
    if args.fresh:
        overrides.append("fresh=true")
    cfg = load_bench_config(experiment, overrides, data=args.data, critics=args.critic)
    if args.dry_run:
        from firm.config import to_yaml

        print(to_yaml(cfg), end="")
        return 0
    try:
        run_bench(cfg, progress=None)
    except BenchEvaluationError as e:
        print(f"firm critic bench: {e}")
        return 1
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from firm.bench.convert import convert_firm_bench

    fields = dict(kv.split("=", 1) for kv in args.field)
    out = convert_firm_bench(
        args.out, edit_dir=args.edit_dir, gen_dir=args.gen_dir, field_map=fields, link_images=not args.copy_images
    )
    print(f"[firm critic bench-convert] wrote {out}; evaluate with `firm critic bench --data {out} --critic NAME`")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    critic = sub.noun("critic")
    p = critic.add_parser(
        "bench",
        help="evaluate critics on FIRM-Bench (or any benchmark directory)",
        description="Score every benchmark item with each critic (cached, resumable), then print MAE per task and "
        "split, correlations and parse failures; writes results.json, table.md and bench.png. "
        "Either `firm critic bench EXP.yaml [key=value ...]` or `firm critic bench --data DIR --critic NAME "
        "[critic.key=value]`.",
    )
    p.add_argument("experiment", nargs="?", help="bench YAML (a path, or a name under experiments/)")
    p.add_argument("overrides", nargs="*", help="overrides such as limit=20 critic.model=/path batch_size=4")
    p.add_argument("--data", help="benchmark directory (items.jsonl + images)")
    p.add_argument("--critic", action="append", metavar="NAME", help="critic registry name (repeatable)")
    p.add_argument("--fresh", action="store_true", help="ignore cached answers and score everything again")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=_cmd_bench)

    p = critic.add_parser(
        "bench-convert",
        help="convert the released FIRM-Bench files into the local benchmark layout",
        description="Read FIRM-Bench-Edit/ and FIRM-Bench-Gen/ as downloaded from the FIRM-Bench dataset "
        "(bench_v1.jsonl + result/human_bench_v1.jsonl + images) and write items.jsonl. See docs/bench.md for the "
        "assumed field names and how to override them.",
    )
    p.add_argument("out", help="output benchmark directory")
    p.add_argument("--edit-dir", help="the FIRM-Bench-Edit folder")
    p.add_argument("--gen-dir", help="the FIRM-Bench-Gen folder")
    p.add_argument(
        "--field", action="append", default=[], metavar="ROLE=KEY", help="use KEY of the source files for ROLE"
    )
    p.add_argument("--copy-images", action="store_true", help="copy images instead of symlinking them")
    p.set_defaults(func=_cmd_convert)
