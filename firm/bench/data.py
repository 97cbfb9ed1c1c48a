"""The local FIRM-Bench layout: one JSONL file of items plus the images it names.

A benchmark directory looks like::

    DIR/
      bench.json        optional: {"name": ..., "description": ..., "score_source": "human" | "rubric"}
      items.jsonl       one item per line (below)
      images/...        any layout; paths in items.jsonl are relative to DIR

Each line of ``items.jsonl`` is one judgement a critic must make, with the reference score::

    {"id": "exec-0001", "task": "edit-execution", "source": "images/0001_src.png",
     "edited": "images/0001_out.png", "instruction": "make the car red", "human_score": 4}
    {"id": "gen-0001", "task": "generation", "image": "images/g0001.png", "prompt": "two cats on a sofa",
     "checklist": ["two cats", "a sofa"], "split": "hard", "human_score": 3}

``task`` is one of :data:`TASKS`; ``human_score`` is a number in 1..5 (a mean of several raters may be fractional);
``split`` (``easy`` | ``hard``) is required for generation items; ``checklist`` is optional; ``meta`` (any JSON object)
is carried through to the per-item predictions. See docs/bench.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from firm.critics.types import CONSISTENCY, EXECUTION, INSTRUCTION

EDIT_EXECUTION = "edit-execution"
EDIT_CONSISTENCY = "edit-consistency"
GENERATION = "generation"
TASKS = (EDIT_EXECUTION, EDIT_CONSISTENCY, GENERATION)
SPLITS = ("easy", "hard")

# The critic dimension each task asks for.
TASK_DIMENSION = {EDIT_EXECUTION: EXECUTION, EDIT_CONSISTENCY: CONSISTENCY, GENERATION: INSTRUCTION}

ITEMS_FILE = "items.jsonl"
META_FILE = "bench.json"

_EDIT_KEYS = ("source", "edited", "instruction")
_GEN_KEYS = ("image", "prompt")
_KNOWN_KEYS = {"id", "task", "human_score", "split", "checklist", "meta", *_EDIT_KEYS, *_GEN_KEYS}


class BenchmarkError(ValueError):
    """A malformed benchmark directory or item; the message names the file, line and field."""


@dataclass
class BenchItem:
    """One benchmark judgement: the inputs a critic sees and the reference score."""

    id: str
    task: str  # one of TASKS
    human_score: float  # reference score in 1..5
    instruction: str | None = None  # edit tasks
    source: Path | None = None  # edit tasks: the image before the edit
    edited: Path | None = None  # edit tasks: the image after the edit
    prompt: str | None = None  # generation
    image: Path | None = None  # generation: the generated image
    checklist: list[str] | None = None  # generation: explicit requirements (None: the critic plans its own)
    split: str | None = None  # generation: easy | hard
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dimension(self) -> str:
        """The critic dimension this item is judged on."""
        return TASK_DIMENSION[self.task]

    @property
    def group(self) -> str:
        """The task, refined by the split for generation items (``generation/hard``)."""
        return f"{self.task}/{self.split}" if self.split else self.task

    def image_paths(self) -> list[Path]:
        return [p for p in (self.source, self.edited, self.image) if p is not None]

    def fingerprint(self) -> str:
        """A hash of everything the critic sees (texts and image bytes), not of the reference score.

        A cached critic output is reused only when the item's fingerprint is unchanged.
        """
        h = hashlib.sha1()
        texts = [self.id, self.task, self.instruction or "", self.prompt or "", json.dumps(self.checklist)]
        h.update("\x00".join(texts).encode())
        for p in self.image_paths():
            h.update(b"\x00")
            h.update(p.read_bytes())
        return h.hexdigest()[:16]

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        """The JSONL record (image paths relative to ``root`` when given)."""

        def rel(p: Path | None) -> str | None:
            if p is None:
                return None
            return str(p.relative_to(root)) if root is not None and p.is_relative_to(root) else str(p)

        rec: dict[str, Any] = {"id": self.id, "task": self.task}
        if self.task == GENERATION:
            rec.update(image=rel(self.image), prompt=self.prompt, split=self.split)
            if self.checklist is not None:
                rec["checklist"] = list(self.checklist)
        else:
            rec.update(source=rel(self.source), edited=rel(self.edited), instruction=self.instruction)
        rec["human_score"] = self.human_score
        if self.meta:
            rec["meta"] = self.meta
        return rec


@dataclass
class Benchmark:
    """A loaded benchmark: its items and its description."""

    root: Path
    items: list[BenchItem]
    name: str
    description: str = ""
    score_source: str = "human"  # "human" (FIRM-Bench) or "rubric" (synthetic ground truth)

    def task_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for it in self.items:
            counts[it.group] = counts.get(it.group, 0) + 1
        return dict(sorted(counts.items()))

    def select(self, tasks: list[str] | None = None, limit: int | None = None) -> Benchmark:
        """A benchmark with only ``tasks`` (all when empty) and at most ``limit`` items per task, in file order."""
        if tasks:
            bad = sorted(set(tasks) - set(TASKS))
            if bad:
                raise BenchmarkError(f"unknown task(s) {bad}; known: {', '.join(TASKS)}")
        kept, seen = [], {t: 0 for t in TASKS}
        for it in self.items:
            if tasks and it.task not in tasks:
                continue
            if limit is not None and seen[it.task] >= limit:
                continue
            seen[it.task] += 1
            kept.append(it)
        return Benchmark(self.root, kept, self.name, self.description, self.score_source)


def _item_from_record(rec: Any, root: Path, where: str, check_files: bool) -> BenchItem:
    if not isinstance(rec, dict):
        raise BenchmarkError(f"{where}: each line must be a JSON object, got {type(rec).__name__}")
    for key in ("id", "task", "human_score"):
        if key not in rec:
            raise BenchmarkError(f"{where}: missing field '{key}'")
    unknown = sorted(set(rec) - _KNOWN_KEYS)
    if unknown:
        raise BenchmarkError(f"{where}: unknown field(s) {unknown}; put extra information under 'meta'")
    item_id = str(rec["id"])
    task = rec["task"]
    if task not in TASKS:
        raise BenchmarkError(f"{where}: item {item_id!r}: task {task!r} is not one of {', '.join(TASKS)}")
    score = rec["human_score"]
    if isinstance(score, bool) or not isinstance(score, int | float) or not 1 <= score <= 5:
        raise BenchmarkError(f"{where}: item {item_id!r}: human_score must be a number in 1..5, got {score!r}")

    def path(key: str) -> Path:
        value = rec.get(key)
        if not isinstance(value, str) or not value:
            raise BenchmarkError(f"{where}: item {item_id!r} ({task}) needs '{key}': an image path relative to {root}")
        p = (root / value).resolve()
        if check_files and not p.is_file():
            raise BenchmarkError(f"{where}: item {item_id!r}: image '{key}' not found: {p}")
        return p

    def text(key: str) -> str:
        value = rec.get(key)
        if not isinstance(value, str) or not value.strip():
            raise BenchmarkError(f"{where}: item {item_id!r} ({task}) needs a non-empty '{key}' string")
        return value

    meta = rec.get("meta") or {}
    if not isinstance(meta, dict):
        raise BenchmarkError(f"{where}: item {item_id!r}: 'meta' must be a JSON object")
    if task == GENERATION:
        split = rec.get("split")
        if split not in SPLITS:
            raise BenchmarkError(
                f"{where}: item {item_id!r}: generation items need split 'easy' or 'hard', got {split!r}"
            )
        checklist = rec.get("checklist")
        if checklist is not None and (
            not isinstance(checklist, list) or not all(isinstance(c, str) and c.strip() for c in checklist)
        ):
            raise BenchmarkError(f"{where}: item {item_id!r}: 'checklist' must be a list of non-empty strings")
        return BenchItem(
            item_id, task, float(score), prompt=text("prompt"), image=path("image"), checklist=checklist,
            split=split, meta=meta,
        )  # fmt: skip
    if rec.get("split") is not None:
        raise BenchmarkError(f"{where}: item {item_id!r}: 'split' applies to generation items only")
    return BenchItem(
        item_id, task, float(score), instruction=text("instruction"), source=path("source"), edited=path("edited"),
        meta=meta,
    )  # fmt: skip


def load_benchmark(root: str | Path, *, check_files: bool = True) -> Benchmark:
    """Read ``root/items.jsonl`` (and ``root/bench.json`` when present).

    Args:
        root: the benchmark directory.
        check_files: fail now when an image is missing, rather than halfway through an evaluation.

    Raises:
        BenchmarkError: naming the file, the line and the field on any problem (duplicate ids included).
    """
    root = Path(root).resolve()
    items_path = root / ITEMS_FILE
    if not items_path.is_file():
        hint = ""
        if root.is_dir() and any(root.rglob("bench_v1.jsonl")):
            hint = " It looks like the released FIRM-Bench files: convert them first with `firm critic bench-convert`."
        raise BenchmarkError(f"no {ITEMS_FILE} in {root} (see docs/bench.md for the layout).{hint}")
    meta: dict[str, Any] = {}
    if (root / META_FILE).is_file():
        try:
            meta = json.loads((root / META_FILE).read_text())
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{root / META_FILE}: not valid JSON ({e})") from None
    items: list[BenchItem] = []
    seen: dict[str, int] = {}
    with open(items_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{items_path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise BenchmarkError(f"{where}: not valid JSON ({e.msg})") from None
            item = _item_from_record(rec, root, where, check_files)
            if item.id in seen:
                raise BenchmarkError(f"{where}: duplicate id {item.id!r} (first on line {seen[item.id]})")
            seen[item.id] = lineno
            items.append(item)
    if not items:
        raise BenchmarkError(f"{items_path}: no items")
    return Benchmark(
        root=root,
        items=items,
        name=str(meta.get("name") or root.name),
        description=str(meta.get("description", "")),
        score_source=str(meta.get("score_source", "human")),
    )


def write_benchmark(
    root: str | Path, items: list[BenchItem], *, name: str, description: str = "", score_source: str = "human"
) -> Path:
    """Write ``items.jsonl`` and ``bench.json`` under ``root`` (images must already be inside ``root``)."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ITEMS_FILE, "w", encoding="utf-8") as f:
        for it in items:
            f.write(json.dumps(it.to_json(root), ensure_ascii=False) + "\n")
    meta = {"name": name, "description": description, "score_source": score_source, "n_items": len(items)}
    (root / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return root


def load_image(path: Path, item_id: str) -> Image.Image:
    """An RGB image, or a clear error naming the item."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise BenchmarkError(f"item {item_id!r}: cannot read image {path}: {e}") from None
