"""`firm kernels bench` and `firm kernels profile`: the fused-kernel benchmark and profiler (see docs/kernels.md).

Thin wrappers over :mod:`firm.kernels.bench` (also runnable as ``python -m firm.kernels.bench``); torch is imported only
when a subcommand runs.
"""

from __future__ import annotations

import argparse


def _bench(args: argparse.Namespace) -> int:
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
    p = sub.add_parser(
        "kernels",
        help="benchmark or profile the fused Triton kernels",
        description="Benchmark (eager vs torch.compile vs Triton; CUDA timings, CPU correctness) or profile the "
        "fused diffusion-RL ops.",
    )
    ksub = p.add_subparsers(dest="kernels_command", metavar="{bench,profile}", required=True)
    b = ksub.add_parser("bench", help="time the ops and check them against float64; writes CSV/JSON")
    _common(b)
    b.add_argument("--quick", action="store_true", help="fewer, smaller shapes")
    b.set_defaults(func=_bench)
    pr = ksub.add_parser("profile", help="write a torch.profiler trace of the ops (forward+backward)")
    _common(pr)
    pr.add_argument("--steps", type=int, default=5, help="profiled iterations")
    pr.set_defaults(func=_profile)
