"""`firm profile step`: where the time of an RL step goes, for any experiment YAML.

    firm profile step EXP.yaml [key=value ...] [--steps N] [--warmup W] [--compare "k=v ..." ...] [--out DIR]

Runs ``W + N`` RL steps of the experiment (no checkpoints, no loggers), times the last ``N`` and prints:

* the breakdown of a step: rollout forwards, critic busy (on its worker thread, overlapping the rest), critic wait
  (the main thread blocked on the critic), update forwards, backward, optimizer, kernels (``kernels.*`` calls),
  other (everything else on the main thread: decoding, encoding, data, Python);
* transformer forwards per trained sample-step (CFG counts twice), host syncs per optimizer step and per RL step
  (counted in one extra RL step, with a dispatch mode that sees every ``.item()`` / ``float()`` / ``nonzero`` and
  device-to-host copy of a tensor; the optimizer's own step counters, CPU tensors on a GPU too, are not counted;
  on a CPU every tensor read counts, so the host-side bookkeeping of the RL step uses numpy), and peak memory (CUDA
  allocator, or the process's peak RSS on a CPU).

``--compare`` runs the same experiment again with each extra set of overrides, in the same process, and adds a column
per set with its ratio to the first: the way to measure, side by side, sync vs async rollouts or a setting's effect.
Results go to ``DIR/<experiment>-<time>.json`` with the device name. On a GPU every timed section synchronises the
device first, so the breakdown is exact and the total slightly pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SECTIONS = ("rollout_fwd", "critic_wait", "update_fwd", "backward", "optimizer", "kernels", "other")
KERNEL_OPS = ("step_log_prob", "clipped_surrogate", "nft_loss", "group_advantages")
_SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}


class SyncCounter(TorchDispatchMode):
    """Counts the ops that make the host wait for the device: scalar reads, ``nonzero``, device-to-host copies."""

    def __init__(self, profiler: StepProfiler | None = None) -> None:
        super().__init__()
        self.count = 0  # every sync of the step
        self.update_count = 0  # those inside the update loop
        self.profiler = profiler

    def _hit(self) -> None:
        if self.profiler is not None and self.profiler.paused:
            return
        self.count += 1
        if self.profiler is not None and self.profiler.in_update:
            self.update_count += 1

    def __enter__(self) -> SyncCounter:
        # Tensor.tolist reads a whole tensor to the host without an aten op: count it by hand
        self._tolist = torch.Tensor.tolist
        counter, tolist = self, self._tolist

        def counted_tolist(t: torch.Tensor) -> Any:
            counter._hit()
            return tolist(t)

        torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _SYNC_OPS:
            self._hit()
        elif name in ("_to_copy", "copy_"):
            src = args[1] if name == "copy_" else args[0]
            dst_dev = kwargs.get("device") if name == "_to_copy" else args[0].device
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and str(dst_dev) == "cpu":
                self._hit()  # device to host
            elif isinstance(src, torch.Tensor) and src.device.type == "cpu" and not src.is_pinned():
                if dst_dev is not None and torch.device(dst_dev).type == "cuda":
                    self._hit()  # a pageable host-to-device copy waits for the stream too
        return func(*args, **kwargs)


def device_name(device: torch.device) -> str:
    """The kernel benchmark's device name, plus the torch thread count on a CPU (it changes CPU timings most)."""
    from firm.kernels.bench import device_name as kernels_device_name

    name = kernels_device_name(device)
    return name if device.type == "cuda" else f"{name}, {torch.get_num_threads()} torch threads"


class StepProfiler:
    """Wraps a module's forward, backward, optimizer, kernels and critic to time one RL step's parts."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.times: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.in_update = False
        self.paused = False  # inside the optimizer's step: its step counters are CPU tensors on a GPU too
        self.syncs: SyncCounter | None = None
        self._patch()

    def _sync(self) -> None:
        if self.module.device.type == "cuda":  # read each time: the module reaches its device only inside fit
            torch.cuda.synchronize()

    def flagged(self, fn: Any, flag: str) -> Any:
        """``fn`` with this profiler's attribute ``flag`` set to True while it runs."""

        def wrapper(*a: Any, **k: Any) -> Any:
            setattr(self, flag, True)
            try:
                return fn(*a, **k)
            finally:
                setattr(self, flag, False)

        return wrapper

    def _timed(self, fn: Any, key: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            self._sync()
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self._sync()
                self.times[key() if callable(key) else key] += time.perf_counter() - t0

        return wrapper

    def _patch(self) -> None:
        from firm import kernels

        m, policy = self.module, self.module.policy
        velocity = policy.velocity

        def counted_velocity(x: torch.Tensor, sigma: torch.Tensor, cond: Any, **kw: Any) -> torch.Tensor:
            cfg = policy.needs_uncond(kw.get("guidance_scale", 1.0))
            self.counts["update_fwd" if self.in_update else "rollout_fwd"] += x.shape[0] * (2 if cfg else 1)
            return velocity(x, sigma, cond, **kw)

        policy.velocity = self._timed(counted_velocity, lambda: "update_fwd" if self.in_update else "rollout_fwd")
        m.manual_backward = self._timed(m.manual_backward, "backward")
        step = m.apply_optimizer_step

        def counted_step(*a: Any, **k: Any) -> Any:
            self.counts["optimizer_steps"] += 1
            return step(*a, **k)

        m.apply_optimizer_step = self._timed(counted_step, "optimizer")
        m.update = self.flagged(m.update, "in_update")
        micro = m.micro_loss

        def counted_micro(roll: Any, adv: Any, ctx: Any, mic: Any) -> Any:
            self.counts["trained_sample_steps"] += mic.m.numel()
            return micro(roll, adv, ctx, mic)

        m.micro_loss = counted_micro
        self._kernels = {name: getattr(kernels, name) for name in KERNEL_OPS}
        for name, fn in self._kernels.items():
            setattr(kernels, name, self._timed(fn, "kernels"))

    def restore(self) -> None:
        from firm import kernels

        for name, fn in self._kernels.items():
            setattr(kernels, name, fn)


def _callback(profiler: StepProfiler, warmup: int, steps: int) -> Any:
    import lightning as L

    class Measure(L.Callback):
        def __init__(self) -> None:
            self.rl = 0
            self.rows: list[dict[str, float]] = []
            self.sync_row: dict[str, float] | None = None
            self.device: torch.device | None = None
            self.peak_mib = 0.0

        def on_train_start(self, trainer: Any, module: Any) -> None:
            # Read here, not after fit: Lightning moves the module back to the CPU when training ends.
            self.device = module.device
            for opt in trainer.optimizers:
                opt.step = profiler.flagged(opt.step, "paused")

        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, batch_idx: int) -> None:
            profiler._sync()
            scorer = module.scorer
            self._t0, self._busy0, self._wait0 = time.perf_counter(), scorer.busy_s, scorer.wait_s
            self._times0, self._counts0 = dict(profiler.times), dict(profiler.counts)
            if self.rl == warmup + steps:  # the extra step that counts host syncs
                profiler.syncs = SyncCounter(profiler)
                profiler.syncs.__enter__()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            profiler._sync()
            scorer = module.scorer
            row = {"step": time.perf_counter() - self._t0, "critic_busy": scorer.busy_s - self._busy0}
            row["critic_wait"] = scorer.wait_s - self._wait0
            for k, v in profiler.times.items():
                row[k] = v - self._times0.get(k, 0.0)
            for k, v in profiler.counts.items():
                row[f"n_{k}"] = v - self._counts0.get(k, 0.0)
            if profiler.syncs is not None:
                profiler.syncs.__exit__(None, None, None)
                row["syncs"] = float(profiler.syncs.count)
                row["update_syncs"] = float(profiler.syncs.update_count)
                self.sync_row, profiler.syncs = row, None
                trainer.should_stop = True
            elif self.rl >= warmup:
                self.rows.append(row)
            if self.device is not None and self.device.type == "cuda":
                self.peak_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.rl += 1

    return Measure()


def profile_experiment(
    experiment: str,
    overrides: list[str],
    *,
    steps: int,
    warmup: int,
    progress: bool = False,
    root: str | Path | None = None,
) -> dict[str, Any]:
    """Run and time one experiment (see the module docstring); returns the result record."""
    import lightning as L

    from firm.config import load_experiment, to_object
    from firm.runner import build_components, build_strategy, quiet_third_party_warnings

    quiet_third_party_warnings()
    cfg = to_object(load_experiment(experiment, overrides))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    module, datamodule = build_components(cfg)
    if not hasattr(module, "micro_loss"):
        raise SystemExit(f"firm profile step: {experiment} is not an RL experiment (module {cfg.module.name!r})")
    profiler = StepProfiler(module)
    measure = _callback(profiler, warmup, steps)
    tc = cfg.trainer
    trainer = L.Trainer(
        max_steps=-1,
        default_root_dir=str(root) if root is not None else tempfile.mkdtemp(prefix="firm-profile-step-"),  # samples/
        max_epochs=10**6,
        accelerator=tc.accelerator,
        devices=tc.devices,
        num_nodes=tc.num_nodes,
        strategy=build_strategy(tc, module),
        precision=tc.precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        callbacks=[measure],
        use_distributed_sampler=getattr(datamodule, "use_distributed_sampler", True),
    )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # what an earlier run of --compare left behind
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(module, datamodule=datamodule)
    profiler.restore()
    if not measure.rows or measure.sync_row is None:
        raise SystemExit("firm profile step: the run ended before the measured steps (too few prompts or steps?)")
    n = len(measure.rows)
    mean = {k: sum(r.get(k, 0.0) for r in measure.rows) / n for k in {k for r in measure.rows for k in r}}
    main = sum(mean.get(k, 0.0) for k in SECTIONS if k != "other")
    mean["other"] = max(mean["step"] - main, 0.0)
    sr = measure.sync_row
    opt_steps = max(sr.get("n_optimizer_steps", 0.0), 1.0)
    device = measure.device or module.device
    if device.type == "cuda":
        peak, peak_kind = measure.peak_mib, "cuda max_memory_allocated"
    else:  # the process's peak so far: with --compare, later runs' values include the earlier runs'
        peak, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"  # KiB
    return {
        "experiment": str(experiment),
        "overrides": overrides,
        "device": device_name(device),
        "steps": n,
        "warmup": warmup,
        "seconds": {k: mean.get(k, 0.0) for k in ("step", "critic_busy", *SECTIONS)},
        "per_step": measure.rows,
        "forwards_per_trained_sample_step": mean.get("n_update_fwd", 0.0)
        / max(mean.get("n_trained_sample_steps", 0), 1),
        "rollout_forwards_per_step": mean.get("n_rollout_fwd", 0.0),
        "optimizer_steps_per_rl_step": mean.get("n_optimizer_steps", 0.0),
        "host_syncs_per_optimizer_step": sr["update_syncs"] / opt_steps,
        "host_syncs_per_rl_step": sr["syncs"],
        "peak_memory_mib": peak,
        "peak_memory_kind": peak_kind,
        "async_rollout": bool(getattr(module.config, "async_rollout", False)),
    }


ROWS = [
    ("step (s)", lambda r: r["seconds"]["step"]),
    *[(f"  {k.replace('_', ' ')} (s)", lambda r, k=k: r["seconds"][k]) for k in SECTIONS],
    ("critic busy, overlapped (s)", lambda r: r["seconds"]["critic_busy"]),
    ("critic wait / step", lambda r: r["seconds"]["critic_wait"] / max(r["seconds"]["step"], 1e-12)),
    ("forwards per trained sample-step", lambda r: r["forwards_per_trained_sample_step"]),
    ("rollout forwards per step", lambda r: r["rollout_forwards_per_step"]),
    ("optimizer steps per RL step", lambda r: r["optimizer_steps_per_rl_step"]),
    ("host syncs per optimizer step", lambda r: r["host_syncs_per_optimizer_step"]),
    ("host syncs per RL step", lambda r: r["host_syncs_per_rl_step"]),
    ("peak memory (MiB)", lambda r: r["peak_memory_mib"]),
]


def table(results: list[dict[str, Any]]) -> str:
    """A markdown table: one column per run, with the ratio of each to the first."""
    head = ["", *[r.get("label") or "as configured" for r in results]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, get in ROWS:
        vals = [get(r) for r in results]
        cells = [f"{vals[0]:.4g}"]
        for v in vals[1:]:
            ratio = f" ({v / vals[0]:.2f}x)" if vals[0] else ""
            cells.append(f"{v:.4g}{ratio}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from firm.paths import find_experiment

    experiment = find_experiment(args.experiment)
    runs = [(list(args.overrides), "base")]
    runs += [(list(args.overrides) + shlex.split(c), c) for c in (args.compare or [])]
    results = []
    for ov, label in runs:
        print(f"[profile step] {experiment} {' '.join(ov)}", file=sys.stderr)
        res = profile_experiment(
            experiment, ov, steps=args.steps, warmup=args.warmup, progress=args.progress, root=Path(args.out) / "root"
        )
        results.append({**res, "label": label})
    print(f"device: {results[0]['device']}; {args.steps} timed RL steps after {args.warmup} warm-up")
    print(f"base: {experiment} {' '.join(args.overrides)}")
    print(table(results))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{Path(experiment).stem}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    meta = {"argv": sys.argv, "torch": torch.__version__, "threads": torch.get_num_threads(), "pid": os.getpid()}
    path.write_text(json.dumps({"device": results[0]["device"], "meta": meta, "runs": results}, indent=2) + "\n")
    print(f"[profile step] results: {path}")
    return 0
