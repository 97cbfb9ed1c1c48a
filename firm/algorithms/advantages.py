"""Group advantages over the whole world, and the training mask, for one RL step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from firm import kernels
from firm.algorithms.config import RLConfig


@dataclass
class Advantages:
    """One RL step's advantages: this rank's slice and mask, and the world's rewards for reporting.

    The host copies (``keep_host``, ``world_keep_host``, ``global_keep``) are made once per RL step, so every rank can
    count each optimizer step's kept samples without communication or further device reads.
    """

    adv: torch.Tensor  # (B,) this rank's advantages (0 where the reward is missing)
    keep: torch.Tensor  # (B,) bool: trained on (valid reward, and not dropped by drop_zero_std_groups / drop_zero_adv)
    keep_host: np.ndarray  # (B,) the same mask on the host
    world_keep_host: np.ndarray  # (W * B,) every rank's mask on the host, in rank order
    global_keep: int  # kept samples over the world
    all_rewards: torch.Tensor  # (W * B,) the world's rewards (NaN: missing)
    all_adv: torch.Tensor  # (W * B,) the world's advantages
    all_valid: torch.Tensor  # (W * B,) bool: the reward is not missing
    zero_std_group_frac: float  # share of the groups (of >= 2 valid rewards) whose reward std is below zero_std_eps
    group_std_mean: float  # mean reward std of the groups


def world_advantages(
    rewards: torch.Tensor,
    groups: torch.Tensor,
    config: RLConfig,
    *,
    gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    rank: int = 0,
    device: torch.device | str | None = None,
    terms: torch.Tensor | None = None,
    mix: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> Advantages:
    """Rewards and group labels are gathered over the world (``gather``: all ranks' tensors in rank order);
    ``firm.kernels.group_advantages`` normalises per prompt group (NaN rewards excluded, advantage 0) with the
    config's ``adv_scale`` / ``adv_eps`` / ``adv_clip_max``; ``rank`` picks this rank's slice.

    With ``mix`` (a reward mix's own advantage rule, e.g. :func:`firm.rewards.mix.gdpo_advantages`), the (B, K)
    ``terms`` are gathered too and ``mix(all_terms, all_groups)`` gives the advantages instead (clipped to
    ``adv_clip_max``); the group statistics reported are still those of the rewards.
    """
    c = config
    b = rewards.shape[0]
    all_r = gather(rewards.to(device, torch.float32))
    all_g = gather(groups.to(device, torch.int64))
    adv, stats = kernels.group_advantages(
        all_r, all_g, scale=c.adv_scale, eps=c.adv_eps, clip=c.adv_clip_max, return_stats=True
    )
    if mix is not None:
        all_t = gather(terms.to(device, torch.float32))
        adv = mix(all_t, all_g).clamp(-c.adv_clip_max, c.adv_clip_max)
        adv = torch.where(torch.isnan(all_r), torch.zeros_like(adv), adv)
    valid = ~torch.isnan(all_r)
    keep = valid.clone()
    per_std, per_count = stats.std[stats.index], stats.count[stats.index]
    if c.drop_zero_std_groups:
        keep &= ~((per_count >= 2) & (per_std < c.zero_std_eps))
    if c.drop_zero_adv:
        keep &= adv != 0  # Flow-GRPO trains only on samples with a nonzero advantage
    lo = rank * b
    g_zero = ((stats.count >= 2) & (stats.std < c.zero_std_eps)).float().sum()
    keep_host = keep.cpu().numpy()  # (W * B,) the one host copy of the step's mask (numpy: host arithmetic only)
    zero, std_mean = torch.stack([g_zero, torch.nan_to_num(stats.std, nan=0.0).mean()]).tolist()
    return Advantages(
        adv=adv[lo : lo + b],
        keep=keep[lo : lo + b],
        keep_host=keep_host[lo : lo + b],
        world_keep_host=keep_host,
        global_keep=int(keep_host.sum()),  # numpy: no device read
        all_rewards=all_r,
        all_adv=adv,
        all_valid=valid,
        zero_std_group_frac=zero / max(stats.labels.numel(), 1),
        group_std_mean=std_mean,
    )
