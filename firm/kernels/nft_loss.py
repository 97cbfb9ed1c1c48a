"""DiffusionNFT loss (negative-aware fine-tuning of a flow-matching policy).

What is fused: forming the implicit positive / negative velocities, both x0-prediction errors, their L1 and L2
means per sample, the reference KL term and the per-sample policy loss, in one pass over the latents; the backward
w.r.t. ``v_theta`` is one elementwise pass that recomputes the errors from the inputs (only B-sized weights are
saved).

Math, per sample b with D non-batch elements (``t``, ``r`` are per-sample):
    v+ = beta * v_theta + (1 - beta) * v_old          v- = (1 + beta) * v_old - beta * v_theta
    e+ = x_t - t * v+ - x0                            e- = x_t - t * v- - x0
    w+ = max(mean|e+|, 1e-5),  w- = max(mean|e-|, 1e-5)       (constants: no gradient)
    L+ = mean(e+^2) / w+,      L- = mean(e-^2) / w-
    policy = (r * L+ + (1 - r) * L-) / beta * adv_clip_max
    kl     = mean((v_theta - v_ref)^2)
    loss   = mean_b(policy) + kl_beta * mean_b(kl)
Gradient: d policy / d v_theta = -(2 t adv_clip_max / D) * (r e+ / w+ - (1 - r) e- / w-),
          d kl / d v_theta = 2 (v_theta - v_ref) / D.

Limits: float32 math whatever the input dtype; beta > 0. Samples are split into chunks reduced by separate programs
and the partial sums are combined by a tiny second kernel (deterministic). ``v_ref=None`` drops the KL term.
"""

from __future__ import annotations

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

W_MIN = 1e-5  # floor of the adaptive weights w+-, as in DiffusionNFT
STAT_KEYS = ("policy", "kl", "loss_pos", "loss_neg", "w_pos", "w_neg")


# ----------------------------------------------------------------------------------------------------------------
# Reference (pure torch). Also the CPU path. `compute_dtype=torch.float64` gives the test oracle.
# ----------------------------------------------------------------------------------------------------------------
def nft_loss_reference(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor | None,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    beta: float = 1.0,
    adv_clip_max: float = 5.0,
    kl_beta: float = 1e-4,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Eager implementation of :func:`nft_loss` (differentiable by plain autograd)."""
    b = v_theta.shape[0]
    vt = v_theta.reshape(b, -1).to(compute_dtype)  # (B, D)
    vo, xt, x0_ = (x.reshape(b, -1).to(compute_dtype) for x in (v_old, x_t, x0))
    tt, rr = (x.reshape(b, 1).to(compute_dtype) for x in (t, r))  # (B, 1)
    v_pos = beta * vt + (1 - beta) * vo
    v_neg = (1 + beta) * vo - beta * vt
    e_pos = xt - tt * v_pos - x0_
    e_neg = xt - tt * v_neg - x0_
    with torch.no_grad():
        w_pos = e_pos.abs().mean(1).clamp_min(W_MIN)
        w_neg = e_neg.abs().mean(1).clamp_min(W_MIN)
    loss_pos = (e_pos**2).mean(1) / w_pos
    loss_neg = (e_neg**2).mean(1) / w_neg
    policy = (rr[:, 0] * loss_pos + (1 - rr[:, 0]) * loss_neg) / beta * adv_clip_max
    if v_ref is not None:
        kl = ((vt - v_ref.reshape(b, -1).to(compute_dtype)) ** 2).mean(1)
    else:
        kl = torch.zeros_like(policy)
    loss = policy.mean() + kl_beta * kl.mean()
    stats = dict(zip(STAT_KEYS, (x.detach() for x in (policy, kl, loss_pos, loss_neg, w_pos, w_neg))))
    return loss, stats


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. Inputs are viewed as (B, D) row-major; grid axis 0 walks chunks of a row, axis 1 the samples.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _nft_fwd_kernel(
    VT,
    VO,
    VR,
    XT,
    X0,
    T,
    PART,  # PART: (5, B, n_chunks) fp32 partial sums of e+^2, |e+|, e-^2, |e-|, (vt-vr)^2
    D,
    chunk,
    n_chunks,
    n_rows,
    beta,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    b = tl.program_id(1)
    t = tl.load(T + b)
    row = b.to(tl.int64) * D
    s2p = tl.zeros([BLOCK], dtype=tl.float32)
    s1p = tl.zeros([BLOCK], dtype=tl.float32)
    s2n = tl.zeros([BLOCK], dtype=tl.float32)
    s1n = tl.zeros([BLOCK], dtype=tl.float32)
    skl = tl.zeros([BLOCK], dtype=tl.float32)
    lo = c * chunk
    for start in range(0, chunk, BLOCK):
        offs = lo + start + tl.arange(0, BLOCK)
        mask = offs < D
        vt = tl.load(VT + row + offs, mask=mask, other=0.0).to(tl.float32)
        vo = tl.load(VO + row + offs, mask=mask, other=0.0).to(tl.float32)
        xt = tl.load(XT + row + offs, mask=mask, other=0.0).to(tl.float32)
        x0 = tl.load(X0 + row + offs, mask=mask, other=0.0).to(tl.float32)
        base = xt - x0
        e_pos = base - t * (beta * vt + (1.0 - beta) * vo)  # 0 where masked
        e_neg = base - t * ((1.0 + beta) * vo - beta * vt)
        s2p += e_pos * e_pos
        s1p += tl.abs(e_pos)
        s2n += e_neg * e_neg
        s1n += tl.abs(e_neg)
        if HAS_REF:
            vr = tl.load(VR + row + offs, mask=mask, other=0.0).to(tl.float32)
            dv = vt - vr
            skl += dv * dv
    plane = n_rows * n_chunks
    out = PART + b * n_chunks + c
    tl.store(out, tl.sum(s2p, axis=0))
    tl.store(out + plane, tl.sum(s1p, axis=0))
    tl.store(out + 2 * plane, tl.sum(s2n, axis=0))
    tl.store(out + 3 * plane, tl.sum(s1n, axis=0))
    if HAS_REF:
        tl.store(out + 4 * plane, tl.sum(skl, axis=0))


@triton.jit
def _nft_finalize_kernel(
    PART,
    R,
    STATS,  # STATS: (6, B) = policy, kl, L+, L-, w+, w-
    n_chunks,
    n_rows,
    inv_d,
    beta,
    adv_clip_max,
    w_min,
    HAS_REF: tl.constexpr,
    CBLOCK: tl.constexpr,
):
    b = tl.program_id(0)
    plane = n_rows * n_chunks
    s2p = tl.zeros([CBLOCK], dtype=tl.float32)
    s1p = tl.zeros([CBLOCK], dtype=tl.float32)
    s2n = tl.zeros([CBLOCK], dtype=tl.float32)
    s1n = tl.zeros([CBLOCK], dtype=tl.float32)
    skl = tl.zeros([CBLOCK], dtype=tl.float32)
    for start in range(0, n_chunks, CBLOCK):
        offs = start + tl.arange(0, CBLOCK)
        mask = offs < n_chunks
        ptr = PART + b * n_chunks + offs
        s2p += tl.load(ptr, mask=mask, other=0.0)
        s1p += tl.load(ptr + plane, mask=mask, other=0.0)
        s2n += tl.load(ptr + 2 * plane, mask=mask, other=0.0)
        s1n += tl.load(ptr + 3 * plane, mask=mask, other=0.0)
        if HAS_REF:
            skl += tl.load(ptr + 4 * plane, mask=mask, other=0.0)
    w_pos = tl.maximum(tl.sum(s1p, axis=0) * inv_d, w_min)
    w_neg = tl.maximum(tl.sum(s1n, axis=0) * inv_d, w_min)
    l_pos = tl.sum(s2p, axis=0) * inv_d / w_pos
    l_neg = tl.sum(s2n, axis=0) * inv_d / w_neg
    r = tl.load(R + b)
    policy = (r * l_pos + (1.0 - r) * l_neg) / beta * adv_clip_max
    kl = tl.sum(skl, axis=0) * inv_d
    tl.store(STATS + b, policy)
    tl.store(STATS + n_rows + b, kl)
    tl.store(STATS + 2 * n_rows + b, l_pos)
    tl.store(STATS + 3 * n_rows + b, l_neg)
    tl.store(STATS + 4 * n_rows + b, w_pos)
    tl.store(STATS + 5 * n_rows + b, w_neg)


@triton.jit
def _nft_bwd_kernel(
    VT,
    VO,
    VR,
    XT,
    X0,
    T,
    R,
    STATS,
    GP,
    GK,
    GV,
    D,
    n_rows,
    inv_d,
    beta,
    adv_clip_max,
    HAS_REF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    t = tl.load(T + b)
    r = tl.load(R + b)
    w_pos = tl.load(STATS + 4 * n_rows + b)
    w_neg = tl.load(STATS + 5 * n_rows + b)
    # d policy / d v_theta = -(2 t adv_clip_max / D) * (r e+ / w+ - (1 - r) e- / w-), times the grad of policy[b]
    k = -2.0 * t * adv_clip_max * inv_d * tl.load(GP + b)
    k_pos = k * r / w_pos
    k_neg = -k * (1.0 - r) / w_neg
    row = b.to(tl.int64) * D
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    vt = tl.load(VT + row + offs, mask=mask, other=0.0).to(tl.float32)
    vo = tl.load(VO + row + offs, mask=mask, other=0.0).to(tl.float32)
    xt = tl.load(XT + row + offs, mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(X0 + row + offs, mask=mask, other=0.0).to(tl.float32)
    base = xt - x0
    e_pos = base - t * (beta * vt + (1.0 - beta) * vo)
    e_neg = base - t * ((1.0 + beta) * vo - beta * vt)
    g = k_pos * e_pos + k_neg * e_neg
    if HAS_REF:
        vr = tl.load(VR + row + offs, mask=mask, other=0.0).to(tl.float32)
        g += (2.0 * inv_d * tl.load(GK + b)) * (vt - vr)
    tl.store(GV + row + offs, g.to(GV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _nft_fwd_impl(v_theta, v_old, v_ref, x_t, x0, t, r, beta, adv_clip_max):
    vt, vo, xt, x0_ = as_rows(v_theta), as_rows(v_old), as_rows(x_t), as_rows(x0)
    vr = as_rows(v_ref) if v_ref is not None else vt  # dummy pointer when HAS_REF is False
    b, d = vt.shape
    cfg = reduction_config(b, d, vt.device)
    part = torch.empty(5, b, cfg.n_chunks, dtype=torch.float32, device=vt.device)
    _nft_fwd_kernel[(cfg.n_chunks, b)](
        vt,
        vo,
        vr,
        xt,
        x0_,
        as_coef(t),
        part,
        d,
        cfg.chunk,
        cfg.n_chunks,
        b,
        float(beta),
        HAS_REF=v_ref is not None,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
    )
    stats = torch.zeros(6, b, dtype=torch.float32, device=vt.device)
    _nft_finalize_kernel[(b,)](
        part,
        as_coef(r),
        stats,
        cfg.n_chunks,
        b,
        1.0 / d,
        float(beta),
        float(adv_clip_max),
        W_MIN,
        HAS_REF=v_ref is not None,
        CBLOCK=min(next_pow2(cfg.n_chunks), 1024),
        num_warps=1,
    )
    return stats


def _nft_bwd_impl(v_theta, v_old, v_ref, x_t, x0, t, r, stats, grad_stats, beta, adv_clip_max):
    vt, vo, xt, x0_ = as_rows(v_theta), as_rows(v_old), as_rows(x_t), as_rows(x0)
    vr = as_rows(v_ref) if v_ref is not None else vt
    b, d = vt.shape
    cfg = elementwise_config(d, vt.device)
    grad_stats = grad_stats.to(torch.float32).contiguous()  # (6, B); rows 0 (policy) and 1 (kl) are used
    grad_v = torch.empty_like(vt)  # (B, D) in v_theta's dtype
    _nft_bwd_kernel[(triton.cdiv(d, cfg.block), b)](
        vt,
        vo,
        vr,
        xt,
        x0_,
        as_coef(t),
        as_coef(r),
        stats.contiguous(),
        grad_stats[0],
        grad_stats[1],
        grad_v,
        d,
        b,
        1.0 / d,
        float(beta),
        float(adv_clip_max),
        HAS_REF=v_ref is not None,
        BLOCK=cfg.block,
        num_warps=cfg.num_warps,
    )
    return grad_v.view(v_theta.shape)


# ----------------------------------------------------------------------------------------------------------------
# torch.library ops (opaque to torch.compile, so no graph break) and their autograd formula
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "firm_kernels::nft_loss",
    mutates_args=(),
    schema="(Tensor v_theta, Tensor v_old, Tensor? v_ref, Tensor x_t, Tensor x0, Tensor t, Tensor r, float beta, "
    "float adv_clip_max) -> Tensor",
)
def _nft_fwd_op(v_theta, v_old, v_ref, x_t, x0, t, r, beta, adv_clip_max):
    return _nft_fwd_impl(v_theta, v_old, v_ref, x_t, x0, t, r, beta, adv_clip_max)


@_nft_fwd_op.register_fake
def _(v_theta, v_old, v_ref, x_t, x0, t, r, beta, adv_clip_max):
    return v_theta.new_empty(6, v_theta.shape[0], dtype=torch.float32)


@torch.library.custom_op(
    "firm_kernels::nft_loss_backward",
    mutates_args=(),
    schema="(Tensor v_theta, Tensor v_old, Tensor? v_ref, Tensor x_t, Tensor x0, Tensor t, Tensor r, Tensor stats, "
    "Tensor grad_stats, float beta, float adv_clip_max) -> Tensor",
)
def _nft_bwd_op(v_theta, v_old, v_ref, x_t, x0, t, r, stats, grad_stats, beta, adv_clip_max):
    return _nft_bwd_impl(v_theta, v_old, v_ref, x_t, x0, t, r, stats, grad_stats, beta, adv_clip_max)


@_nft_bwd_op.register_fake
def _(v_theta, v_old, v_ref, x_t, x0, t, r, stats, grad_stats, beta, adv_clip_max):
    return torch.empty_like(v_theta, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    v_theta, v_old, v_ref, x_t, x0, t, r, beta, adv_clip_max = inputs
    ctx.save_for_backward(v_theta, v_old, v_ref, x_t, x0, t, r, output)  # inputs and the (6, B) stats only
    ctx.beta, ctx.adv_clip_max = beta, adv_clip_max


def _backward(ctx, grad_stats):
    v_theta, v_old, v_ref, x_t, x0, t, r, stats = ctx.saved_tensors
    grad_v = torch.ops.firm_kernels.nft_loss_backward(
        v_theta, v_old, v_ref, x_t, x0, t, r, stats, grad_stats, ctx.beta, ctx.adv_clip_max
    )
    return grad_v, None, None, None, None, None, None, None, None


# The autograd formula is attached to the op with torch.library (it builds the autograd.Function for us): Dynamo
# traces that without graph breaks even when one tensor is passed as two inputs, which a hand-written
# autograd.Function.apply does not support.
_nft_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


def _validate(v_theta, v_old, v_ref, x_t, x0, t, r, beta, adv_clip_max, kl_beta):
    op = "nft_loss"
    check_float("v_theta", v_theta, op)
    if v_theta.ndim < 1 or v_theta.shape[0] == 0 or v_theta.numel() == 0:
        raise ValueError(f"{op}: `v_theta` must be (B, ...) with B >= 1 and at least one element per sample")
    for name, x in (("v_old", v_old), ("v_ref", v_ref), ("x_t", x_t), ("x0", x0)):
        if x is None and name == "v_ref":
            continue
        check_float(name, x, op)
        if x.shape != v_theta.shape:
            want = tuple(v_theta.shape)
            raise ValueError(f"{op}: `{name}` must have the shape of `v_theta` {want}, got {tuple(x.shape)}")
    device = check_same_device(op, v_theta=v_theta, v_old=v_old, v_ref=v_ref, x_t=x_t, x0=x0)
    b = v_theta.shape[0]
    tt, rr = per_sample(op, "t", t, b, device), per_sample(op, "r", r, b, device)
    check_no_grad(op, "v_theta", v_old=v_old, v_ref=v_ref, x_t=x_t, x0=x0, t=t, r=r)
    if not beta > 0:
        raise ValueError(f"{op}: beta must be > 0, got {beta}")
    if not adv_clip_max > 0:
        raise ValueError(f"{op}: adv_clip_max must be > 0, got {adv_clip_max}")
    if not kl_beta >= 0:
        raise ValueError(f"{op}: kl_beta must be >= 0, got {kl_beta}")
    return device, tt, rr


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    v_ref: torch.Tensor | None,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    *,
    beta: float = 1.0,
    adv_clip_max: float = 5.0,
    kl_beta: float = 1e-4,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DiffusionNFT objective (see the module docstring for the formulas).

    Args:
        v_theta: (B, ...) current-policy velocity; the only input gradients flow into.
        v_old: (B, ...) old (sampling / EMA) policy velocity, constant.
        v_ref: (B, ...) reference-model velocity for the KL term, constant; None drops the KL term.
        x_t: (B, ...) noised latents; x0: (B, ...) clean latents (the rollout's final sample).
        t: (B,) per-sample time in [0, 1] with x_t = (1 - t) x0 + t noise (any shape with B elements).
        r: (B,) optimality probability in [0, 1], e.g. ``clip(A / adv_clip_max / 2 + 0.5, 0, 1)``.
        beta: guidance strength of the implicit positive / negative policies (> 0).
        adv_clip_max: scale of the policy term (the advantage clip used to build ``r``).
        kl_beta: weight of the KL term.

    Returns:
        ``(loss, stats)``: ``loss`` is a float32 scalar ``mean(policy) + kl_beta * mean(kl)``, differentiable w.r.t.
        ``v_theta``; ``stats`` maps ``policy``, ``kl``, ``loss_pos`` (L+), ``loss_neg`` (L-), ``w_pos``, ``w_neg`` to
        detached (B,) float32 per-sample values.
    """
    device, tt, rr = _validate(v_theta, v_old, v_ref, x_t, x0, t, r, beta, adv_clip_max, kl_beta)
    if not use_triton(device):
        return nft_loss_reference(v_theta, v_old, v_ref, x_t, x0, tt, rr, beta, adv_clip_max, kl_beta)
    beta, adv_clip_max = float(beta), float(adv_clip_max)
    stats = torch.ops.firm_kernels.nft_loss(v_theta, v_old, v_ref, x_t, x0, tt, rr, beta, adv_clip_max)  # (6, B)
    policy, kl = stats[0], stats[1]  # rows 2..5 are detached below, so only these two carry gradient
    loss = policy.mean() + kl_beta * kl.mean()
    return loss, {key: stats[i].detach() for i, key in enumerate(STAT_KEYS)}
