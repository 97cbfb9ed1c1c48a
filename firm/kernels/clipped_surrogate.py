"""PPO-style clipped surrogate on per-sample log-probabilities (Flow-GRPO's policy loss).

Not fused: the inputs are B-sized (one value per sample and timestep), so the whole op is a handful of tiny
elementwise launches that ``torch.compile`` fuses on its own; a Triton kernel would not pay (see docs/kernels.md).

Math, per sample: ratio = exp(log_prob - old_log_prob);
    loss = max(-A * ratio, -A * clamp(ratio, 1 - clip_range, 1 + clip_range))
Logged: clip_frac = mean(|ratio - 1| > clip_range), approx_kl = 0.5 * mean((log_prob - old_log_prob)^2).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from firm.kernels._common import check_float, check_no_grad, check_same_device


class SurrogateOutput(NamedTuple):
    """Result of :func:`clipped_surrogate` (a tuple: ``loss, clip_frac, approx_kl = clipped_surrogate(...)``).

    Attributes:
        loss: (B,) float32 per-sample loss, differentiable w.r.t. ``log_prob``; take ``.mean()`` for the objective.
        clip_frac: () float32 fraction of samples whose ratio left [1 - clip_range, 1 + clip_range] (no grad).
        approx_kl: () float32 ``0.5 * mean((log_prob - old_log_prob)^2)`` (no grad).
    """

    loss: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor


def clipped_surrogate_reference(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    compute_dtype: torch.dtype = torch.float32,
) -> SurrogateOutput:
    """Eager implementation of :func:`clipped_surrogate`."""
    lp, old, adv = (x.to(compute_dtype) for x in (log_prob, old_log_prob, advantages))
    ratio = torch.exp(lp - old)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped)
    with torch.no_grad():
        clip_frac = ((ratio - 1.0).abs() > clip_range).to(compute_dtype).mean()
        approx_kl = 0.5 * ((lp - old) ** 2).mean()
    return SurrogateOutput(loss, clip_frac, approx_kl)


def clipped_surrogate(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> SurrogateOutput:
    """Per-sample clipped surrogate ``max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c))``.

    Args:
        log_prob: (B,) log-probabilities under the current policy (differentiable).
        old_log_prob: (B,) log-probabilities under the sampling policy (constant).
        advantages: (B,) advantages (constant).
        clip_range: c > 0 (Flow-GRPO uses ~1e-4).

    Returns:
        :class:`SurrogateOutput` ``(loss (B,), clip_frac (), approx_kl ())``, all float32.
    """
    op = "clipped_surrogate"
    for name, t in (("log_prob", log_prob), ("old_log_prob", old_log_prob), ("advantages", advantages)):
        check_float(name, t, op)
        if t.ndim != 1 or t.shape != log_prob.shape:
            want = tuple(log_prob.shape)
            raise ValueError(f"{op}: `{name}` must be (B,) like `log_prob` {want}, got {tuple(t.shape)}")
    check_same_device(op, log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    check_no_grad(op, "log_prob", old_log_prob=old_log_prob, advantages=advantages)
    if not clip_range > 0:
        raise ValueError(f"{op}: clip_range must be > 0, got {clip_range}")
    return clipped_surrogate_reference(log_prob, old_log_prob, advantages, clip_range)
