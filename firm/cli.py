"""The `firm` command line.

Top-level commands are verbs (`firm run`, `firm eval`, `firm curate`, `firm plan`, `firm list`, `firm doctor`); the rest
are a noun and an action (`firm critic serve`, `firm data import`, `firm profile step`). Each area of FIRM adds its own
subcommands through a provider module with ``add_commands(sub)``, registering only the commands whose code it holds:
top-level ones with ``sub.add_parser(...)``, actions of a noun with ``sub.noun("critic").add_parser(...)`` (several
packages may add to one noun: firm/bench/ adds `critic bench`, firm/critics/ adds `critic serve`). tests/test_cli.py
pins which module registers each command. Providers import heavy libraries only inside their handlers, so `firm --help`
and `firm list` stay fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

from firm.config import ConfigError
from firm.paths import find_experiment

# Modules that contribute subcommands (each defines `add_commands(sub)`, `sub` a Subcommands).
PROVIDERS: list[str] = [
    "firm.cli",
    "firm.curation.cli",
    "firm.eval.cli",
    "firm.critics.cli",
    "firm.bench.cli",
    "firm.policies.cli",
    "firm.data.cli",
    "firm.profile.cli",
    "firm.plan.cli",
    "firm.kernels_cli",
    "firm.synthetic.cli",
    "firm.synthetic.recipes.cli",
    "firm.rewards_cli",
]

# `firm NOUN ...`: the groups of actions, with their one-line help.
NOUNS: dict[str, str] = {
    "critic": "critics: score a folder, serve, export a trained one, benchmark on FIRM-Bench",
    "policy": "policies: export a trained LoRA",
    "reward": "reward scorers: serve one over HTTP (from its own Python environment)",
    "data": "reward-data shards: import and inspect",
    "profile": "where the time of an RL step goes",
    "kernels": "the fused Triton kernels: time them against torch, or write a profiler trace",
    "shapes": "the procedural shapes world: preview, export, measure its rule critic, run its studies",
}

# Old spelling -> new spelling, both as the words after `firm`. The old spellings still work, with a warning on stderr,
# until the next release; remove this table then.
RENAMED: dict[tuple[str, ...], tuple[str, ...]] = {
    ("bench",): ("critic", "bench"),
    ("bench-convert",): ("critic", "bench-convert"),
    ("serve-critic",): ("critic", "serve"),
    ("export-critic",): ("critic", "export"),
    ("export-lora",): ("policy", "export"),
    ("bench-step",): ("profile", "step"),
    ("kernels", "bench"): ("kernels", "time"),
    ("shapes", "bench"): ("shapes", "critic-agreement"),
    ("bench-shapes",): ("shapes", "export-bench"),
    ("tiny-critic",): ("shapes", "tiny-critic"),
}


class Subcommands(argparse._SubParsersAction):
    """`firm`'s subcommands, as argparse keeps them, plus :meth:`noun`: what each provider's ``add_commands`` gets."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._nouns: dict[str, argparse._SubParsersAction] = {}

    def noun(self, name: str) -> argparse._SubParsersAction:
        """The actions of `firm NAME`: the first provider to ask creates the group, later ones add to it.

        ``firm NAME`` alone prints the group's help and exits with status 2.
        """
        if name not in NOUNS:
            raise KeyError(f"`firm {name}` is not a noun of the command line; add it to firm.cli.NOUNS")
        if name not in self._nouns:
            parser = self.add_parser(name, help=NOUNS[name], description=NOUNS[name][0].upper() + NOUNS[name][1:])
            self._nouns[name] = parser.add_subparsers(dest=f"{name}_command", metavar="ACTION")
            parser.set_defaults(func=lambda args: _print_help(parser))
        return self._nouns[name]


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def renamed(argv: list[str]) -> tuple[list[str], str | None]:
    """``argv`` with an old spelling replaced by its new one, and the warning to print (None when nothing changed)."""
    for old, new in RENAMED.items():
        if tuple(argv[: len(old)]) == old:
            warning = (
                f"firm: warning: `firm {' '.join(old)}` is deprecated and will be removed in the next release; "
                f"use `firm {' '.join(new)}`"
            )
            return [*new, *argv[len(old) :]], warning
    return list(argv), None


def _renamed_epilog() -> str:
    width = max(len(" ".join(old)) for old in RENAMED)
    lines = [f"  {' '.join(old):<{width}}  ->  firm {' '.join(new)}" for old, new in RENAMED.items()]
    return "renamed (the old spellings still work, with a warning, until the next release):\n" + "\n".join(lines)


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
FOLDER_COMMANDS = {"curation": "firm curate", "bench": "firm critic bench"}


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
        prog="firm",
        description="FIRM: faithful reward modeling and RL for image editing and generation.",
        epilog=_renamed_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", action=Subcommands)
    for name in PROVIDERS:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv, warning = renamed(sys.argv[1:] if argv is None else list(argv))
    if warning:
        print(warning, file=sys.stderr)
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
