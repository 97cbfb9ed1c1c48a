"""Critic faithfulness on shapes editing: the same RL under the rule critic, a trained critic and a hallucinating one.

``firm shapes faithfulness --critic-model DIR`` runs the editing demo (``experiments/demo/shapes_edit_cme.yaml``:
DiffusionNFT, CME reward) from the same start and with the same budget once per (critic, training seed), with the
RL critic (``module.critic``) replaced wholesale per arm:

    rule            ``shapes_rule``: the pixel rule critic, i.e. the truth of this world (the oracle)
    trained         ``local``: an exported (save_pretrained) critic, e.g. the tiny Qwen3-VL trained by
                    ``experiments/critic/``, run in process; score-first JSON answers, so a short token budget
    hallucinating   ``shapes_hallucinating``: the rule critic through the bias + noise model of a general VLM judge
                    (:mod:`firm.synthetic.hallucinating`)

Every run's held-out report (the ``shapes_report`` callback) scores the held-out outputs with its own rule critic,
whatever critic the RL used: the table reports *true* CME, execution, consistency and lazy-editor share. Outputs::

    <out>/faithfulness.md     the table (mean ± std over training seeds, the base model, runs), the command, minutes
    <out>/faithfulness.json   every run's summary and curves
    <out>/faithfulness.png    held-out bars per critic; training reward (the critic's own) vs true held-out CME

The question: does RL gain on the truth only as far as its critic is faithful? Under a hallucinating critic the
training reward should rise while the true held-out CME does not (reward hacking of the critic's blind spots).
The runner, table and plot are the reward ablation's (:mod:`firm.synthetic.recipes.ablation`), over critic arms.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from firm.synthetic.recipes.ablation import (
    CURVE_KEYS,
    Arm,
    Line,
    Panel,
    arms_table,
    current_command,
    plot_arms,
    run_arms,
)

DEFAULT_EXPERIMENT = "demo/shapes_edit_cme"  # a shipped name (firm.paths.find_experiment)
CRITICS = ("rule", "trained", "hallucinating")
LABELS = {
    "rule": "rule critic (oracle)",
    "trained": "trained critic",
    "hallucinating": "hallucinating critic",
}
COLOURS = {"rule": "tab:green", "trained": "tab:blue", "hallucinating": "tab:red"}
# Training curves kept per run: the ablation's, plus how many rewards were missing and the advantage size.
FAITHFULNESS_CURVES = (*CURVE_KEYS, "reward/missing_frac", "adv/abs_mean")
PANELS = (
    Panel(
        "training reward (own critic, solid) vs held-out CME (rule critic, dashed)",
        (
            Line("reward/mean", label="train reward"),
            Line("heldout/reward", "--o", x="heldout_step", smooth=1, label="held-out CME"),
        ),
    ),
    Panel("train lazy-editor share (own critic, 5-step mean)", (Line("reward/lazy_editor_frac"),)),
)


def _yaml_str(value: str) -> str:
    return json.dumps(str(value))  # a double-quoted YAML string: paths with ':' or spaces stay one string


def critic_arms(
    critics: Sequence[str],
    critic_model: str | None = None,
    *,
    max_new_tokens: int = 12,
    batch_size: int | None = None,
    prompts: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
) -> list[Arm]:
    """The arms: one ``module.critic`` per critic name (each replaces the experiment's critic section wholesale).

    A section that switches ``name:`` drops the previous critic's settings (``firm.config``), so the demo's
    ``shapes: ${data.world.shapes}`` does not leak into the ``local`` critic; the hallucinating critic has the rule
    critic's settings and keeps them.

    Args:
        critics: names from :data:`CRITICS`.
        critic_model: the trained critic's save_pretrained directory (needed for ``trained``).
        max_new_tokens: the trained critic's generation budget: its answers are score-first JSON
            (``{"score": 4, "reasoning": ...}``) and only the score is used, which the JSON parser reads from a
            truncated answer.
        batch_size: the trained critic's conversations per ``generate`` call (None: its default).
        prompts: the trained critic's prompt templates, ``{template: path}`` (``firm.critics.prompts.PromptConfig``).
        extra: further ``module.critic.*`` overrides for the trained critic.
    """
    unknown = [c for c in critics if c not in CRITICS]
    if unknown:
        raise ValueError(f"unknown critic(s) {unknown}; the faithfulness runs compare {list(CRITICS)}")
    arms = []
    for name in critics:
        if name == "rule":
            ov = ["module.critic.name=shapes_rule"]
        elif name == "hallucinating":
            ov = ["module.critic.name=shapes_hallucinating"]
        else:
            if not critic_model:
                raise ValueError("the `trained` critic needs --critic-model DIR (a save_pretrained directory)")
            if not (Path(critic_model) / "config.json").is_file():
                raise FileNotFoundError(f"--critic-model {critic_model}: no config.json (export the critic first)")
            ov = [
                "module.critic.name=local",
                f"module.critic.model={_yaml_str(critic_model)}",
                f"module.critic.max_new_tokens={max_new_tokens}",
            ]
            if batch_size is not None:
                ov.append(f"module.critic.batch_size={batch_size}")
            ov += [f"module.critic.prompts.{k}={_yaml_str(v)}" for k, v in (prompts or {}).items()]
            ov += list(extra)
        arms.append(Arm(name, LABELS[name], tuple(ov), COLOURS[name]))
    return arms


def read_heldout_curve(run_dir: Path) -> dict[str, list[float]]:
    """The intermediate held-out evaluations (``heldout/reward``, rule critic) and their optimizer steps (= RL steps
    while every RL step makes one; an arm whose critic never answers stays at step 0)."""
    import csv

    out: dict[str, list[float]] = {"heldout_step": [], "heldout/reward": []}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("heldout/reward"):
                    out["heldout_step"].append(float(row["step"]))
                    out["heldout/reward"].append(float(row["heldout/reward"]))
    return out


def run_faithfulness(
    out: str | Path,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    critics: Sequence[str] = CRITICS,
    seeds: Sequence[int] = (0, 1),
    critic_model: str | None = None,
    max_new_tokens: int = 12,
    batch_size: int | None = None,
    prompts: Mapping[str, str] | None = None,
    steps: int | None = None,
    overrides: Sequence[str] = (),
) -> Path:
    """Run the experiment for every critic and training seed; write faithfulness.{md,json,png} into ``out``.

    Args:
        out: output folder; runs go to ``out/runs/<critic>/``.
        experiment: the RL experiment (an editing module with the ``shapes_report`` callback).
        critics: which arms, from :data:`CRITICS`.
        seeds: training seeds (``seed``, ``module.seed``, ``data.seed``); evaluation seeds stay fixed.
        critic_model, max_new_tokens, batch_size, prompts: the trained critic (see :func:`critic_arms`).
        steps: ``trainer.max_steps`` of every run (None: the experiment's).
        overrides: extra ``key=value`` overrides for every run (before the arm's).

    Returns:
        The path of ``faithfulness.md``.
    """
    out = Path(out)
    arms = critic_arms(critics, critic_model, max_new_tokens=max_new_tokens, batch_size=batch_size, prompts=prompts)
    shared = [*overrides, *([f"trainer.max_steps={steps}"] if steps is not None else [])]
    runs, elapsed = run_arms(
        experiment, arms, seeds, out, shared, arm_key="critic", curve_keys=FAITHFULNESS_CURVES, log="faithfulness"
    )
    for r in runs:
        r["curves"].update(read_heldout_curve(Path(r["run_dir"])))
    command = current_command()
    result: dict[str, Any] = {
        "experiment": experiment,
        "critics": list(critics),
        "seeds": list(seeds),
        "critic_model": critic_model,
        "arms": {a.name: {"label": a.label, "overrides": list(a.overrides)} for a in arms},
        "shared_overrides": shared,
        "command": command,
        "elapsed_s": round(elapsed, 1),
        "runs": runs,
    }
    (out / "faithfulness.json").write_text(json.dumps(result, indent=2) + "\n")
    plot_arms(runs, arms, out / "faithfulness.png", PANELS, arm_key="critic")
    md = out / "faithfulness.md"
    md.write_text(
        "# Critic faithfulness on shapes editing\n\n"
        f"Command: `{command}` ({elapsed / 60:.1f} min)\n\n"
        "Held-out numbers are the rule critic's (the truth), whichever critic the RL was trained with.\n\n"
        f"{arms_table(runs, arms, arm_key='critic', column='critic')}\n\n"
        f"{training_table(runs, arms)}\n\n"
        "![faithfulness](faithfulness.png)\n"
    )
    print(f"[faithfulness] table: {md}", file=sys.stderr)
    return md


def training_table(runs: list[dict[str, Any]], arms: Sequence[Arm], last: int = 5) -> str:
    """What each critic told the RL: mean training reward and missing-score share over the last ``last`` RL steps,
    next to the true held-out gain (trained - base CME); mean ± std over training seeds."""

    def tail(r: dict[str, Any], key: str) -> float:
        v = np.asarray(r["curves"].get(key, []), dtype=np.float64)[-last:]
        return float(np.nanmean(v)) if v.size and not np.isnan(v).all() else math.nan

    def ms(values: list[float]) -> str:
        v = np.asarray(values, dtype=np.float64)
        if np.isnan(v).all():
            return "- (no scores)"
        if len(v) < 2:
            return f"{v.mean():.3f}"
        return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}"

    lines = [
        f"| critic | training reward (own critic, last {last} steps) | missing scores | true held-out CME gain |",
        "|---|---:|---:|---:|",
    ]
    for arm in arms:
        rs = [r for r in runs if r["critic"] == arm.name]
        if not rs:
            continue
        gain = [r["summary"]["trained"]["reward"] - r["summary"]["base"]["reward"] for r in rs]
        lines.append(
            f"| {arm.label} | {ms([tail(r, 'reward/mean') for r in rs])} | "
            f"{ms([tail(r, 'reward/missing_frac') for r in rs])} | {ms(gain)} |"
        )
    return "\n".join(lines)
