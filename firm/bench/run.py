"""`firm critic bench`: evaluate one or more critics on a benchmark directory and write the report.

Outputs go to ``<output_root>/<name>/`` (a stable directory, so that running the same command again resumes)::

    cache/<critic_id>.jsonl      every raw critic answer, keyed by item id (the resume point)
    predictions/<label>.jsonl    per item: task, split, reference score, predicted score, error
    results.json                 metrics per critic and group, evaluation stats, host, published rows
    table.md                     the markdown tables printed at the end
    bench.png                    per-group MAE bars and confusion matrices
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from firm.config import MISSING, ConfigError, check_run_name, component_field, load_config
from firm.provenance import environment

LABEL = re.compile(r"[A-Za-z0-9_.\-]+")  # a critic label names cache and prediction files


@dataclass
class BenchConfig:
    """A benchmark evaluation: which data, which critics, how to run them."""

    name: str = MISSING  # results go to <output_root>/<name>/ (rerunning the same name resumes from its cache)
    description: str = ""  # one line shown by `firm list`
    data: str = MISSING  # benchmark directory (items.jsonl + images; see docs/bench.md)
    output_root: str = "runs/bench"  # root folder of benchmark results
    imports: list[str] = field(default_factory=list)  # modules or .py files that register extra critics
    critics: dict[str, Any] = component_field("critics", many=True)  # label -> {name: <critics key>, **its Config}
    # reward models scored next to the critics (rank agreement; firm/bench/scorers.py): label -> {name: <scorer>, ...}
    scorers: dict[str, Any] = component_field("scorers", many=True)
    tasks: list[str] = field(default_factory=list)  # evaluate only these tasks (empty: all)
    limit: int | None = None  # at most this many items per task (quick looks)
    batch_size: int = 8  # requests per critic.score() call
    concurrency: int = 1  # critic.score() calls in flight (1 for an in-process GPU model; more for HTTP)
    bootstrap_samples: int = 1000  # resamples for the MAE confidence intervals (0: none)
    ci_level: float = 0.95  # confidence level of the intervals
    seed: int = 0  # seed of the bootstrap
    fresh: bool = False  # ignore cached answers and score everything again
    published: bool = True  # show the published FIRM-Bench rows in the table and plot
    plot: bool = True  # write bench.png

    def validate(self) -> None:
        check_run_name(self.name)
        labels = [label for label, conf in self.critics.items() if conf is not None]
        labels += [label for label, conf in self.scorers.items() if conf is not None]
        if not labels:
            raise ValueError(
                "critics: nothing to evaluate: add a `critics:` or `scorers:` section, or pass --critic NAME"
            )
        if len(set(labels)) != len(labels):
            raise ValueError("critics / scorers: every label must be unique across both sections")
        for label in labels:
            if not LABEL.fullmatch(str(label)):
                raise ValueError(
                    f"critics: label {label!r}: use letters, digits, '_', '-' or '.' (it names cache files)"
                )
        for key in ("batch_size", "concurrency"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.bootstrap_samples < 0:
            raise ValueError(f"bootstrap_samples: must be >= 0 (0: no intervals), got {self.bootstrap_samples}")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"ci_level: must be in (0, 1), got {self.ci_level}")


def load_bench_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    *,
    data: str | None = None,
    critics: list[str] | None = None,
) -> DictConfig:
    """A bench config (:func:`firm.config.load_config`): defaults <- YAML (with `base:`) <- ``--data/--critic`` <-
    key=value.

    ``path`` is a YAML or the name of a shipped one (``bench/shapes_rule``). ``critics`` (registry names from
    ``--critic``) replace the YAML's critics, and then overrides ``critic.KEY=VALUE`` apply to the single critic
    given (``critic.NAME.KEY=VALUE`` picks one of several).
    """
    flags: dict[str, Any] = {}
    if data is not None:
        flags["data"] = data
        flags["name"] = Path(data).resolve().name
    overrides = list(overrides or [])
    if critics:
        flags["critics"] = {c: {"name": c} for c in critics}
        rewritten = []
        for ov in overrides:
            if ov.startswith("critic."):
                key = ov[len("critic.") :]
                first = key.split(".", 1)[0].split("=", 1)[0]
                if len(critics) == 1 and first not in critics:
                    key = f"{critics[0]}.{key}"
                ov = f"critics.{key}"
            rewritten.append(ov)
        overrides = rewritten
    return load_config(path, overrides, schema=BenchConfig, flags=flags, flags_source="command line (--data/--critic)")


def critic_id(label: str, conf: Any) -> str:
    """Cache key of a critic: its label plus a hash of its resolved config."""
    blob = json.dumps(dataclasses.asdict(conf), sort_keys=True, default=str)
    return f"{label}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def run_bench(cfg: DictConfig, *, progress: bool | None = None, echo: bool = True) -> dict[str, Any]:
    """Evaluate every critic of ``cfg`` and write the report. Returns the ``results.json`` content.

    Raises:
        ConfigError: bad configuration or benchmark directory.
        BenchEvaluationError: some batches failed (everything else is cached; rerun to resume).
    """
    from firm.bench.data import BenchmarkError, load_benchmark
    from firm.bench.evaluate import evaluate
    from firm.bench.metrics import compute_metrics
    from firm.bench.report import PUBLISHED, PUBLISHED_SOURCE, markdown_tables, plot_report
    from firm.config import import_extensions
    from firm.critics.factory import build_critic

    c: BenchConfig = OmegaConf.to_object(cfg)
    import_extensions(c.imports, "bench config")
    try:
        bench = load_benchmark(c.data).select(c.tasks or None, c.limit)
    except BenchmarkError as e:
        raise ConfigError(str(e)) from None
    out = Path(c.output_root) / c.name
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if echo:
        print(f"[firm critic bench] {bench.name}: {len(bench.items)} items {bench.task_counts()} -> {out}")

    confs = {label: conf for label, conf in c.critics.items() if conf is not None}
    results: dict[str, Any] = {}
    for label, conf in confs.items():
        cid = critic_id(label, conf)
        critic = build_critic(conf)
        try:
            preds, stats = evaluate(
                bench.items,
                critic,
                critic_id=cid,
                cache_path=out / "cache" / f"{cid}.jsonl",
                batch_size=c.batch_size,
                concurrency=c.concurrency,
                fresh=c.fresh,
                progress=progress,
            )
        finally:
            close = getattr(critic, "close", None)
            if callable(close):
                close()
        metrics = compute_metrics(
            bench.items, preds, bootstrap_samples=c.bootstrap_samples, level=c.ci_level, seed=c.seed
        )
        (out / "predictions").mkdir(exist_ok=True)
        with open(out / "predictions" / f"{label}.jsonl", "w", encoding="utf-8") as f:
            for it in bench.items:
                p = preds[it.id]
                rec = {"id": it.id, "task": it.task, "split": it.split, "reference": it.human_score}
                rec.update(predicted=p.score, error=p.error, raw=p.raw[:2000])
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        failures = [
            {"id": it.id, "error": preds[it.id].error, "raw": preds[it.id].raw[:300]}
            for it in bench.items
            if preds[it.id].score is None
        ]
        results[label] = {
            "critic_id": cid,
            "config": json.loads(json.dumps(dataclasses.asdict(conf), default=str)),
            "metrics": metrics,
            "evaluation": {**dataclasses.asdict(stats), "items_per_s": stats.items_per_s},
            "failure_examples": failures[:10],
        }
        if echo:
            ov = metrics["groups"]["overall"]
            mae = "—" if ov["mae"] is None else f"{ov['mae']:.3f}"
            print(
                f"[firm critic bench] {label}: overall MAE {mae} over {ov['n_parsed']}/{ov['n_items']} parsed "
                f"({stats.n_cached} cached, {stats.n_computed} scored in {stats.wall_s:.1f}s)"
            )
    scorer_results = _run_scorers(c, bench.items, progress=progress, echo=echo)
    report = {
        "benchmark": {
            "name": bench.name,
            "path": str(bench.root),
            "description": bench.description,
            "score_source": bench.score_source,
            "n_items": len(bench.items),
            "groups": bench.task_counts(),
        },
        "environment": environment(),
        "critics": results,
        "scorers": scorer_results,
        "published": {"source": PUBLISHED_SOURCE, "rows": PUBLISHED} if c.published else None,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    table = markdown_tables(report, published=c.published) if results else ""
    if scorer_results:
        from firm.bench.scorers import scorer_table

        table = (table + "\n" if table else "") + "\n".join(scorer_table(scorer_results)) + "\n"
    (out / "table.md").write_text(table)
    if c.plot and results:
        plot_report(report, out / "bench.png", published=c.published)
    if echo:
        print()
        print(table)
        plot = ", bench.png" if c.plot and results else ""
        print(f"[firm critic bench] wrote {out / 'results.json'}, {out / 'table.md'}{plot}")
    return report


def _run_scorers(c: BenchConfig, items: list[Any], *, progress: bool | None, echo: bool) -> dict[str, Any]:
    """Score the items with every scorer of ``c.scorers`` (rank agreement with the reference; no cache)."""
    from firm.bench.scorers import score_items, scorer_metrics
    from firm.rewards.scorers.base import build_scorer

    out: dict[str, Any] = {}
    for label, conf in c.scorers.items():
        if conf is None:
            continue
        if getattr(conf, "name", None) == "critic" and not getattr(conf, "task", ""):
            raise ConfigError(f"scorers.{label}: a critic scorer judges one task here: set task: edit or task: gen")
        scorer = build_scorer(conf, label=label)
        try:
            run = score_items(items, scorer, batch_size=c.batch_size, progress=progress)
        finally:
            close = getattr(scorer, "close", None)
            if callable(close):
                close()
        metrics = scorer_metrics(items, run)
        out[label] = {
            "config": json.loads(json.dumps(dataclasses.asdict(conf), default=str)),
            "output": scorer.primary,
            "metrics": metrics,
            "wall_s": run.wall_s,
            "failure_examples": [{"id": k, "error": v} for k, v in list(run.errors.items())[:10]],
        }
        if echo:
            ov = metrics["groups"].get("overall", {})
            rho = ov.get("spearman")
            print(
                f"[firm critic bench] scorer {label}: Spearman {'—' if rho is None else f'{rho:.3f}'} over "
                f"{ov.get('n_scored', 0)}/{ov.get('n_items', 0)} items ({run.skipped} of another task, "
                f"{run.wall_s:.1f}s)"
            )
    return out
