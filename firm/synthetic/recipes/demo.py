"""The shapes-world RL demo: a report callback that evaluates base vs trained on held-out tasks, and RL prompts.

``firm run experiments/demo/shapes_edit_cme.yaml`` (what ``make demo`` runs) trains the committed tiny editor with
DiffusionNFT on the CME reward of the rule critic, then writes into the run directory::

    report/report.md      the report (embeds the images below)
    report/summary.json   {"base": {reward, execution, consistency}, "trained": {...}, "seed_spread": ..., ...}
    report/curves.png     training reward and components per RL step, held-out evaluations with their spread
    report/grid.png       held-out tasks: source | right answer | base | trained, with the critic's scores

The RL itself is the library's, any algorithm of :mod:`firm.algorithms`; the report is the :class:`ShapesReport`
callback, named in the experiment's ``module.callbacks: [{name: shapes_report, ...}]``. Prompts come from
:class:`ShapesPromptDataModule`, which exports the train split as an RL prompt file on first use.

**Held-out and spread.** Held-out tasks are the ``test`` split (a hash of each task's content decides, so no task is
in both splits; the base model was pretrained on ``train`` tasks only and RL draws its prompts from ``train``). Both
models are sampled on the same ``n_tasks`` tasks once per evaluation seed, with a deterministic sampler; the seed
sets every task's initial noise, the same for base and trained. ``seed_spread`` is the larger of the two sample
standard deviations (ddof 1) of the held-out mean reward over the evaluation seeds: how much the headline number
moves when only the sampling noise changes.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L

from firm.data.prompts import PromptDataModule
from firm.synthetic.tasks import SplitConfig, edit_tasks, gen_tasks
from firm.synthetic.world import WorldConfig

# --------------------------------------------------------------------------------------------------------------------
# Prompts


class ShapesPromptDataModule(PromptDataModule):
    """RL prompts of the shapes world: the first ``n_prompts`` tasks of a split, exported once as a prompt file.

    The file (``prompts.jsonl`` + source PNGs, the format of ``firm shapes export``) goes to
    ``<cache_dir>/<task>-<split>-<n>-<hash of the settings>/`` and is reused by later runs. Everything else (groups,
    batches, resume) is :class:`firm.data.prompts.PromptDataModule`.
    """

    @dataclass
    class Config(PromptDataModule.Config):
        name: str = "shapes_prompts"
        n_prompts: int = 256  # tasks in the prompt set
        split_name: str = "train"  # which split they come from (keep `train`: the report evaluates on `test`)
        world: WorldConfig = field(default_factory=WorldConfig)  # scene settings
        split: SplitConfig = field(default_factory=SplitConfig)  # how tasks are split into train / test
        kinds: list[str] | None = None  # edit: instruction kinds (null: all five)
        exclusive_prob: float = 0.5  # gen: share of prompts ending in "and nothing else"
        start: int = 0  # first task seed
        cache_dir: str = "data/shapes"  # where exported prompt files are kept

    def __init__(self, config: Config) -> None:
        if config.prompts is None and config.path is None:
            config.path = str(self.export(config))
        super().__init__(config)

    @staticmethod
    def export(c: Config) -> Path:
        """Write (once) the prompt file of ``c`` and return its path."""
        from firm.synthetic.data import export_prompt_records

        settings = json.dumps(
            [c.task, c.n_prompts, c.split_name, asdict(c.world), asdict(c.split), c.kinds, c.exclusive_prob, c.start],
            sort_keys=True,
        )
        digest = hashlib.sha256(settings.encode()).hexdigest()[:10]
        out = Path(c.cache_dir) / f"{c.task}-{c.split_name}-{c.n_prompts}-{digest}"
        path = out / "prompts.jsonl"
        if path.is_file():
            return path
        tmp = out.with_name(f".{out.name}.tmp{time.time_ns()}")
        export_prompt_records(
            tmp,
            c.task,
            c.n_prompts,
            c.split_name,
            world=c.world,
            split_config=c.split,
            kinds=c.kinds,
            exclusive_prob=c.exclusive_prob,
            start=c.start,
        )
        try:
            tmp.rename(out)
        except OSError:  # another process exported the same file first
            shutil.rmtree(tmp, ignore_errors=True)
        return path


# --------------------------------------------------------------------------------------------------------------------
# The report


class ShapesReport(L.Callback):
    """Evaluates the base (adapters off) and trained policy on held-out tasks and writes ``report/``.

    A Lightning callback for any RL algorithm; the task (edit / gen) is the module's ``task``.
    """

    @dataclass
    class Config:
        """Held-out evaluation and report of a shapes-world RL run."""

        name: str = "shapes_report"
        world: WorldConfig = field(default_factory=WorldConfig)  # scene settings (YAML: ${data.world})
        split: SplitConfig = field(default_factory=SplitConfig)  # the split settings (YAML: ${data.split})
        n_tasks: int = 128  # held-out (test split) tasks
        seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # evaluation seeds (initial noise)
        num_steps: int | None = None  # sampling steps of the evaluation (null: module.sampler.num_steps)
        method: str = "dpm2"  # deterministic evaluation sampler: dpm2 | ode
        every: int = 0  # also evaluate the trained policy every N RL steps on `curve_tasks` tasks, seed 0 (0: never)
        curve_tasks: int = 32  # held-out tasks of those intermediate evaluations
        grid_tasks: int = 8  # held-out tasks shown in grid.png
        batch_size: int = 64  # tasks per sampling batch
        progress: bool = True  # progress bars for the evaluations

    def __init__(self, config: Config) -> None:
        from firm.synthetic.critic import ShapesRuleCritic

        self.config = c = config
        if not c.seeds:
            raise ValueError("the shapes_report callback needs at least one evaluation seed (seeds: [...])")
        self.task: str | None = None
        self.tasks: list[Any] = []
        self.critic = ShapesRuleCritic(
            ShapesRuleCritic.Config(shapes=list(c.world.shapes), object_scale=c.world.shape_scale)
        )
        self.base: Any = None
        self.history: list[dict[str, float]] = []
        self.curve: list[tuple[int, float, dict[str, float]]] = []
        self.timing: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def setup(self, trainer: L.Trainer, module: Any, stage: str) -> None:
        c = self.config
        if trainer.world_size > 1 and getattr(module, "_device_mesh", None) is not None:
            raise ValueError(
                "the shapes report samples on rank 0 alone, which a sharded (fsdp2) policy cannot do: every rank "
                "takes part in each forward; run the report under ddp or on one process"
            )
        self.task = module.config.task
        tasks = edit_tasks if self.task == "edit" else gen_tasks
        self.tasks = list(tasks("test", world=c.world, split_config=c.split, limit=c.n_tasks))

    # ---------------------------------------------------------------------------------------------------- evaluation

    def _evaluate(self, module: Any, adapter: str | None, tasks: list[Any], seeds: list[int], desc: str) -> Any:
        from firm.synthetic.evaluate import evaluate_policy

        c = self.config
        return evaluate_policy(
            module.policy,
            tasks,
            c.world,
            seeds=seeds,
            num_steps=c.num_steps or module.config.sampler.num_steps,
            method=c.method,
            adapter=adapter,
            critic=self.critic,
            batch_size=c.batch_size,
            guidance_scale=module.config.sampler.guidance_scale,
            progress=c.progress,
            desc=desc,
        )

    def on_train_start(self, trainer: L.Trainer, module: Any) -> None:
        if not trainer.is_global_zero:
            return
        t = time.perf_counter()
        self.base = self._evaluate(module, None, self.tasks, self.config.seeds, "base model (held-out)")
        self.timing["eval_base_s"] = time.perf_counter() - t
        s = self.base.summary()
        print(f"[shapes] base model, {len(self.tasks)} held-out tasks: {_fmt(s)}", file=sys.stderr)
        self._t_train = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not trainer.is_global_zero:
            return
        row = {"rl_step": float(module.rl_step)}
        for k, v in trainer.callback_metrics.items():
            if k.startswith("reward/") or k.startswith("train/"):
                row[k] = float(v)
        self.history.append(row)
        every = self.config.every
        if every and module.rl_step % every == 0:
            n = min(self.config.curve_tasks, len(self.tasks))
            res = self._evaluate(module, "default", self.tasks[:n], [self.config.seeds[0]], "held-out curve")
            s = res.summary()
            self.curve.append((module.rl_step, s["reward"], {k: s[k] for k in res.components}))
            metrics = {f"heldout/{k}": s[k] for k in ("reward", *res.components)}
            for logger in trainer.loggers:  # also in metrics.csv / TensorBoard, at this optimizer step
                logger.log_metrics(metrics, step=trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, module: Any) -> None:
        if not trainer.is_global_zero or self.base is None:
            return
        self.timing["train_s"] = time.perf_counter() - self._t_train
        t = time.perf_counter()
        trained = self._evaluate(module, "default", self.tasks, self.config.seeds, "trained model (held-out)")
        self.timing["eval_trained_s"] = time.perf_counter() - t
        print(f"[shapes] trained model, {len(self.tasks)} held-out tasks: {_fmt(trained.summary())}", file=sys.stderr)
        self.timing["total_s"] = time.perf_counter() - self._t0
        out = Path(trainer.default_root_dir) / "report"
        path = write_report(out, self, module, trained)
        print(f"[shapes] report: {path}")


def _fmt(s: dict[str, Any]) -> str:
    keys = [k for k in ("reward", "execution", "consistency", "instruction", "quality") if k in s]
    return ", ".join(f"{k} {s[k]:.3f} ± {s['seed_std'][k]:.3f}" for k in keys)


def compare(base: Any, trained: Any) -> dict[str, Any]:
    """The summary of a base-vs-trained held-out comparison (see the module docstring for the definitions)."""
    sb, st = base.summary(), trained.summary()
    dims = list(base.components)
    pick = ["reward", *dims]
    diffs = [t - b for b, t in zip(sb["per_seed"]["reward"], st["per_seed"]["reward"])]
    spread = max(sb["seed_std"]["reward"], st["seed_std"]["reward"])
    improvement = st["reward"] - sb["reward"]
    return {
        "base": {k: sb[k] for k in pick},
        "trained": {k: st[k] for k in pick},
        "seed_spread": spread,
        "improvement": improvement,
        "improvement_over_spread": improvement / spread if spread > 0 else math.inf,
        "paired_improvement_per_seed": diffs,
        "seed_spread_definition": (
            "max over {base, trained} of the sample std (ddof=1) of the held-out mean reward across evaluation seeds "
            "(each seed draws new initial noise for every task; base and trained share it)"
        ),
        "n_tasks": len(base.keys),
        "seeds": list(base.seeds),
        "per_seed": {"base": sb["per_seed"], "trained": st["per_seed"]},
        "seed_std": {"base": sb["seed_std"], "trained": st["seed_std"]},
        "missing_frac": {"base": sb["missing_frac"], "trained": st["missing_frac"]},
        **({"lazy_frac": {"base": sb["lazy_frac"], "trained": st["lazy_frac"]}} if "lazy_frac" in sb else {}),
    }


def write_report(out: Path, rep: ShapesReport, module: Any, trained: Any) -> Path:
    """Write ``summary.json``, ``curves.png``, ``grid.png`` and ``report.md`` into ``out``; returns report.md."""
    from firm.synthetic.recipes.report import comparison_grid, curves_plot

    out.mkdir(parents=True, exist_ok=True)
    c, mc = rep.config, module.config
    summary = compare(rep.base, trained)
    headline = "cme" if rep.task == "edit" else "qma"
    dims = list(rep.base.components)
    summary.update(
        {
            "task": rep.task,
            "headline_reward": headline,
            "trained_on": _reward_name(mc.reward),
            "algorithm": mc.name,
            "rl_steps": int(module.rl_step),
            "timing_s": {k: round(v, 1) for k, v in rep.timing.items()},
        }
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    # Curves: training reward / components per RL step (train prompts), held-out evaluations as points.
    xs = [r["rl_step"] for r in rep.history]
    series = {}
    for key, label in [("reward/mean", f"train reward ({_reward_name(mc.reward)})")] + [
        (f"reward/{d}", f"train {d}") for d in dims
    ]:
        if rep.history and key in rep.history[0]:
            series[label] = (xs, [r.get(key, math.nan) for r in rep.history])
    last = int(module.rl_step)
    sb, st = summary["seed_std"]["base"], summary["seed_std"]["trained"]
    points = {
        f"held-out {headline} (base, trained; ± seed std)": (
            [0, last],
            [summary["base"]["reward"], summary["trained"]["reward"]],
            [sb["reward"], st["reward"]],
        )
    }
    if rep.curve:
        n_curve = min(c.curve_tasks, len(rep.tasks))
        points[f"held-out {headline} during training (seed {c.seeds[0]}, {n_curve} tasks)"] = (
            [p[0] for p in rep.curve],
            [p[1] for p in rep.curve],
            None,
        )
    curves_plot(
        series,
        out / "curves.png",
        title=f"{mc.name} on shapes {rep.task}: reward and components",
        points=points,
        smooth=3,
    )

    # Grid: held-out tasks, base vs trained (first evaluation seed).
    n = min(c.grid_tasks, len(rep.tasks))
    from firm.synthetic.evaluate import score_images

    tasks = rep.tasks[:n]
    cols = [
        ("base", rep.base.images[:n], score_images(tasks, rep.base.images[:n], c.world, rep.critic)),
        ("trained", trained.images[:n], score_images(tasks, trained.images[:n], c.world, rep.critic)),
    ]
    comparison_grid(tasks, c.world, cols, out / "grid.png", title=f"held-out tasks (evaluation seed {c.seeds[0]})")

    (out / "report.md").write_text(_markdown(summary, rep, module, dims, headline))
    return out / "report.md"


def _reward_name(reward: Any) -> str:
    name = getattr(reward, "name", None) or (reward.get("name") if isinstance(reward, dict) else None)
    return str(name or "?")


def _markdown(s: dict[str, Any], rep: ShapesReport, module: Any, dims: list[str], headline: str) -> str:
    mc = module.config
    b, t = s["base"], s["trained"]
    sb, st = s["seed_std"]["base"], s["seed_std"]["trained"]
    rows = "\n".join(
        f"| {k} | {b[k]:.3f} ± {sb[k]:.3f} | {t[k]:.3f} ± {st[k]:.3f} | {t[k] - b[k]:+.3f} |" for k in ["reward", *dims]
    )
    verdict = (
        "**beats the base by more than the seed spread**"
        if s["improvement"] > s["seed_spread"]
        else "does **not** beat the base by more than the seed spread"
    )
    paired = ", ".join(f"{d:+.3f}" for d in s["paired_improvement_per_seed"])
    tm = s["timing_s"]
    return f"""# Shapes-world RL demo: {mc.name} on {rep.task}, trained on {s["trained_on"]}

Held-out: {s["n_tasks"]} tasks of the `test` split (never seen in pretraining or RL), evaluation seeds {s["seeds"]}.
Scores are the rule critic's, normalised to [0, 1]; `reward` is {headline.upper()} (the headline reward, whatever
the run trained on). Values are means over tasks and seeds, ± the std (ddof 1) of the per-seed means.

| held-out | base | trained | change |
|---|---:|---:|---:|
{rows}

Improvement of the held-out {headline.upper()}: **{s["improvement"]:+.3f}**; seed spread: **{s["seed_spread"]:.3f}**
({s["improvement_over_spread"]:.1f}x). The trained model {verdict}.
Per-seed paired improvement (same initial noise for both models): {paired}.

*Seed spread*: {s["seed_spread_definition"]}.

![reward and components](curves.png)

![held-out tasks, base vs trained](grid.png)

Each grid row: the instruction, the source, the right answer, then the base and the trained model's output with the
critic's scores (E = execution, C = consistency, I = instruction, Q = quality; 1..5).

## Run

- algorithm `{mc.name}`, reward `{s["trained_on"]}`, {s["rl_steps"]} RL steps, group size {_group_size(module)},
  {mc.sampler.num_steps} sampling steps, LoRA rank {mc.policy.lora.rank}, lr {mc.lr}
- policy `{mc.policy.pretrained}` ({mc.policy.family})
- time: base evaluation {tm.get("eval_base_s", 0):.0f} s, RL {tm.get("train_s", 0):.0f} s, trained evaluation
  {tm.get("eval_trained_s", 0):.0f} s (report callback total {tm.get("total_s", 0):.0f} s)
- files: `summary.json` (all numbers, per-seed values), `curves.png`, `grid.png`; the run's metrics are in `../csv/`
"""


def _group_size(module: Any) -> Any:
    dm = getattr(module.trainer, "datamodule", None)
    return getattr(getattr(dm, "config", None), "group_size", "?")
