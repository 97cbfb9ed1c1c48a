"""Group-relative advantages (GRPO-style reward normalisation per prompt group).

What is fused: combining K reward components, per-group valid count / mean / std with NaN rewards excluded,
normalisation, clipping, zeroing of invalid samples and the weighted sum over components, in one kernel launch
(two for ``scale="batch"``) after the label sort, instead of the many small launches of the eager version.

Design: labels are arbitrary int64 and groups need not be contiguous, so the launcher sorts the labels once
(``torch.sort``, stable) and turns them into dense ids ``0..G-1`` with segment offsets (``unique_consecutive``).
The kernel runs one program per group over its contiguous segment of the sorted order: a two-pass mean / sum of
squared deviations (no atomics, so results are deterministic, and no E[x^2] - E[x]^2 cancellation), then it writes
the advantages and dense ids of its members back in input order. For ``scale="batch"`` a first launch writes only
the per-group statistics, the batch std is combined from the per-group (count, mean, M2) triples (Chan's formula,
G-sized torch ops), and a second launch writes the advantages. The sort is the only O(N log N) step; it also gives
``torch.unique``'s sorted label order, so the statistics line up with the reference's.

Limits: forward only (advantages are constants in the RL loss). Rewards may hold NaN (a failed critic: excluded,
advantage 0) but not +-inf (an error). A group is processed by one program, looping over its members in blocks, so
a single huge group is correct but not parallel; RL groups have 8-32 members.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from firm.kernels._common import check_float, next_pow2, tl, triton, use_triton

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


# ----------------------------------------------------------------------------------------------------------------
# Triton kernel: one program per group, over the group's segment of the label-sorted order.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(R, PERM, rows, row_mask, cols, col_mask, w, K, COMBINE: tl.constexpr):
    """Rewards of sorted positions ``rows``: (BLOCK, KP) components, or (BLOCK, 1) combined when COMBINE."""
    idx = tl.load(PERM + rows, mask=row_mask, other=0)
    x = tl.load(R + idx[:, None] * K + cols[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(
        tl.float32
    )
    if COMBINE:
        x = tl.sum(x * w[None, :], axis=1)[:, None]  # NaN in any component -> NaN
    return x, idx


@triton.jit
def _group_adv_kernel(
    R,
    PERM,
    SEG,
    W,
    BATCH_STD,
    ADV,
    INDEX,
    MEAN,
    STD,
    COUNT,
    K,
    C,
    eps,
    clip,
    COMBINE: tl.constexpr,  # sum_then_normalize: combine the K components first (then C == 1)
    SCALE: tl.constexpr,  # 0 group std, 1 batch std (read from BATCH_STD), 2 none
    WRITE: tl.constexpr,  # write advantages (False: statistics only, first pass of scale="batch")
    KP: tl.constexpr,  # K rounded up to a power of two
    CP: tl.constexpr,  # 1 if COMBINE else KP
    BLOCK: tl.constexpr,
):
    g = tl.program_id(0)
    start = tl.load(SEG + g)
    end = tl.load(SEG + g + 1)
    cols = tl.arange(0, KP)
    col_mask = cols < K
    w = tl.load(W + cols, mask=col_mask, other=0.0)
    # pass 1: valid count and sum per column
    cnt = tl.zeros([CP], dtype=tl.float32)
    tot = tl.zeros([CP], dtype=tl.float32)
    for j in range(start, end, BLOCK):
        rows = j + tl.arange(0, BLOCK)
        row_mask = rows < end
        x, idx = _load_tile(R, PERM, rows, row_mask, cols, col_mask, w, K, COMBINE)
        valid = (x == x) & row_mask[:, None]  # NaN != NaN
        cnt += tl.sum(valid.to(tl.float32), axis=0)
        tot += tl.sum(tl.where(valid, x, 0.0), axis=0)
    mean = tot / cnt  # NaN when the group has no valid reward
    # pass 2: sum of squared deviations (two-pass: no cancellation)
    m2 = tl.zeros([CP], dtype=tl.float32)
    for j in range(start, end, BLOCK):
        rows = j + tl.arange(0, BLOCK)
        row_mask = rows < end
        x, idx = _load_tile(R, PERM, rows, row_mask, cols, col_mask, w, K, COMBINE)
        valid = (x == x) & row_mask[:, None]
        dev = tl.where(valid, x - mean[None, :], 0.0)
        m2 += tl.sum(dev * dev, axis=0)
    std = tl.sqrt(m2 / cnt)
    out_cols = tl.arange(0, CP)
    out_mask = out_cols < C
    tl.store(MEAN + g * C + out_cols, mean, mask=out_mask)
    tl.store(STD + g * C + out_cols, std, mask=out_mask)
    tl.store(COUNT + g * C + out_cols, cnt.to(tl.int64), mask=out_mask)
    if WRITE:
        if SCALE == 0:
            inv = 1.0 / (std + eps)
        elif SCALE == 1:
            inv = 1.0 / (tl.load(BATCH_STD + out_cols, mask=out_mask, other=1.0) + eps)
        else:
            inv = tl.full([CP], 1.0, dtype=tl.float32)
        enough = cnt >= 2.0
        # pass 3: normalise, clip, zero the invalid, combine components, scatter back to input order
        for j in range(start, end, BLOCK):
            rows = j + tl.arange(0, BLOCK)
            row_mask = rows < end
            x, idx = _load_tile(R, PERM, rows, row_mask, cols, col_mask, w, K, COMBINE)
            valid = (x == x) & enough[None, :]
            adv = (x - mean[None, :]) * inv[None, :]
            adv = tl.minimum(tl.maximum(adv, -clip), clip)
            adv = tl.where(valid, adv, 0.0)
            if COMBINE:
                out = tl.sum(adv, axis=1)
            else:
                out = tl.sum(adv * w[None, :], axis=1)
            tl.store(ADV + idx, out, mask=row_mask)
            tl.store(INDEX + idx, g.to(tl.int64) + tl.zeros([BLOCK], dtype=tl.int64), mask=row_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _group_advantages_triton(rewards, group_ids, weights, scale, aggregate, eps, clip):
    n = rewards.shape[0]
    r = rewards.reshape(n, -1).contiguous()  # (N, K)
    k = r.shape[1]
    combine = aggregate == "sum_then_normalize"
    c = 1 if combine else k
    dev = r.device
    w = torch.ones(k, device=dev) if weights is None else weights.to(torch.float32).contiguous()
    sorted_ids, perm = torch.sort(group_ids, stable=True)  # (N,), (N,)
    labels, counts = torch.unique_consecutive(sorted_ids, return_counts=True)  # (G,), (G,)
    g = labels.numel()
    seg = torch.zeros(g + 1, dtype=torch.int64, device=dev)
    seg[1:] = torch.cumsum(counts, 0)  # group i is perm[seg[i]:seg[i+1]]
    adv = torch.empty(n, dtype=torch.float32, device=dev)
    index = torch.empty(n, dtype=torch.int64, device=dev)
    mean = torch.empty(g, c, dtype=torch.float32, device=dev)
    std = torch.empty(g, c, dtype=torch.float32, device=dev)
    count = torch.empty(g, c, dtype=torch.int64, device=dev)
    kp = next_pow2(k)
    # One program per group; a block covers a typical group (8-32 members) in one iteration. Groups are tiny, so a
    # single warp per program (more warps would idle).
    block = min(max(next_pow2(-(-n // g)), 16), 256)
    args = dict(COMBINE=combine, KP=kp, CP=1 if combine else kp, BLOCK=block, num_warps=1 if block * kp <= 512 else 4)
    batch_std = w  # dummy pointer unless scale == "batch"
    if scale == "batch":
        _group_adv_kernel[(g,)](
            r, perm, seg, w, batch_std, adv, index, mean, std, count, k, c, eps, clip, SCALE=1, WRITE=False, **args
        )
        # Batch std from the per-group (count, mean, M2) triples (Chan et al.), G-sized ops.
        cnt = count.to(torch.float32)  # (G, C)
        n_valid = cnt.sum(0)  # (C,)
        has = cnt > 0
        mean0 = torch.where(has, mean, 0.0)
        batch_mean = (cnt * mean0).sum(0) / n_valid
        m2 = torch.where(has, std * std * cnt, 0.0).sum(0) + (cnt * (mean0 - batch_mean) ** 2).sum(0)
        batch_std = torch.sqrt(m2 / n_valid).contiguous()  # (C,)
    _group_adv_kernel[(g,)](
        r,
        perm,
        seg,
        w,
        batch_std,
        adv,
        index,
        mean,
        std,
        count,
        k,
        c,
        eps,
        clip,
        SCALE=SCALES.index(scale),
        WRITE=True,
        **args,
    )
    if combine or rewards.ndim == 1:
        mean, std, count = mean[:, 0], std[:, 0], count[:, 0]
    return adv, labels, index, mean, std, count


# ----------------------------------------------------------------------------------------------------------------
# torch.library op: opaque to torch.compile (its output size G is data-dependent), dispatching inside
# ----------------------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "firm_kernels::group_advantages",
    mutates_args=(),
    schema="(Tensor rewards, Tensor group_ids, Tensor? weights, str scale, str aggregate, float eps, float clip) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def _group_advantages_op(rewards, group_ids, weights, scale, aggregate, eps, clip):
    if torch.isinf(rewards).any():
        raise ValueError("group_advantages: `rewards` contains +-inf; mark a missing reward with NaN instead")
    if use_triton(rewards.device):
        return _group_advantages_triton(rewards, group_ids, weights, scale, aggregate, eps, clip)
    adv, st = group_advantages_reference(rewards, group_ids, weights, scale, aggregate, eps, clip)
    return adv, st.labels, st.index, st.mean, st.std, st.count


@_group_advantages_op.register_fake
def _(rewards, group_ids, weights, scale, aggregate, eps, clip):
    n = rewards.shape[0]
    g = torch.library.get_ctx().new_dynamic_size()
    per_component = aggregate == "normalize_then_sum" and rewards.ndim == 2
    stat_shape = (g, rewards.shape[1]) if per_component else (g,)
    f32 = torch.float32
    return (
        rewards.new_empty(n, dtype=f32),
        group_ids.new_empty(g),
        group_ids.new_empty(n, dtype=torch.int64),
        rewards.new_empty(stat_shape, dtype=f32),
        rewards.new_empty(stat_shape, dtype=f32),
        rewards.new_empty(stat_shape, dtype=torch.int64),
    )


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------


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
    clip_value = math.inf if clip is None else float(clip)
    adv, labels, index, mean, std, count = torch.ops.firm_kernels.group_advantages(
        rewards, group_ids, weights, scale, aggregate, float(eps), clip_value
    )
    return (adv, GroupStats(labels, index, mean, std, count)) if return_stats else adv
