"""Checking the plan against a real run on the CPU (tiny experiments): `firm plan EXP.yaml --measure`.

The real run builds the experiment's policy with real tensors, gives AdamW its states (one step on zero gradients),
keeps the EMA copy when the experiment has one, and runs one trained micro-batch exactly as the plan measures it with
fake tensors (:func:`firm.plan.plan.update_step`). Its peak is read from the allocator's events recorded by
``torch.profiler`` (``profile_memory``), independently of the plan's counting. The plan's matching figure is its
update phase without the rollout buffers (the real run does no rollout).

This allocates the model for real: use it on tiny experiments (``pretrained: null``), not on full-size ones.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from firm.plan.plan import Plan, update_step


@dataclass
class Check:
    """The plan's prediction of one micro-step next to the peak measured on the CPU (bytes)."""

    predicted: int
    measured: int

    @property
    def ratio(self) -> float:
        return self.predicted / self.measured


def cpu_peak(fn: Callable[[], Any]) -> int:
    """The peak bytes of CPU tensors alive while ``fn()`` runs, from torch.profiler's memory timeline."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # export_memory_timeline is deprecated in favour of CUDA-only snapshots
        path = Path(d) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    return max((sum(per_category) for per_category in sizes), default=0)


def predicted_micro_step(plan: Plan) -> int:
    """The plan's bytes for what :func:`measure_micro_step` runs: its update phase without the rollout buffers."""
    row = plan.row
    return row.phases["update"] - row.parts["rollout_buffers"]


def measure_micro_step(plan: Plan, experiment: str, overrides: list[str] | None = None) -> Check:
    """Run the plan's micro-step for real on the CPU and compare (see the module docstring)."""
    from firm.config import load_experiment, to_object
    from firm.plan.inputs import InputsContext, tiny_inputs
    from firm.policies.policy import FlowPolicy
    from firm.registry import resolve

    cfg = to_object(load_experiment(experiment, overrides))
    m, s = cfg.module, plan.shapes
    algorithm = resolve("modules", m.name)
    if m.policy.pretrained is not None:
        raise ValueError("--measure builds the model for real on the CPU: use it on tiny experiments (pretrained null)")
    from firm.plan.plan import trains_with_guidance

    guidance = m.sampler.guidance_scale if trains_with_guidance(algorithm) else 1.0

    def run() -> None:
        torch.manual_seed(0)
        policy = FlowPolicy(m.policy, old_adapter=algorithm.needs_old_adapter)
        if m.policy.gradient_checkpointing:
            policy.transformer.enable_gradient_checkpointing()
        ctx = InputsContext(policy.family, m.policy, policy.transformer, policy.codec, None)
        inputs = tiny_inputs(ctx, policy.text_encoder)
        params = policy.trainable_parameters()
        opt = torch.optim.AdamW(params, lr=m.lr)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()  # AdamW's states exist from the first step on; the gradients stay (accumulation)
        ema = [p.detach().clone() for p in params] if m.ema_decay is not None else []
        update_step(policy, inputs, s.micro_batch, guidance=guidance, no_grad_forwards=s.no_grad_forwards)
        del ema, opt

    return Check(predicted_micro_step(plan), cpu_peak(run))
