"""`firm plan EXP.yaml`: the per-GPU memory of an RL or critic SFT experiment (heavy imports inside the handler)."""

from __future__ import annotations

import argparse


def _cmd_plan(args: argparse.Namespace) -> int:
    import sys
    import time

    from firm.paths import find_experiment
    from firm.plan.plan import plan_experiment
    from firm.plan.report import render, write_json

    t0 = time.perf_counter()

    def progress(msg: str) -> None:
        print(f"[firm plan] {msg} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    from firm.plan.critic import critic_config

    critic = critic_config(find_experiment(args.experiment), list(args.overrides))
    if critic is not None:
        return _plan_critic(args, critic, progress)
    plan = plan_experiment(
        find_experiment(args.experiment),
        list(args.overrides),
        prompt_tokens=args.prompt_tokens,
        target=args.gpu,
        progress=None if args.quiet else progress,
    )
    render(plan)
    if args.measure:
        from firm.plan.check import measure_micro_step

        progress("measuring the same micro-step for real on the CPU (torch.profiler)")
        check = measure_micro_step(plan, find_experiment(args.experiment), list(args.overrides))
        mib = 2**20
        print(
            f"one micro-step on the CPU: predicted {check.predicted / mib:.2f} MiB, measured "
            f"{check.measured / mib:.2f} MiB (predicted / measured = {check.ratio:.3f})"
        )
    if args.out:
        print(f"wrote {write_json(plan, args.out)}")
    return 0 if plan.fits or not args.check else 1


def _plan_critic(args: argparse.Namespace, cfg: object, progress: object) -> int:
    from firm.paths import find_experiment
    from firm.plan.critic import measure_critic_micro_step, plan_critic, render_critic, write_critic_json

    if args.prompt_tokens is not None:
        raise SystemExit("firm plan: --prompt-tokens is for RL experiments; a critic's examples are data.max_length")
    path = find_experiment(args.experiment)
    plan = plan_critic(path, cfg, target=args.gpu, progress=None if args.quiet else progress)
    render_critic(plan)
    if args.measure:
        progress("measuring the same micro-step for real on the CPU (torch.profiler)")
        check = measure_critic_micro_step(plan, cfg)
        mib = 2**20
        print(
            f"one micro-step on the CPU: predicted {check.predicted / mib:.2f} MiB, measured "
            f"{check.measured / mib:.2f} MiB (predicted / measured = {check.ratio:.3f})"
        )
    if args.out:
        print(f"wrote {write_critic_json(plan, args.out)}")
    return 0 if plan.fits or not args.check else 1


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="per-GPU memory of an RL or critic SFT experiment (weights, optimizer, activations) before renting GPUs",
        description="Builds the experiment's model from its checkpoint's config files on the meta device, measures "
        "its activations with fake tensors, and prints the per-GPU memory of DDP and FSDP2, with and without "
        "activation checkpointing (and each text-encoder placement, RL); says whether it fits an 80 GB and a 141 GB "
        "GPU.",
    )
    p.add_argument("experiment", help="an RL or critic SFT experiment YAML (a path, or a name under experiments/)")
    p.add_argument("overrides", nargs="*", help="overrides such as trainer.devices=16 module.micro_batch_size=4")
    p.add_argument("--out", help="also write the plan as JSON to this file")
    p.add_argument("--gpu", default="80GB", choices=["80GB", "141GB"], help="the GPU 'fits' refers to (default 80GB)")
    p.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        metavar="N",
        help="plan with prompts of at most N tokens (default: the cap, policy.max_sequence_length or the pipeline's)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="tiny experiments: also run one trained micro-batch for real on the CPU and compare its peak",
    )
    p.add_argument("--check", action="store_true", help="exit with status 1 when the experiment does not fit")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=_cmd_plan)
