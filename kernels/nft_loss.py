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

from kernels._common import check_float, check_no_grad, check_same_device, per_sample

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
    _, tt, rr = _validate(v_theta, v_old, v_ref, x_t, x0, t, r, beta, adv_clip_max, kl_beta)
    return nft_loss_reference(v_theta, v_old, v_ref, x_t, x0, tt, rr, beta, adv_clip_max, kl_beta)
