"""`firm kernels time` and `firm kernels profile`: the fused-kernel timing harness and profiler (see docs/kernels.md).

Thin wrappers over :mod:`firm.kernels.bench` (also runnable as ``python -m firm.kernels.bench``); torch is imported only
when a subcommand runs. This file sits beside firm/kernels/ rather than in it because importing anything of that package
imports torch and triton (about 3 s), which `firm --help` should not wait for.
"""

from __future__ import annotations

import argparse


def _time(args: argparse.Namespace) -> int:
    from firm.kernels.bench import bench_main

    return bench_main(args)


def _profile(args: argparse.Namespace) -> int:
    from firm.kernels.bench import profile_main

    return profile_main(args)


def _common(p: argparse.ArgumentParser) -> None:
    # Mirrors firm.kernels.bench.add_common_args without importing torch at parser-build time.
    p.add_argument("--ops", default="step_log_prob,nft_loss,group_advantages", help="comma-separated subset of the ops")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="input dtype (CPU: fp32)")
    p.add_argument("--out", default="runs/kernels", help="directory for the CSV/JSON results or the trace")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    ksub = sub.noun("kernels")
    b = ksub.add_parser(
        "time",
        help="time the ops (eager vs torch.compile vs Triton) and check them against float64; writes CSV/JSON",
        description="Time the fused diffusion-RL ops against eager torch and torch.compile (CUDA timings; on a CPU, "
        "the correctness check only) and check each against a float64 reference.",
    )
    _common(b)
    b.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    b.set_defaults(func=_time)
    pr = ksub.add_parser("profile", help="write a torch.profiler trace of the ops (forward+backward)")
    _common(pr)
    pr.add_argument("--steps", type=int, default=5, help="profiled iterations")
    pr.set_defaults(func=_profile)
