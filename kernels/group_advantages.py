"""Group-relative advantages (GRPO-style reward normalisation per prompt group).

What is fused: combining K reward components, per-group valid count / mean / std with NaN rewards excluded, the
(optional) batch std, normalisation, clipping and zeroing of invalid samples, in two small kernels instead of the
~20 launches of the eager version.

Design: labels are arbitrary int64 and groups need not be contiguous, so the launcher sorts the labels once
(``torch.sort``) and turns them into dense ids ``0..G-1`` with segment offsets (``unique_consecutive``). Kernel 1
runs one program per group over its contiguous sorted segment: a two-pass mean / sum of squared deviations (no
atomics, so results are deterministic and exact to fp32 rounding) and, for ``scale="group"`` / ``"none"``, it
writes the advantages of its members right away. For ``scale="batch"`` the batch std is combined from the per-group
(count, mean, M2) triples (Chan's formula, G-sized torch ops) and kernel 2, one program per group again, writes the
advantages. The sort is the only O(N log N) step and it also gives ``torch.unique``'s sorted label order.

Limits: forward only (advantages are constants in the RL loss). Rewards may hold NaN (a failed critic: excluded,
advantage 0) but not +-inf (an error). A group is processed by one program, looping over its members in blocks, so
a single huge group is correct but not parallel; RL groups have 8-32 members.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from kernels._common import check_float

SCALES = ("group", "batch", "none")
AGGREGATES = ("sum_then_normalize", "normalize_then_sum")


class GroupStats(NamedTuple):
    """Per-group statistics returned by ``group_advantages(..., return_stats=True)``.

    Shapes: G = number of distinct labels. ``mean``/``std``/``count`` are (G,), or (G, K) when
    ``aggregate="normalize_then_sum"`` and ``rewards`` is (N, K) (one column per component).

    Attributes:
        labels: (G,) int64, the distinct group labels in ascending order.
        index: (N,) int64, position in ``labels`` of each sample's group (``labels[index] == group_ids``).
        mean: float32 mean of the group's valid (non-NaN) rewards; NaN when the group has none.
        std: float32 population std (ddof=0) of the group's valid rewards, whatever ``scale`` was; NaN when none.
        count: int64 number of valid rewards in the group.
    """

    labels: torch.Tensor
    index: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor


# ----------------------------------------------------------------------------------------------------------------
# Reference (pure torch). Also the CPU path. `compute_dtype=torch.float64` gives the test oracle.
# ----------------------------------------------------------------------------------------------------------------
def group_advantages_reference(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    weights: torch.Tensor | None = None,
    scale: str = "group",
    aggregate: str = "sum_then_normalize",
    eps: float = 1e-4,
    clip: float | None = 5.0,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, GroupStats]:
    """Eager implementation of :func:`group_advantages`; always returns ``(advantages, stats)``."""
    r = rewards.to(compute_dtype)
    r = r[:, None] if r.ndim == 1 else r  # (N, K)
    k = r.shape[1]
    w = torch.ones(k, dtype=compute_dtype, device=r.device) if weights is None else weights.to(compute_dtype)
    if aggregate == "sum_then_normalize":
        r = (r * w).sum(1, keepdim=True)  # (N, 1); a NaN component makes the combined reward NaN
    labels, index = torch.unique(group_ids, sorted=True, return_inverse=True)  # (G,), (N,)
    g, c = labels.numel(), r.shape[1]
    valid = ~torch.isnan(r)  # (N, C)
    rz = torch.where(valid, r, torch.zeros_like(r))
    count = torch.zeros(g, c, dtype=compute_dtype, device=r.device).index_add_(0, index, valid.to(compute_dtype))
    total = torch.zeros(g, c, dtype=compute_dtype, device=r.device).index_add_(0, index, rz)
    mean = total / count  # (G, C); NaN for groups with no valid reward
    dev = torch.where(valid, r - mean[index], torch.zeros_like(r))
    m2 = torch.zeros(g, c, dtype=compute_dtype, device=r.device).index_add_(0, index, dev * dev)
    std = torch.sqrt(m2 / count)
    centered = r - mean[index]
    if scale == "group":
        adv = centered / (std[index] + eps)
    elif scale == "batch":
        n_valid = valid.to(compute_dtype).sum(0)  # (C,)
        batch_mean = rz.sum(0) / n_valid
        batch_dev = torch.where(valid, r - batch_mean, torch.zeros_like(r))
        batch_std = torch.sqrt((batch_dev * batch_dev).sum(0) / n_valid)
        adv = centered / (batch_std + eps)
    else:
        adv = centered
    if clip is not None:
        adv = adv.clamp(-clip, clip)
    ok = valid & (count[index] >= 2)
    adv = torch.where(ok, adv, torch.zeros_like(adv))  # (N, C)
    if aggregate == "normalize_then_sum":
        adv = (adv * w).sum(1)
    else:
        adv = adv[:, 0]
    squeeze = aggregate == "sum_then_normalize" or rewards.ndim == 1
    mean, std, count = (x[:, 0] if squeeze else x for x in (mean, std, count))
    stats = GroupStats(labels, index, mean.float(), std.float(), count.round().long())
    return adv.to(torch.float32 if compute_dtype != torch.float64 else compute_dtype), stats


def _validate(rewards, group_ids, weights, scale, aggregate, eps, clip) -> None:
    op = "group_advantages"
    check_float("rewards", rewards, op)
    if rewards.ndim not in (1, 2) or rewards.shape[0] == 0:
        raise ValueError(f"{op}: `rewards` must be (N,) or (N, K) with N >= 1, got shape {tuple(rewards.shape)}")
    if rewards.ndim == 2 and rewards.shape[1] == 0:
        raise ValueError(f"{op}: `rewards` has K=0 components")
    if not isinstance(group_ids, torch.Tensor) or group_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: `group_ids` must be an int64 (or int32) tensor of group labels")
    if group_ids.shape != rewards.shape[:1]:
        raise ValueError(
            f"{op}: `group_ids` must be (N,) = {tuple(rewards.shape[:1])} like rewards' first dim, "
            f"got {tuple(group_ids.shape)}"
        )
    if group_ids.device != rewards.device:
        raise ValueError(f"{op}: `group_ids` is on {group_ids.device} but `rewards` is on {rewards.device}")
    if scale not in SCALES:
        raise ValueError(f"{op}: scale={scale!r} is not one of {SCALES}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"{op}: aggregate={aggregate!r} is not one of {AGGREGATES}")
    k = 1 if rewards.ndim == 1 else rewards.shape[1]
    if weights is not None:
        check_float("weights", weights, op)
        if weights.shape != (k,):
            raise ValueError(f"{op}: `weights` must be (K,) = ({k},), got {tuple(weights.shape)}")
        if weights.device != rewards.device:
            raise ValueError(f"{op}: `weights` is on {weights.device} but `rewards` is on {rewards.device}")
    if not eps >= 0:
        raise ValueError(f"{op}: eps must be >= 0, got {eps}")
    if clip is not None and not clip > 0:
        raise ValueError(f"{op}: clip must be > 0 (or None for no clipping), got {clip}")
    if torch.isinf(rewards).any():
        raise ValueError(f"{op}: `rewards` contains +-inf; mark a missing reward with NaN instead")


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    scale: str = "group",
    aggregate: str = "sum_then_normalize",
    eps: float = 1e-4,
    clip: float | None = 5.0,
    return_stats: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, GroupStats]:
    """Per-group normalised advantages: ``clip((r - mean_group) / (std + eps), -clip, clip)``.

    Args:
        rewards: (N,) rewards, or (N, K) for K reward components; any float dtype. NaN marks a missing reward:
            it is excluded from its group's statistics and its advantage is 0.
        group_ids: (N,) int64 group labels (arbitrary values; groups may differ in size and need not be contiguous).
        weights: (K,) component weights (default all ones); only for (N, K) rewards.
        scale: ``"group"`` divides by the group's population std (ddof=0), ``"batch"`` by the std of all valid
            rewards in the call, ``"none"`` only subtracts the group mean.
        aggregate: with K > 1, ``"sum_then_normalize"`` first combines ``sum_k w_k r_k`` (NaN if any component is
            NaN) and normalises that; ``"normalize_then_sum"`` computes each component's (clipped) advantage, with
            that component's NaNs excluded, and returns ``sum_k w_k A_k`` (so it can exceed ``clip``).
        eps: added to the std.
        clip: advantages are clipped to ``[-clip, clip]``; None disables clipping.
        return_stats: also return a :class:`GroupStats` (per-group mean, std, valid count, labels, index).

    Returns:
        ``advantages`` (N,) float32, or ``(advantages, stats)`` when ``return_stats``. A group with fewer than two
        valid members gives advantage 0 to all its members.
    """
    _validate(rewards, group_ids, weights, scale, aggregate, eps, clip)
    adv, stats = group_advantages_reference(rewards, group_ids, weights, scale, aggregate, eps, clip)
    return (adv, stats) if return_stats else adv
