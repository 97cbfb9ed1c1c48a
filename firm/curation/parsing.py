"""Reading teacher answers: lenient about how JSON is wrapped, strict about what it must contain.

Each ``parse_*`` returns ``(value, None)`` or ``(None, why)``: an answer that cannot be read is a missing result
with a reason (counted and logged by the pipeline), never a default value. Finding the JSON in an answer and
reading a score from it are the critics' own helpers (:mod:`firm.critics.parsing`), so curated labels and critic
outputs are read by the same rules.
"""

from __future__ import annotations

import re
from typing import Any

from firm.critics.parsing import MAX_ANSWER_CHARS, coerce_score, find_json, strip_thinking
from firm.vocab import CHECKLIST_CATEGORIES, DIFFERENCE_ASPECTS

Parsed = tuple[Any, str | None]

_CATEGORY_ALIASES = {
    "main_subject": "main_subject",
    "main_subjects": "main_subject",
    "subject": "main_subject",
    "subjects": "main_subject",
    "attributes": "attributes_actions",
    "attributes_actions": "attributes_actions",
    "attribute": "attributes_actions",
    "actions": "attributes_actions",
    "style": "style_composition",
    "composition": "style_composition",
    "style_composition": "style_composition",
    "negative": "negative_constraints",
    "negative_constraints": "negative_constraints",
    "negatives": "negative_constraints",
    "other": "other",
}
_ASPECT_ALIASES = {
    "shape": "shape_form",
    "shape_and_form": "shape_form",
    "form": "shape_form",
    "colour": "color",
    "colors": "color",
    "texture": "texture_surface",
    "texture_and_surface": "texture_surface",
    "surface": "texture_surface",
    "position": "position_layout",
    "layout": "position_layout",
    "position_and_layout": "position_layout",
    "size": "size_scale",
    "scale": "size_scale",
    "size_and_scale": "size_scale",
    "text": "text_symbols",
    "text_and_symbols": "text_symbols",
    "count": "quantity",
    "number": "quantity",
}


def _norm(name: str) -> str:
    return re.sub(r"[^a-z]+", "_", name.lower()).strip("_")


def _strings(v: Any) -> list[str] | None:
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v.strip() and v.strip().lower() not in ("none", "n/a", "-") else []
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return [x.strip() for x in v if x.strip() and x.strip().lower() not in ("none", "n/a", "-")]
    return None


def parse_difference_report(text: str | None) -> Parsed:
    """``{"obvious": [...], "detailed": {aspect: [...]}, "summary": str}`` with known aspect names."""
    obj, why = find_json(text, dict)
    if obj is None:
        return None, why
    if "obvious" not in obj and "detailed" not in obj:
        return None, "the JSON object has neither 'obvious' nor 'detailed'"
    obvious = _strings(obj.get("obvious"))
    if obvious is None:
        return None, "'obvious' must be a list of strings"
    detailed_raw = obj.get("detailed") or {}
    if not isinstance(detailed_raw, dict):
        return None, "'detailed' must map aspects to lists of strings"
    detailed: dict[str, list[str]] = {}
    for k, v in detailed_raw.items():
        aspect = _norm(str(k))
        aspect = aspect if aspect in DIFFERENCE_ASPECTS else _ASPECT_ALIASES.get(aspect, "other")
        items = _strings(v)
        if items is None:
            return None, f"'detailed.{k}' must be a list of strings"
        if items:
            detailed.setdefault(aspect, []).extend(items)
    report: dict[str, Any] = {"obvious": obvious, "detailed": detailed}
    if isinstance(obj.get("summary"), str) and obj["summary"].strip():
        report["summary"] = obj["summary"].strip()
    return report, None


def _judgement(obj: dict, name: str) -> tuple[int | None, str, str | None]:
    part = None
    for k, v in obj.items():
        if _norm(str(k)) == name:
            part = v
    if part is None:
        return None, "", f"no '{name}' judgement"
    if isinstance(part, dict):
        score, why = coerce_score(part.get("score", part.get("rating")))
        reasoning = part.get("reasoning") or part.get("reason") or part.get("explanation") or ""
        return score, str(reasoning).strip(), (f"{name}: {why}" if why else None)
    score, why = coerce_score(part)
    return score, "", (f"{name}: {why}" if why else None)


def parse_edit_evaluation(text: str | None) -> Parsed:
    """``{"execution": (score|None, reasoning, why), "consistency": (...)}`` -- each judgement may fail alone."""
    obj, why = find_json(text, dict)
    if obj is None:
        return None, why
    out = {name: _judgement(obj, name) for name in ("execution", "consistency")}
    if all(v[0] is None for v in out.values()):
        return None, "; ".join(v[2] or "" for v in out.values())
    return out, None


def parse_plan(text: str | None) -> Parsed:
    """A checklist ``[{"category", "text"}]``; unknown categories become ``other``; numbered lists are accepted."""
    items, why = find_json(text, list)
    if items is None:
        obj, _ = find_json(text, dict)  # {"checklist": [...]}
        if isinstance(obj, dict):
            items = next((v for v in obj.values() if isinstance(v, list)), None)
    if items is None and len((text or "").strip()) <= MAX_ANSWER_CHARS:
        body = strip_thinking(text or "")
        # [ \t], not \s: a repeat that can cross lines makes a run of blank lines cost quadratic time
        lines = [m.group(1).strip() for m in re.finditer(r"^[ \t]*(?:\d+[.)]|[-*])[ \t]+(\S.*)$", body, re.MULTILINE)]
        items = lines or None
    if not items:
        return None, why or "no checklist found"
    out = []
    for it in items:
        if isinstance(it, str):
            m = re.match(r"^\[?([A-Za-z_ ]+)\]?\s*[:\]]\s*(.+)$", it)
            cat = _CATEGORY_ALIASES.get(_norm(m.group(1))) if m else None
            out.append({"category": cat or "other", "text": (m.group(2) if cat else it).strip()})
        elif isinstance(it, dict):
            txt = it.get("text") or it.get("requirement") or it.get("item")
            if not isinstance(txt, str) or not txt.strip():
                return None, f"checklist item without text: {it!r}"
            cat = _CATEGORY_ALIASES.get(_norm(str(it.get("category", "other"))), "other")
            out.append({"category": cat if cat in CHECKLIST_CATEGORIES else "other", "text": txt.strip()})
        else:
            return None, f"checklist item is neither text nor an object: {it!r}"
    return out, None


VERDICTS = ("yes", "partly", "no")


def parse_checklist_score(text: str | None, n_items: int) -> Parsed:
    """``{"score": int, "reasoning": str, "items": [{"item", "verdict", "note"}]}``; the score is required."""
    obj, why = find_json(text, dict)
    if obj is None:
        return None, why
    score, why = coerce_score(obj.get("score"))
    if score is None:
        return None, why
    items = []
    for i, it in enumerate(obj.get("items") or [], 1):
        if not isinstance(it, dict):
            continue
        verdict = _norm(str(it.get("verdict", "")))
        verdict = {"partial": "partly", "partially": "partly", "true": "yes", "false": "no"}.get(verdict, verdict)
        items.append(
            {
                "item": int(it["item"]) if isinstance(it.get("item"), int) else i,
                "verdict": verdict if verdict in VERDICTS else "unknown",
                "note": str(it.get("note", "")).strip(),
            }
        )
    reasoning = str(obj.get("reasoning", "")).strip()
    if items:
        listing = "\n".join(
            f"{it['item']}. {it['verdict']}" + (f": {it['note']}" if it["note"] else "") for it in items
        )
        reasoning = f"{listing}\n{reasoning}".strip()
    return {"score": score, "reasoning": reasoning, "items": items, "complete": len(items) == n_items}, None


def parse_rewrite(text: str | None, field: str) -> Parsed:
    """The rewritten ``instruction`` / ``prompt`` string."""
    obj, why = find_json(text, dict)
    if obj is None:
        return None, why
    value = obj.get(field)
    if not isinstance(value, str) or not value.strip():
        return None, f"no non-empty '{field}' in the answer"
    return value.strip(), None
