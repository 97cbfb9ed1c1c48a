"""`firm eval EXP.yaml [key=value ...] [--stage generate|score|report]`: the three stages over one config.

Outputs go to ``<output_root>/<name>/`` (a stable folder: running the same command again resumes)::

    manifest/<label>.json, <label>.rank<r>.jsonl   generation settings and one line per image
    images/<label>/<item>__s<seed>.png             the images
    score/<judge id>.rank<r>.jsonl                 every raw judge answer (the cache)
    results.json, table.md, grids/<category>.png   the report
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from firm.config import MISSING, ConfigError, build_component, check_run_name, component_field, load_config, to_object
from firm.eval.generate import GenerationConfig
from firm.eval.policies import PolicySpec
from firm.eval.report import ReportConfig

STAGES = ("generate", "score", "report")


@dataclass
class EvalConfig:
    """A policy evaluation: prompts, policies, generation settings, judge, report."""

    name: str = MISSING  # results go to <output_root>/<name>/ (rerunning the same name resumes)
    description: str = ""  # one line shown by `firm list`
    output_root: str = "runs/eval"  # root folder of evaluations
    imports: list[str] = field(default_factory=list)  # modules or .py files registering extra sets / judges / critics
    prompts: Any = component_field("eval_sets")  # the prompt set: {name: <EVAL_SETS key>, ...its Config}
    categories: list[str] = field(default_factory=list)  # evaluate only these categories (empty: all)
    limit: int | None = None  # at most this many prompts per category (quick looks)
    policies: dict[str, PolicySpec] = field(default_factory=dict)  # label -> policy (base, run, exported LoRA)
    baseline: str | None = None  # the label the others are compared to (null: the first)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    judge: Any = component_field("judges")  # {name: <JUDGES key>, ...its Config}
    score_batch_size: int = 8  # questions per judge call
    wait_s: float = 3600.0  # several ranks: how long rank 0 waits for the others' answers before the report
    progress: bool = True  # progress bars
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> None:
        check_run_name(self.name)
        if not self.policies:
            raise ValueError("policies: names no policy to evaluate")
        if self.baseline is not None and self.baseline not in self.policies:
            raise ValueError(f"baseline: {self.baseline!r} is not one of the policies {list(self.policies)}")
        for label in self.policies:
            if not label.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"policies: label {label!r}: use letters, digits, '_' or '-' (it names folders)")
        if self.score_batch_size < 1:
            raise ValueError(f"score_batch_size: must be >= 1, got {self.score_batch_size}")


def load_eval_config(path: str | Path, overrides: list[str] | None = None) -> EvalConfig:
    """The :class:`EvalConfig` of an eval YAML (a path or a shipped name) and key=value overrides
    (:func:`firm.config.load_config`); the policies are checked too (no weights read)."""
    from firm.eval.policies import resolve_spec

    c: EvalConfig = to_object(load_config(path, overrides, schema=EvalConfig))
    for label, spec in c.policies.items():
        resolve_spec(spec, label, c.generation.resolution, check_files=False)
    return c


def build_prompt_set(c: EvalConfig) -> Any:
    from firm.eval.items import EvalSetError

    cls, conf = build_component("eval_sets", c.prompts, source="prompts")
    try:
        return cls(conf).load().select(c.categories or None, c.limit)
    except EvalSetError as e:
        raise ConfigError(str(e)) from None


def build_judge(c: EvalConfig, kind: str) -> tuple[Any, str]:
    from firm.eval.score import judge_id

    cls, conf = build_component("judges", c.judge, source="judge")
    try:
        return cls(conf, kind), judge_id(conf)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _values(out: Path, c: EvalConfig, ps: Any, judge: Any, jid: str) -> tuple[dict, dict[str, int], list[dict]]:
    """``label -> item id -> seed -> metrics`` from the cache; parse failures per label and some examples."""
    from firm.eval.generate import sample_id
    from firm.eval.score import load_answers

    answers = load_answers(out, jid)
    values: dict[str, dict] = {}
    failures: dict[str, int] = {}
    examples: list[dict] = []
    unscored = []
    for label in c.policies:
        failures[label] = 0
        keys, batch = [], []
        for it in ps.items:
            for s in c.generation.seeds:
                sid = f"{label}/{sample_id(it, s)}"
                got = {}
                for q in judge.questions(it):
                    hit = answers.get(f"{sid}/{q}")
                    if hit is None:
                        unscored.append(f"{sid}/{q}")
                        continue
                    pred = hit[1]
                    got[q] = pred
                    if pred.score is None:
                        failures[label] += 1
                        if len(examples) < 10:
                            examples.append({"answer": pred.item_id, "error": pred.error, "raw": pred.raw[:300]})
                keys.append((it, s))
                batch.append(got)
        if unscored:
            raise ConfigError(
                f"{len(unscored)} judge answers are missing (e.g. {unscored[0]}): run the score stage first"
            )
        metrics = judge.metrics_batch([it for it, _ in keys], batch)
        per: dict[str, dict] = {}
        for (it, s), m in zip(keys, metrics, strict=True):
            per.setdefault(it.id, {})[s] = m
        values[label] = per
    return values, failures, examples


def report(out: Path, c: EvalConfig, ps: Any, judge: Any, jid: str) -> dict[str, Any]:
    from firm.eval.policies import resolve_spec
    from firm.eval.report import draw_grid, markdown, paired_difference, summarise
    from firm.provenance import environment

    values, failures, examples = _values(out, c, ps, judge, jid)
    labels = list(c.policies)
    base = c.baseline or labels[0]
    policies = {}
    for lab in labels:
        _, desc = resolve_spec(c.policies[lab], lab, c.generation.resolution, check_files=False)
        policies[lab] = {
            "policy": desc,
            "metrics": {m: summarise(values[lab], ps, m, judge.overall) for m in judge.metric_names},
            "parse_failures": failures[lab],
        }
    diffs = {
        o: {m: paired_difference(values[base], values[o], ps, m, judge.overall, c.report) for m in judge.metric_names}
        for o in labels
        if o != base
    }
    counts = {cat: sum(it.category == cat for it in ps.items) for cat in ps.categories()}
    results = {
        "name": c.name,
        "prompt_set": ps.name,
        "kind": ps.kind,
        "n_items": len(ps.items),
        "seeds": list(c.generation.seeds),
        "categories": ps.categories(),
        "counts": counts,
        "labels": labels,
        "baseline": base,
        "headline": judge.metric_names[0],
        "metrics": list(judge.metric_names),
        "overall_rule": judge.overall,
        "scale": judge.scale,
        "note": getattr(judge, "note", ""),
        "judge": {"id": jid, **json.loads(json.dumps(dataclasses.asdict(c.judge), default=str))},
        "generation": dataclasses.asdict(c.generation),
        "resolutions": sorted({p["policy"]["resolution"] for p in policies.values()}),
        "policies": policies,
        "differences": diffs,
        "ci_level": c.report.ci_level,
        "bootstrap_samples": c.report.bootstrap_samples,
        "failure_examples": examples,
        "published": [{**dataclasses.asdict(p), "published": True} for p in c.report.published],
        "environment": environment(),
    }
    if c.report.grid_items > 0:
        results["grids"] = [
            str(p.relative_to(out))
            for cat in ps.categories()
            if (
                p := draw_grid(
                    out,
                    ps,
                    cat,
                    labels,
                    c.generation.seeds[0],
                    values,
                    judge.metric_names[0],
                    c.report.grid_cell,
                    c.report.grid_items,
                )
            )
        ]
    (out / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    (out / "table.md").write_text(markdown(results))
    return results


def _wait_for_answers(out: Path, c: EvalConfig, ps: Any, judge: Any, jid: str) -> None:
    from firm.eval.generate import sample_id
    from firm.eval.score import load_answers

    need = {
        f"{lab}/{sample_id(it, s)}/{q}"
        for lab in c.policies
        for it in ps.items
        for s in c.generation.seeds
        for q in judge.questions(it)
    }
    t0 = time.monotonic()
    while True:
        have = set(load_answers(out, jid))
        if need <= have:
            return
        if time.monotonic() - t0 > c.wait_s:
            raise ConfigError(f"waited {c.wait_s:.0f} s for the other ranks: {len(need - have)} answers still missing")
        time.sleep(1.0)


def run_eval(c: EvalConfig, stages: tuple[str, ...] = STAGES, *, echo: bool = True) -> dict[str, Any]:
    """Run ``stages`` of ``c`` on this rank; returns what each stage reported."""
    from firm.eval.generate import generate, rank_and_world
    from firm.eval.score import score

    rank, world = rank_and_world()
    out = Path(c.output_root) / c.name
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(c)))
    ps = build_prompt_set(c)
    done: dict[str, Any] = {}
    say = (lambda m: print(f"[firm eval] {m}")) if echo else (lambda m: None)
    say(
        f"{ps.name}: {len(ps.items)} prompts x {len(c.generation.seeds)} seeds, policies {list(c.policies)} -> {out}"
        + (f" (rank {rank}/{world})" if world > 1 else "")
    )
    if "generate" in stages:
        t = time.perf_counter()
        done["generate"] = generate(out, ps, c.policies, c.generation, rank=rank, world=world, progress=c.progress)
        say(f"generate: {done['generate']} ({time.perf_counter() - t:.1f} s)")
    judge = None
    if "score" in stages or "report" in stages:
        judge, jid = build_judge(c, ps.kind)
    try:
        if "score" in stages:
            t = time.perf_counter()
            done["score"] = score(
                out,
                ps,
                list(c.policies),
                c.generation.seeds,
                judge,
                jid,
                rank=rank,
                world=world,
                batch_size=c.score_batch_size,
                progress=c.progress,
            )
            say(f"score: {done['score']} ({time.perf_counter() - t:.1f} s)")
        if "report" in stages and rank == 0:
            if world > 1:
                _wait_for_answers(out, c, ps, judge, jid)
            done["report"] = report(out, c, ps, judge, jid)
            if echo:
                print((out / "table.md").read_text())
            say(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'grids'}")
    finally:
        if judge is not None:
            judge.close()
    return done
