"""`firm profile step`: the time of an RL step, part by part (heavy imports happen inside the handler)."""

from __future__ import annotations

import argparse


def _cmd_step(args: argparse.Namespace) -> int:
    from firm.profile.step import main

    return main(args)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.noun("profile").add_parser(
        "step",
        help="time the parts of an RL experiment's step (forwards, critic, backward, ...), host syncs, memory",
        description="Runs a few RL steps of an experiment and prints where the time goes; writes JSON with the device.",
    )
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
    p.add_argument("--out", default="runs/profile-step", help="folder for the JSON results")
    p.add_argument("--progress", action="store_true", help="show Lightning's progress bar")
    p.set_defaults(func=_cmd_step)
