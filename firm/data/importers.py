"""Import reward data from plain layouts into FIRM shards (`firm data import`).

Two layouts are understood:

**JSONL** -- one JSON object per line with the schema's fields; image fields hold file paths (relative to the JSONL
file's folder, or absolute)::

    {"key": "a1", "source": "img/a1_src.png", "edited": "img/a1_out.png", "instruction": "make the cup red",
     "execution": 4, "consistency": 5}

A line without ``key`` gets ``<jsonl stem>-<line number>``.

**Folder** -- files grouped by the part of their name before the first dot (the WebDataset convention):

- ``<key>.<image field>.<ext>`` for each image field (``<key>.source.png``, ``<key>.edited.jpg``); a schema with a
  single image field named ``image`` also accepts ``<key>.png``;
- ``<key>.json`` with the other fields, and/or ``<key>.txt`` holding the main text (``instruction`` for edit samples,
  ``prompt`` for generation samples and RL prompts).

RL prompts in a folder get ``task: edit`` when they have a ``source`` image and ``task: generation`` otherwise,
unless their json says.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from firm.data.schema import (
    IMAGE_EXTENSIONS,
    Schema,
    SchemaError,
    check_key,
    get_schema,
    sanitise_key,
)
from firm.data.writer import ShardWriter

log = logging.getLogger(__name__)

MAIN_TEXT = {"edit": "instruction", "generation": "prompt", "rl_prompt": "prompt"}
EXTRA_FIELD = {"edit": "provenance", "generation": "provenance", "rl_prompt": "meta"}


class DataImportError(ValueError):
    """A row or file cannot be imported; the message names the file (and line) and what was wrong."""


@dataclass
class ImportReport:
    """What an import did."""

    imported: int = 0
    skipped: int = 0
    shards: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # the first few skipped rows and why

    def summary(self) -> str:
        s = f"imported {self.imported} sample(s) into {len(self.shards)} shard(s)"
        if self.skipped:
            s += f"; skipped {self.skipped} bad row(s), e.g.:\n  " + "\n  ".join(self.problems[:5])
        return s


def _open_image(path: Path, where: str) -> Image.Image:
    if not path.is_file():
        raise DataImportError(f"{where}: image file not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("RGB", "RGBA", "L"):
                im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
            else:
                im = im.copy()
            return im
    except DataImportError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types
        raise DataImportError(f"{where}: cannot read image {path}: {type(e).__name__}: {e}") from None


def _move_extras(row: dict, schema: Schema, where: str, extra_to: str | None) -> dict:
    known = {f.name for f in schema.fields} | {"key", "schema"}
    extras = {k: row[k] for k in row if k not in known}
    if not extras:
        return row
    if extra_to is None:
        raise DataImportError(
            f"{where}: field(s) {sorted(extras)} are not part of the {schema.name!r} schema; "
            f"remove them, or keep them under '{EXTRA_FIELD[schema.name]}' with --extra-to-bag (extra_to_bag=True)"
        )
    row = {k: v for k, v in row.items() if k in known}
    bag = dict(row.get(extra_to) or {})
    bag.update(extras)
    row[extra_to] = bag
    return row


def _jsonl_rows(path: Path, schema: Schema, extra_to: str | None) -> Iterator[Callable[[], dict]]:
    """One builder per line; calling it parses the line and loads its images (raising DataImportError)."""
    base = path.parent

    def build(lineno: int, line: str) -> dict:
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataImportError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(row, dict):
            raise DataImportError(f"{where}: each line must be a JSON object")
        row.setdefault("key", sanitise_key(f"{path.stem}-{lineno:08d}"))
        row = _move_extras(row, schema, where, extra_to)
        for fld in schema.image_fields:
            value = row.get(fld.name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise DataImportError(f"{where}: image field {fld.name!r} must be a file path, got {value!r}")
            p = Path(value)
            row[fld.name] = _open_image(p if p.is_absolute() else base / p, where)
        return row

    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield functools.partial(build, lineno, line)


def _folder_rows(root: Path, schema: Schema, extra_to: str | None) -> Iterator[Callable[[], dict]]:
    if not root.is_dir():
        raise DataImportError(f"not a folder: {root}")
    groups: dict[str, dict[str, Path]] = defaultdict(dict)
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.startswith("."):
                continue
            p = Path(dirpath) / name
            stem, dot, suffix = p.relative_to(root).as_posix().partition(".")
            if dot:
                groups[stem][suffix.lower()] = p
    image_names = {f.name for f in schema.image_fields}
    single_image = image_names == {"image"}

    def build(stem: str, files: dict[str, Path]) -> dict:
        where = f"{root}/{stem}.*"
        row: dict[str, Any] = {}
        if "json" in files:
            try:
                row = json.loads(files["json"].read_text(encoding="utf-8"))
            except ValueError as e:
                raise DataImportError(f"{files['json']}: not valid JSON: {e}") from None
            if not isinstance(row, dict):
                raise DataImportError(f"{files['json']}: must hold a JSON object")
        if "txt" in files:
            row.setdefault(MAIN_TEXT[schema.name], files["txt"].read_text(encoding="utf-8").strip())
        row.setdefault("key", stem if check_key(stem) is None else sanitise_key(stem))
        row = _move_extras(row, schema, where, extra_to)
        for suffix, p in files.items():
            name, _, ext = suffix.rpartition(".")
            if ext not in IMAGE_EXTENSIONS:
                continue
            if name == "" and single_image:
                name = "image"
            if name in image_names:
                row[name] = _open_image(p, where)
        if schema.name == "rl_prompt":
            row.setdefault("task", "edit" if row.get("source") is not None else "generation")
        return row

    for stem in sorted(groups):
        files = groups[stem]
        names = {s.rpartition(".")[0] or ("image" if single_image else "") for s in files}
        if not ({"json", "txt"} & set(files)) and not (names & image_names):
            continue  # files that belong to no sample
        yield functools.partial(build, stem, files)


def jsonl_samples(path: str | Path, schema: str | Schema, *, extra_to: str | None = None) -> Iterator[dict]:
    """Samples from a JSONL file (see the module docstring); raises :class:`DataImportError` naming the line."""
    for build in _jsonl_rows(Path(path), get_schema(schema), extra_to):
        yield build()


def folder_samples(root: str | Path, schema: str | Schema, *, extra_to: str | None = None) -> Iterator[dict]:
    """Samples from a folder of ``<key>.<field>.<ext>`` files (see the module docstring), sorted by key."""
    for build in _folder_rows(Path(root), get_schema(schema), extra_to):
        yield build()


def import_samples(
    source: str | Path,
    out_prefix: str | Path,
    schema: str | Schema,
    *,
    on_error: str = "fail",
    extra_to_bag: bool = False,
    progress: bool = True,
    **writer_kwargs: Any,
) -> ImportReport:
    """Import a JSONL file or a folder (see the module docstring) into validated shards ``<out_prefix>-NNNNNN.tar``.

    Args:
        source: a ``.jsonl`` file or a folder.
        out_prefix: shard path prefix.
        schema: ``edit``, ``generation`` or ``rl_prompt``.
        on_error: ``fail`` stops at the first bad row (naming it); ``skip`` skips it with a warning and counts it.
        extra_to_bag: keep fields outside the schema under ``provenance`` (``meta`` for RL prompts) instead of failing.
        progress: show a tqdm progress bar.
        writer_kwargs: :class:`~firm.data.writer.ShardWriter` options (image_format, max_count, max_size, ...).
    """
    from tqdm import tqdm

    schema = get_schema(schema)
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    source = Path(source)
    extra_to = EXTRA_FIELD[schema.name] if extra_to_bag else None
    if source.is_dir():
        builders = _folder_rows(source, schema, extra_to)
    elif source.is_file():
        builders = _jsonl_rows(source, schema, extra_to)
    else:
        raise DataImportError(f"import source not found: {source} (give a .jsonl file or a folder)")
    report = ImportReport()
    with ShardWriter(out_prefix, schema, **writer_kwargs) as writer:
        bar = tqdm(desc=f"import {source.name}", unit="sample", disable=not progress)
        for build in builders:
            try:
                writer.write(build())
            except (DataImportError, SchemaError, ValueError) as e:
                msg = str(e) if isinstance(e, DataImportError) else f"{source}: {e}"
                if on_error == "fail":
                    raise DataImportError(msg) from None
                report.skipped += 1
                if len(report.problems) < 20:
                    report.problems.append(msg)
                log.warning("skipping: %s", msg)
                continue
            report.imported += 1
            bar.update()
        bar.close()
    report.shards = writer.shards
    return report
