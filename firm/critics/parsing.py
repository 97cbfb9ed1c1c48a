"""Parsing critic outputs into 1..5 scores, tolerant of what real models emit, strict about what counts as a score.

Accepted: JSON objects inside code fences or surrounded by prose, single-quoted (Python-style) dicts, trailing
commas, a score given as an int, a whole float, a string (``"4"``, ``"4/5"``) or a one-element list, ``\\boxed{N}``,
labelled lines such as ``Final Alignment Rating: 4`` or ``**Score:** 4``, ``<think>...</think>`` blocks before
the answer, and stray whitespace. Anything else is *not* a score: the parsers return ``None`` and the ``explain_*``
variants say why. A score outside 1..5 or not a whole number is rejected, never clipped or rounded; so is a score
on another scale (``4/10``, ``8 out of 10``): only ``/5`` or ``out of 5`` may follow a number.

Each ``explain_*`` result also gives the character span of every score digit in the text, which the local backend
uses to find the score token for expected-score mode.

Hostile text. The parsers never raise on any input, and their work is bounded by construction:

- they read the answer after its ``<think>`` block, at most :data:`MAX_ANSWER_CHARS` characters of it (a longer
  answer is a failure with that reason, not a guess at which part holds the score);
- brackets are matched in one right-to-left pass that jumps over inner values already matched, and that pass may
  take at most ``STEP_FACTOR`` steps per character of the answer; JSON values are decoded from the end of the
  answer, at most :data:`MAX_VALUES` of them, and the characters handed to the JSON / Python-literal decoders add
  up to at most ``DECODE_FACTOR * MAX_ANSWER_CHARS`` (each count is checked by a test);
- a JSON value nested deeper than :data:`MAX_NESTING` levels is not read, and a score written with more than a few
  digits is out of range without being converted;
- every regular expression is written without overlapping repeats, so none of them backtracks quadratically.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import re
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

from firm.vocab import QUALITY_ASPECTS, SCORE_MAX, SCORE_MIN

__all__ = [
    "MAX_ANSWER_CHARS",
    "MAX_NESTING",
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

# QUALITY_ASPECTS (defined in firm.data.schema, re-exported here): the three aspects of the generation Quality
# judgement, as the parsers report them; the Quality score is their minimum.

# Limits on what the parsers look at. A critic answer is bounded by its generation budget (1024 tokens by default,
# a few thousand characters); curation teachers write longer reports, still well under this.
MAX_ANSWER_CHARS = 16_384  # characters of the answer (after its <think> block) that are read at all
MAX_NESTING = 32  # deepest nesting of lists / objects read inside a JSON value
MAX_LENIENT_CHARS = 8_192  # longest value the lenient decoders (trailing commas, Python literals) are tried on
MAX_NUMBER_DIGITS = 6  # a number written with more digits than this is out of range without being converted
STEP_FACTOR = 4  # bracket-matching steps allowed per character of the answer
DECODE_FACTOR = 8  # characters handed to decoders, in units of MAX_ANSWER_CHARS


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


def _shown(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + f"... ({len(text)} characters)"


class _Work:
    """Counts the work of one parse: bracket-matching steps (limited to ``STEP_FACTOR`` per character of the
    answer) and characters handed to decoders (limited to ``DECODE_FACTOR * MAX_ANSWER_CHARS``)."""

    def __init__(self, n_chars: int) -> None:
        self.limit = STEP_FACTOR * n_chars + 64
        self.steps = 0
        self.decode_limit = DECODE_FACTOR * MAX_ANSWER_CHARS
        self.decoded = 0
        self.exhausted = False

    def step(self) -> bool:
        if self.steps >= self.limit:
            self.exhausted = True
            return False
        self.steps += 1
        return True

    def decode(self, n: int) -> bool:
        if self.decoded + n > self.decode_limit:
            self.exhausted = True
            return False
        self.decoded += n
        return True


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers

_NUM = r"[-+]?\d+(?:\.\d+)?"
# An optional scale after a score: "4/5", "4 / 10", "4 out of 5". Only a scale of 5 is FIRM's.
_SCALE = rf"(?:\s*(?:/|out\s+of)\s*(?P<den>{_NUM}))?"
_SCORE_TEXT = re.compile(rf"\**\s*(?P<num>{_NUM}){_SCALE}\s*\**\.?", re.IGNORECASE)


def _number(num: str) -> tuple[float | None, str | None]:
    """The value of a number as written (``_NUM``), or ``(None, why)`` when it has too many digits to be a score."""
    digits = num.lstrip("+-").split(".")[0].lstrip("0")
    if len(digits) > MAX_NUMBER_DIGITS:
        return None, f"score {_shown(num, 12)} is outside {SCORE_MIN}..{SCORE_MAX}"
    if len(num) > 4 * MAX_NUMBER_DIGITS:  # a long fraction: 4.000...0001
        return None, f"score {_shown(num, 12)} is not a whole number"
    return float(num), None


def _scale_problem(num: str, den: str | None) -> str | None:
    """Why ``num/den`` is not a 1..5 score (None when no scale is given or it is 5)."""
    if den is None:
        return None
    value, _ = _number(den)
    if value == 5:
        return None
    return f"score {_shown(num, 12)}/{_shown(den, 12)} is on a scale of {_shown(den, 12)}, not {SCORE_MIN}..{SCORE_MAX}"


_THINK_CLOSE = re.compile(r"(?s).*</think>", re.IGNORECASE)  # greedy: ends at the last </think>
_THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)


def _answer(text: str) -> tuple[str, int, str | None]:
    """The part of ``text`` that is the answer: ``(answer, its offset in text, problem or None)``.

    Everything up to the last ``</think>`` is thinking (its opening tag may be in the prompt); an unfinished
    ``<think>`` block runs to the end of the text. Surrounding whitespace is dropped (the offset accounts for it).
    """
    problem = None
    m = _THINK_CLOSE.match(text)
    if m is not None:
        lo, hi = m.end(), len(text)
    else:
        o = _THINK_OPEN.search(text)
        lo, hi = 0, (o.start() if o is not None else len(text))
        if o is not None:
            problem = "the output ends inside an unfinished <think> block"
    answer = text[lo:hi]
    stripped = answer.lstrip()
    lo += len(answer) - len(stripped)
    return stripped.rstrip(), lo, problem


def _read_answer(text: Any) -> tuple[str, int, str | None, ParseResult | None]:
    """``(answer, offset, problem, failure)``: ``failure`` is set when there is nothing the parsers may read."""
    if not isinstance(text, str) or not text.strip():
        return "", 0, None, _fail("empty output" if text is None or isinstance(text, str) else "the output is not text")
    answer, off, problem = _answer(text)
    if not answer:
        return "", off, problem, _fail(problem or "empty output")
    if len(answer) > MAX_ANSWER_CHARS:
        return (
            "",
            off,
            problem,
            _fail(
                f"the answer is {len(answer)} characters long (after any <think> block); the parsers read at most "
                f"{MAX_ANSWER_CHARS}"
            ),
        )
    return answer, off, problem, None


def strip_thinking(text: str) -> str:
    """``text`` with its ``<think>...</think>`` reasoning (and an unfinished ``<think>`` tail) blanked out."""
    if not isinstance(text, str):
        return ""
    m = _THINK_CLOSE.match(text)
    if m is not None:
        return " " * m.end() + text[m.end() :]
    o = _THINK_OPEN.search(text)
    return text if o is None else text[: o.start()] + " " * (len(text) - o.start())


def coerce_score(value: Any) -> tuple[int | None, str | None]:
    """An int 1..5 from a JSON value (int, whole float, numeric string such as ``"4"`` / ``"4/5"``, one-element
    list), or ``(None, why)``: never clipped, rounded or guessed. Never raises."""
    for _ in range(MAX_NESTING + 1):  # a one-element list (of a one-element list ...) holds the score
        if not isinstance(value, list):
            break
        if len(value) != 1:
            return None, f"score is a list of {len(value)} items, expected one"
        value = value[0]
    else:
        return None, f"score is nested in more than {MAX_NESTING} lists"
    if isinstance(value, bool) or value is None:
        return None, f"score is {value!r}, not a number"
    if isinstance(value, str):
        m = _SCORE_TEXT.fullmatch(value.strip())
        if not m:
            return None, f"score {_shown(value.strip())!r} is not a number"
        problem = _scale_problem(m.group("num"), m.group("den"))
        if problem:
            return None, problem
        value, why = _number(m.group("num"))
        if value is None:
            return None, why
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, f"score {value} is not a finite number"
        if not value.is_integer():
            return None, f"score {value:g} is not a whole number"
        value = int(value)
    if not isinstance(value, int):
        return None, f"score has type {type(value).__name__}, expected a number"
    if not SCORE_MIN <= value <= SCORE_MAX:
        shown = str(value) if value.bit_length() < 40 else f"with {int(value.bit_length() * 0.30103) + 1} digits"
        return None, f"score {shown} is outside {SCORE_MIN}..{SCORE_MAX}"
    return value, None


# --------------------------------------------------------------------------------------------------------------------
# Finding JSON values in prose

# Per bracket kind: the characters the matcher looks at (its own brackets, quotes and backslashes).
_TOKENS = {"{": re.compile(r"[{}\"'\\]"), "[": re.compile(r"[\[\]\"'\\]")}
_CLOSER = {"{": "}", "[": "]"}
MAX_VALUES = 256  # JSON values decoded per search, from the end of the answer (where the answer's own value is)


def _match_ends(text: str, opener: str, work: _Work) -> dict[int, int]:
    """For every ``opener`` in ``text`` that is closed: the index just past its closing bracket (string-aware).

    Works on the list of significant characters (brackets of this kind, quotes, backslashes), right to left, so that
    a scan meeting an inner opener jumps past that opener's (already known) end instead of scanning its contents
    again: unmatched brackets cost one step each, not a scan to the end each. The result equals scanning from each
    opener alone (an inner value ends where its own scan ends). At most ``work.limit`` steps in all; openers left
    when the limit is reached count as unclosed.
    """
    closer = _CLOSER[opener]
    # Positions of the significant characters without a match object each: from the lengths of the pieces between
    # them (C-level iteration; re.finditer costs about 3x more on text made only of brackets).
    pieces = _TOKENS[opener].split(text)
    n = len(pieces) - 1
    pos = list(map(operator.add, accumulate(map(len, pieces[:-1])), range(n)))
    chars = list(map(text.__getitem__, pos))
    end_tok = [-1] * n  # token index of an opener -> token index just past its closer, or -1
    ends: dict[int, int] = {}
    steps, limit = work.steps, work.limit
    for k in range(n - 1, -1, -1):
        if chars[k] != opener:
            continue
        j = k + 1
        while j < n and steps < limit:
            steps += 1
            c = chars[j]
            if c == opener:
                j = end_tok[j]
                if j < 0:
                    break
            elif c == closer:
                end_tok[k] = j + 1
                ends[pos[k]] = pos[j] + 1
                break
            elif c == "\\":  # outside a string a backslash is just a character
                j += 1
            else:  # a quoted string: skip to its closing quote
                j += 1
                while j < n and steps < limit:
                    steps += 1
                    c2 = chars[j]
                    if c2 == c:
                        break
                    # a backslash escapes the character right after it (possibly another backslash or a quote)
                    j += 2 if c2 == "\\" and j + 1 < n and pos[j + 1] == pos[j] + 1 else 1
                if j >= n or steps >= limit:
                    break
                j += 1
    if steps >= limit:
        work.exhausted = True
    work.steps = steps
    return ends


_TOO_DEEP = object()


def _too_deep(value: Any) -> bool:
    """Whether containers nest more than MAX_NESTING levels deep in ``value`` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list, tuple, set, frozenset)):
            if depth > MAX_NESTING:
                return True
            children = [*v.keys(), *v.values()] if isinstance(v, dict) else v
            stack.extend((c, depth + 1) for c in children)
    return False


def _decode(snippet: str, work: _Work) -> Any:
    """A value written as JSON, JSON with trailing commas, or a Python literal; None if none works; ``_TOO_DEEP``
    when it nests deeper than MAX_NESTING. Never raises."""
    value: Any = None
    try:
        value = json.loads(snippet)
    except RecursionError:
        return _TOO_DEEP
    except ValueError:  # JSONDecodeError, and numbers over Python's int digit limit
        value = None
    if value is None and len(snippet) <= MAX_LENIENT_CHARS and work.decode(3 * len(snippet)):
        relaxed = re.sub(r",\s*([}\]])", r"\1", snippet)  # trailing commas
        if relaxed != snippet:
            try:
                value = json.loads(relaxed)
            except RecursionError:
                return _TOO_DEEP
            except ValueError:
                value = None
        for candidate in dict.fromkeys((snippet, relaxed)):
            if value is not None:
                break
            try:
                value = ast.literal_eval(candidate)  # single quotes, Python True / None
            except Exception:  # noqa: BLE001 - literal_eval raises many types (SyntaxError, ValueError, Memory...)
                value = None
    if value is not None and _too_deep(value):
        return _TOO_DEEP
    return value


def _last_value(
    text: str, kind: type, work: _Work, accept: Callable[[Any], bool] | None = None
) -> tuple[tuple[Any, int, int] | None, str | None]:
    """The last top-level dict (or list, ``kind=list``) in ``text`` that ``accept(value)`` takes, as
    ``(value, start, end)``, or ``(None, why the search ended early)`` (``why`` is None when there simply is none).

    Top-level: a value found is not searched inside; brackets that do not decode are searched inside. The search
    goes from the end (the answer's own value comes last; an echoed format example comes first), decodes at most
    :data:`MAX_VALUES` values, and stops at a value nested deeper than :data:`MAX_NESTING` (its content is unread).
    """
    ends = _match_ends(text, "{" if kind is dict else "[", work)
    openers = sorted(ends)

    def spans(lo: int, hi: int) -> list[tuple[int, int]]:
        """Outermost matched spans inside [lo, hi), left to right (greedy, as a left-to-right reader sees them)."""
        out, i = [], bisect_left(openers, lo)
        while i < len(openers) and openers[i] < hi:
            start = openers[i]
            end = ends[start]
            if end <= hi:
                out.append((start, end))
                i = bisect_left(openers, end, i + 1)
            else:
                i += 1
        return out

    stack = spans(0, len(text))  # popped from the end: right to left
    decoded = 0
    while stack:
        start, end = stack.pop()
        if decoded >= MAX_VALUES or not work.decode(end - start):
            return None, f"the answer holds too many bracketed values to search (read the last {decoded})"
        decoded += 1
        value = _decode(text[start:end], work)
        if value is _TOO_DEEP:
            return None, f"a JSON value nested deeper than {MAX_NESTING} levels was not read"
        if isinstance(value, kind):
            if accept is None or accept(value):
                return (value, start, end), None
            continue
        stack.extend(spans(start + 1, end - 1))  # not a value: the values inside it are top-level
    if work.exhausted:
        return None, "the answer is too irregular to search completely (work limit reached)"
    return None, None


def find_json(text: str | None, kind: type = dict) -> tuple[Any, str | None]:
    """The last top-level JSON object (``kind=dict``) or list (``kind=list``) in ``text``, or ``(None, why)``.

    Lenient about the wrapping, like the score parsers: code fences, prose around it, ``<think>`` blocks, trailing
    commas, single quotes. The last value wins (an echoed format example comes before the answer). Never raises.
    """
    if kind not in (dict, list):
        raise ValueError(f"find_json looks for a dict or a list, not {kind.__name__}")
    answer, _, problem, failure = _read_answer(text)
    if failure is not None:
        return None, failure.reason
    found, why = _last_value(answer, kind, _Work(len(answer)))
    if found is None:
        return None, why or problem or f"no JSON {'object' if kind is dict else 'list'} found"
    return found[0], None


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


# "Final Alignment Rating: 4", "**Final Score:** 4/5", "Overall rating = 3", "Score: 5". No repeat overlaps the next
# one (e.g. no `\s*[*_]*\s*`), so a long run of spaces after a label costs linear time, not quadratic.
_LABELLED = re.compile(rf"(?:rating|score)[\s*_`]*[:：=][*_`\"'\[\s]*(?P<num>{_NUM})" + _SCALE, re.IGNORECASE)
# \boxed{4}, \boxed{ 4 }, \boxed{\text{4}}, \boxed{4/5}, boxed{4}
_BOXED = re.compile(r"\\?boxed\s*\{(?P<inner>[^{}]*(?:\{[^{}]*\}[^{}]*)*)\}")


def _last_match(pattern: re.Pattern, text: str, start: int = 0, end: int | None = None) -> re.Match | None:
    m = None
    for m in pattern.finditer(text, start, len(text) if end is None else end):
        pass
    return m


def _labelled_score(text: str) -> tuple[int | None, str | None, tuple[int, int] | None]:
    m = None
    for m in _LABELLED.finditer(text):
        pass
    if m is None:
        return None, None, None
    problem = _scale_problem(m.group("num"), m.group("den"))
    if problem:
        return None, problem, m.span("num")
    score, why = coerce_score(m.group("num"))
    return score, why, m.span("num")


def _shift(spans: dict[str, tuple[int, int]], off: int) -> dict[str, tuple[int, int]]:
    return {k: (s + off, e + off) for k, (s, e) in spans.items()}


# --------------------------------------------------------------------------------------------------------------------
# JSON score: {"reasoning": ..., "score": N}

_SCORE_KEYS = ("score", "final_score", "rating", "final score")
_SCORE_DIGIT = re.compile(r"(?:score|rating)[\"']?\s*:[\[\s\"']*(\d)", re.IGNORECASE)
_KEYED_SCORE = re.compile(rf"[\"']score[\"']\s*:[\[\s\"']*(?P<num>{_NUM}){_SCALE}", re.IGNORECASE)


def explain_json_score(text: str | None) -> ParseResult:
    """Parse an answer of the form ``{"reasoning": "...", "score": N}``; see :func:`parse_json_score`."""
    body, off, problem, failure = _read_answer(text)
    if failure is not None:
        return failure
    found, json_problem = _last_value(body, dict, _Work(len(body)), lambda o: _has_key(o, _SCORE_KEYS))
    if found is not None:
        obj, start, end = found  # the answer comes last (an echoed format example would come first)
        score, why = coerce_score(_find_key(obj, _SCORE_KEYS))
        if score is None:
            return _fail(why or "invalid score")
        reasoning = _reasoning_of(obj) or body[:start].strip()
        m = None
        for m in _SCORE_DIGIT.finditer(body, start, end):
            pass
        spans = {"score": m.span(1)} if m else {}
        return ParseResult(value=score, reasoning=reasoning, spans=_shift(spans, off))
    if json_problem is not None:  # a value too deep or too irregular to read: not a score, whatever it holds
        return _fail(json_problem)
    # Broken JSON (e.g. an unescaped quote in the reasoning) still often carries a readable "score": N.
    m = None
    for m in _KEYED_SCORE.finditer(body):
        pass
    if m is not None:
        score, why = coerce_score(m.group("num"))
        problem_scale = _scale_problem(m.group("num"), m.group("den"))
        if problem_scale:
            score, why = None, problem_scale
        if score is None:
            return _fail(why or "invalid score")
        return ParseResult(
            value=score, reasoning=body[: m.start()].strip(), spans=_shift({"score": m.span("num")}, off)
        )
    boxed = _boxed_score(body, off, problem)
    if boxed.ok:
        return boxed
    score, why, span = _labelled_score(body)
    if score is not None:
        return ParseResult(value=score, reasoning=body[: span[0]].strip(), spans=_shift({"score": span}, off))
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

_TEXT_MACRO = re.compile(r"\\(?:text|textbf|mathbf|mathrm)\s*\{([^{}]*)\}")
_BOX_WRAPPING = " \t\r\n[]{}"  # brackets / braces around the boxed number (stripped, not matched: linear time)


def _boxed_score(body: str, off: int, problem: str | None) -> ParseResult:
    m = None
    for m in _BOXED.finditer(body):
        pass
    boxed_why = None
    if m is not None:
        inner = m.group("inner")
        num = re.search(_NUM, inner)
        # \boxed{[4]} (the released FIRM instruction template shows the rating in brackets) and \boxed{{4}}
        value = _TEXT_MACRO.sub(r"\1", inner).strip(_BOX_WRAPPING)
        score, why = coerce_score(value)
        if score is not None:
            start = m.start("inner") + num.start() if num else m.start()
            end = m.start("inner") + num.end() if num else m.end()
            spans = _shift({"score": (start, end)}, off)
            # the reasoning is what precedes the box, or (a score-first answer: "\boxed{4}\n\nbecause ...") follows it
            reasoning = body[: m.start()].strip() or body[m.end() :].strip()
            return ParseResult(value=score, reasoning=reasoning, spans=spans)
        boxed_why = f"\\boxed{{{_shown(inner.strip())}}}: {why}"
    # No readable box: a labelled line such as "Final Alignment Rating: [4]" (the released template writes both).
    score, why, span = _labelled_score(body)
    if score is not None:
        return ParseResult(value=score, reasoning=body[: span[0]].strip(), spans=_shift({"score": span}, off))
    if boxed_why:
        return _fail(boxed_why)
    if why:
        return _fail(why)
    return _fail(problem or "no \\boxed{N} and no labelled final rating found")


def explain_boxed_score(text: str | None) -> ParseResult:
    """Parse an answer ending in ``\\boxed{N}`` (or a labelled final rating); see :func:`parse_boxed_score`."""
    body, off, problem, failure = _read_answer(text)
    if failure is not None:
        return failure
    return _boxed_score(body, off, problem)


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
    """Aspect -> raw value from a (possibly nested) dict (nesting is bounded by MAX_NESTING when it was read)."""
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
    rf"[\s*_`\"']*(?:\(\s*1\s*-\s*5\s*\)[\s*_`\"']*)?[:：=\-][*_`\"'\s]*(?P<num>{_NUM})" + _SCALE,
    re.IGNORECASE,
)


def _score_list(obj: dict) -> list | None:
    """The released FIRM-Gen Quality answer ``{"score": [a, t, s], ...}``: its list of three aspect scores."""
    v = _find_key(obj, ("score", "scores"))
    return v if isinstance(v, list) and len(v) == len(QUALITY_ASPECTS) else None


# The same answer with broken JSON around it: "score": [4, 3, 5]
_SCORE_LIST = re.compile(
    rf"[\"']scores?[\"']\s*:\s*\[\s*(?P<a>{_NUM})\s*,\s*(?P<b>{_NUM})\s*,\s*(?P<c>{_NUM})\s*\]", re.IGNORECASE
)


def explain_quality_scores(text: str | None) -> ParseResult:
    """Parse the three quality aspects; see :func:`parse_quality_scores`."""
    body, off, problem, failure = _read_answer(text)
    if failure is not None:
        return failure
    raw: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    reasoning = ""
    found, json_problem = _last_value(
        body, dict, _Work(len(body)), lambda o: bool(_aspect_values(o)) or _score_list(o) is not None
    )
    listed = None if found is not None else _last_match(_SCORE_LIST, body)
    if found is not None and not _aspect_values(found[0]):
        obj, start, end = found
        raw = dict(zip(QUALITY_ASPECTS, _score_list(obj)))  # in the order the template lists the aspects
        reasoning = _reasoning_of(obj) or body[:start].strip()
        m = _last_match(_SCORE_LIST, body, start, end)
        if m is not None:
            spans = {a: m.span(g) for a, g in zip(QUALITY_ASPECTS, "abc")}
    elif found is not None:
        obj, start, end = found
        raw = _aspect_values(obj)
        reasoning = _reasoning_of(obj) or body[:start].strip()
        for m in _ASPECT_LINE.finditer(body, start, end):
            spans[_aspect_of(m.group("name"))] = m.span("num")
    elif json_problem is not None:
        return _fail(json_problem)
    elif listed is not None:
        raw = {a: listed.group(g) for a, g in zip(QUALITY_ASPECTS, "abc")}
        spans = {a: listed.span(g) for a, g in zip(QUALITY_ASPECTS, "abc")}
        reasoning = body[: listed.start()].strip()
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
    return ParseResult(value=scores, reasoning=reasoning, spans=_shift(spans, off))


def parse_quality_scores(text: str | None) -> dict[str, int] | None:
    """The three quality aspect scores ``{"aesthetics", "technical", "structure"}`` (each 1..5), or None.

    Reads a JSON object (keys matched loosely: ``aesthetic_quality``, ``technical quality``,
    ``structure_and_texture``, nested ``{"scores": {...}}`` or ``{"score": N}`` values), the released FIRM-Gen
    answer ``{"score": [aesthetics, technical, structure], ...}``, or labelled lines (``Aesthetics: 4``). All three
    are required. The Quality score is the minimum of the three.
    """
    return explain_quality_scores(text).value


# --------------------------------------------------------------------------------------------------------------------
# Planner output: a checklist of requirements

_ITEM = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•]|\[\s?\])\s+(?P<item>\S.*)$")
_FLAT_ARRAY = re.compile(r"\[[^\[\]]*(?:\[[^\[\]]*\][^\[\]]*)*\]")


def explain_checklist(text: str | None) -> ParseResult:
    """Parse a planner answer (a JSON list of strings, or a numbered / bulleted list) into requirements."""
    body, _, problem, failure = _read_answer(text)
    if failure is not None:
        return failure
    for arr in reversed(_FLAT_ARRAY.findall(body)):
        try:
            items = json.loads(arr)
        except (ValueError, RecursionError):
            continue
        if isinstance(items, list) and items and all(isinstance(x, str) and x.strip() for x in items):
            return ParseResult(value=[x.strip() for x in items])
    items = [m.group("item").strip().strip("*_ ") for line in body.splitlines() if (m := _ITEM.match(line))]
    items = [x for x in items if x]
    if items:
        return ParseResult(value=items)
    return _fail(problem or "no numbered or bulleted requirements and no JSON list of strings found")


def parse_checklist(text: str | None) -> list[str] | None:
    """The requirements listed by the planner, or None when none could be read."""
    return explain_checklist(text).value
