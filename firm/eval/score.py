"""Stage 2, score: every image's judge questions, answered once and cached (the `firm critic bench` cache).

Answers go to ``score/<judge id>.rank<r>.jsonl`` through :class:`firm.bench.evaluate.PredictionCache`: one line per
(sample, question), written and fsynced as soon as its batch returns, stamped with a fingerprint of the image bytes,
the prompt, the question and the judge's prompt version. A relaunch asks only the questions without a valid line
(from any rank's file). The raw answer is kept; an answer that cannot be parsed is stored with its reason and counted
by the report, never turned into a score.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm import tqdm

from firm.bench.evaluate import Prediction, PredictionCache
from firm.eval.generate import image_path, sample_id, shard
from firm.eval.items import PromptItem, PromptSet
from firm.eval.judges import Judge, Query


def judge_id(config: Any) -> str:
    """The cache key of a judge: its name plus a hash of its resolved config."""
    blob = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
    return f"{config.name}-{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def fingerprint(png: bytes, item: PromptItem, qid: str, version: str) -> str:
    h = hashlib.sha1(png)
    h.update(json.dumps([item.prompt, item.meta, qid, version], sort_keys=True, default=str).encode())
    return h.hexdigest()


def load_answers(out: Path, jid: str) -> dict[str, tuple[str, Prediction]]:
    """``answer id -> (fingerprint, prediction)`` over every rank's cache of judge ``jid``."""
    found: dict[str, tuple[str, Prediction]] = {}
    for path in sorted((out / "score").glob(f"{jid}.rank*.jsonl")):
        found.update(PredictionCache(path, jid).load())
    return found


def queries_of(
    out: Path, label: str, items: list[PromptItem], seeds: list[int], judge: Judge
) -> list[tuple[Query, str]]:
    """The (query, fingerprint) pairs of ``label``'s images of ``items``; fails when an image is missing."""
    qs = []
    missing = [sample_id(it, s) for it in items for s in seeds if not image_path(out, label, it, s).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{label}: {len(missing)} image(s) not generated yet (e.g. {missing[0]}); run the generate stage first"
        )
    for it in items:
        for s in seeds:
            p = image_path(out, label, it, s)
            png = p.read_bytes()
            for qid in judge.questions(it):
                q = Query(f"{label}/{sample_id(it, s)}", qid, it, _LazyImage(p))  # type: ignore[arg-type]
                qs.append((q, fingerprint(png, it, qid, judge.version)))
    return qs


class _LazyImage:
    """Opens the PNG when a judge first needs its pixels (cached answers never do)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._im: Image.Image | None = None

    def load(self) -> Image.Image:
        if self._im is None:
            with Image.open(self.path) as im:
                self._im = im.convert("RGB")
        return self._im


def score(
    out: Path,
    prompt_set: PromptSet,
    labels: list[str],
    seeds: list[int],
    judge: Judge,
    jid: str,
    *,
    rank: int = 0,
    world: int = 1,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, int]:
    """Answer this rank's share of the questions; returns ``{n_questions, n_cached, n_asked}``."""
    items = shard(prompt_set.items, rank, world)
    cached = load_answers(out, jid)
    todo: list[tuple[Query, str]] = []
    n = 0
    for label in labels:
        for q, fp in queries_of(out, label, items, seeds, judge):
            n += 1
            hit = cached.get(q.answer_id)
            if hit is None or hit[0] != fp:
                todo.append((q, fp))
    stats = {"n_questions": n, "n_cached": n - len(todo), "n_asked": 0}
    if not todo:
        return stats
    cache = PredictionCache(out / "score" / f"{jid}.rank{rank}.jsonl", jid)
    bar = tqdm(total=len(todo), desc=f"score {jid}", unit="q", disable=not progress)
    t0 = time.perf_counter()
    try:
        for lo in range(0, len(todo), batch_size):
            chunk = todo[lo : lo + batch_size]
            queries = [dataclasses.replace(q, image=q.image.load()) for q, _ in chunk]  # type: ignore[attr-defined]
            preds = judge.answer(queries)
            if len(preds) != len(queries):
                raise RuntimeError(f"judge returned {len(preds)} answers for {len(queries)} questions")
            cache.append([(fp, p) for (_, fp), p in zip(chunk, preds, strict=True)])
            stats["n_asked"] += len(preds)
            bar.update(len(preds))
    finally:
        bar.close()
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    return stats
