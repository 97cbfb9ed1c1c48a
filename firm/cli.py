"""The `firm` command line.

Each area of FIRM adds its own subcommands through a provider module with ``add_commands(subparsers)``; providers
import heavy libraries only inside their handlers, so `firm --help` and `firm list` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from firm.config import ConfigError
from firm.paths import find_experiment

# Modules that contribute subcommands (each defines `add_commands(subparsers)`).
PROVIDERS: list[str] = [
    "firm.cli",
    "firm.kernels_cli",
    "firm.critics.cli",
    "firm.policies.cli",
    "firm.synthetic.cli",
    "firm.bench.cli",
    "firm.curation.cli",
    "firm.eval.cli",
]


def _cmd_run(args: argparse.Namespace) -> int:
    from firm.runner import run

    experiment = args.experiment
    overrides = list(args.overrides)
    # `firm run --resume RUN_DIR key=value`: argparse puts the first override into `experiment`.
    if experiment is not None and "=" in experiment and not experiment.endswith((".yaml", ".yml")):
        overrides.insert(0, experiment)
        experiment = None
    resume = args.resume
    # `firm run X.yaml --resume key=value`: argparse takes the override for RUN_DIR; it is an override, and the run
    # to resume is the experiment's newest.
    if resume is not None and "=" in resume and not Path(resume).is_dir():
        overrides.insert(0, resume)
        resume = "latest"
    if experiment is not None:
        experiment = find_experiment(experiment)
        _check_kind(experiment)
    run(experiment, overrides, dry_run=args.dry_run, resume=resume)
    return 0


# Top-level keys that mark a YAML as another command's experiment (and `firm run` experiments have `module:`).
KIND_KEYS = {"pipeline": "curation", "critics": "bench"}


def _check_kind(path: str) -> None:
    """Refuse, naming the right command, a curation or bench YAML given to `firm run` (they have no `module:`)."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return  # load_experiment reports it
    if not isinstance(data, dict) or "module" in data:
        return
    kind = next((k for key, k in KIND_KEYS.items() if key in data), None)
    if kind is None:
        return
    command = FOLDER_COMMANDS[kind]
    marker = next(key for key, k in KIND_KEYS.items() if k == kind)
    raise ConfigError(
        f"{path} is a {kind} experiment (it has `{marker}:` and no `module:`); run it with `{command} {path}`"
    )


# The command that runs the experiments of a top-level folder of experiments/ (default: `firm run`).
FOLDER_COMMANDS = {"curation": "firm curate", "bench": "firm bench"}


def _cmd_bench_step(args: argparse.Namespace) -> int:
    from firm.algorithms.bench import main

    return main(args)


def _bench_step_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("experiment", help="an RL experiment YAML (a path, or a name under experiments/)")
    p.add_argument("overrides", nargs="*", help="overrides such as module.async_rollout=true")
    p.add_argument("--steps", type=int, default=3, help="timed RL steps (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed RL steps first (default 1)")
    p.add_argument(
        "--compare",
        action="append",
        metavar='"K=V ..."',
        help="run again with these extra overrides (repeatable); the table shows each run's ratio to the first",
    )
    p.add_argument("--out", default="runs/bench-step", help="folder for the JSON results")
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")


def _cmd_list(args: argparse.Namespace) -> int:
    from firm.paths import experiments_root
    from firm.runner import list_experiments

    rows = list_experiments()
    if not rows:
        print(f"no experiments found under {experiments_root()}")
        return 1
    width = max(len(r[0]) for r in rows)
    print(f"Shipped experiments (under {experiments_root()}):")
    folder = None
    for path, desc in rows:
        top = path.split("/", 1)[0] if "/" in path else ""
        if top != folder:
            folder = top
            print(f"\n{top or '.'}/  (by name, anywhere: `{FOLDER_COMMANDS.get(top, 'firm run')} {top}/<name>`)")
        print(f"  {path:<{width}}  {desc}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from firm.doctor import main

    return main()


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run an experiment YAML",
        description="Resolve an experiment (dataclass defaults <- YAML <- key=value overrides), then train it. "
        "Outputs go to <output_root>/<name>/<timestamp>/.",
    )
    p.add_argument("experiment", nargs="?", help="experiment YAML (a path, or a name under experiments/)")
    p.add_argument("overrides", nargs="*", help="overrides such as trainer.max_steps=100 module.lr=3e-4")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN_DIR",
        help="continue a run from its last checkpoint (without RUN_DIR: the experiment's newest run)",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "bench-step",
        help="time the parts of an RL experiment's step (forwards, critic, backward, ...), host syncs, memory",
        description="Runs a few RL steps of an experiment and prints where the time goes; writes JSON with the device.",
    )
    _bench_step_arguments(p)
    p.set_defaults(func=_cmd_bench_step)

    p = sub.add_parser("list", help="list the shipped experiments")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser(
        "doctor",
        help="check that transformers, diffusers/peft and FIRM's fused kernels import, each from its own place",
        description="Imports transformers' hub-kernels integration, diffusers' peft loader and firm.kernels in one "
        "process and says where the import name `kernels` comes from. Exit status 1 when a check fails.",
    )
    p.set_defaults(func=_cmd_doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="firm", description="FIRM: faithful reward modeling and RL for image editing and generation."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in PROVIDERS:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # Overrides may follow options (`firm run x.yaml --dry-run a.b=1`): argparse leaves those for us.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        sys.exit(2)
    try:
        code = args.func(args)
    except ConfigError as e:
        print(f"firm: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("firm: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `firm list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    sys.exit(code or 0)
