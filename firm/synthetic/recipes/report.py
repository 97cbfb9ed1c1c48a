"""Plots and the markdown report of shapes-world runs: curves, before/after grids, summary tables.

Everything here draws with matplotlib's Agg backend (no display needed) and writes PNG files.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from firm.synthetic.tasks import EditTask, GenTask
from firm.synthetic.world import WorldConfig, render


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(scores: dict[str, Any] | None) -> str:
    if not scores:
        return ""
    return " ".join(f"{k[0].upper()}{'-' if v is None else v}" for k, v in scores.items())


def comparison_grid(
    tasks: Sequence[EditTask | GenTask],
    world: WorldConfig,
    columns: Sequence[tuple[str, Sequence[Image.Image], Sequence[dict[str, Any]] | None]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """One row per task: (edit: source,) the right answer, then each column's image with its critic scores.

    Args:
        tasks: the tasks (rows).
        world: renders sources and right answers.
        columns: ``(name, images, scores)`` per compared model; ``scores`` are the critic's 1..5 scores per image.
        path: the PNG to write.
        title: a figure title.
    """
    plt = _plt()
    edit = isinstance(tasks[0], EditTask)
    fixed = 2 if edit else 1
    ncols = fixed + len(columns)
    fig, axes = plt.subplots(len(tasks), ncols, figsize=(1.55 * ncols + 2.2, 1.7 * len(tasks) + 0.4), squeeze=False)
    for r, (row, task) in enumerate(zip(axes, tasks)):
        tiles: list[tuple[Image.Image, str]] = []
        if edit:
            tiles.append((render(task.source, world), "source"))
            tiles.append((render(task.target, world), "right answer"))
        else:
            tiles.append((render(task.scene, world), "right answer"))
        for name, images, scores in columns:
            tiles.append((images[r], f"{name}\n{_label(scores[r]) if scores is not None else ''}"))
        for ax, (img, label) in zip(row, tiles):
            ax.imshow(img, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(label, fontsize=7)
        text = task.instruction if edit else task.prompt
        row[0].set_ylabel("\n".join(textwrap.wrap(text, 26)), fontsize=6.5, rotation=0, ha="right", va="center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curves_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | Path,
    *,
    title: str,
    xlabel: str = "RL step",
    ylabel: str = "normalised score [0, 1]",
    points: dict[str, tuple[Sequence[float], Sequence[float], Sequence[float] | None]] | None = None,
    smooth: int = 1,
) -> Path:
    """Line plot of named ``(x, y)`` series (optionally smoothed with a trailing mean), plus marker series
    ``points`` ``(x, y, yerr)`` (e.g. held-out evaluations with their seed spread)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for name, (xs, ys) in series.items():
        ys = list(ys)
        if smooth > 1:
            ys = [_mean(ys[max(0, i - smooth + 1) : i + 1]) for i in range(len(ys))]
        ax.plot(list(xs), ys, label=name, linewidth=1.5)
    for name, (xs, ys, err) in (points or {}).items():
        ax.errorbar(list(xs), list(ys), yerr=None if err is None else list(err), fmt="o--", capsize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean(xs: Sequence[float]) -> float:
    ok = [x for x in xs if x == x]
    return sum(ok) / len(ok) if ok else math.nan


def bar_plot(
    groups: Sequence[str],
    bars: dict[str, tuple[Sequence[float], Sequence[float] | None]],
    path: str | Path,
    *,
    title: str,
    ylabel: str = "held-out mean [0, 1]",
) -> Path:
    """Grouped bars: ``bars[name] = (values per group, errors per group or None)``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    n = len(bars)
    width = 0.8 / max(n, 1)
    for i, (name, (vals, errs)) in enumerate(bars.items()):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, list(vals), width, yerr=None if errs is None else list(errs), capsize=3, label=name)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
