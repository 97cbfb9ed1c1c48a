"""Teacher prompt templates of the curation pipelines (our own words, carrying FIRM's rubric facts).

=====================  ================================  ========================================================
template               shows                             answer (JSON)
=====================  ================================  ========================================================
difference_report      source, edited                    ``{"obvious": [..], "detailed": {aspect: [..]}, "summary"}``
edit_evaluation        source, edited (optional)         ``{"execution": {"reasoning", "score"},
                       + instruction + report              "consistency": {"reasoning", "score"}}``
plan                   text only: prompt                 ``[{"category": .., "text": ..}, ..]``
checklist_score        image + prompt + checklist        ``{"items": [{"item", "verdict", "note"}], "reasoning",
                                                           "score"}``
rewrite_instruction    source + instruction + report     ``{"instruction": ..}``
rewrite_prompt         text: prompt + checklist verdicts ``{"prompt": ..}``
=====================  ================================  ========================================================

Quality (plan-then-score) reuses the critic's own ``gen_quality`` template (:mod:`firm.critics.prompts`), so curated
quality labels are asked for exactly as the critic will be asked. Any template can be replaced by a text file
(``prompts.<template>: path`` in the curation YAML). Templates follow the same rule as the critic's
(:mod:`firm.templates`, documented in ``docs/critics.md``): ``{name}`` placeholders, only the template's own names are
replaced, every other brace is literal (JSON examples need no escaping); a file missing a placeholder is refused.
Every template's SHA-256 goes into the manifest, so a dataset records the exact prompts that made it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from PIL import Image

from firm.templates import check_template, read_template, render_template
from firm.vocab import CHECKLIST_CATEGORIES, DIFFERENCE_ASPECTS

ASPECT_GUIDE = {
    "quantity": "objects added, removed or duplicated; changed counts",
    "shape_form": "outline, silhouette, pose or structure of an object",
    "color": "hue, saturation or brightness of an object or region",
    "texture_surface": "material, pattern, gloss, roughness",
    "position_layout": "where things are, their arrangement, orientation and spacing",
    "size_scale": "how big things are relative to each other or the frame",
    "text_symbols": "letters, numbers, signs, logos",
    "background": "setting, sky, walls, floor, environment, global lighting",
    "other": "anything that fits none of the above (style, camera, weather, ...)",
}
assert set(ASPECT_GUIDE) == set(DIFFERENCE_ASPECTS)

DIFFERENCE_REPORT = """\
You are shown two images: the first is an original picture, the second is a version of it produced by an image \
editor. Write a precise report of every visual difference between them. Do not guess what the editor was asked \
to do and do not judge quality; describe only what differs.

Work in two passes.
1. Obvious differences: the changes a viewer notices at first glance.
2. Detailed differences: go through each aspect below and list every difference you can find on closer \
comparison, including small ones. Name the object or region and say what it was before and what it is now.
{aspects}

Answer with one JSON object and nothing after it. Use an empty list for an aspect with no differences:
{"obvious": ["..."], "detailed": {{aspect_keys}}, "summary": "<one sentence>"}"""

EDIT_EVALUATION = """\
You evaluate an image edit. The editor received this instruction:

Instruction: {instruction}

A careful observer compared the original image and the edited image and wrote this report of all visual \
differences:

{report}

Using this evidence (and the images, when shown: original first, edited second), make two separate judgements.

EXECUTION - was the requested change carried out, completely and correctly?
5: everything the instruction asks for is done, correctly and convincingly.
4: done, with one small flaw or a minor detail missing.
3: partly done: a significant part of the request is missing or wrong.
2: hardly done: only a trace of the requested change, or mostly wrong.
1: not done at all (for example the image came back unchanged) or something unrelated was done.

CONSISTENCY - did anything change that the instruction did not ask for? Count the unintended differences in the \
report. A significant one is a change a viewer would notice at once (an object, a person, the layout, the \
background or the style); a minor one is a small detail noticed on closer comparison.
5: only the requested changes.
4: one significant unintended change and/or one or two minor ones.
3: two or three significant and/or three or four minor.
2: four or more significant and/or five or more minor.
1: the image is almost entirely different from the original.
These are NOT unintended changes: areas revealed or hidden because of the edit itself (background behind a \
removed object); small shifts in overall quality, sharpness or lighting; the look of an entity that the \
instruction explicitly replaces; direct physical consequences of the edit (shadows, reflections, splashes).

Answer with one JSON object and nothing after it:
{"execution": {"reasoning": "<what was asked and what the evidence shows>", "score": <1-5>}, \
"consistency": {"reasoning": "<each unintended change, significant or minor>", "score": <1-5>}}"""

PLAN = """\
Turn a text-to-image prompt into a checklist that a judge can verify by looking at a generated image.

Prompt: {prompt}

List concrete, checkable requirements in these categories:
- main_subject: every subject the prompt asks for, with how many of each;
- attributes_actions: colours, sizes, materials, poses, expressions, actions, relations between subjects, text;
- style_composition: art style, medium, viewpoint, framing, placement and layout, lighting, mood;
- negative_constraints: things the prompt rules out ("no ...", "without ...", "nothing else").
Only include what the prompt states or clearly implies; one requirement per item.

Answer with a JSON list and nothing after it:
[{"category": "main_subject", "text": "..."}, ...]"""

CHECKLIST_SCORE = """\
Judge how well the image follows its text-to-image prompt.

Prompt: {prompt}

Checklist:
{checklist}

Go through the checklist item by item and decide for each whether the image satisfies it ("yes"), satisfies it \
in part ("partly") or not at all ("no"), with a short note. Negative constraints count like every other item.

Then give the instruction-following score:
5: everything is right, negative constraints included.
4: one or two non-critical details are off; all main content is right.
3: the main subject is there, but several requirements are missing or wrong.
2: most of the main subjects are missing or wrong.
1: the image is unrelated to the prompt.

Answer with one JSON object and nothing after it:
{"items": [{"item": 1, "verdict": "yes", "note": "..."}, ...], "reasoning": "<summary of the verdicts>", \
"score": <1-5>}"""

REWRITE_INSTRUCTION = """\
We are building training data for a judge of image edits and need edits that did NOT do what they were asked. \
The image shows the original picture. An editor was asked to do this:

Instruction: {instruction}

and this is what actually changed in its output:

{report}

Write one new editing instruction for the same original picture that the edited output clearly fails: ask for \
a different change (another object, attribute, position or action) than the one that happened, so that the \
output would be judged as not carrying it out. The instruction must be natural and make sense for the picture; \
do not mention the output or this task.

Answer with one JSON object and nothing after it:
{"instruction": "..."}"""

REWRITE_PROMPT = """\
We are building training data for a judge of text-to-image models and need prompts that an image does NOT \
follow. An image was generated for this prompt:

Prompt: {prompt}

and a judge checked it against these requirements:
{verdicts}

Write one new prompt in the same style that this image clearly fails in at least one important way: change a \
main subject, a key attribute or the count, or add a requirement the image violates. Keep it natural; do not \
mention the image or this task.

Answer with one JSON object and nothing after it:
{"prompt": "..."}"""

DEFAULT_TEMPLATES: dict[str, str] = {
    "difference_report": DIFFERENCE_REPORT,
    "edit_evaluation": EDIT_EVALUATION,
    "plan": PLAN,
    "checklist_score": CHECKLIST_SCORE,
    "rewrite_instruction": REWRITE_INSTRUCTION,
    "rewrite_prompt": REWRITE_PROMPT,
}
PLACEHOLDERS: dict[str, tuple[str, ...]] = {
    "difference_report": ("aspects", "aspect_keys"),
    "edit_evaluation": ("instruction", "report"),
    "plan": ("prompt",),
    "checklist_score": ("prompt", "checklist"),
    "rewrite_instruction": ("instruction", "report"),
    "rewrite_prompt": ("prompt", "verdicts"),
}


@dataclass
class CurationPromptConfig:
    """Template files replacing the built-in teacher prompts (None keeps the built-in one)."""

    difference_report: str | None = None  # needs {aspects} and {aspect_keys}; images: source, edited
    edit_evaluation: str | None = None  # needs {instruction} and {report}
    plan: str | None = None  # needs {prompt}
    checklist_score: str | None = None  # needs {prompt} and {checklist}; image: the generated image
    rewrite_instruction: str | None = None  # needs {instruction} and {report}; image: source
    rewrite_prompt: str | None = None  # needs {prompt} and {verdicts}


def template_hash(text: str) -> str:
    """First 16 hex digits of the SHA-256 of a template's text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class CurationPrompts:
    """The templates in use and their hashes; renders them into neutral chat messages (images first)."""

    def __init__(self, config: CurationPromptConfig | None = None) -> None:
        config = config or CurationPromptConfig()
        self.templates = dict(DEFAULT_TEMPLATES)
        self.sources = dict.fromkeys(DEFAULT_TEMPLATES, "built-in")
        for name in DEFAULT_TEMPLATES:
            path = getattr(config, name)
            if path:
                text = read_template(path, f"prompts.{name}")
                check_template(text, f"prompts.{name}", str(path), PLACEHOLDERS[name])
                self.templates[name] = text
                self.sources[name] = str(path)

    def hashes(self) -> dict[str, str]:
        return {name: template_hash(t) for name, t in self.templates.items()}

    def render(self, name: str, images: list[Image.Image], **values: Any) -> list[dict]:
        if name == "difference_report":
            values = {
                "aspects": "\n".join(f"   - {a}: {ASPECT_GUIDE[a]}" for a in DIFFERENCE_ASPECTS),
                "aspect_keys": ", ".join(f'"{a}": ["..."]' for a in DIFFERENCE_ASPECTS),
                **values,
            }
        missing = [f for f in PLACEHOLDERS[name] if f not in values]
        if missing:
            raise KeyError(f"template {name!r}: no value for placeholder(s) {missing}")
        text = render_template(self.templates[name], **{f: values[f] for f in PLACEHOLDERS[name]})
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
        return [{"role": "user", "content": content}]


def format_report(report: dict | str | None) -> str:
    """A difference report as the text the evaluator and the rewriter read."""
    if report is None:
        return "(no report)"
    if isinstance(report, str):
        return report
    lines = ["Obvious differences:"]
    lines += [f"- {x}" for x in report.get("obvious", [])] or ["- none"]
    lines.append("Detailed differences:")
    any_detail = False
    for aspect in DIFFERENCE_ASPECTS:
        for x in report.get("detailed", {}).get(aspect, []):
            lines.append(f"- [{aspect}] {x}")
            any_detail = True
    if not any_detail:
        lines.append("- none")
    if report.get("summary"):
        lines.append(f"Summary: {report['summary']}")
    return "\n".join(lines)


def format_checklist(checklist: list[dict]) -> str:
    return "\n".join(f"{i}. [{c.get('category', 'other')}] {c['text']}" for i, c in enumerate(checklist, 1))


def format_verdicts(checklist: list[dict], verdicts: list[dict] | None) -> str:
    by_item = {v.get("item"): v for v in verdicts or []}
    lines = []
    for i, c in enumerate(checklist, 1):
        v = by_item.get(i, {})
        verdict = v.get("verdict", "?")
        note = f" ({v['note']})" if v.get("note") else ""
        lines.append(f"{i}. {c['text']}: {verdict}{note}")
    return "\n".join(lines)


assert set(CHECKLIST_CATEGORIES) >= {"main_subject", "attributes_actions", "style_composition", "negative_constraints"}
