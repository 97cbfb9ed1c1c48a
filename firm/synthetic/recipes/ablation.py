"""The reward ablation of the shapes editing demo: the same RL with CME, the plain sum 0.5 E + 0.5 C, and E alone.

``firm shapes ablate`` runs ``experiments/demo/ablation_edit_rewards.yaml`` once per (reward, training seed), each
run writing its own held-out report (:mod:`firm.synthetic.recipes.demo`), then gathers the held-out numbers and the
training curves into::

    <out>/ablation.md     a markdown table (held-out CME, execution, consistency, lazy-editor share; mean ± std over
                          training seeds) with the command that produced it
    <out>/ablation.json   every run's summary
    <out>/ablation.png    held-out bars per reward and training curves of execution / consistency

The runner, table and plot are shared with other comparisons of the same RL (:func:`run_arms`, :func:`arms_table`,
:func:`plot_arms` over a list of :class:`Arm`: a name and the overrides that make it), e.g. the critic faithfulness
experiment of :mod:`firm.synthetic.recipes.faithfulness`.

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
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

COLOURS = {"base": "tab:gray", "cme": "tab:blue", "weighted_sum": "tab:orange", "execution_only": "tab:red"}
REWARDS = {
    "cme": "CME = E (0.6 + 0.4 C)",
    "weighted_sum": "plain sum 0.5 E + 0.5 C",
    "execution_only": "execution only",
}
CURVE_KEYS = ("reward/mean", "reward/execution", "reward/consistency", "reward/lazy_editor_frac")
HELD_OUT_KEYS = (("reward", "held-out CME"), ("execution", "execution"), ("consistency", "consistency"))


@dataclass(frozen=True)
class Arm:
    """One arm of a comparison: a name (run name, key in the tables), a label and the overrides that make it."""

    name: str  # the run's `name` (runs go to <out>/runs/<name>/) and the arm's key in the results
    label: str  # how tables and plots call it
    overrides: tuple[str, ...] = ()  # key=value overrides that make this arm (after the shared ones)
    colour: str | None = None  # matplotlib colour of its bars and curves


@dataclass(frozen=True)
class Line:
    """One curve per arm in a panel: ``curves[key]`` against ``curves[x]``, averaged over the arm's seeds."""

    key: str  # a curve key of the run records (a metrics.csv column)
    style: str = "-"  # matplotlib line style
    x: str = "rl_step"  # the curve key of its x values
    smooth: int = 5  # trailing mean over this many points (1: none)
    label: str | None = None  # appended to the arm's label when a panel has several lines (None: the key)


@dataclass(frozen=True)
class Panel:
    """A training-curve panel of the plot."""

    title: str
    lines: tuple[Line, ...]
    ylim: tuple[float, float] | None = (0, 1.02)


ABLATION_PANELS = (
    Panel("train execution (rollouts, 5-step mean)", (Line("reward/execution"),)),
    Panel("train consistency (rollouts, 5-step mean)", (Line("reward/consistency"),)),
)


def reward_arms(rewards: Sequence[str]) -> list[Arm]:
    """The ablation's arms: one per reward registry name (``module.reward.name``)."""
    unknown = [r for r in rewards if r not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward(s) {unknown}; the ablation compares {list(REWARDS)}")
    return [Arm(r, REWARDS[r], (f"module.reward.name={r}",), COLOURS.get(r)) for r in rewards]


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
    out = Path(out)
    arms = reward_arms(rewards)
    runs, elapsed = run_arms(experiment, arms, seeds, out, overrides, arm_key="reward", log="ablation")
    command = current_command()
    result = {"experiment": experiment, "rewards": list(rewards), "seeds": list(seeds), "command": command}
    result["elapsed_s"] = round(elapsed, 1)
    result["runs"] = runs
    (out / "ablation.json").write_text(json.dumps(result, indent=2) + "\n")
    table = arms_table(runs, arms, arm_key="reward")
    plot_arms(runs, arms, out / "ablation.png", ABLATION_PANELS, arm_key="reward")
    md = out / "ablation.md"
    md.write_text(
        f"# Reward ablation on shapes editing\n\nCommand: `{command}` ({elapsed / 60:.1f} min)\n\n{table}\n\n"
        "![ablation](ablation.png)\n"
    )
    print(f"[ablation] table: {md}")
    return md


def run_arms(
    experiment: str,
    arms: Sequence[Arm],
    seeds: Sequence[int],
    out: Path,
    overrides: Sequence[str] = (),
    *,
    arm_key: str = "arm",
    curve_keys: Sequence[str] = CURVE_KEYS,
    log: str = "arms",
) -> tuple[list[dict[str, Any]], float]:
    """Run ``experiment`` once per (arm, training seed); each run must write the ``shapes_report`` summary.

    Overrides of a run, in order: ``overrides``, the arm's, the seeds (``seed``, ``module.seed``, ``data.seed``),
    ``output_root=<out>/runs`` and ``name=<arm name>``.

    Returns:
        One record per run ``{arm_key: arm name, seed, run_dir, summary, curves}`` (in arm, then seed order) and the
        elapsed seconds.
    """
    from firm.paths import find_experiment
    from firm.runner import RUN_DIR_ENV, run

    experiment = find_experiment(experiment)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for arm in arms:
        for seed in seeds:
            print(f"[{log}] {arm_key}={arm.name} seed={seed}", file=sys.stderr)
            os.environ.pop(RUN_DIR_ENV, None)  # each run gets its own directory
            run_dir = run(
                experiment,
                [
                    *overrides,
                    *arm.overrides,
                    f"seed={seed}",
                    f"module.seed={seed}",
                    f"data.seed={seed}",
                    f"output_root={out / 'runs'}",
                    f"name={arm.name}",
                ],
            )
            if run_dir is None:
                raise RuntimeError(f"the {log} runs cannot be dry runs")
            summary = json.loads((Path(run_dir) / "report" / "summary.json").read_text())
            runs.append(
                {
                    arm_key: arm.name,
                    "seed": seed,
                    "run_dir": str(run_dir),
                    "summary": summary,
                    "curves": read_curves(Path(run_dir), curve_keys),
                }
            )
    return runs, time.perf_counter() - t0


def current_command() -> str:
    """The command line that is running, as ``firm ...`` (or ``(python API)``)."""
    return " ".join(shlex.quote(a) for a in ["firm", *sys.argv[1:]]) if sys.argv[1:] else "(python API)"


def read_curves(run_dir: Path, keys: Sequence[str] = CURVE_KEYS) -> dict[str, list[float]]:
    """Per RL step values of ``keys`` (default: training reward / execution / consistency / lazy share), from the
    run's metrics.csv files (rows that log ``reward/mean``)."""
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


def arms_table(
    runs: list[dict[str, Any]], arms: Sequence[Arm], *, arm_key: str = "arm", column: str = "trained on"
) -> str:
    """Markdown table: the base model, then each arm's trained model (mean ± std over training seeds)."""
    cols = HELD_OUT_KEYS
    lines = [
        f"| model | {column} | " + " | ".join(c[1] for c in cols) + " | lazy-editor share | runs |",
        "|---|---|" + "---:|" * (len(cols) + 2),
    ]
    # The base model's evaluation is the same in every run (same checkpoint, tasks and evaluation seeds).
    base = runs[0]["summary"]["base"]
    base_lazy = runs[0]["summary"].get("lazy_frac", {}).get("base", math.nan)
    cells = [f"{base[k]:.3f} ± {runs[0]['summary']['seed_std']['base'][k]:.3f}" for k, _ in cols]
    lines.append(f"| base (pretrained) | - | {' | '.join(cells)} | {base_lazy:.3f} | (± over evaluation seeds) |")
    labels = {a.name: a.label for a in arms}
    for name in dict.fromkeys(r[arm_key] for r in runs):
        rs = [r for r in runs if r[arm_key] == name]
        cells = [_fmt_ms([r["summary"]["trained"][k] for r in rs]) for k, _ in cols]
        lazy = _fmt_ms([r["summary"].get("lazy_frac", {}).get("trained", math.nan) for r in rs])
        lines.append(f"| RL | {labels.get(name, name)} | {' | '.join(cells)} | {lazy} | {len(rs)} seeds |")
    n_tasks = runs[0]["summary"]["n_tasks"]
    eval_seeds = runs[0]["summary"]["seeds"]
    lines.append("")
    lines.append(
        f"Held-out: {n_tasks} test-split tasks x evaluation seeds {eval_seeds}, scores normalised to [0, 1]; "
        "mean ± std (ddof 1) over training seeds. Lazy-editor share: outputs with execution <= 0.25 and consistency "
        ">= 0.75 (the source copied, or nearly)."
    )
    return "\n".join(lines)


def ablation_table(runs: list[dict[str, Any]]) -> str:
    """The ablation's table (runs keyed by ``reward``)."""
    names = list(dict.fromkeys(r["reward"] for r in runs))
    arms = [Arm(n, REWARDS.get(n, n)) for n in names]
    return arms_table(runs, arms, arm_key="reward")


def _fmt_ms(values: Sequence[float]) -> str:
    m, s = _mean_std(values)
    return f"{m:.3f}" if len(values) < 2 else f"{m:.3f} ± {s:.3f}"


def plot_arms(
    runs: list[dict[str, Any]],
    arms: Sequence[Arm],
    path: Path,
    panels: Sequence[Panel] = ABLATION_PANELS,
    *,
    arm_key: str = "arm",
) -> Path:
    """Held-out bars (CME, E, C per arm, base first) and one training-curve panel per entry of ``panels``."""
    from firm.synthetic.recipes.report import _plt

    plt = _plt()
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(4.7 * (1 + len(panels)) - 0.1, 3.8))
    ax_bar, curve_axes = axes[0], axes[1:]
    labels = {a.name: a.label for a in arms}
    colours = {"base": COLOURS["base"], **{a.name: a.colour for a in arms}}
    names_run = list(dict.fromkeys(r[arm_key] for r in runs))
    keys = [("reward", "CME"), ("execution", "execution"), ("consistency", "consistency")]
    names = ["base", *names_run]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        if name == "base":  # identical in every run: its error bar is the evaluation-seed std
            ms = [(runs[0]["summary"]["base"][k], runs[0]["summary"]["seed_std"]["base"][k]) for k, _ in keys]
        else:
            vals = [[r["summary"]["trained"][k] for r in runs if r[arm_key] == name] for k, _ in keys]
            ms = [_mean_std(v) for v in vals]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(keys))]
        label = "base" if name == "base" else labels.get(name, name)
        ax_bar.bar(
            xs, [m for m, _ in ms], width, yerr=[s for _, s in ms], capsize=3, label=label, color=colours.get(name)
        )
    ax_bar.set_xticks(range(len(keys)))
    ax_bar.set_xticklabels([k[1] for k in keys])
    ax_bar.set_ylim(0, 1.05)
    ax_bar.set_title("held-out (RL: mean ± std over training seeds)", fontsize=9)
    ax_bar.legend(fontsize=7)
    for ax, panel in zip(curve_axes, panels):
        for name in names_run:
            rs = [r for r in runs if r[arm_key] == name]
            for line in panel.lines:
                n = min(len(r["curves"].get(line.key, [])) for r in rs)
                if n == 0:
                    continue
                with warnings.catch_warnings():  # an arm whose critic never answered has all-NaN curves
                    warnings.simplefilter("ignore", RuntimeWarning)
                    ys = np.nanmean(np.array([r["curves"][line.key][:n] for r in rs]), axis=0)
                    k = line.smooth  # trailing mean over k points
                    sm = [float(np.nanmean(ys[max(0, i - k + 1) : i + 1])) for i in range(n)]
                label = labels.get(name, name) + (f" ({line.label or line.key})" if len(panel.lines) > 1 else "")
                xs = rs[0]["curves"][line.x][:n]
                ax.plot(xs, sm, line.style, label=label, color=colours.get(name))
        ax.set_title(panel.title, fontsize=9)
        ax.set_xlabel("RL step")
        if panel.ylim is not None:
            ax.set_ylim(*panel.ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ablation(runs: list[dict[str, Any]], path: Path) -> Path:
    """The ablation's plot (runs keyed by ``reward``)."""
    names = list(dict.fromkeys(r["reward"] for r in runs))
    arms = [Arm(n, REWARDS.get(n, n), colour=COLOURS.get(n)) for n in names]
    return plot_arms(runs, arms, path, ABLATION_PANELS, arm_key="reward")
