"""The reward ablation of the shapes editing demo: the same RL with CME, the plain sum 0.5 E + 0.5 C, and E alone.

``firm shapes ablate`` runs ``experiments/demo/ablation_edit_rewards.yaml`` once per (reward, training seed), each
run writing its own held-out report (:mod:`firm.synthetic.demo`), then gathers the held-out numbers and the
training curves into::

    <out>/ablation.md     a markdown table (held-out CME, execution, consistency, lazy-editor share; mean ± std over
                          training seeds) with the command that produced it
    <out>/ablation.json   every run's summary
    <out>/ablation.png    held-out bars per reward and training curves of execution / consistency

The question it answers (the paper's "lazy editor" finding, in miniature): does the plain sum drift towards copying
the source (consistency up, execution down) while CME improves execution without giving up consistency?
"""

from __future__ import annotations

import csv
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

COLOURS = {"base": "tab:gray", "cme": "tab:blue", "weighted_sum": "tab:orange", "execution_only": "tab:red"}
REWARDS = {
    "cme": "CME = E (0.6 + 0.4 C)",
    "weighted_sum": "plain sum 0.5 E + 0.5 C",
    "execution_only": "execution only",
}


def run_ablation(
    experiment: str,
    rewards: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    overrides: Sequence[str] = (),
) -> Path:
    """Run ``experiment`` for every reward and training seed, then write the table and plot into ``out``.

    Args:
        experiment: the RL experiment YAML (an RL module with the ``shapes_report`` callback).
        rewards: reward registry names (``module.reward.name``).
        seeds: training seeds (``seed``, ``module.seed``, ``data.seed``); the held-out evaluation seeds stay fixed.
        out: output folder; runs go to ``out/runs/<reward>/``.
        overrides: extra ``key=value`` overrides for every run.

    Returns:
        The path of ``ablation.md``.
    """
    from firm.runner import RUN_DIR_ENV, run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [r for r in rewards if r not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; the ablation compares {list(REWARDS)}")
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for reward in rewards:
        for seed in seeds:
            print(f"[ablation] reward={reward} seed={seed}", file=sys.stderr)
            os.environ.pop(RUN_DIR_ENV, None)  # each run gets its own directory
            run_dir = run(
                experiment,
                [
                    *overrides,
                    f"module.reward.name={reward}",
                    f"seed={seed}",
                    f"module.seed={seed}",
                    f"data.seed={seed}",
                    f"output_root={out / 'runs'}",
                    f"name={reward}",
                ],
            )
            if run_dir is None:
                raise RuntimeError("the ablation runs cannot be dry runs")
            summary = json.loads((Path(run_dir) / "report" / "summary.json").read_text())
            runs.append(
                {
                    "reward": reward,
                    "seed": seed,
                    "run_dir": str(run_dir),
                    "summary": summary,
                    "curves": read_curves(Path(run_dir)),
                }
            )
    elapsed = time.perf_counter() - t0
    command = " ".join(shlex.quote(a) for a in ["firm", *sys.argv[1:]]) if sys.argv[1:] else "(python API)"
    result = {"experiment": experiment, "rewards": list(rewards), "seeds": list(seeds), "command": command}
    result["elapsed_s"] = round(elapsed, 1)
    result["runs"] = runs
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ablation_table(runs)
    plot_ablation(runs, out / "ablation.png")
    md = out / "ablation.md"
    md.write_text(
        f"# Reward ablation on shapes editing\n\nCommand: `{command}` ({elapsed / 60:.1f} min)\n\n{table}\n\n"
        "![ablation](ablation.png)\n"
    )
    print(f"[ablation] table: {md}")
    return md


def read_curves(run_dir: Path) -> dict[str, list[float]]:
    """Per RL step training reward / execution / consistency / lazy share, from the run's metrics.csv files."""
    keys = ("reward/mean", "reward/execution", "reward/consistency", "reward/lazy_editor_frac")
    out: dict[str, list[float]] = {"rl_step": [], **{k: [] for k in keys}}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if not row.get("reward/mean"):
                    continue
                out["rl_step"].append(float(row["rl_step"]))
                for k in keys:
                    out[k].append(float(row[k]) if row.get(k) else math.nan)
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def ablation_table(runs: list[dict[str, Any]]) -> str:
    """Markdown table: the base model, then each reward's trained model (mean ± std over training seeds)."""
    cols = [("reward", "held-out CME"), ("execution", "execution"), ("consistency", "consistency")]
    lines = [
        "| model | trained on | " + " | ".join(c[1] for c in cols) + " | lazy-editor share | runs |",
        "|---|---|" + "---:|" * (len(cols) + 2),
    ]
    # The base model's evaluation is the same in every run (same checkpoint, tasks and evaluation seeds).
    base = runs[0]["summary"]["base"]
    base_lazy = runs[0]["summary"].get("lazy_frac", {}).get("base", math.nan)
    cells = [f"{base[k]:.3f} ± {runs[0]['summary']['seed_std']['base'][k]:.3f}" for k, _ in cols]
    lines.append(f"| base (pretrained) | - | {' | '.join(cells)} | {base_lazy:.3f} | (± over evaluation seeds) |")
    for reward in dict.fromkeys(r["reward"] for r in runs):
        rs = [r for r in runs if r["reward"] == reward]
        cells = [_fmt_ms([r["summary"]["trained"][k] for r in rs]) for k, _ in cols]
        lazy = _fmt_ms([r["summary"].get("lazy_frac", {}).get("trained", math.nan) for r in rs])
        lines.append(f"| RL | {REWARDS.get(reward, reward)} | {' | '.join(cells)} | {lazy} | {len(rs)} seeds |")
    n_tasks = runs[0]["summary"]["n_tasks"]
    eval_seeds = runs[0]["summary"]["seeds"]
    lines.append("")
    lines.append(
        f"Held-out: {n_tasks} test-split tasks x evaluation seeds {eval_seeds}, scores normalised to [0, 1]; "
        "mean ± std (ddof 1) over training seeds. Lazy-editor share: outputs with execution <= 0.25 and consistency "
        ">= 0.75 (the source copied, or nearly)."
    )
    return "\n".join(lines)


def _fmt_ms(values: Sequence[float]) -> str:
    m, s = _mean_std(values)
    return f"{m:.3f}" if len(values) < 2 else f"{m:.3f} ± {s:.3f}"


def plot_ablation(runs: list[dict[str, Any]], path: Path) -> Path:
    """Held-out bars (CME, E, C per reward, base first) and training curves of E and C per reward."""
    from firm.synthetic.report import _plt

    plt = _plt()
    fig, (ax_bar, ax_e, ax_c) = plt.subplots(1, 3, figsize=(14, 3.8))
    rewards = list(dict.fromkeys(r["reward"] for r in runs))
    keys = [("reward", "CME"), ("execution", "execution"), ("consistency", "consistency")]
    names = ["base", *rewards]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        if name == "base":  # identical in every run: its error bar is the evaluation-seed std
            ms = [(runs[0]["summary"]["base"][k], runs[0]["summary"]["seed_std"]["base"][k]) for k, _ in keys]
        else:
            vals = [[r["summary"]["trained"][k] for r in runs if r["reward"] == name] for k, _ in keys]
            ms = [_mean_std(v) for v in vals]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
        label = "base" if name == "base" else REWARDS.get(name, name)
        ax_bar.bar(
            xs, [m for m, _ in ms], width, yerr=[s for _, s in ms], capsize=3, label=label, color=COLOURS.get(name)
        )
    ax_bar.set_xticks(range(len(keys)))
    ax_bar.set_xticklabels([k[1] for k in keys])
    ax_bar.set_ylim(0, 1.05)
    ax_bar.set_title("held-out (RL: mean ± std over training seeds)", fontsize=9)
    ax_bar.legend(fontsize=7)
    panels = ((ax_e, "reward/execution", "train execution"), (ax_c, "reward/consistency", "train consistency"))
    for ax, key, title in panels:
        for reward in rewards:
            rs = [r for r in runs if r["reward"] == reward]
            n = min(len(r["curves"]["rl_step"]) for r in rs)
            if n == 0:
                continue
            ys = np.nanmean(np.array([r["curves"][key][:n] for r in rs]), axis=0)
            k = 5  # trailing mean over 5 RL steps
            sm = [float(np.nanmean(ys[max(0, i - k + 1) : i + 1])) for i in range(n)]
            ax.plot(rs[0]["curves"]["rl_step"][:n], sm, label=REWARDS.get(reward, reward), color=COLOURS.get(reward))
        ax.set_title(f"{title} (rollouts, 5-step mean)", fontsize=9)
        ax.set_xlabel("RL step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
