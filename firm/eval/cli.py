"""The `firm eval` command (see :mod:`firm.eval.run`)."""

from __future__ import annotations

import argparse


def _cmd_eval(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from firm.eval.run import STAGES, load_eval_config, run_eval

    c = load_eval_config(args.experiment, list(args.overrides))
    if args.dry_run:
        print(OmegaConf.to_yaml(OmegaConf.structured(c)))
        return 0
    run_eval(c, STAGES if args.stage == "all" else (args.stage,))
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate policies on a prompt set (generate -> score -> report)",
        description="Generate images for a prompt set with each policy, score them with a judge (cached), and write "
        "table.md, results.json and grids to <output_root>/<name>/. Rerunning resumes. docs/eval.md.",
    )
    p.add_argument("experiment", help="eval YAML (a path, or a name under experiments/)")
    p.add_argument("overrides", nargs="*", help="overrides such as generation.seeds=[0,1] limit=4")
    p.add_argument("--stage", choices=["all", "generate", "score", "report"], default="all", help="run one stage")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit (reads no weights)")
    p.set_defaults(func=_cmd_eval)
