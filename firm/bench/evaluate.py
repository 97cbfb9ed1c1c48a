"""Run a critic over benchmark items with bounded concurrency, caching every raw output so that runs resume.

The cache is an append-only JSONL file per critic id: one line per item, keyed by ``(critic_id, item_id)`` and
stamped with the item's fingerprint (its texts and image bytes). A line is written, flushed and fsynced as soon as
the batch holding it returns, so an evaluation that is interrupted (Ctrl-C, SIGKILL, a crashed endpoint) loses at
most the batches in flight; running it again only scores the items that have no valid line. A torn last line (the
process died mid-write) is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from firm.bench.data import GENERATION, BenchItem, load_image
from firm.critics.types import Critic, CriticRequest, CriticResult, EditRequest, GenRequest, check_score

log = logging.getLogger(__name__)


class BenchEvaluationError(RuntimeError):
    """Some batches failed (transport errors, a crashed backend); finished items are cached, rerun to resume."""


@dataclass
class Prediction:
    """The critic's answer for one item: a score in 1..5, or ``None`` with the reason."""

    item_id: str
    score: int | None
    error: str | None = None  # why the score is missing (unparseable output, dimension not returned, ...)
    raw: str = ""  # the critic's raw output for this item's dimension
    reasoning: str = ""
    latency_s: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class EvaluationStats:
    n_items: int = 0
    n_cached: int = 0  # answers taken from the cache
    n_computed: int = 0  # answers obtained in this run
    n_failed_batches: int = 0
    wall_s: float = 0.0  # time spent scoring (excluding cached items)

    @property
    def items_per_s(self) -> float | None:
        return self.n_computed / self.wall_s if self.n_computed and self.wall_s > 0 else None


def build_request(item: BenchItem) -> CriticRequest:
    """The critic request for one item, asking only for the item's dimension."""
    if item.task == GENERATION:
        return GenRequest(
            image=load_image(item.image, item.id),
            prompt=item.prompt,
            checklist=item.checklist,
            key=item.id,
            dimensions=(item.dimension,),
        )
    return EditRequest(
        source=load_image(item.source, item.id),
        edited=load_image(item.edited, item.id),
        instruction=item.instruction,
        key=item.id,
        dimensions=(item.dimension,),
    )


def prediction_from_result(item: BenchItem, result: CriticResult) -> Prediction:
    """Pick the item's dimension out of a critic result; a missing or invalid score stays ``None``."""
    dim = item.dimension
    raw = str(result.raw.get(dim, ""))
    reasoning = str(result.reasoning.get(dim, ""))
    if dim not in result.scores:
        return Prediction(item.id, None, f"critic returned no {dim!r} score", raw, reasoning, result.latency_s)
    value = result.scores[dim]
    score = check_score(value)
    if score is None:
        error = result.errors.get(dim) or (
            "no score parsed" if value is None else f"score {value!r} is not an integer in 1..5"
        )
        return Prediction(item.id, None, error, raw, reasoning, result.latency_s, _jsonable(result.details))
    return Prediction(item.id, score, None, raw, reasoning, result.latency_s, _jsonable(result.details))


def _jsonable(obj: Any) -> Any:
    try:
        json.dumps(obj)
        return obj
    except (TypeError, ValueError):
        return json.loads(json.dumps(obj, default=str))


class PredictionCache:
    """Append-only JSONL of predictions for one critic id."""

    def __init__(self, path: Path, critic_id: str) -> None:
        self.path = Path(path)
        self.critic_id = critic_id

    def load(self) -> dict[str, tuple[str, Prediction]]:
        """``item_id -> (fingerprint, prediction)``; later lines win; torn or foreign lines are skipped."""
        out: dict[str, tuple[str, Prediction]] = {}
        if not self.path.is_file():
            return out
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if rec["critic_id"] != self.critic_id:
                    continue
                pred = Prediction(**rec["prediction"])
                out[rec["item_id"]] = (rec["fingerprint"], pred)
            except (json.JSONDecodeError, KeyError, TypeError):
                # The last line may be torn by a kill mid-write; anything else is corruption worth a warning.
                if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1 :]):
                    log.warning("%s:%d: unreadable cache line skipped", self.path, i + 1)
        return out

    def append(self, records: list[tuple[str, Prediction]]) -> None:
        """Write ``(fingerprint, prediction)`` lines and make them durable."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A torn last line (no newline) must not swallow the next record.
        needs_newline = False
        if self.path.is_file() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b"\n"
        with open(self.path, "a", encoding="utf-8") as f:
            if needs_newline:
                f.write("\n")
            for fp, pred in records:
                rec = {"critic_id": self.critic_id, "item_id": pred.item_id, "fingerprint": fp}
                rec["prediction"] = asdict(pred)
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _score_batch(critic: Critic, batch: list[BenchItem]) -> tuple[list[Prediction], float]:
    t0 = time.perf_counter()
    requests = [build_request(it) for it in batch]
    results = critic.score(requests)
    if len(results) != len(requests):
        raise BenchEvaluationError(f"critic returned {len(results)} results for {len(requests)} requests")
    return [prediction_from_result(it, r) for it, r in zip(batch, results, strict=True)], time.perf_counter() - t0


def evaluate(
    items: list[BenchItem],
    critic: Critic,
    *,
    critic_id: str,
    cache_path: str | Path,
    batch_size: int = 8,
    concurrency: int = 1,
    fresh: bool = False,
    progress: bool | None = None,
) -> tuple[dict[str, Prediction], EvaluationStats]:
    """Score every item with ``critic``, reusing cached answers.

    Args:
        items: the benchmark items.
        critic: any :class:`firm.critics.types.Critic`.
        critic_id: the cache key of this critic (label + hash of its config).
        cache_path: the JSONL cache file of this critic.
        batch_size: requests per ``critic.score`` call.
        concurrency: ``critic.score`` calls in flight at once (threads). Use 1 for an in-process GPU model; more
            for HTTP endpoints or rule critics.
        fresh: ignore the cache (new answers are still appended to it).
        progress: show a tqdm bar (default: when stderr is a terminal).

    Returns:
        ``(item_id -> prediction, stats)``.

    Raises:
        BenchEvaluationError: when some batches raised; every other answer is cached and a rerun resumes.
    """
    import sys

    from tqdm import tqdm

    if batch_size < 1 or concurrency < 1:
        raise ValueError(f"batch_size and concurrency must be >= 1, got {batch_size} and {concurrency}")
    cache = PredictionCache(Path(cache_path), critic_id)
    cached = {} if fresh else cache.load()
    preds: dict[str, Prediction] = {}
    todo: list[tuple[BenchItem, str]] = []
    for it in items:
        fp = it.fingerprint()
        hit = cached.get(it.id)
        if hit is not None and hit[0] == fp:
            preds[it.id] = hit[1]
        else:
            todo.append((it, fp))
    stats = EvaluationStats(n_items=len(items), n_cached=len(preds))
    if not todo:
        return preds, stats

    fps = dict((it.id, fp) for it, fp in todo)
    batches = [[it for it, _ in todo[i : i + batch_size]] for i in range(0, len(todo), batch_size)]
    show = sys.stderr.isatty() if progress is None else progress
    bar = tqdm(total=len(todo), desc=f"bench {critic_id}", unit="item", disable=not show)
    errors: list[tuple[list[BenchItem], BaseException]] = []
    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="firm-bench")
    in_flight: dict[Future, list[BenchItem]] = {}
    pending = iter(batches)
    try:
        while True:
            while len(in_flight) < concurrency:
                batch = next(pending, None)
                if batch is None:
                    break
                in_flight[pool.submit(_score_batch, critic, batch)] = batch
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for fut in done:
                batch = in_flight.pop(fut)
                try:
                    batch_preds, _ = fut.result()
                except KeyboardInterrupt:
                    raise
                except Exception as e:  # noqa: BLE001 - reported after the other batches finish
                    errors.append((batch, e))
                    log.warning("batch of %d items failed: %s: %s", len(batch), type(e).__name__, e)
                    bar.update(len(batch))
                    continue
                cache.append([(fps[p.item_id], p) for p in batch_preds])
                for p in batch_preds:
                    preds[p.item_id] = p
                stats.n_computed += len(batch_preds)
                bar.update(len(batch_preds))
    finally:
        # On an interrupt: drop queued work; batches already running finish in their threads but are not awaited.
        pool.shutdown(wait=not in_flight, cancel_futures=True)
        bar.close()
        stats.wall_s = time.perf_counter() - t0
    if errors:
        stats.n_failed_batches = len(errors)
        n_items = sum(len(b) for b, _ in errors)
        first = errors[0][1]
        raise BenchEvaluationError(
            f"{len(errors)} batch(es) ({n_items} items) failed for critic {critic_id}; the first error: "
            f"{type(first).__name__}: {first}. The other {len(preds)} answers are cached in {cache.path}: "
            "fix the cause and run the same command again to score only the missing items."
        ) from first
    return preds, stats
