"""Group advantages over the whole world, and the training mask, for one RL step."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from firm import kernels

if TYPE_CHECKING:
    from firm.algorithms.base import RLAlgorithm


def world_advantages(module: RLAlgorithm, rewards: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
    """Rewards and group labels are all-gathered; ``firm.kernels.group_advantages`` normalises per prompt group over the
    world (NaN rewards excluded, advantage 0). Returns this rank's slice and mask, and the world's mask on the host
    (one copy per RL step), from which every rank computes each optimizer step's kept count without communication.
    """
    c = module.config
    b = rewards.shape[0]
    all_r = module.gather(rewards.to(module.device, torch.float32))
    all_g = module.gather(groups.to(module.device, torch.int64))
    adv, stats = kernels.group_advantages(
        all_r, all_g, scale=c.adv_scale, eps=c.adv_eps, clip=c.adv_clip_max, return_stats=True
    )
    valid = ~torch.isnan(all_r)
    keep = valid.clone()
    per_std, per_count = stats.std[stats.index], stats.count[stats.index]
    if c.drop_zero_std_groups:
        keep &= ~((per_count >= 2) & (per_std < c.zero_std_eps))
    if c.drop_zero_adv:
        keep &= adv != 0  # Flow-GRPO trains only on samples with a nonzero advantage
    lo = (module.global_rank if module._trainer is not None else 0) * b
    g_zero = ((stats.count >= 2) & (stats.std < c.zero_std_eps)).float().sum()
    keep_host = keep.cpu().numpy()  # (W * B,) the one host copy of the step's mask (numpy: host arithmetic only)
    zero, std_mean = torch.stack([g_zero, torch.nan_to_num(stats.std, nan=0.0).mean()]).tolist()
    return {
        "adv": adv[lo : lo + b],
        "keep": keep[lo : lo + b],
        "keep_host": keep_host[lo : lo + b],
        "world_keep_host": keep_host,
        "global_keep": int(keep_host.sum()),  # numpy: no device read
        "all_rewards": all_r,
        "all_adv": adv,
        "all_valid": valid,
        "zero_std_group_frac": zero / max(stats.labels.numel(), 1),
        "group_std_mean": std_mean,
    }
