"""Benchmark and profiling harness for the fused ops: ``python -m firm.kernels.bench [bench|profile] [options]``.

For each op at realistic shapes it compares three implementations of the same math:
  * ``eager``   -- the pure-torch reference (float32 compute), as a user would write it;
  * ``compile`` -- ``torch.compile`` of that reference (inductor, static shapes);
  * ``triton``  -- the public op (the fused Triton kernels on CUDA).
On CUDA it reports forward and forward+backward medians (``triton.testing.do_bench``), speedups, achieved GB/s
against the minimum bytes each op must move and that as % of a device copy bandwidth measured in the same run, the
peak extra memory, and the max error vs a float64 reference. On CPU it runs the correctness part only (errors vs
float64 for the implementations that run there: eager, and triton under ``TRITON_INTERPRET=1``) and says that
timings need CUDA. Results go to CSV and JSON named after the device.

Minimum bytes: forward = every full-size input read once (+ the small outputs); backward = the inputs it needs read
once + the gradient written once; group advantages = rewards + labels read once + advantages written once.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from firm import kernels
from firm.kernels._common import HAS_TRITON, INTERPRETER

OPS = ("step_log_prob", "nft_loss", "group_advantages")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

# SD3.5 latents: (B, 16, 64, 64) at 512 px, (B, 16, 128, 128) at 1024 px; B up to 64.
LATENT_SHAPES = [(1, 16, 64, 64), (8, 16, 64, 64), (64, 16, 64, 64), (8, 16, 128, 128), (64, 16, 128, 128)]
LATENT_SHAPES_QUICK = [(8, 16, 64, 64), (16, 16, 128, 128)]
LATENT_SHAPES_CPU = [(1, 3, 7, 11), (2, 16, 16, 16)]
# Group advantages: (N, K) rewards in groups of 12-24.
REWARD_SHAPES = [(4096, 1), (65536, 1), (65536, 3)]
REWARD_SHAPES_QUICK = [(65536, 1)]
REWARD_SHAPES_CPU = [(37, 1), (500, 3)]


@dataclass
class Case:
    """One op at one shape: how to build inputs, the implementations, and the bytes the op must move."""

    op: str
    shape: str
    make: Callable[[], dict]  # inputs on the device, in the benchmark dtype
    impls: dict[str, Callable[[dict], tuple]]  # name -> inputs -> tuple of outputs (first ones compared)
    exact: Callable[[dict], tuple]  # float64 reference
    grad_key: str | None  # input that receives the gradient (None: forward only)
    objective: Callable[[tuple], torch.Tensor] | None  # scalar to backpropagate
    bytes_fwd: int
    bytes_bwd: int = 0
    extra: dict = field(default_factory=dict)


def _numel(shape) -> int:
    return math.prod(shape)


def _latent_inputs(shape, dtype, device, names, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b = shape[0]
    out = {n: torch.randn(shape, generator=g).to(device=device, dtype=dtype) for n in names}
    return out, g, b


def step_log_prob_case(shape, dtype, device) -> Case:
    def make():
        t, g, b = _latent_inputs(shape, dtype, device, ("x", "v", "xp", "vr"))
        t["cx"] = (1 + 0.01 * torch.randn(b, generator=g)).to(device)
        t["cv"] = (-0.05 + 0.01 * torch.randn(b, generator=g)).to(device)
        t["s"] = (0.1 + torch.rand(b, generator=g)).to(device)
        return t

    def eager(i, compute_dtype=torch.float32):
        return kernels.step_log_prob_reference(
            i["x"], i["v"], i["xp"], i["cx"], i["cv"], i["s"], i["vr"], compute_dtype=compute_dtype
        )

    def fused(i):
        return kernels.step_log_prob(i["x"], i["v"], i["xp"], i["cx"], i["cv"], i["s"], ref_velocity=i["vr"])

    es = torch.tensor([], dtype=dtype).element_size()
    n = _numel(shape)
    return Case(
        "step_log_prob",
        "x".join(map(str, shape)),
        make,
        {"eager": eager, "compile": _compiled(eager), "triton": fused},
        lambda i: eager({k: v.double() for k, v in i.items()}, torch.float64),
        "v",
        lambda out: out[0].sum() + out[1].sum(),
        bytes_fwd=4 * n * es + 4 * shape[0] * 4,
        bytes_bwd=5 * n * es,
    )


def nft_loss_case(shape, dtype, device) -> Case:
    def make():
        t, g, b = _latent_inputs(shape, dtype, device, ("vt", "vo", "vr", "xt", "x0"))
        t["t"] = torch.rand(b, generator=g).to(device)
        t["r"] = torch.rand(b, generator=g).to(device)
        return t

    def eager(i, compute_dtype=torch.float32):
        loss, st = kernels.nft_loss_reference(
            i["vt"], i["vo"], i["vr"], i["xt"], i["x0"], i["t"], i["r"], compute_dtype=compute_dtype
        )
        return loss, st["policy"]

    def fused(i):
        loss, st = kernels.nft_loss(i["vt"], i["vo"], i["vr"], i["xt"], i["x0"], i["t"], i["r"])
        return loss, st["policy"]

    es = torch.tensor([], dtype=dtype).element_size()
    n = _numel(shape)
    return Case(
        "nft_loss",
        "x".join(map(str, shape)),
        make,
        {"eager": eager, "compile": _compiled(eager), "triton": fused},
        lambda i: eager({k: v.double() for k, v in i.items()}, torch.float64),
        "vt",
        lambda out: out[0],
        bytes_fwd=5 * n * es,
        bytes_bwd=6 * n * es,
    )


def group_advantages_case(n, k, dtype, device) -> Case:
    aggregate = "normalize_then_sum" if k > 1 else "sum_then_normalize"
    scale = "batch" if k > 1 else "group"

    def make():
        g = torch.Generator().manual_seed(0)
        sizes = []
        while sum(sizes) < n:
            sizes.append(int(torch.randint(12, 25, (1,), generator=g)))
        sizes[-1] -= sum(sizes) - n
        labels = torch.randint(0, 1 << 62, (len(sizes),), generator=g)
        ids = labels.repeat_interleave(torch.tensor(sizes))[torch.randperm(n, generator=g)]  # non-contiguous groups
        rewards = torch.rand(n, k, generator=g).squeeze(1) if k == 1 else torch.rand(n, k, generator=g)
        rewards[torch.rand(rewards.shape, generator=g) < 0.02] = float("nan")  # failed critic calls
        w = torch.rand(k, generator=g) + 0.5
        return {"r": rewards.to(device, dtype), "ids": ids.to(device), "w": w.to(device)}

    def eager(i, compute_dtype=torch.float32):
        adv, _ = kernels.group_advantages_reference(
            i["r"], i["ids"], i["w"], scale, aggregate, 1e-4, 5.0, compute_dtype=compute_dtype
        )
        return (adv,)

    def fused(i):
        return (kernels.group_advantages(i["r"], i["ids"], weights=i["w"], scale=scale, aggregate=aggregate),)

    es = torch.tensor([], dtype=dtype).element_size()
    return Case(
        "group_advantages",
        f"N={n},K={k}",
        make,
        {"eager": eager, "compile": _compiled(eager), "triton": fused},
        lambda i: eager({"r": i["r"].double(), "ids": i["ids"], "w": i["w"].double()}, torch.float64),
        None,
        None,
        bytes_fwd=n * k * es + n * 8 + n * 4,
        extra={"scale": scale, "aggregate": aggregate},
    )


def _compiled(fn):
    """torch.compile of the eager function, built lazily (and afresh per case, see _reset_compile)."""
    holder = {}

    def run(i):
        if "fn" not in holder:
            holder["fn"] = torch.compile(fn, dynamic=False)
        return holder["fn"](i)

    return run


def build_cases(ops, dtype, device, quick=False) -> list[Case]:
    cpu = device.type != "cuda"
    lat = LATENT_SHAPES_CPU if cpu else (LATENT_SHAPES_QUICK if quick else LATENT_SHAPES)
    rew = REWARD_SHAPES_CPU if cpu else (REWARD_SHAPES_QUICK if quick else REWARD_SHAPES)
    cases = []
    for op in ops:
        if op == "step_log_prob":
            cases += [step_log_prob_case(s, dtype, device) for s in lat]
        elif op == "nft_loss":
            cases += [nft_loss_case(s, dtype, device) for s in lat]
        elif op == "group_advantages":
            cases += [group_advantages_case(n, k, dtype, device) for n, k in rew]
        else:
            raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    return cases


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------
def _with_grad(inputs: dict, key: str | None) -> dict:
    if key is None:
        return inputs
    out = dict(inputs)
    out[key] = inputs[key].detach().clone().requires_grad_(True)
    return out


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    both_nan = a.isnan() & b.isnan()
    return float((a - b).abs().masked_fill(both_nan, 0.0).max().nan_to_num(math.inf)) if a.numel() else 0.0


def errors(case: Case, impl: Callable, inputs: dict) -> tuple[float, float | None]:
    """Max abs error of the outputs (and of the gradient) vs the float64 reference."""
    exact_in = _with_grad({k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}, case.grad_key)
    exact = case.exact(exact_in)
    got_in = _with_grad(inputs, case.grad_key)
    got = impl(got_in)
    out_err = max(_max_err(a, b) for a, b in zip(got, exact))
    grad_err = None
    if case.grad_key is not None:
        (g,) = torch.autograd.grad(case.objective(got), got_in[case.grad_key])
        (g64,) = torch.autograd.grad(case.objective(exact), exact_in[case.grad_key])
        grad_err = _max_err(g, g64)
    return out_err, grad_err


def copy_bandwidth_gbps(device: torch.device, mib: int = 1024) -> float:
    """Device-to-device copy bandwidth (read + write bytes / time) of a large buffer, measured now."""
    import triton.testing

    src = torch.empty(mib * 2**20 // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * mib * 2**20 / (ms * 1e-3) / 1e9


def time_case(case: Case, impl: Callable, inputs: dict, backward: bool) -> tuple[float, float]:
    """(median ms, peak extra MiB) of one forward (or forward+backward) call on CUDA."""
    import triton.testing

    if backward:
        x = inputs[case.grad_key].detach().clone().requires_grad_(True)
        run_in = dict(inputs)
        run_in[case.grad_key] = x

        def fn():
            torch.autograd.grad(case.objective(impl(run_in)), x)
    else:
        run_in = _with_grad(inputs, case.grad_key)  # forward as in training: inputs require grad

        def fn():
            impl(run_in)

    fn()  # warm up (compiles torch.compile / Triton)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, peak


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()})" + (" + triton interpreter" if INTERPRETER else "")


def run_bench(
    ops=OPS, dtype: str = "bf16", quick: bool = False, out_dir: str | Path = "runs/kernels", device: str | None = None
) -> list[dict]:
    """Run the benchmark (CUDA) or the correctness checks (CPU); print a table; write CSV/JSON. Returns the rows."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    torch_dtype = DTYPES[dtype]
    if not cuda and torch_dtype != torch.float32:
        print(f"note: {dtype} on CPU -> using fp32 (the Triton interpreter has no bf16/fp16 arithmetic)")
        torch_dtype, dtype = torch.float32, "fp32"
    name = device_name(dev)
    print(f"device: {name} | torch {torch.__version__} | dtype {dtype}")
    copy_bw = None
    if cuda:
        copy_bw = copy_bandwidth_gbps(dev)
        print(f"copy bandwidth (measured now): {copy_bw:.0f} GB/s")
    else:
        print("CPU: running correctness checks only -- timings, GB/s and memory need a CUDA device.")
    triton_runs = HAS_TRITON and (cuda or INTERPRETER)
    rows = []
    for case in build_cases(ops, torch_dtype, dev, quick):
        torch._dynamo.reset()  # fresh compile cache per shape: no recompile limit, no cross-shape reuse
        inputs = case.make()
        impls = {k: v for k, v in case.impls.items() if cuda or k == "eager" or (k == "triton" and triton_runs)}
        if not triton_runs:
            impls.pop("triton", None)
        case_rows = {}
        for impl_name, impl in impls.items():
            out_err, grad_err = errors(case, impl, inputs)
            modes = (["fwd"] + (["fwd+bwd"] if case.grad_key else [])) if cuda else ["check"]
            for mode in modes:
                row = dict(
                    device=name,
                    op=case.op,
                    shape=case.shape,
                    dtype=dtype,
                    impl=impl_name,
                    mode=mode,
                    max_err=out_err,
                    grad_err=grad_err if mode != "fwd" else None,
                    ms=None,
                    speedup_vs_eager=None,
                    speedup_vs_compile=None,
                    gbps=None,
                    pct_copy=None,
                    peak_mib=None,
                    **case.extra,
                )
                if cuda:
                    ms, peak = time_case(case, impl, inputs, backward=mode == "fwd+bwd")
                    nbytes = case.bytes_fwd + (case.bytes_bwd if mode == "fwd+bwd" else 0)
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    row.update(ms=ms, peak_mib=peak, gbps=gbps, pct_copy=100 * gbps / copy_bw)
                case_rows[(impl_name, mode)] = row
                rows.append(row)
        if cuda:
            for (impl_name, mode), row in case_rows.items():
                eager, comp = case_rows.get(("eager", mode)), case_rows.get(("compile", mode))
                row["speedup_vs_eager"] = eager["ms"] / row["ms"] if eager else None
                row["speedup_vs_compile"] = comp["ms"] / row["ms"] if comp else None
        del inputs
    print_table(rows, cuda)
    write_results(rows, out_dir, name, dict(dtype=dtype, quick=quick, copy_gbps=copy_bw))
    return rows


def _fmt(v, spec):
    width = int(re.match(r"\d*", spec).group() or 0)
    return f"{'-':>{width}}" if v is None else format(v, spec)


def print_table(rows: list[dict], timed: bool) -> None:
    if timed:
        head = f"{'op':<17}{'shape':<16}{'impl':<8}{'mode':<8}{'ms':>9}{'x eager':>8}{'x comp':>8}"
        head += f"{'GB/s':>8}{'%copy':>7}{'MiB':>9}{'max err':>10}{'grad err':>10}"
    else:
        head = f"{'op':<17}{'shape':<16}{'impl':<8}{'mode':<8}{'max err':>10}{'grad err':>10}"
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['op']:<17}{r['shape']:<16}{r['impl']:<8}{r['mode']:<8}"
        if timed:
            line += f"{_fmt(r['ms'], '9.3f')}{_fmt(r['speedup_vs_eager'], '8.2f')}"
            line += f"{_fmt(r['speedup_vs_compile'], '8.2f')}"
            line += f"{_fmt(r['gbps'], '8.0f')}{_fmt(r['pct_copy'], '7.1f')}{_fmt(r['peak_mib'], '9.1f')}"
        line += f"{_fmt(r['max_err'], '10.2e')}{_fmt(r['grad_err'], '10.2e')}"
        print(line)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def write_results(rows: list[dict], out_dir: str | Path, device: str, meta: dict) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_bench_{_slug(device)}_{meta.get('dtype', '')}"
    csv_path, json_path = out / f"{stem}.csv", out / f"{stem}.json"
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    doc = dict(
        device=device,
        torch=torch.__version__,
        triton=_triton_version(),
        time=time.strftime("%Y-%m-%d %H:%M:%S"),
        **meta,
        rows=rows,
    )
    json_path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {csv_path} and {json_path}")
    return csv_path, json_path


def _triton_version() -> str | None:
    if not HAS_TRITON:
        return None
    import triton

    return triton.__version__


# ----------------------------------------------------------------------------------------------------------------
# Profiling
# ----------------------------------------------------------------------------------------------------------------
def run_profile(
    ops=OPS, dtype: str = "bf16", out_dir: str | Path = "runs/kernels", steps: int = 5, device: str | None = None
) -> Path:
    """torch.profiler trace of the public ops (forward+backward) at one realistic shape per op."""
    from torch.profiler import ProfilerActivity, profile, record_function

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    torch_dtype = DTYPES[dtype] if cuda else torch.float32
    cases = build_cases(ops, torch_dtype, dev, quick=True)
    seen, chosen = set(), []
    for c in reversed(cases):  # the largest shape of each op
        if c.op not in seen:
            seen.add(c.op)
            chosen.append(c)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prepared = [(c, _with_grad(c.make(), c.grad_key)) for c in chosen]
    for c, inp in prepared:  # warm up outside the trace
        _step(c, inp)
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(steps):
            for c, inp in prepared:
                with record_function(f"{c.op} {c.shape}"):
                    _step(c, inp)
        if cuda:
            torch.cuda.synchronize()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    trace = out / f"kernels_trace_{_slug(device_name(dev))}.json"
    prof.export_chrome_trace(str(trace))
    sort_key = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort_key, row_limit=20))
    print(f"wrote {trace} (open in chrome://tracing or https://ui.perfetto.dev)")
    return trace


def _step(case: Case, inputs: dict) -> None:
    out = case.impls["triton"](inputs)
    if case.grad_key is not None:
        torch.autograd.grad(case.objective(out), inputs[case.grad_key])


# ----------------------------------------------------------------------------------------------------------------
# CLI (also `firm kernels time|profile`)
# ----------------------------------------------------------------------------------------------------------------
def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="input dtype (CPU always uses fp32)")
    p.add_argument("--out", default="runs/kernels", help="directory for the CSV/JSON results or the trace")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--quick", action="store_true", help="fewer, smaller shapes")


def add_profile_args(p: argparse.ArgumentParser) -> None:
    add_common_args(p)
    p.add_argument("--steps", type=int, default=5, help="profiled iterations")


def _ops(spec: str) -> tuple[str, ...]:
    ops = tuple(o.strip() for o in spec.split(",") if o.strip())
    bad = [o for o in ops if o not in OPS]
    if bad:
        raise SystemExit(f"unknown op(s) {bad}; choose from {OPS}")
    return ops


def bench_main(args: argparse.Namespace) -> int:
    run_bench(_ops(args.ops), args.dtype, args.quick, args.out, args.device)
    return 0


def profile_main(args: argparse.Namespace) -> int:
    run_profile(_ops(args.ops), args.dtype, args.out, args.steps, args.device)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m firm.kernels.bench", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    add_bench_args(sub.add_parser("bench", help="time and check the ops (default)"))
    add_profile_args(sub.add_parser("profile", help="write a torch.profiler trace"))
    argv = list(argv) if argv is not None else None
    import sys

    raw = sys.argv[1:] if argv is None else argv
    if not raw or raw[0] not in ("bench", "profile", "-h", "--help"):
        raw = ["bench", *raw]
    args = parser.parse_args(raw)
    return profile_main(args) if args.command == "profile" else bench_main(args)


if __name__ == "__main__":
    raise SystemExit(main())
