"""Prompt sets: what to generate or edit, one :class:`PromptItem` per prompt, read by one loader per format.

A loader is a registered class (``firm.registry.EVAL_SETS``) with a nested ``Config`` and a ``load()`` returning a
:class:`PromptSet`. The file formats each loader reads are documented in docs/eval.md; on input it does not know,
a loader fails naming the keys it found.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from firm.vocab import Task

EDIT, GEN = Task.EDIT.value, Task.GEN.value


class EvalSetError(ValueError):
    """A prompt-set file that cannot be read (missing file, unknown fields, bad values)."""


_SAFE = re.compile(r"[^A-Za-z0-9_.\-]+")


def safe_id(text: str) -> str:
    """``text`` made filename-safe (runs of other characters become ``-``)."""
    out = _SAFE.sub("-", str(text)).strip("-.")
    if not out:
        raise EvalSetError(f"item id {text!r} has no filename-safe characters")
    return out


@dataclass
class PromptItem:
    """One prompt of a set.

    Attributes:
        id: unique within the set and filename-safe (images are named after it).
        prompt: the edit instruction or the generation prompt.
        category: the benchmark's task type / tag (the report's rows).
        source_path: edit: the source image file.
        source: edit: the source image in memory (procedural sets), used when ``source_path`` is None.
        language: the prompt's language (GEdit-Bench: ``en`` / ``cn``).
        meta: the benchmark's metadata the judge needs (GenEval's objects, a checklist, ...); JSON-serialisable.
        key: the seed key of the item's initial noise (default: ``id``).
    """

    id: str
    prompt: str
    category: str = "all"
    source_path: Path | None = None
    source: Image.Image | None = field(default=None, repr=False)
    language: str = "en"
    meta: dict[str, Any] = field(default_factory=dict)
    key: str | None = None

    @property
    def noise_key(self) -> str:
        return self.key if self.key is not None else self.id

    def source_image(self) -> Image.Image | None:
        """The edit source as RGB, or None for generation."""
        if self.source is not None:
            return self.source
        if self.source_path is None:
            return None
        try:
            with Image.open(self.source_path) as im:
                return im.convert("RGB")
        except OSError as e:
            raise EvalSetError(f"item {self.id}: cannot read source image {self.source_path}: {e}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "category": self.category,
            "language": self.language,
            "source_path": None if self.source_path is None else str(self.source_path),
            "meta": self.meta,
        }


@dataclass
class PromptSet:
    """The items of a benchmark plus what the report needs to know about it."""

    name: str
    kind: str  # edit | gen
    items: list[PromptItem]
    description: str = ""

    def __post_init__(self) -> None:
        if self.kind not in (EDIT, GEN):
            raise EvalSetError(f"prompt set {self.name}: kind must be edit or gen, got {self.kind!r}")
        if not self.items:
            raise EvalSetError(f"prompt set {self.name}: no items")
        seen: set[str] = set()
        for it in self.items:
            if it.id in seen:
                raise EvalSetError(f"prompt set {self.name}: item id {it.id!r} appears twice")
            seen.add(it.id)
            if self.kind == EDIT and it.source is None and it.source_path is None:
                raise EvalSetError(f"prompt set {self.name}: edit item {it.id} has no source image")

    def categories(self) -> list[str]:
        return sorted({it.category for it in self.items})

    def select(self, categories: list[str] | None, limit: int | None, languages: list[str] | None = None) -> PromptSet:
        """Keep items of ``categories`` / ``languages`` (None: all), at most ``limit`` per category."""
        if categories:
            unknown = sorted(set(categories) - set(self.categories()))
            if unknown:
                raise EvalSetError(f"prompt set {self.name}: unknown categories {unknown}; known {self.categories()}")
        out, counts = [], {}
        for it in self.items:
            if categories and it.category not in categories:
                continue
            if languages and it.language not in languages:
                continue
            if limit is not None and counts.get(it.category, 0) >= limit:
                continue
            counts[it.category] = counts.get(it.category, 0) + 1
            out.append(it)
        return PromptSet(self.name, self.kind, out, self.description)


# --------------------------------------------------------------------------------------------------------------------
# Reading files


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a ``.jsonl`` file (one object a line) or a ``.json`` file (a list, or an id -> record mapping; the
    id is then added as ``_key``)."""
    if not path.is_file():
        raise EvalSetError(f"{path}: no such file")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalSetError(f"{path}:{i}: not JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise EvalSetError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            out.append(rec)
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvalSetError(f"{path}: not JSON ({e.msg})") from None
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    if isinstance(data, dict) and all(isinstance(r, dict) for r in data.values()):
        return [{"_key": k, **r} for k, r in data.items()]
    raise EvalSetError(f"{path}: expected a list of objects or a mapping id -> object")


def need(rec: dict[str, Any], keys: tuple[str, ...], where: str, fmt: str) -> None:
    """Fail naming the keys found when ``rec`` lacks one of ``keys``."""
    missing = [k for k in keys if k not in rec]
    if missing:
        raise EvalSetError(
            f"{where}: not a {fmt} record: missing {missing}; found keys {sorted(rec)} (see docs/eval.md for the "
            "fields each format needs)"
        )


def _resolve(root: Path, rel: Any, where: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise EvalSetError(f"{where}: image path must be a non-empty string, got {rel!r}")
    p = Path(rel)
    p = p if p.is_absolute() else root / p
    if not p.is_file():
        raise EvalSetError(f"{where}: image {p} does not exist")
    return p


# --------------------------------------------------------------------------------------------------------------------
# Loaders

GEDIT_TASKS = (
    "background_change",
    "color_alter",
    "material_alter",
    "motion_change",
    "ps_human",
    "style_change",
    "subject-add",
    "subject-remove",
    "subject-replace",
    "text_change",
    "tone_transfer",
)


class GEditBench:
    """GEdit-Bench (Step1X-Edit): EN and CN instructions over 11 task types; judged VIEScore-style."""

    @dataclass
    class Config:
        name: str = "gedit"
        path: str = "data/gedit_bench/gedit.jsonl"  # JSONL export of the dataset (docs/eval.md); images beside it
        languages: list[str] = field(default_factory=lambda: ["en", "cn"])  # which instruction languages

    def __init__(self, config: Config) -> None:
        self.config = config

    def load(self) -> PromptSet:
        path = Path(self.config.path)
        items = []
        for i, rec in enumerate(read_records(path), 1):
            where = f"{path}:{i}"
            need(rec, ("key", "task_type", "instruction", "instruction_language", "input_image"), where, "GEdit-Bench")
            task, lang = str(rec["task_type"]), str(rec["instruction_language"]).lower()
            if task not in GEDIT_TASKS:
                raise EvalSetError(f"{where}: task_type {task!r} is not one of GEdit-Bench's {list(GEDIT_TASKS)}")
            if lang not in ("en", "cn"):
                raise EvalSetError(f"{where}: instruction_language must be en or cn, got {lang!r}")
            if lang not in self.config.languages:
                continue
            items.append(
                PromptItem(
                    id=safe_id(f"{task}-{rec['key']}-{lang}"),
                    prompt=str(rec["instruction"]),
                    category=task,
                    source_path=_resolve(path.parent, rec["input_image"], where),
                    language=lang,
                    meta={"key": str(rec["key"]), "intersection_exist": rec.get("Intersection_exist")},
                )
            )
        return PromptSet("gedit", EDIT, items, "GEdit-Bench")


IMGEDIT_TYPES = ("add", "remove", "replace", "adjust", "extract", "style", "background", "compose", "action")


class ImgEditBench:
    """ImgEdit Basic-Edit (single turn): 9 edit types, judged 1-5."""

    @dataclass
    class Config:
        name: str = "imgedit"
        path: str = "data/imgedit/basic_edit.json"  # id -> {id: image path, prompt, edit_type} (docs/eval.md)
        image_root: str | None = None  # folder the image paths are relative to (null: the JSON file's folder)

    def __init__(self, config: Config) -> None:
        self.config = config

    def load(self) -> PromptSet:
        path = Path(self.config.path)
        root = Path(self.config.image_root) if self.config.image_root else path.parent
        items = []
        for i, rec in enumerate(read_records(path), 1):
            where = f"{path}: record {rec.get('_key', i)}"
            need(rec, ("id", "prompt", "edit_type"), where, "ImgEdit")
            etype = str(rec["edit_type"])
            if etype not in IMGEDIT_TYPES:
                raise EvalSetError(f"{where}: edit_type {etype!r} is not one of ImgEdit's {list(IMGEDIT_TYPES)}")
            key = str(rec.get("_key", i))
            items.append(
                PromptItem(
                    id=safe_id(f"{etype}-{key}"),
                    prompt=str(rec["prompt"]),
                    category=etype,
                    source_path=_resolve(root, rec["id"], where),
                    meta={"key": key},
                )
            )
        return PromptSet("imgedit", EDIT, items, "ImgEdit Basic-Edit")


GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


class GenEvalSet:
    """GenEval's prompts and metadata (``evaluation_metadata.jsonl``): objects, counts, colours, positions."""

    @dataclass
    class Config:
        name: str = "geneval"
        path: str = "data/geneval/evaluation_metadata.jsonl"  # one {tag, prompt, include[, exclude]} per line

    def __init__(self, config: Config) -> None:
        self.config = config

    def load(self) -> PromptSet:
        path = Path(self.config.path)
        items = []
        for i, rec in enumerate(read_records(path), 1):
            where = f"{path}:{i}"
            need(rec, ("tag", "prompt", "include"), where, "GenEval metadata")
            if rec["tag"] not in GENEVAL_TAGS:
                raise EvalSetError(f"{where}: tag {rec['tag']!r} is not one of GenEval's {list(GENEVAL_TAGS)}")
            for j, obj in enumerate([*rec["include"], *rec.get("exclude", [])]):
                if not isinstance(obj, dict) or "class" not in obj:
                    found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
                    raise EvalSetError(f"{where}: object {j} needs a `class`; found {found}")
            meta = {"tag": rec["tag"], "include": rec["include"], "exclude": rec.get("exclude", [])}
            items.append(PromptItem(id=f"{i - 1:05d}", prompt=str(rec["prompt"]), category=str(rec["tag"]), meta=meta))
        return PromptSet("geneval", GEN, items, "GenEval prompts (VLM-judged, not GenEval's detector)")


class JsonlPromptSet:
    """Any prompt list: one ``{id, prompt[, category][, source]}`` per line (``source``: an edit's image path)."""

    @dataclass
    class Config:
        name: str = "jsonl"
        path: str = "prompts.jsonl"  # the file
        kind: str = "gen"  # edit | gen
        set_name: str = "prompts"  # what the report calls the set

    def __init__(self, config: Config) -> None:
        self.config = config

    def load(self) -> PromptSet:
        path = Path(self.config.path)
        items = []
        for i, rec in enumerate(read_records(path), 1):
            where = f"{path}:{i}"
            need(rec, ("id", "prompt", *(("source",) if self.config.kind == EDIT else ())), where, "prompt list")
            src = _resolve(path.parent, rec["source"], where) if self.config.kind == EDIT else None
            meta = {k: v for k, v in rec.items() if k not in ("id", "prompt", "category", "source")}
            items.append(
                PromptItem(safe_id(rec["id"]), str(rec["prompt"]), str(rec.get("category", "all")), src, meta=meta)
            )
        return PromptSet(self.config.set_name, self.config.kind, items)
