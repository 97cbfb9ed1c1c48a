"""VLM judges behind an OpenAI-compatible endpoint (vLLM, SGLang) as scorers: ``vlm_judge``.

A judge model is asked in its own trained format, its answer is parsed as its authors parse it, and its scores are
combined and normalised as its authors combine them. The requests go through FIRM's HTTP client
(:class:`firm.critics.transport.ChatTransport`: endpoint balancing, retries with backoff, ``Retry-After``, timeouts,
the API key from ``$api_key_env``, one connection pool), with the images as base64 data URLs. An answer that cannot
be parsed is asked again at ``retry_temperature`` (``parse_retries`` times, as FIRM's HTTP critic does) and then
costs only its own request: its scores are NaN, with the reason in :attr:`Scores.errors`.

Styles (``style:``), each for the checkpoints named; every output is one float per request:

``unifiedreward`` (text-to-image; UnifiedReward 1.0/2.0 Qwen-VL checkpoints, e.g. ``CodeGoat24/UnifiedReward-qwen-7b``)
    One request: the generated image and the caption. The judge weighs caption alignment and image quality and
    writes ``Final Score: x`` with x in 1..5. Read as in the UnifiedReward RL reward (CodeGoat24/UnifiedReward,
    ``sglang_llava/sglang_inference.py``, ``_extract_scores``, the same code as Flow-GRPO's
    ``flow_grpo/rewards.py``): the first ``Final Score:`` followed by a number; divided by 5 as there.
    Output: ``unifiedreward`` = x / 5, in [0.2, 1].

``unifiedreward_edit`` (edits; ``CodeGoat24/UnifiedReward-Edit-*``, pointwise mode)
    Two requests (CodeGoat24/UnifiedReward ``UnifiedReward-Edit/edit_pointwise_instruction_following.py`` and
    ``edit_pointwise_quality.py``): (source, edited) + instruction -> ``{"reasoning": ..., "score": [success,
    overediting]}``; the edited image alone -> ``score: [naturalness, artifacts]``; every score in 0..25. Read and
    combined as the author's RL code does (CodeGoat24/Pref-GRPO ``fastvideo/rewards/unifiedreward_edit_pointwise.py``,
    default weights 1 and 1): ``..._following`` = mean(success, overediting), ``..._quality`` = mean(naturalness,
    artifacts), on the 0..25 scale (the official code does not normalise; use ``scale: 0.04`` in the mix for
    [0, 1]). Pref-GRPO uses the two as separate rewards; the primary ``unifiedreward_edit`` = mean(following,
    quality) is FIRM's one-number summary of both. Also the four raw scores.

``editscore`` (edits; ``EditScore/EditScore-7B`` and the other EditScore LoRAs on Qwen2.5-VL / Qwen3-VL)
    Two requests (VectorSpaceLab/EditScore ``editscore/__init__.py``, VIEScore rules with ``score_range`` 25):
    semantic consistency from (source, edited) + instruction -> ``score: [editing success, overediting]``; perceptual
    quality from the edited image -> ``score: [naturalness, artifacts]``. Combined as ``EditScore.batch_evaluate``
    and the OmniGen2-RL reward server (``reward = O_score / 10``): SC = min(SC scores), PQ = min(PQ scores), overall
    = sqrt(SC * PQ), all divided by ``score_range``. Outputs in [0, 1]: ``editscore`` (overall, the RL reward),
    ``editscore_sc``, ``editscore_pq``, ``editscore_prompt_following`` (first SC score), ``editscore_consistency``
    (second). Images are labelled ``<img1>: ``, ``<img2>: `` before each image, as EditScore's Qwen2.5-VL prompt does
    (``image_labels: false`` for the Qwen3-VL checkpoints, which EditScore prompts through the plain chat template).
    ``passes: N`` with a temperature > 0 averages N samples per request (EditScore's ``num_pass``, reduction
    ``average_last``).

``rationalrewards`` (text-to-image; ``TIGER-Lab/RationalRewards-8B-T2I``) and ``rationalrewards_edit`` (edits;
``TIGER-Lab/RationalRewards-8B-Edit``)
    One request (TIGER-AI-Lab/RationalRewards README, "vLLM Inference Templates and Parsing"): the judge analyses the
    request, then scores Text Faithfulness, (edits: Image Faithfulness,) Physical and Visual Quality and Text
    Rendering (1..4 floats, Text Rendering N/A when no text is asked for) under ``## Score:`` lines, then proposes a
    refined request. Read as ``parse_t2i_scores`` / ``parse_i2i_scores`` there: the mean of the aspects that have a
    score (N/A left out), normalised by ``(mean - 1) / 3``; text-to-image clamps each score to [1, 4] first, edits do
    not. Outputs: the primary (``rationalrewards`` / ``rationalrewards_edit``) and each required aspect mapped the
    same way (``..._text_faithfulness``, ``..._physical_quality``, edits: ``..._image_faithfulness``); Text
    Rendering, often N/A, is in the details only. (The authors' RL scripts for editing average Text Faithfulness,
    Physical Quality and Text Rendering only; the README's parser, followed here, averages all four.)

Where FIRM departs from the official code (each is pinned by tests/rewards/scorers/test_judges.py): where the
official code substitutes a number for an answer it could not read (0 for UnifiedReward and Pref-GRPO, the mid-range
for EditScore, the mean of the aspects that did parse for RationalRewards), the score here is NaN; a score outside
its scale (e.g. ``Final Score: 10``, which the official regex reads as 1) is NaN; an answer in the judge's format
with a small JSON slip (a trailing comma, single quotes) that Pref-GRPO's strict parser drops is read.

The prompts are FIRM's own wording of each judge's rubric, with the facts (scale, output format, image order) of the
official prompt. To send a judge the exact prompt it was trained with, give a template file per prompt
(``prompts: {vie_sc: path/to/file.txt}``); :data:`TEMPLATE_NAMES` lists the names and their placeholders. A
``<image>`` in a template marks where each image goes; without one, the images come first.

Example::

    rewards:
      editscore: {name: vlm_judge, style: editscore, endpoints: [http://judge:8000/v1], model: EditScore-7B}
"""

from __future__ import annotations

import ast
import asyncio
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from firm.critics.http import to_openai_messages
from firm.critics.transport import ChatTransport, CriticReplyError, CriticRequestError, gather_all, normalize_endpoint
from firm.critics.types import EditRequest, GenRequest
from firm.images import fit_pixels
from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores
from firm.templates import check_template, read_template, render_template

log = logging.getLogger(__name__)

IMAGE_MARKER = "<image>"


class JudgeParseError(ValueError):
    """A judge's answer has no score that can be read (or one outside its scale)."""


# ---------------------------------------------------------------------------------------------------------------
# Prompts (FIRM's wording; the facts of each official prompt are named in the comments)

# UnifiedReward text-to-image pointwise prompt. Facts from CodeGoat24/UnifiedReward sglang_llava/sglang_inference.py
# (the RL reward) and inference_qwen/image_generation/qwen_point_score_image_generation.py: two criteria (caption
# alignment; overall image quality), one score from 1 to 5 after "Final Score:", the caption last as
# "Text Caption: [...]"; the image comes before the text.
UNIFIEDREWARD = """\
The image was generated from the text caption given at the end. Judge it on two criteria together:
1. Caption alignment: are the objects the caption names present and correct, with the attributes and the \
relations between them that the caption describes?
2. Image quality: how sharp and detailed the image is, how faithful its colours are, and how good it looks overall.
Weigh both criteria and rate the image with a single number from 1 to 5, written after 'Final Score:'.
Text Caption: [{prompt}]"""

# VIEScore-style editing rules shared by UnifiedReward-Edit (UnifiedReward-Edit/edit_pointwise_*.py) and EditScore
# (editscore/vie_prompts.py with score_range 25): an answer {"reasoning": ..., "score": [...]}, two scores per
# request from 0 to the top of the scale; semantic consistency sees (original, edited) and scores [editing success,
# overediting]; perceptual quality sees the edited image and scores [naturalness, artifacts].
_VIE_PREAMBLE = """\
You are an experienced digital artist who rates AI-generated images by fixed rules. Every image here, people \
included, is AI-generated, so there is no privacy concern.

Answer in exactly this form, with short reasoning:
{
"reasoning" : "...",
"score" : [...]
}
"""

VIE_SC = (
    _VIE_PREAMBLE
    + """
RULES:

There are two images: the first is an original AI-generated image and the second is that image after an edit. Rate \
how well the second image carries out the editing instruction. A failed edit can leave the two images looking the \
same.

Both scores run from 0 to {max_score}:
The first score rates the editing success: 0 when the edited scene does not follow the instruction at all, \
{max_score} when it follows the instruction perfectly.
The second score rates the overediting: 0 when the edited scene has nothing in common with the original any more, \
{max_score} when it is recognisably the original with a minimal yet effective edit.
Give them as a list, score = [score1, score2], score1 for the editing success and score2 for the overediting.

Editing instruction: {instruction}
"""
)

VIE_PQ = (
    _VIE_PREAMBLE
    + """
RULES:

The image is AI-generated. Rate how well it was generated.

Both scores run from 0 to {max_score}:
The first score rates naturalness: 0 when the scene does not look natural at all (a wrong sense of distance, wrong \
shadows, wrong lighting), {max_score} when it looks natural.
The second score rates artifacts: 0 when a large part of the image is distorted or shows watermarks, scratches, \
blurred faces, malformed body parts or subjects that do not fit together, {max_score} when there are no artifacts.
Give them as a list, score = [naturalness, artifacts].
"""
)

# RationalRewards prompts. Facts from TIGER-AI-Lab/RationalRewards README.md (build_t2i_messages,
# build_i2i_messages): a system turn, then the request with the images at the marked places; aspects scored 1-4 as
# floats (anchor on an integer level, then adjust), Text Rendering N/A when no text is asked for; then a refined
# request; the section headings of the answer are the format the model was trained to emit.
RR_GEN_SYSTEM = (
    "You evaluate images made by text-to-image models: judge a generated image against the user's instruction, "
    "then suggest how the instruction could be refined to get a better image (if it can)."
)

RR_EDIT_SYSTEM = (
    "You evaluate image edits: judge an edited image against its source image and the user's instruction, then "
    "suggest how the instruction could be refined to get a better edit (if it can)."
)

_RR_TF = """\
**1. Text Faithfulness** (does the result do what the instruction says?)
- **4 (Full match):** every key element (objects, colours, actions) is there exactly as described; nothing invented \
and nothing changed that was not asked for.
- **3 (Minor mismatch):** most key elements are there; a few minor details are missing, wrong or slightly off.
- **2 (Some mismatch):** some key elements are missing, changed or misread.
- **1 (Major deviations):** key elements are missing, changed or contradicted; the instruction is ignored.
"""

_RR_IF = """\
**2. Image Faithfulness** (are the parts that should stay, and the key elements of the input, kept?)
- **4 (Uses input fully):** everything relevant from the input (background, style, lighting, identity) is kept, \
or changed exactly as instructed.
- **3 (Minor mismatch):** most of it is kept; a few things (background details, consistent lighting) are lost or \
handled wrongly.
- **2 (Partial mismatch):** some of it carries over, but key aspects of the source are lost or distorted.
- **1 (Fails to use input):** the key elements of the source are ignored, misread or destroyed.
"""


def _rr_pq(n: int) -> str:
    return f"""\
**{n}. Physical and Visual Quality** (technical errors, composition, realism, physics)
- **4 (No noticeable flaws):** physically plausible (lighting, shadows, geometry, anatomy) and free of visible \
artifacts such as seams, blur or noise.
- **3 (Minor flaws):** small inaccuracies that are noticeable but hardly disturbing (a slight lighting mismatch, a \
minor texture problem).
- **2 (Some flaws):** clear physical or visual errors that disturb the image (wrong perspective, floating objects, \
shadows in the wrong direction, obvious seams).
- **1 (Severe flaws):** severe physical or visual errors (impossible geometry, distorted anatomy, garbled objects, \
heavy artifacts).
"""


def _rr_tr(n: int) -> str:
    return f"""\
**{n}. Text Rendering** (only when the instruction asks for text in the image)
- **4 (Full match):** the text is correct, legible and well integrated.
- **3 (Mostly match):** minor misspellings or inconsistent capitalisation.
- **2 (Partial match):** major misspellings or distorted text.
- **1 (Major deviations):** the text is unreadable, badly distorted or missing. (Write N/A when no text is asked \
for.)
"""


def _rr_method(what: str, source: str) -> str:
    return f"""\
### How to score (important)
For each aspect keep the user request{source} and the rubric of that aspect in mind, and justify the score with \
what you see.
1. **Anchor:** look at the request and the whole result, and pick the integer level (1, 2, 3 or 4) that the \
rubric gives it.
2. **Justify and Adjust:** examine the image closely, name its concrete flaws, and refine the anchor into a float \
with that evidence: a little more for exceptional execution, a little less for each specific flaw.
   - *For example:* go down from 4.0 for slight flaws when the aspect is nearly satisfied; go up from 1.0 or 2.0 \
according to how severe the flaws are.

Then write a refined user request that would help the model produce a better {what}: take the weaknesses found \
in the judgement, turn each into a concrete detail of the request, and give the new, richer request in full.
"""


def _rr_format(aspects: list[tuple[str, str]], what: str) -> str:
    lines = [
        "Output your evaluation in the following format:",
        "# User Request Analysis",
        "[ what the request asks for, including what it implies or leaves to be inferred for a good result ]",
        "# Detailed Judgement",
    ]
    for i, (title, score) in enumerate(aspects, 1):
        lines += [f"{i}. {title}:", "## Justification: [ analysis and how it leads to the score ]"]
        lines += [f"## Score: [ {score} ]"]
    lines += [
        "# Summary: [ summary of the evaluation ]",
        "",
        "# User Request Refinement:",
        "## Refinement Comments: [ concrete suggestions for the request ]",
        f"## Refined Request: [ the improved request, written like a normal user instruction for {what} ]",
    ]
    return "\n".join(lines)


RR_GEN = "\n".join(
    [
        "User Instruction: {prompt}",
        "You are given one image:",
        "1. Generated Image <image>",
        "",
        "Assess the image on three aspects, each with a justification and an absolute score on a 1-4 scale.",
        "",
        "### Aspects and rubric",
        _RR_TF,
        _rr_pq(2),
        _rr_tr(3),
        _rr_method("image", ""),
        _rr_format(
            [
                ("Text Faithfulness", "float score"),
                ("Physical and Visual Quality", "float score"),
                ("Text Rendering", "float score or N/A"),
            ],
            "generation",
        ),
    ]
)

RR_EDIT = "\n".join(
    [
        "User Instruction: {instruction}",
        "You are given two images:",
        "1. Source Image <image>",
        "2. Edited Image <image>",
        "",
        "Assess the edited image on four aspects, each with a justification and an absolute score on a 1-4 scale.",
        "",
        "### Aspects and rubric",
        _RR_TF,
        _RR_IF,
        _rr_pq(3),
        _rr_tr(4),
        _rr_method("edit", ", the source image"),
        _rr_format(
            [
                ("Text Faithfulness", "float score"),
                ("Image Faithfulness", "float score"),
                ("Physical and Visual Quality", "float score"),
                ("Text Rendering", "float score or N/A"),
            ],
            "editing",
        ),
    ]
)

DEFAULT_TEMPLATES = {
    "unifiedreward": UNIFIEDREWARD,
    "vie_sc": VIE_SC,
    "vie_pq": VIE_PQ,
    "rr_gen_system": RR_GEN_SYSTEM,
    "rr_gen": RR_GEN,
    "rr_edit_system": RR_EDIT_SYSTEM,
    "rr_edit": RR_EDIT,
}

# template name -> (required placeholders, optional placeholders, number of images)
TEMPLATE_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...], int]] = {
    "unifiedreward": (("prompt",), (), 1),
    "vie_sc": (("instruction",), ("max_score",), 2),
    "vie_pq": ((), ("max_score",), 1),
    "rr_gen_system": ((), (), 0),
    "rr_gen": (("prompt",), (), 1),
    "rr_edit_system": ((), (), 0),
    "rr_edit": (("instruction",), (), 2),
}


# ---------------------------------------------------------------------------------------------------------------
# Parsing: one function per answer format


def parse_final_score(text: str) -> float:
    """The number after the first ``Final Score:`` (UnifiedReward), in 1..5.

    As UnifiedReward's ``_extract_scores`` (the first match of ``Final Score:\\s*([1-5](?:\\.\\d+)?)``), except that
    the whole number is read (``Final Score: 10`` is out of range, not 1), markdown bold around it is allowed, and no
    match is an error instead of 0.

    Raises:
        JudgeParseError: no score, or one outside 1..5.
    """
    m = re.search(r"Final Score:\s*(?:\*\*)?\s*(\d+(?:\.\d+)?)", text)
    if m is None:
        raise JudgeParseError("no 'Final Score: <1-5>' in the answer")
    value = float(m.group(1))
    if not 1.0 <= value <= 5.0:
        raise JudgeParseError(f"Final Score {m.group(1)} is outside 1..5")
    return value


@dataclass
class ScoreList:
    """A ``{"reasoning": ..., "score": [...]}`` answer (VIEScore format)."""

    scores: list[float]
    reasoning: str


def _as_number(x: Any) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):
        try:
            return float(x.strip())
        except ValueError:
            return None
    return None


def _from_object(obj: Any) -> ScoreList | None:
    if not isinstance(obj, dict) or "score" not in obj:
        return None
    raw = obj["score"]
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    nums = [_as_number(x) for x in items]
    if not nums or any(n is None for n in nums):
        return None
    reasoning = next((obj[k] for k in ("reasoning", "reason", "rationale") if isinstance(obj.get(k), str)), "")
    return ScoreList([float(n) for n in nums], reasoning)  # type: ignore[arg-type]


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _mended(text: str) -> list[str]:
    """Candidate repairs of an almost-JSON object: smart quotes, Python literals and single quotes, trailing commas,
    unquoted keys, double quotes inside the reasoning string."""
    t = text.replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "'").replace("\u2019", "'")
    no_trailing = re.sub(r",\s*([}\]])", r"\1", t)
    out = [t, no_trailing]
    try:  # Python dict syntax ({'score': [8, 9]})
        lit = ast.literal_eval(no_trailing)
        out.append(json.dumps(lit))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    out.append(re.sub(r"([{\s,])([A-Za-z_]\w*)\s*:", r'\1"\2":', no_trailing))
    inner = re.sub(
        r'("reasoning"\s*:\s*")(.*?)("\s*,\s*"score")',
        lambda m: m.group(1) + re.sub(r'(?<!\\)"', r"\"", m.group(2)) + m.group(3),
        no_trailing,
        flags=re.DOTALL,
    )
    out.append(inner)
    return out


def parse_score_list(text: str) -> ScoreList:
    """The score list of a VIEScore-format answer: ``{"reasoning": "...", "score": [a, b]}``.

    Reads the outermost ``{...}`` as JSON, then after small repairs (trailing commas, single quotes, unquoted keys,
    unescaped quotes in the reasoning), then the list after the last ``"score":`` key; an answer that is only a
    list of numbers (``[7, 9]``) is read too.

    Raises:
        JudgeParseError: no score list can be read.
    """
    body = text.strip()
    start, end = body.find("{"), body.rfind("}")
    if start != -1 and end > start:
        obj_text = body[start : end + 1]
        for candidate in _mended(obj_text):
            found = _from_object(_loads(candidate))
            if found is not None:
                return found
        keyed = list(re.finditer(r"[\"']score[\"']\s*:\s*\[([^\]\[]*)\]", obj_text))
        if keyed:
            nums = re.findall(r"[-+]?\d*\.?\d+", keyed[-1].group(1))
            if nums:
                m = re.search(r"[\"']reasoning[\"']\s*:\s*[\"'](.*?)[\"']\s*,\s*[\"']score", obj_text, re.DOTALL)
                return ScoreList([float(n) for n in nums], m.group(1) if m else "")
        raise JudgeParseError(f"no readable 'score' list in the JSON answer: {_shown(obj_text)}")
    bare = re.fullmatch(r"\[\s*([-+]?\d*\.?\d+(?:\s*,\s*[-+]?\d*\.?\d+)*)\s*\]", body)
    if bare:
        return ScoreList([float(n) for n in re.findall(r"[-+]?\d*\.?\d+", bare.group(1))], "")
    raise JudgeParseError(f"no JSON object with a 'score' list in the answer: {_shown(body)}")


def _shown(text: str, n: int = 160) -> str:
    text = " ".join(text.split())
    return repr(text[:n] + ("..." if len(text) > n else ""))


def checked_scores(found: ScoreList, top: float, what: str) -> ScoreList:
    """A VIEScore answer, checked: at least the two scores the rubric asks for, each within 0..top."""
    if len(found.scores) < 2:
        raise JudgeParseError(f"{what}: the answer gives {len(found.scores)} score(s), the rubric asks for two")
    bad = [s for s in found.scores if not (0.0 <= s <= top and math.isfinite(s))]
    if bad:
        raise JudgeParseError(f"{what}: score {bad[0]:g} is outside 0..{top:g}")
    return found


# RationalRewards aspects: (key, heading)
RR_ASPECTS = {
    "gen": (
        ("text_faithfulness", "Text Faithfulness"),
        ("physical_quality", "Physical and Visual Quality"),
        ("text_rendering", "Text Rendering"),
    ),
    "edit": (
        ("text_faithfulness", "Text Faithfulness"),
        ("image_faithfulness", "Image Faithfulness"),
        ("physical_quality", "Physical and Visual Quality"),
        ("text_rendering", "Text Rendering"),
    ),
}
RR_OPTIONAL = ("text_rendering",)  # may be N/A


@dataclass
class RationalJudgement:
    """A RationalRewards answer: each aspect's score (None: N/A or not given, text rendering only) and the texts."""

    scores: dict[str, float | None]
    summary: str = ""
    refined_request: str = ""


def _score_value(raw: str) -> float | str | None:
    """A ``## Score:`` value: a number at its start, ``"N/A"``, or None (unreadable)."""
    v = raw.strip().strip("*[] \t").strip()
    if v.upper().startswith("N/A"):
        return "N/A"
    m = re.match(r"(\d+(?:\.\d+)?)", v)
    return float(m.group(1)) if m else None


def parse_rational(text: str, task: str) -> RationalJudgement:
    """Scores of a RationalRewards answer (``task`` gen or edit).

    The judgement is the text before ``# Summary:``; each aspect's block starts at its numbered heading
    (``2. Physical and Visual Quality:``) and ends at the next one; its score is the first ``## Score:`` line of the
    block that starts with a number or says N/A.

    Raises:
        JudgeParseError: an aspect other than Text Rendering has no score (missing heading, missing or unreadable
            score, or N/A).
    """
    aspects = RR_ASPECTS[task]
    body, _, tail = text.partition("# Summary:")
    starts: list[tuple[int, int, str]] = []  # (heading start, block start, key)
    pos = 0
    for key, title in aspects:
        m = re.compile(r"^[ \t#*]*\d+\.\s*\**\s*" + re.escape(title) + r"\b.*$", re.MULTILINE).search(body, pos)
        if m is not None:
            starts.append((m.start(), m.end(), key))
            pos = m.end()
    blocks: dict[str, str] = {}
    for i, (_, begin, key) in enumerate(starts):
        stop = starts[i + 1][0] if i + 1 < len(starts) else len(body)
        blocks[key] = body[begin:stop]
    scores: dict[str, float | None] = {}
    for key, title in aspects:
        value: float | str | None = None
        for line in blocks.get(key, "").splitlines():
            m = re.match(r"^[ \t#*]*Score\s*\**\s*:\s*(.*)$", line, re.IGNORECASE)
            if m is not None:
                value = _score_value(m.group(1))
                if value is not None:
                    break
        if isinstance(value, float):
            scores[key] = value
        elif key in RR_OPTIONAL:
            scores[key] = None
        elif key not in blocks:
            raise JudgeParseError(f"no '{title}' section in the judgement")
        else:
            raise JudgeParseError(f"no {title} score ({'N/A' if value == 'N/A' else 'no number'} under '## Score:')")
    refined = re.search(r"Refined Request:\s*(.*)", tail)
    return RationalJudgement(scores, tail.split("# User Request Refinement")[0].strip(), refined and refined[1] or "")


# ---------------------------------------------------------------------------------------------------------------
# Combination and normalisation: parsed answers -> the style's outputs


def unifiedreward_outputs(final_score: float) -> dict[str, float]:
    """``Final Score`` x -> x / 5 (UnifiedReward's RL reward)."""
    return {"unifiedreward": final_score / 5.0}


def unifiedreward_edit_outputs(sc: list[float], pq: list[float]) -> dict[str, float]:
    """[success, overediting] and [naturalness, artifacts] (0..25) -> Pref-GRPO's two means (weights 1, 1; first two
    scores of each list), and their mean as the primary."""
    following = (sc[0] + sc[1]) / 2.0
    quality = (pq[0] + pq[1]) / 2.0
    return {
        "unifiedreward_edit": (following + quality) / 2.0,
        "unifiedreward_edit_following": following,
        "unifiedreward_edit_quality": quality,
        "unifiedreward_edit_success": sc[0],
        "unifiedreward_edit_overediting": sc[1],
        "unifiedreward_edit_naturalness": pq[0],
        "unifiedreward_edit_artifacts": pq[1],
    }


def editscore_outputs(sc: list[float], pq: list[float], score_range: float) -> dict[str, float]:
    """EditScore: SC = min(SC scores), PQ = min(PQ scores), overall = sqrt(SC * PQ); all over ``score_range``
    (= ``O_score / 10`` of ``batch_evaluate``, the OmniGen2-RL reward)."""
    s, p = min(sc) / score_range, min(pq) / score_range
    return {
        "editscore": math.sqrt(s * p),
        "editscore_sc": s,
        "editscore_pq": p,
        "editscore_prompt_following": sc[0] / score_range,
        "editscore_consistency": sc[1] / score_range,
    }


def rationalrewards_outputs(judgement: RationalJudgement, task: str) -> dict[str, float]:
    """The mean of the scored aspects (N/A left out) as ``(mean - 1) / 3``; each required aspect mapped the same
    way. Text-to-image clamps each score to [1, 4] first (``parse_t2i_scores``); edits do not (``parse_i2i_scores``)."""
    name = "rationalrewards" if task == "gen" else "rationalrewards_edit"
    scores = {k: v for k, v in judgement.scores.items() if v is not None}
    if task == "gen":
        scores = {k: min(4.0, max(1.0, v)) for k, v in scores.items()}
    mean = sum(scores.values()) / len(scores)
    out = {name: (mean - 1.0) / 3.0}
    for key, _ in RR_ASPECTS[task]:
        if key not in RR_OPTIONAL:
            out[f"{name}_{key}"] = (scores[key] - 1.0) / 3.0
    return out


# ---------------------------------------------------------------------------------------------------------------
# Styles


@dataclass
class Ask:
    """One chat request of a judgement: its neutral messages (PIL images inline) and how its answer is read."""

    name: str
    messages: list[dict]
    parse: Callable[[str], Any]


@dataclass(frozen=True)
class Style:
    """A judge's request layout, answer format and score combination."""

    name: str
    task: str  # gen | edit
    outputs: tuple[str, ...]  # primary first
    max_tokens: int  # default generation budget per request
    labels: bool = False  # put "<imgN>: " before each image by default


STYLES: dict[str, Style] = {
    s.name: s
    for s in (
        # UnifiedReward's vllm_request.py asks with max_tokens 4096
        Style("unifiedreward", "gen", ("unifiedreward",), 4096),
        Style(
            "unifiedreward_edit",
            "edit",
            (
                "unifiedreward_edit",
                "unifiedreward_edit_following",
                "unifiedreward_edit_quality",
                "unifiedreward_edit_success",
                "unifiedreward_edit_overediting",
                "unifiedreward_edit_naturalness",
                "unifiedreward_edit_artifacts",
            ),
            4096,
        ),
        # EditScore samples with max_tokens 512 (mllm_tools/qwen25vl_vllm.py)
        Style(
            "editscore",
            "edit",
            ("editscore", "editscore_sc", "editscore_pq", "editscore_prompt_following", "editscore_consistency"),
            512,
            labels=True,
        ),
        # RationalRewards' README asks with max_tokens 2048
        Style(
            "rationalrewards",
            "gen",
            ("rationalrewards", "rationalrewards_text_faithfulness", "rationalrewards_physical_quality"),
            2048,
        ),
        Style(
            "rationalrewards_edit",
            "edit",
            (
                "rationalrewards_edit",
                "rationalrewards_edit_text_faithfulness",
                "rationalrewards_edit_image_faithfulness",
                "rationalrewards_edit_physical_quality",
            ),
            2048,
        ),
    )
}


def style_asks(style: str, score_range: float = 25) -> dict[str, tuple[str, Callable[[str], Any]]]:
    """The requests of one judgement of ``style``: ask name -> (template name, answer reader)."""
    if style == "unifiedreward":
        return {"score": ("unifiedreward", parse_final_score)}
    if style in ("unifiedreward_edit", "editscore"):
        top = float(score_range)
        return {
            "sc": ("vie_sc", lambda t: checked_scores(parse_score_list(t), top, "semantic consistency")),
            "pq": ("vie_pq", lambda t: checked_scores(parse_score_list(t), top, "perceptual quality")),
        }
    task = STYLES[style].task
    return {"judge": ("rr_" + task, lambda t: parse_rational(t, task))}


def combine(style: str, parsed: dict[str, Any], score_range: float = 25) -> dict[str, float]:
    """A judgement's outputs from its parsed answers (ask name -> what its reader returned)."""
    if style == "unifiedreward":
        return unifiedreward_outputs(parsed["score"])
    if style == "unifiedreward_edit":
        return unifiedreward_edit_outputs(parsed["sc"].scores, parsed["pq"].scores)
    if style == "editscore":
        return editscore_outputs(parsed["sc"].scores, parsed["pq"].scores, float(score_range))
    return rationalrewards_outputs(parsed["judge"], STYLES[style].task)


def score_replies(style: str, replies: dict[str, str], score_range: float = 25) -> dict[str, float]:
    """The outputs of ``style`` from the judge's answer texts (ask name -> text): what the scorer computes once the
    answers are in. Raises :class:`JudgeParseError` for an unreadable answer."""
    readers = style_asks(style, score_range)
    return combine(style, {name: readers[name][1](replies[name]) for name in readers}, score_range)


def _content(text: str, images: list[Image.Image], labels: bool) -> list[dict]:
    """User-turn parts: the images at the template's ``<image>`` marks, or first (labelled ``<imgN>: `` when asked)."""
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) == 1:
        parts: list[dict] = []
        for i, im in enumerate(images, 1):
            if labels:
                parts.append({"type": "text", "text": f"<img{i}>: "})
            parts.append({"type": "image", "image": im})
        return [*parts, {"type": "text", "text": text}]
    if len(pieces) - 1 != len(images):
        marks = len(pieces) - 1
        raise ValueError(f"the template marks {marks} image(s) with {IMAGE_MARKER}; the request has {len(images)}")
    parts = []
    for i, piece in enumerate(pieces):
        if piece:
            parts.append({"type": "text", "text": piece})
        if i < len(images):
            parts.append({"type": "image", "image": images[i]})
    return parts


# ---------------------------------------------------------------------------------------------------------------
# The scorer


@dataclass
class _Answer:
    reply: str | None  # the last answer text (None: no answer came back)
    parsed: Any  # the reader's result (None when unreadable)
    error: str | None
    attempts: int


class VLMJudgeScorer(Scorer):
    """A VLM judge behind OpenAI-compatible endpoints as a scorer (registry name ``vlm_judge``); see the module
    docstring for the styles, their outputs and their sources."""

    concurrent = True  # requests go to an endpoint; its transport bounds what is in flight

    @dataclass
    class Config(ScorerConfig):
        name: str = "vlm_judge"
        style: str = "unifiedreward"  # unifiedreward | unifiedreward_edit | editscore | rationalrewards(_edit)
        endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])  # API base URLs
        model: str | None = None  # model name sent with each request; None: the first id of GET /models
        api_key_env: str = "FIRM_JUDGE_API_KEY"  # environment variable holding the API key, if any
        max_concurrency: int = 32  # HTTP requests in flight at once per call, over all endpoints
        timeout_s: float = 120.0  # limit for one HTTP request (connect + generate + read)
        max_retries: int = 3  # retries after a connection error, timeout, HTTP 408/429/5xx or a malformed reply
        backoff_s: float = 0.5  # delay before the first retry; doubles at each retry (+-25% jitter)
        backoff_max_s: float = 10.0  # cap on one retry delay
        retry_after_max_s: float = 60.0  # longest wait honoured from a Retry-After header
        parse_retries: int = 1  # ask again (at retry_temperature) when an answer cannot be read
        temperature: float = 0.0  # sampling temperature of the first attempt (0: greedy)
        retry_temperature: float = 0.7  # temperature of the parse retries
        max_tokens: int | None = None  # generation budget per request; None: the style's (see STYLES)
        passes: int = 1  # judgements per request, averaged (EditScore's num_pass); > 1 needs temperature > 0
        score_range: int = 25  # top of the 0..N scale of unifiedreward_edit / editscore (both trained on 25)
        image_labels: bool | None = None  # "<imgN>: " before each image; None: the style's (editscore: yes)
        image_format: str = "png"  # png (lossless) | jpeg (smaller requests)
        jpeg_quality: int = 95  # when image_format is jpeg
        max_image_pixels: int | None = None  # downscale larger images to this many pixels before sending
        extra_body: dict[str, Any] = field(default_factory=dict)  # merged into every request (e.g. top_p)
        prompts: dict[str, str] = field(default_factory=dict)  # template name -> file replacing FIRM's wording
        batch_size: int = 1 << 30  # the endpoint batches; max_concurrency bounds the requests in flight

        def validate(self) -> None:
            if self.style not in STYLES:
                raise ValueError(f"style must be one of {', '.join(STYLES)}, got {self.style!r}")
            if not self.endpoints:
                raise ValueError("give at least one endpoint URL in `endpoints:`")
            for url in self.endpoints:
                normalize_endpoint(url)
            if self.max_concurrency < 1 or self.max_retries < 0 or self.parse_retries < 0 or self.timeout_s <= 0:
                raise ValueError("need max_concurrency >= 1, max_retries >= 0, parse_retries >= 0 and timeout_s > 0")
            if self.max_tokens is not None and self.max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
            if self.passes < 1:
                raise ValueError(f"passes must be >= 1, got {self.passes}")
            if self.passes > 1 and self.temperature <= 0:
                raise ValueError("passes > 1 averages samples: set temperature > 0 (EditScore samples at 0.7)")
            if self.score_range <= 0:
                raise ValueError(f"score_range must be > 0, got {self.score_range}")
            if self.image_format.lower() not in ("png", "jpeg", "jpg"):
                raise ValueError(f"image_format must be png or jpeg, got {self.image_format!r}")
            unknown = sorted(set(self.prompts) - set(TEMPLATE_NAMES))
            if unknown:
                raise ValueError(f"prompts: unknown template(s) {unknown}; known: {', '.join(TEMPLATE_NAMES)}")

    def __init__(self, config: Config, *, api_key: str | None = None) -> None:
        """Nothing is connected before the first call. ``api_key`` (never a config field, so never saved) is sent as
        ``Authorization: Bearer ...``; None reads ``$<config.api_key_env>``."""
        super().__init__(config)
        config.validate()
        self.style = STYLES[config.style]
        self.outputs = self.style.outputs
        self.tasks = (self.style.task,)
        self.max_tokens = config.max_tokens or self.style.max_tokens
        self.labels = self.style.labels if config.image_labels is None else bool(config.image_labels)
        self.templates = self._templates(config.prompts)
        self.asks = style_asks(config.style, config.score_range)
        self.transport = ChatTransport.from_config(config, name=f"firm-judge-{config.style}", api_key=api_key)

    @staticmethod
    def _templates(files: dict[str, str]) -> dict[str, str]:
        out = dict(DEFAULT_TEMPLATES)
        for name, path in files.items():
            text = read_template(Path(path), f"prompts.{name}")
            required, optional, n_images = TEMPLATE_NAMES[name]
            check_template(text, f"prompts.{name}", str(path), required, required + optional)
            marks = text.count(IMAGE_MARKER)
            if marks not in (0, n_images):
                raise ValueError(f"prompts.{name} ({path}): {marks} {IMAGE_MARKER} mark(s); this prompt has {n_images}")
            out[name] = text
        return out

    def close(self) -> None:
        """Close the connection pool and stop the client's loop thread (a later call reopens them)."""
        self.transport.close()

    # ---- requests

    def _messages(self, template: str, r: EditRequest | GenRequest, images: dict[int, Image.Image]) -> list[dict]:
        """The neutral messages of one request of the template ``template`` (images already prepared)."""
        c = self.config
        if isinstance(r, EditRequest):
            values = {"instruction": r.instruction, "max_score": c.score_range}
            src, out = images[id(r.source)], images[id(r.edited)]
            shown = [src, out] if TEMPLATE_NAMES[template][2] == 2 else [out]
        else:
            values = {"prompt": r.prompt}
            shown = [images[id(r.image)]]
        text = render_template(self.templates[template], **values)
        messages = []
        system = self.templates.get(template + "_system")
        if system:
            messages.append({"role": "system", "content": [{"type": "text", "text": system}]})
        messages.append({"role": "user", "content": _content(text, shown, self.labels)})
        return messages

    def _prepared(self, requests: list[Any]) -> dict[int, Image.Image]:
        """Each distinct request image once, as sent (RGB, at most ``max_image_pixels``), by ``id`` of the original
        (the originals stay alive in ``requests`` meanwhile)."""
        out: dict[int, Image.Image] = {}
        for i, r in enumerate(requests):
            pics = (r.source, r.edited) if isinstance(r, EditRequest) else (r.image,)
            for im in pics:
                if id(im) not in out:
                    out[id(im)] = fit_pixels(im, self.config.max_image_pixels, f"request {i} image")
        return out

    async def _ask(self, sem: asyncio.Semaphore, payload: list[dict], parse: Callable[[str], Any]) -> _Answer:
        """One request, asked again while its answer cannot be read; a reply failure costs only this request."""
        c = self.config
        text, why = None, ""
        for attempt in range(1 + c.parse_retries):
            fields = {
                "messages": payload,
                "max_tokens": self.max_tokens,
                "temperature": c.temperature if attempt == 0 else c.retry_temperature,
                **c.extra_body,
            }
            try:
                reply = await self.transport.chat(sem, fields)
            except CriticReplyError as e:
                return _Answer(text, None, f"no usable reply from the endpoint: {e}", attempt + 1)
            except CriticRequestError as e:
                if e.status != 413:
                    raise
                return _Answer(text, None, f"the endpoint refused the request as too large: {e}", attempt + 1)
            text = reply.text
            try:
                return _Answer(text, parse(text), None, attempt + 1)
            except JudgeParseError as e:
                why = str(e) + (" (the answer was cut at max_tokens)" if reply.finish_reason == "length" else "")
        n = 1 + c.parse_retries
        return _Answer(text, None, f"unreadable answer after {n} attempt(s): {why}", n)

    async def _judge(self, payloads: list[list[dict]], parsers: list[Callable[[str], Any]]) -> list[_Answer]:
        """Every request at once (at most ``max_concurrency`` in flight); the first that raises cancels the rest."""
        sem = self.transport.limit()
        return await gather_all([self._ask(sem, p, f) for p, f in zip(payloads, parsers)])

    def score_batch(self, requests: list[Any]) -> Scores:
        c = self.config
        images = self._prepared(requests)
        jobs: list[tuple[int, int, str]] = []  # (request, pass, ask)
        payloads, parsers = [], []
        cache: dict = {}  # data URLs by id of the prepared image (all alive in `images`)
        for i, r in enumerate(requests):
            per_ask = {
                name: to_openai_messages(self._messages(tpl, r, images), c.image_format, c.jpeg_quality, cache)
                for name, (tpl, _) in self.asks.items()
            }
            for p in range(c.passes):
                for name, (_, parse) in self.asks.items():
                    jobs.append((i, p, name))
                    payloads.append(per_ask[name])
                    parsers.append(parse)
        answers = self.transport.run(lambda: self._judge(payloads, parsers))

        by_request: list[dict[int, dict[str, _Answer]]] = [{} for _ in requests]
        for (i, p, name), ans in zip(jobs, answers):
            by_request[i].setdefault(p, {})[name] = ans
        values = {k: torch.full((len(requests),), math.nan, dtype=torch.float32) for k in self.outputs}
        errors: list[str | None] = []
        details: list[Any] = []
        for i, passes in enumerate(by_request):
            error, per_pass = None, []
            for p in range(c.passes):
                failed = [f"{name}: {a.error}" for name, a in passes[p].items() if a.error]
                if failed:
                    error = error or f"{c.name} ({c.style})" + (f" pass {p + 1}" if c.passes > 1 else "") + ": "
                    error += "; ".join(failed)
                    continue
                per_pass.append(combine(c.style, {n: a.parsed for n, a in passes[p].items()}, c.score_range))
            if error is None:
                for k in self.outputs:
                    values[k][i] = sum(o[k] for o in per_pass) / len(per_pass)
            errors.append(error)
            answers = [{n: _shown_answer(a) for n, a in pa.items()} for _, pa in sorted(passes.items())]
            details.append({"style": c.style, "answers": answers})
        return Scores(values, errors, details)

    def __enter__(self) -> VLMJudgeScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shown_answer(a: _Answer) -> dict[str, Any]:
    """An answer as plain data for the details (logged as JSON)."""
    parsed = dict(a.parsed.__dict__) if isinstance(a.parsed, (ScoreList, RationalJudgement)) else a.parsed
    return {"reply": a.reply, "attempts": a.attempts, "parsed": parsed}
