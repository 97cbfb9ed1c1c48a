"""`firm curate EXP.yaml`: run a curation pipeline over a source, resumably, and write shards + a manifest.

A run lives in ``<output_dir>/<name>/``::

    config.yaml          the resolved config of the first launch (a relaunch must match it, see below)
    scored/              phase 1: every input sample judged by the pipeline (shards + journal.jsonl)
    rewritten/           phase 2 (balance.rewrite): samples whose text was rewritten to mismatch, judged again
    final/               phase 3 (balance.enabled): the selection that follows the target histogram(s)
    manifest.json        counts, histograms (scored / with rewrites / final), teachers, template hashes, shards
    histograms.png       the score histograms before and after balancing

Relaunching the same command continues where a killed run stopped: each phase skips the keys its journal lists
as finished (sealed in a shard, or failed) and redoes only the rest, so every key ends up exactly once. The
choices of phases 2 and 3 are deterministic functions of the scores and ``balance.seed``; when a relaunch with
``retry_failed: true`` scores samples that had failed, the selection is recomputed and ``final/`` is rebuilt if
it no longer matches. A relaunch whose config
differs in what determines the results (source, pipeline, teachers' models, prompts, balance, output format) is
refused: give the new run another name. A launch that failed before recording any result (no journal line, no
shard) binds nothing: a relaunch with another config replaces its ``config.yaml``.

Concurrency: input samples are cut into chunks of ``concurrency.batch_size``; a chunk goes through all stages of
the pipeline in a worker thread, with at most ``concurrency.max_in_flight`` chunks in flight, so at most
``max_in_flight`` teacher calls (of up to ``batch_size`` requests each) are outstanding at any time.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from firm.config import MISSING, ConfigError, check_run_name, component_field, load_config
from firm.curation.balance import BalanceConfig, plan_rewrites, select_joint
from firm.curation.journal import ShardSink
from firm.curation.pipelines import PIPELINES, Outcome, Pipeline
from firm.curation.prompts import CurationPromptConfig, CurationPrompts
from firm.curation.teachers import Teacher

log = logging.getLogger(__name__)

ROLES = ("reporter", "evaluator", "planner", "scorer", "rewriter")
# Settings that may change between a killed run and its relaunch (they do not change the results).
VOLATILE = {
    "description",
    "concurrency",
    "progress",
    "retry_failed",
    "imports",
    "endpoints",
    "max_concurrency",
    "timeout_s",
    "max_retries",
    "api_key_env",
    "device",
    "batch_size",
}


@dataclass
class TeachersConfig:
    """Which teacher plays each role; a role left out uses ``default``."""

    default: Any = component_field("teachers", optional=True)  # used for every role not set below
    reporter: Any = component_field("teachers", optional=True)  # difference_first: writes the difference report
    evaluator: Any = component_field("teachers", optional=True)  # difference_first: Execution + Consistency
    planner: Any = component_field("teachers", optional=True)  # plan_then_score: prompt -> checklist
    scorer: Any = component_field("teachers", optional=True)  # plan_then_score: checklist + quality scores
    rewriter: Any = component_field("teachers", optional=True)  # balancing: writes mismatching texts


@dataclass
class ConcurrencyConfig:
    """How teacher work is batched and overlapped."""

    batch_size: int = 8  # samples per teacher call (a local model batches them; HTTP sends them concurrently)
    max_in_flight: int = 4  # chunks (teacher calls) in flight at once

    def validate(self) -> None:
        for key in ("batch_size", "max_in_flight"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class OutputConfig:
    """Shard format of the outputs."""

    max_count: int = 1000  # samples per shard
    max_size: float = 1e9  # bytes per shard
    image_format: str = "png"  # png (lossless) | jpg
    jpeg_quality: int = 95  # when image_format is jpg


@dataclass
class CurationConfig:
    """A curation run (`firm curate`)."""

    name: str = MISSING  # run name; outputs go to <output_dir>/<name>/
    description: str = ""  # one line shown by `firm list`
    output_dir: str = "runs/curation"  # parent folder of the run folder
    imports: list[str] = field(default_factory=list)  # modules or .py files that register extra teachers/sources
    pipeline: str = "difference_first"  # difference_first (editing) | plan_then_score (generation)
    source: Any = component_field("curation_sources")  # input samples: {name: shards | shapes_edit | shapes_gen, ...}
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    prompts: CurationPromptConfig = field(default_factory=CurationPromptConfig)  # template files
    evaluator_sees_images: bool = True  # difference_first: show the images to the evaluator besides the report
    quality: bool = True  # plan_then_score: also rate Quality (aesthetics, technical, structure)
    concurrency: ConcurrencyConfig = field(default_factory=ConcurrencyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    retry_failed: bool = False  # on relaunch, try again the samples whose teacher answers could not be read
    progress: bool = True  # tqdm progress bars

    def validate(self) -> None:
        check_run_name(self.name)
        if self.pipeline not in PIPELINES:
            raise ValueError(f"pipeline: unknown {self.pipeline!r}; choose from {', '.join(PIPELINES)}")


def load_curation(path: str | Path, overrides: list[str] | None = None) -> Any:
    """The resolved :class:`CurationConfig` (as a DictConfig) of a curation YAML (a path or a shipped name) and
    key=value overrides: :func:`firm.config.load_config`."""
    return load_config(path, overrides, schema=CurationConfig)


# --------------------------------------------------------------------------------------------------------------------
# Building


def build_teachers(cfg: CurationConfig, roles: Iterable[str]) -> dict[str, Teacher]:
    """One teacher per role; roles with equal configs share one instance (a local model is loaded once)."""
    from firm.curation.teachers import build_teacher

    built: list[tuple[Any, Teacher]] = []
    out: dict[str, Teacher] = {}
    for role in roles:
        conf = getattr(cfg.teachers, role) or cfg.teachers.default
        if conf is None:
            raise ConfigError(f"teachers.{role}: no teacher for this role (set it, or teachers.default)")
        for c, t in built:
            if c == conf:
                out[role] = t
                break
        else:
            t = build_teacher(conf)
            built.append((conf, t))
            out[role] = t
    return out


def build_pipeline(cfg: CurationConfig) -> Pipeline:
    if cfg.pipeline not in PIPELINES:
        raise ConfigError(f"pipeline: unknown {cfg.pipeline!r}; choose from {', '.join(PIPELINES)}")
    cls = PIPELINES[cfg.pipeline]
    roles = list(cls.roles)
    if cfg.balance.enabled and cfg.balance.rewrite:
        roles.append("rewriter")
    teachers = build_teachers(cfg, roles)
    prompts = CurationPrompts(cfg.prompts)
    if cls.name == "difference_first":
        return cls(teachers, prompts, evaluator_sees_images=cfg.evaluator_sees_images)
    return cls(teachers, prompts, quality=cfg.quality)


def build_source(cfg: CurationConfig) -> Any:
    from firm.config import build_component

    cls, conf = build_component("curation_sources", cfg.source, source="source")
    return cls(conf)


# --------------------------------------------------------------------------------------------------------------------
# Running a stage


def _chunks(items: Iterable[dict], size: int) -> Iterator[list[dict]]:
    chunk: list[dict] = []
    for it in items:
        chunk.append(it)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class StageReport:
    """What one stage did in this launch."""

    processed: int = 0  # samples sent through the pipeline now
    skipped: int = 0  # samples already finished by an earlier launch
    written: int = 0
    failed: int = 0
    notes: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def run_stage(
    items: Iterable[dict],
    work: Callable[[list[dict]], list[Outcome]],
    sink: ShardSink,
    *,
    batch_size: int,
    max_in_flight: int,
    total: int | None,
    desc: str,
    progress: bool,
    retry_failed: bool = False,
) -> StageReport:
    """Run ``work`` over the unfinished ``items`` in bounded parallel chunks, writing outcomes to ``sink``."""
    from tqdm import tqdm

    rep = StageReport()
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True)

    def todo() -> Iterator[dict]:
        seen: set[str] = set()
        for it in items:
            key = it["key"]
            if key in seen:
                raise ValueError(f"{desc}: the source yields key {key!r} twice; keys must be unique")
            seen.add(key)
            if key in sink.done or (key in sink.failed and not retry_failed):
                rep.skipped += 1
                bar.update(1)
                continue
            yield it

    def handle(fut: Future) -> None:
        outcomes = fut.result()
        for o in outcomes:
            if o.sample is not None:
                sink.write(o.sample)
                rep.written += 1
            else:
                sink.fail(o.key, o.error or "unknown error")
                rep.failed += 1
                log.debug("%s failed: %s", o.key, o.error)
            for n in o.notes:
                rep.notes[n.split(":")[0]] += 1
        rep.processed += len(outcomes)
        bar.update(len(outcomes))
        bar.set_postfix(failed=rep.failed, resumed=rep.skipped, refresh=False)

    pool = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix=f"firm-{desc}")
    pending: set[Future] = set()
    try:
        for chunk in _chunks(todo(), batch_size):
            while len(pending) >= max_in_flight:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in done:
                    handle(f)
            pending.add(pool.submit(work, chunk))
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                handle(f)
    except BaseException:
        # keep what finished (its samples are complete), then stop; unfinished chunks are redone next launch
        for f in pending:
            f.cancel()
        for f in pending:
            if f.done() and not f.cancelled() and f.exception() is None:
                handle(f)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        rep.seconds = time.perf_counter() - t0
    return rep


# --------------------------------------------------------------------------------------------------------------------
# The run


def _identity(cfg_node: Any) -> Any:
    """The config without the settings that may change between launches."""

    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in VOLATILE}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x

    out = strip(OmegaConf.to_container(cfg_node, resolve=True))
    balance = out.get("balance") if isinstance(out, dict) else None
    if isinstance(balance, dict) and not balance.get("joint"):
        balance.pop("joint", None)  # runs saved before balance.joint existed have none; empty means the same
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _has_work(run_dir: Path) -> bool:
    """Whether a run directory holds any result: a journal line or a shard (sealed or being written)."""
    for sub in run_dir.iterdir():
        if not sub.is_dir():
            continue
        journal = sub / "journal.jsonl"
        if journal.is_file() and journal.stat().st_size > 0:
            return True
        if any(sub.glob("*.tar")) or any(sub.glob("*.tar.tmp")):
            return True
    return False


def _check_run_dir(run_dir: Path, cfg_node: Any) -> None:
    saved = run_dir / "config.yaml"
    if saved.is_file():
        before = _identity(OmegaConf.load(saved))
        now = _identity(cfg_node)
        changed = _diff(before, now)
        if changed and not _has_work(run_dir):
            # A launch that failed before judging anything (a wrong source path, a teacher not up yet) left only its
            # config: nothing depends on it, so the corrected relaunch takes its place.
            log.warning(
                "%s: the earlier launch recorded no results; replacing its config (it differed in: %s)",
                run_dir,
                ", ".join(changed[:8]),
            )
            OmegaConf.save(cfg_node, saved, resolve=True)
            return
        if changed:
            raise ConfigError(
                f"{run_dir} holds a curation run with a different config (differs in: {', '.join(changed[:8])}); "
                "relaunch with the same settings to resume it, or give the new run another name"
            )
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg_node, saved, resolve=True)


def _histograms(facts: dict[str, dict], dims: Iterable[str]) -> dict[str, dict[str, int]]:
    from firm.data.inspect import histogram

    return {d: histogram([f.get("scores", {}).get(d) for f in facts.values()]) for d in dims}


def _scored_iter(sinks: list[ShardSink], keys: set[str]) -> Iterator[dict]:
    """Samples with ``keys`` from the sealed shards of ``sinks`` (reading only the shards that hold them)."""
    from firm.data.reader import iter_samples

    for sink in sinks:
        shard_names = sorted({sink.shard_of[k] for k in keys if k in sink.shard_of})
        for name in shard_names:
            for s in iter_samples(str(sink.dir / name), sink.schema, on_corrupt="fail"):
                if s["key"] in keys:
                    yield s


def run_curation(cfg_node: Any) -> dict:
    """Run (or resume) the curation described by a resolved config; returns the manifest."""
    from firm.config import to_object

    cfg: CurationConfig = to_object(cfg_node)
    run_dir = Path(cfg.output_dir) / cfg.name
    _check_run_dir(run_dir, cfg_node)
    t_start = time.perf_counter()
    pipeline = build_pipeline(cfg)
    source = build_source(cfg)
    dims = list(pipeline.scores({}).keys())
    bal = cfg.balance
    dim = bal.dimension or pipeline.balance_default
    if dim not in dims:
        raise ConfigError(f"balance.dimension: {dim!r} is not a score of {pipeline.name} (one of {dims})")
    unknown = [d for d in bal.joint or {} if d not in dims]
    if unknown:
        raise ConfigError(f"balance.joint: {unknown} not score(s) of {pipeline.name} (one of {dims})")
    targets = None  # balanced dimension -> target shares; the primary dimension first
    if bal.enabled:
        try:
            targets = bal.targets(dim)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    shares = targets[dim] if targets else None
    writer_kwargs = {
        "max_count": cfg.output.max_count,
        "max_size": cfg.output.max_size,
        "image_format": cfg.output.image_format,
        "jpeg_quality": cfg.output.jpeg_quality,
    }

    def facts_of(sample: dict) -> dict:
        prov = sample.get("provenance") or {}
        return {"scores": pipeline.scores(sample), "rewritten": bool(prov.get("rewritten"))}

    common = dict(
        batch_size=cfg.concurrency.batch_size,
        max_in_flight=cfg.concurrency.max_in_flight,
        progress=cfg.progress,
        retry_failed=cfg.retry_failed,
    )
    reports: dict[str, StageReport] = {}

    # ---- phase 1: judge every input sample
    scored = ShardSink(run_dir / "scored", "scored", pipeline.schema, writer_kwargs, facts_of)
    try:
        reports["score"] = run_stage(
            iter(source), pipeline.process, scored, total=getattr(source, "total", None), desc="score", **common
        )
    finally:
        scored.close()
    sinks = [scored]

    # ---- phase 2: rewrite texts to synthesise low scores
    rewritten = None
    if bal.enabled and bal.rewrite:
        base_scores = {k: f["scores"].get(dim) for k, f in scored.done.items()}
        candidates = plan_rewrites(base_scores, shares, bal.max_rewrite_fraction, bal.seed)
        rewritten = ShardSink(run_dir / "rewritten", "rewritten", pipeline.schema, writer_kwargs, facts_of)
        from firm.curation.pipelines import REWRITE_SUFFIX

        todo = {
            k
            for k in candidates
            if k + REWRITE_SUFFIX not in rewritten.done
            and (k + REWRITE_SUFFIX not in rewritten.failed or cfg.retry_failed)
        }
        try:
            reports["rewrite"] = run_stage(
                _scored_iter([scored], todo),
                pipeline.rewrite,
                rewritten,
                total=len(todo),
                desc="rewrite",
                **{**common, "retry_failed": True},
            )
            reports["rewrite"].skipped = len(candidates) - len(todo)
        finally:
            rewritten.close()
        sinks.append(rewritten)

    # ---- phase 3: select the balanced output
    final = None
    all_facts = {k: f for s in sinks for k, f in s.done.items()}
    if bal.enabled:
        # one dimension: select(); with balance.joint, every balanced dimension at once (see balance.py)
        keep = select_joint(
            {k: f["scores"] for k, f in all_facts.items()}, targets, bal.seed, bal.max_samples, bal.fill
        )
        final = ShardSink(run_dir / "final", "final", pipeline.schema, writer_kwargs, facts_of)
        stale = set(final.done) - keep
        if stale:
            # The scores changed since final/ was written (a retry_failed relaunch scored samples that had failed),
            # so the selection did too. final/ is a function of the scores: write it again from scratch.
            log.warning(
                "balance: %d sample(s) in %s are no longer selected (the scores changed since it was written, "
                "e.g. by retry_failed); rebuilding it",
                len(stale),
                final.dir,
            )
            final.close()
            shutil.rmtree(final.dir)
            final = ShardSink(run_dir / "final", "final", pipeline.schema, writer_kwargs, facts_of)
        todo = {k for k in keep if k not in final.done}
        try:

            def copy(chunk: list[dict]) -> list[Outcome]:
                return [Outcome(s["key"], sample={k: v for k, v in s.items() if not k.startswith("__")}) for s in chunk]

            reports["select"] = run_stage(
                _scored_iter(sinks, todo),
                copy,
                final,
                total=len(todo),
                desc="select",
                batch_size=64,
                max_in_flight=1,
                progress=cfg.progress,
            )
            reports["select"].skipped = len(keep) - len(todo)
        finally:
            final.close()
        extra = set(final.done) - keep
        if extra:
            raise RuntimeError(
                f"{final.dir} holds {len(extra)} sample(s) outside the selection (e.g. {sorted(extra)[:3]})"
            )

    manifest = _manifest(cfg, cfg_node, run_dir, pipeline, source, scored, rewritten, final, dims, dim, targets)
    manifest["this_launch"] = {
        name: {
            "processed": r.processed,
            "resumed_skipped": r.skipped,
            "written": r.written,
            "failed": r.failed,
            "notes": dict(r.notes),
            "seconds": round(r.seconds, 2),
            "samples_per_s": round(r.processed / r.seconds, 2) if r.seconds > 0 else None,
        }
        for name, r in reports.items()
    }
    manifest["this_launch"]["teacher_calls"] = dict(pipeline.stats)
    manifest["this_launch"]["seconds"] = round(time.perf_counter() - t_start, 2)
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def _manifest(cfg, cfg_node, run_dir, pipeline, source, scored, rewritten, final, dims, dim, targets) -> dict:
    from firm.data.inspect import plot_histograms

    hist = {"scored": _histograms(scored.done, dims)}
    counts: dict[str, Any] = {
        "scored": len(scored.done),
        "failed": len(scored.failed),
        "missing_scores": {d: hist["scored"][d]["missing"] for d in dims},
    }
    shards = {"scored": scored.shards()}
    if rewritten is not None:
        merged = {**scored.done, **rewritten.done}
        hist["with_rewrites"] = _histograms(merged, dims)
        counts["rewritten"] = len(rewritten.done)
        counts["rewrite_failed"] = len(rewritten.failed)
        shards["rewritten"] = rewritten.shards()
    if final is not None:
        hist["final"] = _histograms(final.done, dims)
        counts["final"] = len(final.done)
        counts["final_rewritten"] = sum(1 for f in final.done.values() if f.get("rewritten"))
        shards["final"] = final.shards()
    failures = Counter(r.split(":")[0] for r in scored.failed.values())
    balanced = list(targets or {dim: None})
    plots = {f"{stage}: {d}": h[d] for stage, h in hist.items() for d in balanced}
    plot = plot_histograms(
        plots, run_dir / "histograms.png", f"{cfg.name}: {', '.join(balanced)} before / after balancing"
    )
    return {
        "name": cfg.name,
        "pipeline": pipeline.name,
        "schema": pipeline.schema,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "source": source.source_id,
        "teachers": pipeline.teacher_ids()
        | ({"rewriter": pipeline.teachers["rewriter"].teacher_id} if "rewriter" in pipeline.teachers else {}),
        "prompt_templates": pipeline.template_hashes(),
        "counts": counts,
        "failures_by_reason": dict(failures),
        "balance": {"dimension": dim, "target": targets[dim], "dimensions": balanced, "targets": targets}
        if targets
        else None,
        "histograms": hist,
        "histogram_plot": plot,
        "output": "final" if final is not None else "scored",
        "output_shards": shards["final"] if final is not None else shards["scored"],
        "shards": shards,
        "config": OmegaConf.to_container(cfg_node, resolve=True),
    }


def print_report(manifest: dict) -> None:
    """The manifest's counts and histograms as text."""
    from firm.data.inspect import format_histogram

    c = manifest["counts"]
    print(f"curation {manifest['name']} ({manifest['pipeline']}): {c['scored']} scored, {c['failed']} failed", end="")
    if "rewritten" in c:
        print(f", {c['rewritten']} rewritten", end="")
    if "final" in c:
        print(f", {c['final']} in the balanced output ({c['final_rewritten']} rewritten)", end="")
    print()
    for name, r in manifest.get("this_launch", {}).items():
        if isinstance(r, dict) and "processed" in r:
            rate = f", {r['samples_per_s']} samples/s" if r.get("samples_per_s") else ""
            print(f"  {name}: processed {r['processed']} now, {r['resumed_skipped']} already done{rate}")
    bal = manifest.get("balance") or {}
    balanced = bal.get("dimensions") or ([bal["dimension"]] if bal.get("dimension") else None)
    for stage, hists in manifest["histograms"].items():
        for d, h in hists.items():
            if balanced is None or d in balanced or stage == "scored":
                print()
                print("\n".join(format_histogram(f"{stage}: {d}", h)))
    if manifest["failures_by_reason"]:
        print("\nfailures:", ", ".join(f"{k} x{v}" for k, v in manifest["failures_by_reason"].items()))
    run_dir = Path(manifest["histogram_plot"]).parent
    where = f"{run_dir / manifest['output']}/" if manifest["output_shards"] else "(none)"
    print(f"\noutput: {len(manifest['output_shards'])} shard(s) in {where}")
    print(f"manifest: {run_dir / 'manifest.json'}; histograms: {manifest['histogram_plot']}")
