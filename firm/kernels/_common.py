"""Shared plumbing for the fused ops: Triton import guard, backend dispatch, input validation.

Dispatch rule (see docs/kernels.md):
  * ``FIRM_KERNELS=torch`` forces the pure-torch reference everywhere;
  * CUDA tensors run the compiled Triton kernels;
  * CPU tensors run the torch reference, unless the Triton interpreter was switched on (``TRITON_INTERPRET=1``
    in the environment *before* triton was imported), in which case the Triton kernels run on the CPU.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:  # Triton is a Linux-only dependency; without it every op runs its torch reference.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on platforms without triton
    HAS_TRITON = False

    class _Shim:
        """Lets the @triton.jit definitions in the op files parse when triton is absent (they are never called)."""

        constexpr = None

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = _Shim()  # type: ignore[assignment]
    tl = _Shim()  # type: ignore[assignment]

# Triton decides at decoration time whether @triton.jit builds interpreted kernels, so capture the flag at import.
INTERPRETER = HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0") == "1"

_BACKENDS = ("auto", "torch", "triton")


def backend_setting() -> str:
    """The value of ``FIRM_KERNELS`` (auto | torch | triton), validated."""
    value = os.environ.get("FIRM_KERNELS", "auto").strip().lower() or "auto"
    if value not in _BACKENDS:
        raise ValueError(f"FIRM_KERNELS={value!r} is not one of {_BACKENDS}; unset it or pick one of those")
    return value


def use_triton(device: torch.device) -> bool:
    """Whether an op on tensors living on ``device`` runs the Triton kernels (True) or the torch reference."""
    setting = backend_setting()
    if setting == "torch":
        return False
    runnable = HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and INTERPRETER))
    if setting == "triton" and not runnable:
        raise RuntimeError(
            f"FIRM_KERNELS=triton but Triton cannot run on {device}: "
            + (
                "triton is not installed"
                if not HAS_TRITON
                else "use CUDA tensors, or set TRITON_INTERPRET=1 before "
                "importing triton to run the kernels in the interpreter"
            )
        )
    return runnable


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(name: str, x: object, op: str) -> torch.Tensor:
    """``x`` must be a floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: `{name}` must be float16/bfloat16/float32/float64, got {x.dtype}")
    return x


def check_same_device(op: str, **tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None entries ignored) live on one device; returns it."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    first = next(iter(devices.values()))
    bad = {n: str(d) for n, d in devices.items() if d != first}
    if bad:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on one device, got {listing}")
    return first


def check_no_grad(op: str, differentiable: str, **tensors: torch.Tensor | None) -> None:
    """Gradients flow only into ``differentiable``; refuse other inputs that require grad instead of dropping it."""
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise ValueError(
                f"{op}: `{name}` requires grad, but the op is differentiable only with respect to `{differentiable}`; "
                f"pass `{name}.detach()` (it is treated as a constant)"
            )


def per_sample(op: str, name: str, x: object, batch: int, device: torch.device) -> torch.Tensor:
    """A per-sample coefficient: a float tensor with exactly ``batch`` elements ((B,), (B, 1, 1, 1), ...) -> (B,)."""
    x = check_float(name, x, op)
    if x.numel() != batch:
        raise ValueError(f"{op}: `{name}` must hold one value per sample ({batch}), got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{op}: `{name}` is on {x.device} but the other inputs are on {device}")
    return x.reshape(batch)


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """A per-sample tensor (B, ...) as launch-ready rows (B, D); copies only if the input is not contiguous."""
    return x.reshape(x.shape[0], -1).contiguous()  # (B, D)


def as_coef(x: torch.Tensor) -> torch.Tensor:
    """A per-sample coefficient (B,) / (B, 1, ...) as a contiguous fp32 vector (B,) for the kernels."""
    return x.reshape(-1).to(torch.float32).contiguous()  # (B,)


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


class LaunchConfig(NamedTuple):
    block: int  # elements per program per loop iteration
    chunk: int  # elements of one row reduced by one program (a multiple of block)
    n_chunks: int  # programs per row
    num_warps: int


# Row reductions over (B, D) latents are bandwidth-bound. A program streams BLOCK elements per iteration with 4
# warps (8 fp32 per thread: two 16-byte loads per input); rows are cut into chunks so that about 4 programs per SM
# are in flight even for B=1. These are the usual settings for bandwidth-bound Triton reductions, NOT yet tuned on
# hardware (no GPU was available while writing them): `python -m firm.kernels.bench` reports % of copy bandwidth, which
# is the number to watch when changing them.
GPU_BLOCK = 1024
GPU_WARPS = 4
PROGRAMS_PER_SM = 4
# Under the interpreter each program is a Python loop over numpy blocks: small blocks and several chunks per row
# exercise the masking and multi-chunk paths while keeping tests fast.
INTERPRETER_BLOCK = 128
INTERPRETER_PROGRAMS = 8


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_PROGRAMS // PROGRAMS_PER_SM
    return torch.cuda.get_device_properties(device).multi_processor_count


def reduction_config(rows: int, d: int, device: torch.device) -> LaunchConfig:
    """Chunking of a (rows, d) per-row reduction: the launch grid is (n_chunks, rows)."""
    block = GPU_BLOCK if device.type == "cuda" else INTERPRETER_BLOCK
    warps = GPU_WARPS if device.type == "cuda" else 1
    target = PROGRAMS_PER_SM * _num_sms(device)
    per_program = -(-rows * d // target)  # ceil
    chunk = min(max(next_pow2(per_program), block), next_pow2(d) if d > block else block)
    chunk = -(-chunk // block) * block
    return LaunchConfig(block, chunk, -(-d // chunk), warps)


def elementwise_config(d: int, device: torch.device) -> LaunchConfig:
    """Elementwise pass over (rows, d): grid (cdiv(d, block), rows)."""
    block = GPU_BLOCK if device.type == "cuda" else INTERPRETER_BLOCK
    warps = GPU_WARPS if device.type == "cuda" else 1
    return LaunchConfig(block, block, -(-d // block), warps)
