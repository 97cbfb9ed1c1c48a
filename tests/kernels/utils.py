"""Shared helpers for the kernel tests: backend markers and the float64-oracle tolerance rule (STYLE item 5)."""

from __future__ import annotations

import pytest
import torch

from firm.kernels._common import INTERPRETER


def interpreter(fn):
    """Marks a test of the Triton kernels on CPU: skipped in the normal run, executed by test_interpreter.py in a
    subprocess with TRITON_INTERPRET=1."""
    fn = pytest.mark.skipif(not INTERPRETER, reason="Triton interpreter off; test_interpreter.py runs these")(fn)
    return pytest.mark.interpreter(fn)


def gpu(fn):
    """Marks a test of the compiled kernels on a CUDA device (bf16 and fp32)."""
    fn = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn)
    return pytest.mark.gpu(fn)


# Small absolute slack added to the 2x rule, relative to the magnitude of the exact result.
ATOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def assert_fused_close(name: str, fused, plain, exact, dtype: torch.dtype) -> None:
    """flash-attention's rule: |fused - exact| <= 2 |plain - exact| + atol, where ``plain`` is plain torch in the
    input dtype and ``exact`` the float64 reference. NaNs must match exactly."""
    fused, plain, exact = (torch.as_tensor(x).detach().double().cpu() for x in (fused, plain, exact))
    assert fused.shape == exact.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(exact.shape)}"
    assert torch.equal(fused.isnan(), exact.isnan()), f"{name}: NaN pattern differs"
    fused, plain, exact = (x.nan_to_num(0.0) for x in (fused, plain, exact))
    err = (fused - exact).abs().max().item() if fused.numel() else 0.0
    base = (plain - exact).abs().max().item() if plain.numel() else 0.0
    atol = ATOL[dtype] * (1.0 + exact.abs().max().item() if exact.numel() else 1.0)
    assert err <= 2 * base + atol, f"{name}: fused error {err:.3e} > 2 x plain-torch error {base:.3e} + {atol:.1e}"


def grad_of(fn, x: torch.Tensor, *args, **kwargs):
    """Gradient of sum_i (weights_i * output_i) w.r.t. ``x``, for each differentiable output of ``fn``, with fixed
    pseudo-random output weights so that every sample's gradient is checked with a different scale."""
    x = x.detach().clone().requires_grad_(True)
    outs = fn(x, *args, **kwargs)
    outs = [o for o in (outs if isinstance(outs, tuple) else (outs,)) if o is not None]
    total = 0.0
    for i, o in enumerate(outs):
        w = torch.linspace(0.5, 1.5, o.numel(), dtype=torch.float64, device=o.device).reshape(o.shape) * (i + 1)
        total = total + (o.double() * w).sum()
    (g,) = torch.autograd.grad(total, x)
    return [o.detach() for o in outs], g
