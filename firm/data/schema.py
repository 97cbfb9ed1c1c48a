"""Sample schemas of FIRM's reward data, and their validation and (de)serialisation as WebDataset members.

Three kinds of samples travel through shards (see ``docs/data.md`` for the field tables):

- ``edit``: a source image, an edited image, the instruction, the teacher's difference report, Execution and
  Consistency scores with their reasoning, and provenance;
- ``generation``: an image, its prompt, the checklist ("plan"), the Instruction score and reasoning, Quality scores
  (three aspects and their minimum), and provenance;
- ``rl_prompt``: a prompt for RL rollouts and, for editing, the source image.

In memory a sample is a plain ``dict``: ``{"key": ..., <field>: ...}`` with images as ``PIL.Image`` objects. On disk
(one WebDataset sample) each image is its own member ``<key>.<field>.png`` (or ``.jpg``) and every other field lives in
one ``<key>.json`` member, which also records the schema name. Score fields hold an int in 1..5 or ``None`` (a score
that is missing, e.g. not judged yet or unparseable teacher output) -- never a substitute number.

This module imports only FIRM's leaf modules (firm.vocab, firm.images).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from PIL import Image

from firm.images import (  # noqa: F401 - the image rules of shards; re-exported for readers of this module
    IMAGE_EXTENSIONS,
    IMAGE_FORMATS,
    IMAGE_MODES,
    MAX_IMAGE_PIXELS,
    PNG_COMPRESS_LEVEL,
    ImageTooLargeError,
)
from firm.images import decode as decode_image
from firm.images import encode as encode_image
from firm.vocab import CHECKLIST_CATEGORIES, DIFFERENCE_ASPECTS, QUALITY_ASPECTS, SCORE_MAX, SCORE_MIN, Task

# Deepest nesting of lists / mappings accepted in a sample's JSON data (provenance, meta, reports).
MAX_JSON_NESTING = 64
RL_TASKS = tuple(t.schema for t in Task)  # the `task` field of rl_prompt samples: edit | generation

_KEY_RE = re.compile(r"^[A-Za-z0-9_\-:+=@][A-Za-z0-9_\-:+=@/]*$")


class SchemaError(ValueError):
    """A sample does not match its schema; the message names the key and the field."""

    def __init__(self, key: Any, field: str, problem: str) -> None:
        self.key, self.field, self.problem = key, field, problem
        super().__init__(f"sample {key!r}: field {field!r}: {problem}")


# --------------------------------------------------------------------------------------------------------------------
# Field kinds: each returns an error message (str) or None when the value is valid.


def _check_image(v: Any) -> str | None:
    if not isinstance(v, Image.Image):
        return f"expected a PIL.Image, got {type(v).__name__}"
    if v.mode not in IMAGE_MODES:
        return f"image mode {v.mode!r} is not supported; convert it to one of {IMAGE_MODES}"
    if v.width < 1 or v.height < 1:
        return f"empty image ({v.width}x{v.height})"
    return None


def _check_text(v: Any) -> str | None:
    if not isinstance(v, str):
        return f"expected a string, got {type(v).__name__}"
    if not v.strip():
        return "must not be empty"
    return None


def _check_optional_text(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return None
    return f"expected a string or null, got {type(v).__name__}"


def _check_score(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        return f"expected an int score in {SCORE_MIN}..{SCORE_MAX} or null, got {v!r} ({type(v).__name__})"
    if not SCORE_MIN <= v <= SCORE_MAX:
        return f"score {v} is outside {SCORE_MIN}..{SCORE_MAX}"
    return None


def _check_json_value(v: Any, where: str = "") -> str | None:
    """Plain JSON data only (dict with str keys, list, str, int, finite float, bool, None), nested at most
    MAX_JSON_NESTING levels (checked without recursion, so hostile nesting is an error, not a RecursionError)."""
    stack: list[tuple[Any, str, int]] = [(v, where, 0)]
    while stack:
        v, where, depth = stack.pop()
        if v is None or isinstance(v, (str, bool, int)):
            continue
        if isinstance(v, float):
            if not math.isfinite(v):
                return f"non-finite number {v!r}{where}"
            continue
        if not isinstance(v, (list, tuple, dict)):
            return f"{type(v).__name__} is not JSON data{where}"
        if depth >= MAX_JSON_NESTING:
            return f"nested deeper than {MAX_JSON_NESTING} levels{where[:200]}"
        if isinstance(v, dict):
            for k, x in reversed(list(v.items())):
                if not isinstance(k, str):
                    return f"non-string key {k!r}{where}"
                stack.append((x, f"{where}.{k}", depth + 1))
        else:
            stack.extend((x, f"{where}[{i}]", depth + 1) for i, x in reversed(list(enumerate(v))))
    return None


def _check_mapping(v: Any) -> str | None:
    if not isinstance(v, dict):
        return f"expected a mapping, got {type(v).__name__}"
    return _check_json_value(v)


def _check_difference_report(v: Any) -> str | None:
    if v is None or isinstance(v, str):
        return None
    if not isinstance(v, dict):
        return f"expected a mapping {{'obvious': [...], 'detailed': {{aspect: [...]}}}}, a string or null, got {v!r}"
    unknown = set(v) - {"obvious", "detailed", "summary"}
    if unknown:
        return f"unknown keys {sorted(unknown)} (allowed: obvious, detailed, summary)"
    obvious = v.get("obvious", [])
    if not isinstance(obvious, list) or not all(isinstance(x, str) for x in obvious):
        return "'obvious' must be a list of strings"
    detailed = v.get("detailed", {})
    if not isinstance(detailed, dict):
        return "'detailed' must map aspects to lists of strings"
    for aspect, items in detailed.items():
        if aspect not in DIFFERENCE_ASPECTS:
            return f"unknown aspect {aspect!r} in 'detailed' (known: {', '.join(DIFFERENCE_ASPECTS)})"
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            return f"'detailed.{aspect}' must be a list of strings"
    if "summary" in v and not isinstance(v["summary"], str):
        return "'summary' must be a string"
    return None


def _check_checklist(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, list):
        return f"expected a list of {{'category': ..., 'text': ...}} items or null, got {type(v).__name__}"
    for i, item in enumerate(v):
        if not isinstance(item, dict) or set(item) - {"category", "text"} or "text" not in item:
            return f"item {i} must be a mapping with 'category' and 'text', got {item!r}"
        if not isinstance(item["text"], str) or not item["text"].strip():
            return f"item {i}: 'text' must be a non-empty string"
        if item.get("category", "other") not in CHECKLIST_CATEGORIES:
            return f"item {i}: unknown category {item.get('category')!r} (known: {', '.join(CHECKLIST_CATEGORIES)})"
    return None


def _check_quality_aspects(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, dict):
        return f"expected a mapping of {QUALITY_ASPECTS} to scores, got {type(v).__name__}"
    for k, s in v.items():
        if k not in QUALITY_ASPECTS:
            return f"unknown quality aspect {k!r} (known: {', '.join(QUALITY_ASPECTS)})"
        err = _check_score(s)
        if err:
            return f"{k}: {err}"
    return None


def _check_text_list(v: Any) -> str | None:
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
        return "expected a list of non-empty strings or null"
    return None


def _check_task(v: Any) -> str | None:
    return None if v in RL_TASKS else f"expected one of {RL_TASKS}, got {v!r}"


@dataclass(frozen=True)
class Field:
    """One field of a schema.

    Attributes:
        name: the dict key (and, for images, the member name ``<key>.<name>.png``).
        kind: ``image`` or a JSON kind (stored inside ``<key>.json``).
        check: validator returning an error message or None.
        required: the field must be present (and, for images and text, not None).
        default: the value filled in when an optional field is absent (a factory when callable).
        doc: one line for docs/data.md.
    """

    name: str
    kind: str
    check: Callable[[Any], str | None]
    required: bool
    default: Any = None
    doc: str = ""

    @property
    def is_image(self) -> bool:
        return self.kind == "image"

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


def _image(name: str, doc: str, required: bool = True) -> Field:
    return Field(name, "image", _check_image, required, None, doc)


def _text(name: str, doc: str) -> Field:
    return Field(name, "text", _check_text, True, None, doc)


def _opt_text(name: str, doc: str) -> Field:
    return Field(name, "text?", _check_optional_text, False, None, doc)


def _score(name: str, doc: str) -> Field:
    return Field(name, "score?", _check_score, False, None, doc)


def _provenance() -> Field:
    return Field(
        "provenance",
        "mapping",
        _check_mapping,
        False,
        dict,
        "where the sample came from: source dataset, editor/generator, teacher ids, template hashes, rewrites",
    )


@dataclass(frozen=True)
class Schema:
    """A named list of fields, with an optional whole-sample check (for rules across fields)."""

    name: str
    fields: tuple[Field, ...]
    doc: str = ""
    extra_check: Callable[[dict], tuple[str, str] | None] | None = None  # -> (field, problem) or None

    @property
    def image_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.is_image)

    @property
    def json_fields(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if not f.is_image)

    @property
    def score_fields(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.kind == "score?")

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)


def _rl_prompt_check(sample: dict) -> tuple[str, str] | None:
    if sample.get("task") == "edit" and sample.get("source") is None:
        return "source", "an edit prompt needs its source image"
    if sample.get("task") == "generation" and sample.get("source") is not None:
        return "source", "a generation prompt has no source image (remove it, or set task: edit)"
    return None


def _generation_check(sample: dict) -> tuple[str, str] | None:
    aspects, quality = sample.get("quality_aspects"), sample.get("quality")
    if aspects and quality is not None and set(aspects) == set(QUALITY_ASPECTS) and quality != min(aspects.values()):
        return "quality", f"must be the minimum of quality_aspects ({min(aspects.values())}), got {quality}"
    return None


EDIT = Schema(
    "edit",
    (
        _image("source", "the image before editing"),
        _image("edited", "the image after editing"),
        _text("instruction", "the editing instruction the edited image is judged against"),
        Field(
            "difference_report",
            "difference_report",
            _check_difference_report,
            False,
            None,
            "teacher's report of visual differences: {obvious: [..], detailed: {aspect: [..]}, summary} (or text)",
        ),
        _score("execution", "Execution score 1..5 (did the requested change happen), null if missing"),
        _opt_text("execution_reasoning", "the evaluator's reasoning for the Execution score"),
        _score("consistency", "Consistency score 1..5 (did anything else change), null if missing"),
        _opt_text("consistency_reasoning", "the evaluator's reasoning for the Consistency score"),
        _provenance(),
    ),
    "an edit pair judged on Execution and Consistency",
)

GENERATION = Schema(
    "generation",
    (
        _image("image", "the generated image"),
        _text("prompt", "the text-to-image prompt"),
        Field(
            "checklist",
            "checklist",
            _check_checklist,
            False,
            None,
            "the plan: [{category, text}] with categories " + ", ".join(CHECKLIST_CATEGORIES),
        ),
        _score("instruction", "Instruction-following score 1..5 against the checklist, null if missing"),
        _opt_text("instruction_reasoning", "item-by-item reasoning for the Instruction score"),
        _score("quality", "Quality score 1..5 = min of the quality aspects, null if missing"),
        Field(
            "quality_aspects",
            "quality_aspects",
            _check_quality_aspects,
            False,
            None,
            "Quality sub-scores {aesthetics, technical, structure}, each 1..5",
        ),
        _opt_text("quality_reasoning", "the reasoning for the Quality scores"),
        _provenance(),
    ),
    "a generated image judged on Instruction following and Quality",
    extra_check=_generation_check,
)

RL_PROMPT = Schema(
    "rl_prompt",
    (
        _text("prompt", "the instruction (editing) or prompt (generation)"),
        Field("task", "task", _check_task, True, None, "edit | generation"),
        _image("source", "the image to edit (edit prompts only)", required=False),
        Field(
            "checklist",
            "text_list",
            _check_text_list,
            False,
            None,
            "requirements a generation critic checks (as GenRequest.checklist); null lets the critic plan",
        ),
        Field("meta", "mapping", _check_mapping, False, dict, "task data a reward may need (e.g. a shapes scene)"),
    ),
    "an RL prompt (and, for editing, its source image)",
    extra_check=_rl_prompt_check,
)

SCHEMAS: dict[str, Schema] = {s.name: s for s in (EDIT, GENERATION, RL_PROMPT)}


def get_schema(schema: str | Schema) -> Schema:
    """The schema named ``schema`` (``edit``, ``generation``, ``rl_prompt``), or ``schema`` itself."""
    if isinstance(schema, Schema):
        return schema
    if schema not in SCHEMAS:
        raise ValueError(f"unknown sample schema {schema!r}; known: {', '.join(SCHEMAS)}")
    return SCHEMAS[schema]


# --------------------------------------------------------------------------------------------------------------------
# Validation


def check_key(key: Any) -> str | None:
    """Why ``key`` cannot be a WebDataset sample key (or None when it can).

    Keys name tar members as ``<key>.<field>.<ext>``; WebDataset splits a member name at its first dot, so keys may
    not contain dots or whitespace.
    """
    if not isinstance(key, str) or not key:
        return f"must be a non-empty string, got {key!r}"
    if not _KEY_RE.match(key) or "//" in key or key.endswith("/"):
        return (
            f"{key!r} is not a valid key: use letters, digits and _-:+=@/ (no dots, spaces, leading or trailing '/'); "
            "sanitise_key() turns any string into one"
        )
    return None


def sanitise_key(text: str) -> str:
    """A valid key derived from any string (dots and other characters become ``_``)."""
    key = re.sub(r"[^A-Za-z0-9_\-:+=@]", "_", str(text)).strip("_") or "sample"
    return key


def validate(sample: dict, schema: str | Schema, *, check_images: bool = True) -> dict:
    """Check ``sample`` against ``schema``; returns a copy with optional fields filled by their defaults.

    Keys of the form ``__name__`` (reader metadata such as ``__url__``) are ignored and not copied.

    ``check_images=False`` accepts any value for image fields (e.g. still-encoded bytes).

    Raises:
        SchemaError: naming the sample's key and the offending field.
    """
    schema = get_schema(schema)
    if not isinstance(sample, dict):
        raise SchemaError(None, "<sample>", f"a sample must be a dict, got {type(sample).__name__}")
    key = sample.get("key")
    err = check_key(key)
    if err:
        raise SchemaError(key, "key", err)
    known = {f.name for f in schema.fields} | {"key", "schema"}
    unknown = sorted(k for k in sample if k not in known and not k.startswith("__"))  # __x__: reader metadata
    if unknown:
        raise SchemaError(
            key,
            unknown[0],
            f"not a field of the {schema.name!r} schema (fields: {', '.join(f.name for f in schema.fields)}); "
            "put extra information under 'provenance' or 'meta'",
        )
    if sample.get("schema", schema.name) != schema.name:
        raise SchemaError(key, "schema", f"sample says schema {sample['schema']!r}, expected {schema.name!r}")
    out: dict[str, Any] = {"key": key}
    for f in schema.fields:
        if f.name not in sample or sample[f.name] is None:
            if f.required:
                raise SchemaError(key, f.name, "required field is missing")
            out[f.name] = f.default_value()
            continue
        err = f.check(sample[f.name]) if (check_images or not f.is_image) else None
        if err:
            raise SchemaError(key, f.name, err)
        out[f.name] = sample[f.name]
    if schema.extra_check is not None:
        problem = schema.extra_check(out)
        if problem:
            raise SchemaError(key, problem[0], problem[1])
    return out


# --------------------------------------------------------------------------------------------------------------------
# Encoding to / decoding from WebDataset members


def encode_sample(
    sample: dict,
    schema: str | Schema,
    image_format: str = "png",
    jpeg_quality: int = 95,
    png_compress_level: int = PNG_COMPRESS_LEVEL,
) -> dict[str, Any]:
    """Validate ``sample`` and turn it into a WebDataset record ``{"__key__": key, "<member ext>": bytes}``."""
    schema = get_schema(schema)
    s = validate(sample, schema)
    record: dict[str, Any] = {"__key__": s["key"]}
    meta: dict[str, Any] = {"schema": schema.name}
    for f in schema.fields:
        value = s[f.name]
        if f.is_image:
            if value is not None:
                ext, data = encode_image(value, image_format, jpeg_quality, png_compress_level)
                record[f"{f.name}.{ext}"] = data
        else:
            meta[f.name] = value
    record["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True, allow_nan=False).encode("utf-8")
    return record


def member_schema(members: dict[str, bytes]) -> str | None:
    """The schema name recorded in a raw record's json member (None if absent)."""
    if "json" not in members:
        return None
    try:
        return json.loads(members["json"]).get("schema")
    except (ValueError, AttributeError):
        return None


def decode_record(
    record: dict[str, Any],
    schema: str | Schema | None = None,
    *,
    decode_images: bool = True,
    max_image_pixels: int | None = MAX_IMAGE_PIXELS,
) -> dict:
    """A validated sample dict from a raw WebDataset record (member extension -> bytes).

    Only the ``json`` member and the schema's image members are decoded; every other member is ignored, unread.
    Text and JSON are parsed with ``json``; images with PIL (PNG, JPEG, WebP only). Nothing is ever unpickled.

    Args:
        record: ``{"__key__": key, "json": bytes, "<field>.<ext>": bytes, ...}``.
        schema: the expected schema; None takes it from the record's json.
        decode_images: False keeps images as their encoded bytes (skips validation of image fields).
        max_image_pixels: images with more pixels are an error of this sample (see :func:`decode_image`).

    Raises:
        SchemaError: the record is incomplete, unreadable or does not match the schema (also for JSON nested too
            deeply to parse, and numbers too long to convert).
    """
    key = record.get("__key__")
    if "json" not in record:
        raise SchemaError(key, "json", "the record has no json member (truncated or not a FIRM shard)")
    try:
        meta = json.loads(record["json"])
    except (ValueError, UnicodeDecodeError) as e:
        raise SchemaError(key, "json", f"unreadable json member: {e}") from None
    except RecursionError:
        raise SchemaError(key, "json", "the json member is nested too deeply to read") from None
    if not isinstance(meta, dict):
        raise SchemaError(key, "json", "the json member must hold a mapping")
    if "key" in meta:
        raise SchemaError(key, "json", "the json member sets 'key'; a sample's key is its tar member name")
    name = meta.pop("schema", None)
    if schema is None:
        if name is None:
            raise SchemaError(key, "schema", "the json member does not say which schema the sample follows")
        schema = name
    schema = get_schema(schema)
    if name is not None and name != schema.name:
        raise SchemaError(key, "schema", f"the record is a {name!r} sample, expected {schema.name!r}")
    sample: dict[str, Any] = {"key": key, **meta}
    for f in schema.image_fields:
        data, ext = None, None
        for e in IMAGE_EXTENSIONS:
            if f"{f.name}.{e}" in record:
                data, ext = record[f"{f.name}.{e}"], e
                break
        if data is None:
            if f.required:
                raise SchemaError(key, f.name, "image member is missing (truncated shard or wrong schema)")
            continue
        if not decode_images:
            sample[f.name] = data
            continue
        try:
            sample[f.name] = decode_image(data, max_image_pixels)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for corrupt data
            raise SchemaError(key, f.name, f"cannot decode {f.name}.{ext}: {type(e).__name__}: {e}") from None
    out = validate(sample, schema, check_images=decode_images)
    out["__schema__"] = schema.name
    return out


def member_suffixes(schema: str | Schema | None) -> set[str] | None:
    """The member suffixes the reader reads for ``schema`` (None: any schema's)."""
    schemas = list(SCHEMAS.values()) if schema is None else [get_schema(schema)]
    out = {"json"}
    for s in schemas:
        for f in s.image_fields:
            out |= {f"{f.name}.{e}" for e in IMAGE_EXTENSIONS}
    return out
