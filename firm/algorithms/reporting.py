"""What an RL step reports: reward / advantage statistics of the whole world and sample grids."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from firm.critics.types import CONSISTENCY, EXECUTION
from firm.images import to_pil, to_tensor

if TYPE_CHECKING:
    from firm.algorithms.advantages import Advantages
    from firm.algorithms.rollout import Rollout


def rollout_metrics(
    roll: Rollout, adv: Advantages, gather: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
) -> dict[str, float]:
    """Reward (and each component), missing rate, advantage and critic statistics of the whole world (``gather``:
    all ranks' tensors in rank order, as for the advantages).

    Every statistic is computed on the device and read in one copy (NaN where nothing was valid).
    """
    r, valid, a = adv.all_rewards, adv.all_valid, adv.all_adv
    nan = torch.full((), math.nan, device=r.device, dtype=torch.float32)
    vr = torch.where(valid, r, nan)
    dev: dict[str, torch.Tensor] = {
        "reward/mean": vr.nanmean(),
        "reward/std": (vr - vr.nanmean()).pow(2).nanmean().sqrt(),  # population std over the valid rewards
        "reward/missing_frac": 1.0 - valid.float().mean(),
        "adv/mean": a.mean(),
        "adv/abs_mean": a.abs().mean(),
        "adv/std": a.std(unbiased=False),
        "adv/max": a.max(),
        "adv/min": a.min(),
    }
    comps = roll.reward.components
    if comps:
        names = sorted(comps)
        stacked = gather(torch.stack([comps[k] for k in names], dim=1).to(r.device))  # (N, K)
        for j, k in enumerate(names):
            col = stacked[:, j]
            dev[f"reward/{k}"] = col.nanmean()
            dev[f"reward/{k}_missing_frac"] = torch.isnan(col).float().mean()
        if EXECUTION in comps and CONSISTENCY in comps:
            e, cns = stacked[:, names.index(EXECUTION)], stacked[:, names.index(CONSISTENCY)]
            ok = ~(torch.isnan(e) | torch.isnan(cns))
            lazy = (cns >= 0.75) & (e <= 0.25) & ok
            dev["reward/lazy_editor_frac"] = lazy.float().sum() / ok.float().sum().clamp_min(1.0)
    keys = list(dev)
    values = torch.stack([dev[k].float().reshape(()) for k in keys]).tolist()  # the one read
    out = dict(zip(keys, values))
    out.update(
        {
            "reward/critic_failures": float(roll.critic_failures),
            "adv/zero_std_group_frac": adv.zero_std_group_frac,
            "adv/group_std_mean": adv.group_std_mean,
            "adv/trained_frac": adv.global_keep / max(r.numel(), 1),
        }
    )
    return out


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = 1.0) -> torch.Tensor:
    """(N, 3, H, W) images -> one (3, H', W') grid image, ``nrow`` images per row."""
    n, ch, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.full(
        (ch, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value, dtype=images.dtype
    )
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def log_samples(
    out_dir: Path,
    batch: dict[str, Any],
    roll: Rollout,
    adv: Advantages,
    *,
    rl_step: int,
    edit: bool,
    max_images: int,
    loggers: Iterable[Any] = (),
) -> None:
    """A grid of the batch's first ``max_images`` samples (source | output for edits) as ``out_dir/stepNNNNNN.png``
    with a caption file, and in each TensorBoard-like logger."""
    n = min(max_images, roll.images.shape[0])
    outs = roll.images[:n]
    if edit:
        src = to_tensor(batch["image"][:n], outs.shape[-1])
        tiles = torch.stack([src, outs], dim=1).reshape(-1, *outs.shape[1:])  # (2n, 3, H, W) source, output
        nrow = 2 * max(1, int(math.sqrt(n)))
    else:
        tiles, nrow = outs, max(1, int(math.ceil(math.sqrt(n))))
    grid = make_grid(tiles, nrow=nrow, padding=2, pad_value=1.0)  # (3, H', W')
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"step{rl_step:06d}"
    to_pil(grid[None])[0].save(out_dir / f"{stem}.png")
    rewards = roll.reward.rewards[:n].tolist()
    lines = [
        f"{i}\treward={r:.3f}\tadv={float(a):.3f}\t{p}"
        for i, (r, a, p) in enumerate(zip(rewards, adv.adv[:n].tolist(), batch["prompt"][:n]))
    ]
    (out_dir / f"{stem}.txt").write_text("\n".join(lines) + "\n")
    for logger in loggers:
        exp = getattr(logger, "experiment", None)
        if hasattr(exp, "add_image"):
            exp.add_image("samples", grid, rl_step)
