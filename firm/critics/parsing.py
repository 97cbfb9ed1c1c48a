"""Parsing critic outputs into 1..5 scores, tolerant of what real models emit, strict about what counts as a score.

Accepted: JSON objects inside code fences or surrounded by prose, single-quoted (Python-style) dicts, trailing
commas, a score given as an int, a whole float, a string (``"4"``, ``"4/5"``) or a one-element list, ``\\boxed{N}``,
labelled lines such as ``Final Alignment Rating: 4`` or ``**Score:** 4``, ``<think>...</think>`` blocks before
the answer, and stray whitespace. Anything else is *not* a score: the parsers return ``None`` and the ``explain_*``
variants say why. A score outside 1..5 or not a whole number is rejected, never clipped or rounded; so is a score
on another scale (``4/10``, ``8 out of 10``): only ``/5`` or ``out of 5`` may follow a number.

Each ``explain_*`` result also gives the character span of every score digit in the text, which the local backend
uses to find the score token for expected-score mode.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any

from datamodules.schema import QUALITY_ASPECTS, SCORE_MAX, SCORE_MIN

__all__ = [
    "QUALITY_ASPECTS",
    "ParseResult",
    "coerce_score",
    "find_json",
    "strip_thinking",
    "explain_boxed_score",
    "explain_checklist",
    "explain_json_score",
    "explain_quality_scores",
    "parse_boxed_score",
    "parse_checklist",
    "parse_json_score",
    "parse_quality_scores",
]

# QUALITY_ASPECTS (defined in datamodules.schema, re-exported here): the three aspects of the generation Quality
# judgement, as the parsers report them; the Quality score is their minimum.


@dataclass
class ParseResult:
    """What a parser found.

    Attributes:
        value: the score (int), the aspect scores (dict), the checklist (list), or None when nothing valid was found.
        reason: why ``value`` is None (None on success).
        reasoning: the model's reasoning text, when it could be separated from the answer.
        spans: character spans (start, end) in the original text of each score number, keyed by what it scores
            (``"score"`` or an aspect name); used to locate the score token for expected-score mode.
    """

    value: Any = None
    reason: str | None = None
    reasoning: str = ""
    spans: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.value is not None


def _fail(reason: str) -> ParseResult:
    return ParseResult(value=None, reason=reason)


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers

_NUM = r"[-+]?\d+(?:\.\d+)?"
# An optional scale after a score: "4/5", "4 / 10", "4 out of 5". Only a scale of 5 is FIRM's.
_SCALE = rf"(?:\s*(?:/|out\s+of)\s*(?P<den>{_NUM}))?"


def _scale_problem(num: str, den: str | None) -> str | None:
    """Why ``num/den`` is not a 1..5 score (None when no scale is given or it is 5)."""
    if den is None or float(den) == 5:
        return None
    return f"score {num}/{den} is on a scale of {den}, not {SCORE_MIN}..{SCORE_MAX}"


def _blank(text: str, start: int, end: int) -> str:
    """``text`` with [start, end) replaced by spaces, so character offsets stay valid."""
    return text[:start] + " " * (end - start) + text[end:]


def _strip_thinking(text: str) -> tuple[str, str | None]:
    """Blank out ``<think>...</think>`` blocks (keeping offsets). Returns (text, problem or None)."""
    lower = text.lower()
    close = lower.rfind("</think>")
    if close != -1:  # everything up to the last </think> is thinking (the opening tag may be in the prompt)
        return _blank(text, 0, close + len("</think>")), None
    open_ = lower.find("<think>")
    if open_ != -1:
        return _blank(text, open_, len(text)), "the output ends inside an unfinished <think> block"
    return text, None


def strip_thinking(text: str) -> str:
    """``text`` with its ``<think>...</think>`` reasoning (and an unfinished ``<think>`` tail) blanked out."""
    return _strip_thinking(text)[0]


def coerce_score(value: Any) -> tuple[int | None, str | None]:
    """An int 1..5 from a JSON value (int, whole float, numeric string such as ``"4"`` / ``"4/5"``, one-element
    list), or ``(None, why)``: never clipped, rounded or guessed."""
    if isinstance(value, list):
        if len(value) != 1:
            return None, f"score is a list of {len(value)} items, expected one"
        return coerce_score(value[0])
    if isinstance(value, bool) or value is None:
        return None, f"score is {value!r}, not a number"
    if isinstance(value, str):
        m = re.fullmatch(rf"\s*\**\s*(?P<num>{_NUM}){_SCALE}\s*\**\s*\.?\s*", value, re.IGNORECASE)
        if not m:
            return None, f"score {value!r} is not a number"
        problem = _scale_problem(m.group("num"), m.group("den"))
        if problem:
            return None, problem
        value = float(m.group("num"))
    if isinstance(value, float):
        if not value.is_integer():
            return None, f"score {value:g} is not a whole number"
        value = int(value)
    if not isinstance(value, int):
        return None, f"score has type {type(value).__name__}, expected a number"
    if not SCORE_MIN <= value <= SCORE_MAX:
        return None, f"score {value} is outside {SCORE_MIN}..{SCORE_MAX}"
    return value, None


def _matching_brace(text: str, start: int) -> int | None:
    """Index just past the bracket closing the ``{`` or ``[`` at ``start`` (string-aware), or None."""
    opener = text[start]
    closer = "}" if opener == "{" else "]"
    depth, in_str, quote, esc = 0, False, "", False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == quote:
                in_str = False
        elif ch in "\"'":
            in_str, quote = True, ch
        elif ch == opener:
            depth += 1
        elif ch == closer:
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def _lenient_load(snippet: str) -> Any:
    """Decode a value written as JSON, JSON with trailing commas, or a Python literal; None if none works."""
    for candidate in (snippet, re.sub(r",\s*([}\]])", r"\1", snippet)):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            pass
        try:
            return ast.literal_eval(candidate)
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            pass
    return None


def _json_values(text: str, kind: type = dict) -> list[tuple[Any, int, int]]:
    """Every top-level dict (or list, ``kind=list``) in ``text`` as (value, start, end), in order of appearance;
    brackets inside a value found are not searched again."""
    opener = "{" if kind is dict else "["
    found, i = [], 0
    decoder = json.JSONDecoder()
    while True:
        i = text.find(opener, i)
        if i == -1:
            return found
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            end = _matching_brace(text, i)
            obj = _lenient_load(text[i:end]) if end is not None else None
        if isinstance(obj, kind) and end is not None:
            found.append((obj, i, end))
            i = end
        else:
            i += 1


def _json_objects(text: str) -> list[tuple[dict, int, int]]:
    return _json_values(text, dict)


def find_json(text: str | None, kind: type = dict) -> tuple[Any, str | None]:
    """The last top-level JSON object (``kind=dict``) or list (``kind=list``) in ``text``, or ``(None, why)``.

    Lenient about the wrapping, like the score parsers: code fences, prose around it, ``<think>`` blocks, trailing
    commas, single quotes. The last value wins (an echoed format example comes before the answer).
    """
    if kind not in (dict, list):
        raise ValueError(f"find_json looks for a dict or a list, not {kind.__name__}")
    if not text or not text.strip():
        return None, "empty output"
    body, problem = _strip_thinking(text)
    values = _json_values(body, kind)
    if not values:
        return None, problem or f"no JSON {'object' if kind is dict else 'list'} found"
    return values[-1][0], None


def _find_key(obj: dict, names: tuple[str, ...]) -> Any:
    for k, v in obj.items():
        if isinstance(k, str) and k.strip().lower() in names:
            return v
    return None


def _has_key(obj: dict, names: tuple[str, ...]) -> bool:
    return any(isinstance(k, str) and k.strip().lower() in names for k in obj)


def _reasoning_of(obj: dict) -> str:
    v = _find_key(obj, ("reasoning", "reason", "explanation", "analysis", "rationale"))
    return v.strip() if isinstance(v, str) else ""


# "Final Alignment Rating: 4", "**Final Score:** 4/5", "Overall rating = 3", "Score: 5"
_LABELLED = re.compile(
    rf"(?:final|overall)?[ \t\w]{{0,40}}?(?:rating|score)\s*[*_`]*\s*[:：=]\s*[*_`\"'\[\s]*(?P<num>{_NUM})" + _SCALE,
    re.IGNORECASE,
)
# \boxed{4}, \boxed{ 4 }, \boxed{\text{4}}, \boxed{4/5}, boxed{4}
_BOXED = re.compile(r"\\?boxed\s*\{(?P<inner>(?:[^{}]|\{[^{}]*\})*)\}")


def _labelled_score(text: str) -> tuple[int | None, str | None, tuple[int, int] | None]:
    matches = list(_LABELLED.finditer(text))
    if not matches:
        return None, None, None
    m = matches[-1]
    problem = _scale_problem(m.group("num"), m.group("den"))
    if problem:
        return None, problem, m.span("num")
    score, why = coerce_score(m.group("num"))
    return score, why, m.span("num")


# --------------------------------------------------------------------------------------------------------------------
# JSON score: {"reasoning": ..., "score": N}

_SCORE_KEYS = ("score", "final_score", "rating", "final score")


def explain_json_score(text: str | None) -> ParseResult:
    """Parse an answer of the form ``{"reasoning": "...", "score": N}``; see :func:`parse_json_score`."""
    if not text or not text.strip():
        return _fail("empty output")
    body, problem = _strip_thinking(text)
    if problem and not body.strip():
        return _fail(problem)
    candidates = [(o, s, e) for o, s, e in _json_objects(body) if _has_key(o, _SCORE_KEYS)]
    if candidates:
        obj, start, end = candidates[-1]  # the answer comes last (an echoed format example would come first)
        score, why = coerce_score(_find_key(obj, _SCORE_KEYS))
        if score is None:
            return _fail(why or "invalid score")
        reasoning = _reasoning_of(obj) or body[:start].strip()
        m = None
        for m in re.finditer(r"(?:score|rating)[\"']?\s*:\s*[\[\s\"']*(\d)", body[start:end], re.IGNORECASE):
            pass
        spans = {"score": (start + m.start(1), start + m.end(1))} if m else {}
        return ParseResult(value=score, reasoning=reasoning, spans=spans)
    # Broken JSON (e.g. an unescaped quote in the reasoning) still often carries a readable "score": N.
    keyed = list(re.finditer(rf"[\"']score[\"']\s*:\s*[\[\s\"']*(?P<num>{_NUM}){_SCALE}", body, re.IGNORECASE))
    if keyed:
        m = keyed[-1]
        score, why = coerce_score(m.group("num"))
        problem = _scale_problem(m.group("num"), m.group("den"))
        if problem:
            score, why = None, problem
        if score is None:
            return _fail(why or "invalid score")
        return ParseResult(value=score, reasoning=body[: m.start()].strip(), spans={"score": m.span("num")})
    boxed = explain_boxed_score(text)
    if boxed.ok:
        return boxed
    score, why, span = _labelled_score(body)
    if score is not None:
        return ParseResult(value=score, reasoning=body[: span[0]].strip(), spans={"score": span})
    if why:
        return _fail(why)
    return _fail(problem or "no JSON object with a 'score' key and no labelled score found")


def parse_json_score(text: str | None) -> int | None:
    """The score of a JSON answer ``{"reasoning": ..., "score": N}``, or None.

    Tolerates code fences, prose around the JSON, single quotes, trailing commas, a score given as a string or a
    one-element list, ``<think>`` blocks, and broken JSON that still has a readable ``"score": N``. Returns None
    for anything else, and for scores outside 1..5 or not whole. :func:`explain_json_score` also says why.
    """
    return explain_json_score(text).value


# --------------------------------------------------------------------------------------------------------------------
# Boxed score: reasoning ... \boxed{N}


def explain_boxed_score(text: str | None) -> ParseResult:
    """Parse an answer ending in ``\\boxed{N}`` (or a labelled final rating); see :func:`parse_boxed_score`."""
    if not text or not text.strip():
        return _fail("empty output")
    body, problem = _strip_thinking(text)
    if problem and not body.strip():
        return _fail(problem)
    boxes = list(_BOXED.finditer(body))
    if boxes:
        m = boxes[-1]
        inner = m.group("inner")
        num = re.search(_NUM, inner)
        cleaned = re.sub(r"\\(?:text|textbf|mathbf|mathrm)\s*\{([^{}]*)\}", r"\1", inner)
        score, why = coerce_score(cleaned.strip())
        if score is None:
            return _fail(f"\\boxed{{{inner.strip()}}}: {why}")
        start = m.start("inner") + num.start() if num else m.start()
        end = m.start("inner") + num.end() if num else m.end()
        return ParseResult(value=score, reasoning=body[: m.start()].strip(), spans={"score": (start, end)})
    score, why, span = _labelled_score(body)
    if score is not None:
        return ParseResult(value=score, reasoning=body[: span[0]].strip(), spans={"score": span})
    if why:
        return _fail(why)
    return _fail(problem or "no \\boxed{N} and no labelled final rating found")


def parse_boxed_score(text: str | None) -> int | None:
    """The score of an answer ending in ``\\boxed{N}``, or None.

    Takes the last box; accepts ``\\boxed{ 4 }``, ``\\boxed{\\text{4}}``, ``\\boxed{4/5}``, and, without a box, a
    labelled line such as ``Final Alignment Rating: 4``. :func:`explain_boxed_score` also says why it failed.
    """
    return explain_boxed_score(text).value


# --------------------------------------------------------------------------------------------------------------------
# Quality: three aspects, each 1..5


def _aspect_of(key: str) -> str | None:
    k = re.sub(r"[^a-z]+", " ", key.lower())
    if "aesthetic" in k:
        return "aesthetics"
    if "technical" in k:
        return "technical"
    if "structure" in k or "texture" in k:
        return "structure"
    return None


def _aspect_values(obj: dict) -> dict[str, Any]:
    """Aspect -> raw value from a (possibly nested) dict."""
    out: dict[str, Any] = {}
    for k, v in obj.items():
        if not isinstance(k, str):
            continue
        aspect = _aspect_of(k)
        if aspect is not None and aspect not in out:
            out[aspect] = _find_key(v, ("score", "rating")) if isinstance(v, dict) else v
        elif isinstance(v, dict):
            for a, val in _aspect_values(v).items():
                out.setdefault(a, val)
    return out


_ASPECT_LINE = re.compile(
    r"(?P<name>aesthetic(?:s|[\s_]+quality)?|technical(?:[\s_]+quality)?"
    r"|structure(?:[\s_]*(?:&|and|/)[\s_]*texture)?|texture)"
    rf"[\s*_`\"']*(?:\(\s*1\s*-\s*5\s*\)\s*)?[:：=\-]\s*[*_`\"'\s]*(?P<num>{_NUM})" + _SCALE,
    re.IGNORECASE,
)


def explain_quality_scores(text: str | None) -> ParseResult:
    """Parse the three quality aspects; see :func:`parse_quality_scores`."""
    if not text or not text.strip():
        return _fail("empty output")
    body, problem = _strip_thinking(text)
    if problem and not body.strip():
        return _fail(problem)
    raw: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    reasoning = ""
    objs = [(o, s, e) for o, s, e in _json_objects(body) if _aspect_values(o)]
    if objs:
        obj, start, end = objs[-1]
        raw = _aspect_values(obj)
        reasoning = _reasoning_of(obj) or body[:start].strip()
        for m in _ASPECT_LINE.finditer(body[start:end]):
            spans[_aspect_of(m.group("name"))] = (start + m.start("num"), start + m.end("num"))
    else:
        for m in _ASPECT_LINE.finditer(body):  # the last mention of each aspect wins
            aspect = _aspect_of(m.group("name"))
            raw[aspect] = m.group("num") if m.group("den") is None else f"{m.group('num')}/{m.group('den')}"
            spans[aspect] = m.span("num")
        if raw:
            reasoning = body[: min(s for s, _ in spans.values())].strip()
    if not raw:
        return _fail(problem or "no aesthetics / technical quality / structure-and-texture scores found")
    missing = [a for a in QUALITY_ASPECTS if a not in raw]
    if missing:
        return _fail(f"missing quality aspect(s): {', '.join(missing)}")
    scores: dict[str, int] = {}
    for a in QUALITY_ASPECTS:
        score, why = coerce_score(raw[a])
        if score is None:
            return _fail(f"{a}: {why}")
        scores[a] = score
    return ParseResult(value=scores, reasoning=reasoning, spans=spans)


def parse_quality_scores(text: str | None) -> dict[str, int] | None:
    """The three quality aspect scores ``{"aesthetics", "technical", "structure"}`` (each 1..5), or None.

    Reads a JSON object (keys matched loosely: ``aesthetic_quality``, ``technical quality``,
    ``structure_and_texture``, nested ``{"scores": {...}}`` or ``{"score": N}`` values) or labelled lines
    (``Aesthetics: 4``). All three are required. The Quality score is the minimum of the three.
    """
    return explain_quality_scores(text).value


# --------------------------------------------------------------------------------------------------------------------
# Planner output: a checklist of requirements

_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•]|\[\s?\])\s+(?P<item>.+?)\s*$")


def explain_checklist(text: str | None) -> ParseResult:
    """Parse a planner answer (a JSON list of strings, or a numbered / bulleted list) into requirements."""
    if not text or not text.strip():
        return _fail("empty output")
    body, problem = _strip_thinking(text)
    arrays = re.findall(r"\[(?:[^\[\]]|\[[^\[\]]*\])*\]", body)
    for arr in reversed(arrays):
        try:
            items = json.loads(arr)
        except json.JSONDecodeError:
            continue
        if isinstance(items, list) and items and all(isinstance(x, str) and x.strip() for x in items):
            return ParseResult(value=[x.strip() for x in items])
    items = [m.group("item").strip("*_ ") for line in body.splitlines() if (m := _ITEM.match(line))]
    items = [x for x in items if x]
    if items:
        return ParseResult(value=items)
    return _fail(problem or "no numbered or bulleted requirements and no JSON list of strings found")


def parse_checklist(text: str | None) -> list[str] | None:
    """The requirements listed by the planner, or None when none could be read."""
    return explain_checklist(text).value
