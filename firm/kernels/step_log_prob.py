"""Gaussian log-probability of one stochastic sampler step (Flow-GRPO SDE, CPS, DanceGRPO-style steps).

What is fused: the step mean ``mu = coef_x * x_t + coef_v * v``, the squared residual of the observed
``prev_sample``, its per-sample mean, the Gaussian normalisers and (optionally) the squared distance of ``v`` to a
reference velocity, in one pass over the latents; the backward (w.r.t. ``velocity`` only) is one elementwise pass
that recomputes ``mu`` from the inputs, so nothing full-size is saved besides the inputs themselves.

Math, per sample b with D = number of non-batch elements:
    log_prob[b] = mean_d( -(prev - mu)^2 / (2 std_b^2) ) - log(std_b) - 0.5 * log(2 pi)
    sq_dist[b]  = mean_d( (v - v_ref)^2 )
    d log_prob[b] / d v = coef_v_b * (prev - mu) / (std_b^2 * D)
    d sq_dist[b]  / d v = 2 * (v - v_ref) / D
Flow-GRPO's KL on step means is ``coef_v^2 * sq_dist / (2 std^2)`` since mu - mu_ref = coef_v * (v - v_ref).

Limits: all math in float32 whatever the input dtype; std must be > 0. Each sample is split into chunks reduced by
separate programs (so B=1 still fills the GPU) and the chunk partial sums are added by a tiny second kernel, so the
result is deterministic.
"""

from __future__ import annotations

import math

import torch

from firm.kernels._common import (
    as_coef,
    as_rows,
    check_float,
    check_no_grad,
    check_same_device,
    elementwise_config,
    next_pow2,
    per_sample,
    reduction_config,
    tl,
    triton,
    use_triton,
)

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


# ----------------------------------------------------------------------------------------------------------------
# Reference (pure torch). Also the CPU path. `compute_dtype=torch.float64` gives the test oracle.
# ----------------------------------------------------------------------------------------------------------------
def step_log_prob_reference(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    prev_sample: torch.Tensor,
    coef_x: torch.Tensor,
    coef_v: torch.Tensor,
    std: torch.Tensor,
    ref_velocity: torch.Tensor | None = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Eager implementation of :func:`step_log_prob` (differentiable by plain autograd)."""
    b = sample.shape[0]
    x = sample.reshape(b, -1).to(compute_dtype)  # (B, D)
    v = velocity.reshape(b, -1).to(compute_dtype)
    xp = prev_sample.reshape(b, -1).to(compute_dtype)
    cx, cv, s = (c.reshape(b, 1).to(compute_dtype) for c in (coef_x, coef_v, std))  # (B, 1)
    mu = cx * x + cv * v
    log_prob = (-((xp - mu) ** 2) / (2 * s * s)).mean(1) - torch.log(s[:, 0]) - _HALF_LOG_2PI
    sq_dist = None
    if ref_velocity is not None:
        sq_dist = ((v - ref_velocity.reshape(b, -1).to(compute_dtype)) ** 2).mean(1)
    return log_prob, sq_dist


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. Inputs are viewed as (B, D) row-major; grid axis 0 walks chunks of a row, axis 1 the samples.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _slp_fwd_kernel(
    X,
    V,
    XP,
    VR,
    CX,
    CV,
    PART,  # PART: (2, B, n_chunks) fp32 partial sums
    D,
    chunk,
    n_chunks,
    n_rows,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    b = tl.program_id(1)
    cx = tl.load(CX + b)
    cv = tl.load(CV + b)
    row = b.to(tl.int64) * D
    acc_res = tl.zeros([BLOCK], dtype=tl.float32)
    acc_ref = tl.zeros([BLOCK], dtype=tl.float32)
    lo = c * chunk
    for start in range(0, chunk, BLOCK):
        offs = lo + start + tl.arange(0, BLOCK)
        mask = offs < D
        x = tl.load(X + row + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + row + offs, mask=mask, other=0.0).to(tl.float32)
        xp = tl.load(XP + row + offs, mask=mask, other=0.0).to(tl.float32)
        d = xp - (cx * x + cv * v)  # 0 where masked
        acc_res += d * d
        if HAS_REF:
            vr = tl.load(VR + row + offs, mask=mask, other=0.0).to(tl.float32)
            dv = v - vr
            acc_ref += dv * dv
    tl.store(PART + b * n_chunks + c, tl.sum(acc_res, axis=0))
    if HAS_REF:
        tl.store(PART + (n_rows + b) * n_chunks + c, tl.sum(acc_ref, axis=0))


@triton.jit
def _slp_finalize_kernel(
    PART,
    S,
    LP,
    SQ,
    n_chunks,
    n_rows,
    inv_d,
    half_log_2pi,
    HAS_REF: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    acc_res = tl.zeros([CBLOCK], dtype=tl.float32)
    acc_ref = tl.zeros([CBLOCK], dtype=tl.float32)
    for start in range(0, n_chunks, CBLOCK):
        offs = start + tl.arange(0, CBLOCK)
        mask = offs < n_chunks
        acc_res += tl.load(PART + b * n_chunks + offs, mask=mask, other=0.0)
        if HAS_REF:
            acc_ref += tl.load(PART + (n_rows + b) * n_chunks + offs, mask=mask, other=0.0)
    s = tl.load(S + b)
    lp = -tl.sum(acc_res, axis=0) * inv_d / (2.0 * s * s) - tl.log(s) - half_log_2pi
    tl.store(LP + b, lp)
    if HAS_REF:
        tl.store(SQ + b, tl.sum(acc_ref, axis=0) * inv_d)


@triton.jit
def _slp_bwd_kernel(
    X,
    V,
    XP,
    VR,
    CX,
    CV,
    S,
    GLP,
    GSQ,
    GV,
    D,
    inv_d,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    cx = tl.load(CX + b)
    cv = tl.load(CV + b)
    s = tl.load(S + b)
    # d log_prob / d v = coef_v * (prev - mu) / (std^2 D), scaled by the incoming grad of log_prob[b]
    k_res = tl.load(GLP + b) * cv * inv_d / (s * s)
    row = b.to(tl.int64) * D
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    x = tl.load(X + row + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(V + row + offs, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(XP + row + offs, mask=mask, other=0.0).to(tl.float32)
    g = k_res * (xp - (cx * x + cv * v))
    if HAS_REF:
        vr = tl.load(VR + row + offs, mask=mask, other=0.0).to(tl.float32)
        g += (2.0 * inv_d * tl.load(GSQ + b)) * (v - vr)
    tl.store(GV + row + offs, g.to(GV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _step_log_prob_fwd_impl(sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std):
    x, v, xp = as_rows(sample), as_rows(velocity), as_rows(prev_sample)
    vr = as_rows(ref_velocity) if ref_velocity is not None else v  # dummy pointer when HAS_REF is False
    b, d = x.shape
    cfg = reduction_config(b, d, x.device)
    part = torch.empty(2, b, cfg.n_chunks, dtype=torch.float32, device=x.device)
    _slp_fwd_kernel[(cfg.n_chunks, b)](
        x,
        v,
        xp,
        vr,
        as_coef(coef_x),
        as_coef(coef_v),
        part,
        d,
        cfg.chunk,
        cfg.n_chunks,
        b,
        HAS_REF=ref_velocity is not None,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
    )
    log_prob = torch.empty(b, dtype=torch.float32, device=x.device)
    sq_dist = torch.zeros(b, dtype=torch.float32, device=x.device)
    _slp_finalize_kernel[(b,)](
        part,
        as_coef(std),
        log_prob,
        sq_dist,
        cfg.n_chunks,
        b,
        1.0 / d,
        _HALF_LOG_2PI,
        HAS_REF=ref_velocity is not None,
        CBLOCK=min(next_pow2(cfg.n_chunks), 1024),
        num_warps=1,
    )
    return log_prob, sq_dist


def _step_log_prob_bwd_impl(sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std, grad_lp, grad_sq):
    x, v, xp = as_rows(sample), as_rows(velocity), as_rows(prev_sample)
    vr = as_rows(ref_velocity) if ref_velocity is not None else v
    b, d = x.shape
    cfg = elementwise_config(d, x.device)
    grad_v = torch.empty_like(v)  # (B, D) in velocity's dtype
    _slp_bwd_kernel[(triton.cdiv(d, cfg.block), b)](
        x,
        v,
        xp,
        vr,
        as_coef(coef_x),
        as_coef(coef_v),
        as_coef(std),
        as_coef(grad_lp),
        as_coef(grad_sq),
        grad_v,
        d,
        1.0 / d,
        HAS_REF=ref_velocity is not None,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
    )
    return grad_v.view(velocity.shape)


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, so no graph break) and their autograd formula
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "firm_kernels::step_log_prob",
    mutates_args=(),
    schema="(Tensor sample, Tensor velocity, Tensor prev_sample, Tensor? ref_velocity, Tensor coef_x, "
    "Tensor coef_v, Tensor std) -> (Tensor, Tensor)",
)
def _step_log_prob_fwd_op(sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std):
    return _step_log_prob_fwd_impl(sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std)


@_step_log_prob_fwd_op.register_fake
def _(sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std):
    b = sample.shape[0]
    return sample.new_empty(b, dtype=torch.float32), sample.new_empty(b, dtype=torch.float32)


@torch.library.custom_op(
    "firm_kernels::step_log_prob_backward",
    mutates_args=(),
    schema="(Tensor sample, Tensor velocity, Tensor prev_sample, Tensor? ref_velocity, Tensor coef_x, "
    "Tensor coef_v, Tensor std, Tensor grad_log_prob, Tensor grad_sq_dist) -> Tensor",
)
def _step_log_prob_bwd_op(sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std, grad_lp, grad_sq):
    return _step_log_prob_bwd_impl(sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std, grad_lp, grad_sq)


@_step_log_prob_bwd_op.register_fake
def _(sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std, grad_lp, grad_sq):
    return torch.empty_like(velocity, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std = inputs
    ctx.save_for_backward(sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std)  # inputs only


def _backward(ctx, grad_lp, grad_sq):
    sample, velocity, prev_sample, ref_velocity, coef_x, coef_v, std = ctx.saved_tensors
    zeros = torch.zeros(std.shape[0], dtype=torch.float32, device=std.device)
    grad_v = torch.ops.firm_kernels.step_log_prob_backward(
        sample,
        velocity,
        prev_sample,
        ref_velocity,
        coef_x,
        coef_v,
        std,
        zeros if grad_lp is None else grad_lp,
        zeros if grad_sq is None else grad_sq,
    )
    return None, grad_v, None, None, None, None, None


# The autograd formula is attached to the op with torch.library (it builds the autograd.Function for us): Dynamo
# traces that without graph breaks even when one tensor is passed as two inputs, which a hand-written
# autograd.Function.apply does not support.
_step_log_prob_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _validate(sample, velocity, prev_sample, coef_x, coef_v, std, ref_velocity):
    op = "step_log_prob"
    for name, t in (("sample", sample), ("velocity", velocity), ("prev_sample", prev_sample)):
        check_float(name, t, op)
    if sample.ndim < 1 or sample.shape[0] == 0 or sample.numel() == 0:
        raise ValueError(f"{op}: `sample` must be (B, ...) with B >= 1 and at least one element per sample")
    for name, t in (("velocity", velocity), ("prev_sample", prev_sample), ("ref_velocity", ref_velocity)):
        if t is not None:
            check_float(name, t, op)
            if t.shape != sample.shape:
                raise ValueError(
                    f"{op}: `{name}` must have the shape of `sample` {tuple(sample.shape)}, got {tuple(t.shape)}"
                )
    device = check_same_device(op, sample=sample, velocity=velocity, prev_sample=prev_sample, ref_velocity=ref_velocity)
    b = sample.shape[0]
    coefs = [per_sample(op, n, c, b, device) for n, c in (("coef_x", coef_x), ("coef_v", coef_v), ("std", std))]
    check_no_grad(
        op,
        "velocity",
        sample=sample,
        prev_sample=prev_sample,
        ref_velocity=ref_velocity,
        coef_x=coef_x,
        coef_v=coef_v,
        std=std,
    )
    return device, coefs


def step_log_prob(
    sample: torch.Tensor,
    velocity: torch.Tensor,
    prev_sample: torch.Tensor,
    coef_x: torch.Tensor,
    coef_v: torch.Tensor,
    std: torch.Tensor,
    *,
    ref_velocity: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-density of ``prev_sample`` under N(coef_x * sample + coef_v * velocity, std^2), averaged over dims.

    Args:
        sample: (B, ...) the current latent x_t.
        velocity: (B, ...) the model output; the only input gradients flow into.
        prev_sample: (B, ...) the observed next latent.
        coef_x, coef_v, std: (B,) per-sample step coefficients computed by the sampler (any shape with B
            elements is accepted); std > 0.
        ref_velocity: optional (B, ...) reference-model velocity (for the KL term); treated as a constant.

    Returns:
        ``(log_prob, sq_dist)``: ``log_prob`` (B,) float32; ``sq_dist`` (B,) float32
        ``mean((velocity - ref_velocity)^2)`` over non-batch dims, or None when ``ref_velocity`` is None.
        Both are differentiable with respect to ``velocity``. Inputs requiring grad other than ``velocity`` raise.
    """
    device, (cx, cv, s) = _validate(sample, velocity, prev_sample, coef_x, coef_v, std, ref_velocity)
    if not use_triton(device):
        return step_log_prob_reference(sample, velocity, prev_sample, cx, cv, s, ref_velocity)
    log_prob, sq_dist = torch.ops.firm_kernels.step_log_prob(sample, velocity, prev_sample, ref_velocity, cx, cv, s)
    return log_prob, (sq_dist if ref_velocity is not None else None)
