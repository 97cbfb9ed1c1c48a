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

from kernels._common import check_float, check_no_grad, check_same_device, per_sample

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
    _, (cx, cv, s) = _validate(sample, velocity, prev_sample, coef_x, coef_v, std, ref_velocity)
    return step_log_prob_reference(sample, velocity, prev_sample, cx, cv, s, ref_velocity)
