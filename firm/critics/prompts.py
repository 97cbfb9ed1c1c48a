"""Critic prompt templates and their rendering into chat messages.

Five templates, one per judgement:

- ``edit_execution``   (images: source, edited; ``{instruction}``) -> JSON ``{"reasoning": ..., "score": N}``
- ``edit_consistency`` (images: source, edited; ``{instruction}``) -> JSON ``{"reasoning": ..., "score": N}``
- ``gen_instruction``  (image; ``{prompt}``, ``{checklist}``)      -> requirement-by-requirement, ``\\boxed{N}``
- ``gen_quality``      (image; ``{prompt}`` optional)              -> JSON with three aspect scores (min = Quality)
- ``planner``          (no image; ``{prompt}``)                    -> numbered checklist of requirements

Templates follow the rule of :mod:`firm.templates`: ``{name}`` placeholders, only the template's own names are
substituted, so JSON braces in the text need no escaping. Images go first in the user turn, unless the template
marks where each one goes with ``<image>``. Any template can be replaced by a file
(``prompts.edit_execution: path/to/template.txt`` in YAML), to match exactly the prompt a released critic was
trained with; a system prompt can be added the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from firm.templates import check_template, read_template, render_template

__all__ = [
    "DEFAULT_TEMPLATES",
    "IMAGE_MARKER",
    "PromptConfig",
    "PromptSet",
    "REQUIRED_FIELDS",
    "render_template",
]

IMAGE_MARKER = "<image>"

EDIT_EXECUTION = """\
You are a careful judge of image edits. The first image is the original. The second image was produced by \
applying the editing instruction below to the original.

Editing instruction: {instruction}

Judge EXECUTION only: how completely and how correctly the requested change is present in the second image. \
Do not judge whether anything else in the image changed; that is judged separately.

Score on this scale (whole numbers only):
5 - every part of the instruction is carried out, correctly and convincingly.
4 - the instruction is carried out, with a small flaw or one minor detail missing or off.
3 - the instruction is partly carried out: some of it is done, but a significant part is missing or wrong.
2 - barely carried out: only a faint trace of the requested change, or it is mostly wrong.
1 - not carried out: the requested change is absent (e.g. the image is returned unchanged) or something \
unrelated was done instead.

First look at what the instruction asks for, then check each part of it in the second image. Answer with one \
JSON object and nothing after it:
{"reasoning": "<what was asked, what you see, and why this score>", "score": <1-5>}"""

EDIT_CONSISTENCY = """\
You are a careful judge of image edits. The first image is the original. The second image was produced by \
applying the editing instruction below to the original.

Editing instruction: {instruction}

Judge CONSISTENCY only: did anything change that the instruction did not ask for? Do not judge whether the \
requested change itself succeeded; that is judged separately.

Count the unintended changes. A significant change alters an object, a person, the layout, the background or \
the style in a way a viewer would notice at once; a minor change is a small detail (a small object, a texture, \
a bit of text, a local color) that is noticeable on closer comparison.

Do NOT count as changes:
- regions revealed or hidden as a natural effect of the edit (e.g. background uncovered when an object is removed);
- small shifts in overall image quality, sharpness, noise or lighting;
- attributes of an entity that the instruction explicitly replaces (if a cat is replaced by a dog, the dog's look \
is not an inconsistency);
- direct physical consequences of the edit (shadows, reflections, or wet ground when rain is added).

Score on this scale (whole numbers only):
5 - only the requested changes were made; everything else is the same.
4 - one significant unintended change, and/or one or two minor ones.
3 - two or three significant unintended changes, and/or three or four minor ones.
2 - four or more significant unintended changes, and/or five or more minor ones.
1 - the image is almost entirely different from the original.

First compare the two images region by region and list the unintended changes you find, then answer with one \
JSON object and nothing after it:
{"reasoning": "<the unintended changes you found and how you counted them>", "score": <1-5>}"""

GEN_INSTRUCTION = """\
You are a careful judge of text-to-image generation. Check whether the image follows the prompt.

Prompt: {prompt}

Requirements to check (derived from the prompt):
{checklist}

Go through the requirements one at a time. For each, say briefly whether the image satisfies it, partly \
satisfies it, or violates it. Negative requirements ("no ...", "without ...") count like any other.

Then score instruction following on this scale (whole numbers only):
5 - everything in the prompt is right, negative constraints included.
4 - one or two non-critical details are missing or wrong; the main content is all correct.
3 - the main subject is present, but several requirements are missing or wrong.
2 - most of the main subjects are missing or wrong.
1 - the image has nothing to do with the prompt.

End your answer with the score in a box, for example \\boxed{3}, and write nothing after it."""

GEN_QUALITY = """\
You are a careful judge of image quality. The image was generated from the prompt: {prompt}

Judge the image itself, not whether it matches the prompt. Rate three aspects, each on a whole-number scale \
from 1 (very poor) to 5 (excellent):
- aesthetics: composition, color harmony, lighting and overall visual appeal;
- technical_quality: sharpness, noise, artifacts, blur, exposure and resolution;
- structure_texture: plausible anatomy and geometry (hands, faces, limbs, perspective, object shapes) and \
natural, coherent surface textures without smears or repeated patterns.

Describe the strengths and flaws you see, then answer with one JSON object and nothing after it:
{"reasoning": "<your observations>", "aesthetics": <1-5>, "technical_quality": <1-5>, "structure_texture": <1-5>}"""

PLANNER = """\
You will help judge images generated from a text prompt. Turn the prompt into a checklist of concrete, visually \
verifiable requirements: every subject and how many of it, attributes (color, size, material, pose, expression), \
spatial relations, actions, text that must appear, style, and negative constraints ("no ...", "without ...").
Keep each requirement short and checkable on its own; do not add requirements the prompt does not imply.

Prompt: {prompt}

Answer with a numbered list, one requirement per line, and nothing else."""

DEFAULT_TEMPLATES: dict[str, str] = {
    "edit_execution": EDIT_EXECUTION,
    "edit_consistency": EDIT_CONSISTENCY,
    "gen_instruction": GEN_INSTRUCTION,
    "gen_quality": GEN_QUALITY,
    "planner": PLANNER,
}

# Placeholders each template must contain, those it may contain, and how many images each judgement shows.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "edit_execution": ("instruction",),
    "edit_consistency": ("instruction",),
    "gen_instruction": ("prompt", "checklist"),
    "gen_quality": (),
    "planner": ("prompt",),
}
FIELDS: dict[str, tuple[str, ...]] = {**REQUIRED_FIELDS, "gen_quality": ("prompt",)}
NUM_IMAGES = {"edit_execution": 2, "edit_consistency": 2, "gen_instruction": 1, "gen_quality": 1, "planner": 0}


@dataclass
class PromptConfig:
    """Where to read prompt templates from; None keeps the built-in one."""

    edit_execution: str | None = None  # path to a template file for edit Execution (needs {instruction})
    edit_consistency: str | None = None  # path to a template file for edit Consistency (needs {instruction})
    gen_instruction: str | None = None  # path to a template file for instruction following ({prompt}, {checklist})
    gen_quality: str | None = None  # path to a template file for generation Quality (three aspects)
    planner: str | None = None  # path to a template file for the checklist planner (needs {prompt})
    system: str | None = None  # path to a system-prompt file sent before every judgement (None: no system turn)


def _format_checklist(items: list[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


class PromptSet:
    """The templates in use, loaded from a :class:`PromptConfig`, rendered into chat messages.

    Messages use a neutral format that both backends convert: ``[{"role": "system"|"user", "content": [{"type":
    "text", "text": ...} | {"type": "image", "image": PIL.Image}]}]``.
    """

    def __init__(self, config: PromptConfig | None = None) -> None:
        config = config or PromptConfig()
        self.templates = dict(DEFAULT_TEMPLATES)
        self.sources = dict.fromkeys(DEFAULT_TEMPLATES, "built-in")
        for name in DEFAULT_TEMPLATES:
            path = getattr(config, name)
            if path:
                self.templates[name] = read_template(path, f"prompts.{name}")
                self.sources[name] = str(path)
                self._check(name)
        self.system = read_template(config.system, "prompts.system").strip() if config.system else None

    def _check(self, name: str) -> None:
        text, src = self.templates[name], self.sources[name]
        check_template(text, f"prompts.{name}", src, REQUIRED_FIELDS[name], FIELDS[name])
        markers = text.count(IMAGE_MARKER)
        if markers not in (0, NUM_IMAGES[name]):
            raise ValueError(
                f"prompts.{name} ({src}): has {markers} {IMAGE_MARKER} markers; this judgement shows "
                f"{NUM_IMAGES[name]} image(s): use exactly that many, or none to put the images first"
            )

    def messages(self, name: str, images: list[Image.Image], **values: Any) -> list[dict]:
        """Chat messages for judgement ``name`` with its images and placeholder values."""
        if len(images) != NUM_IMAGES[name]:
            raise ValueError(f"{name} shows {NUM_IMAGES[name]} image(s), got {len(images)}")
        if isinstance(values.get("checklist"), (list, tuple)):
            values["checklist"] = _format_checklist(list(values["checklist"]))
        given = {k: v for k, v in values.items() if v is not None and k in FIELDS[name]}
        text = render_template(self.templates[name], **given)
        content: list[dict] = []
        if IMAGE_MARKER in text:
            pieces = text.split(IMAGE_MARKER)
            for i, piece in enumerate(pieces):
                if piece:
                    content.append({"type": "text", "text": piece})
                if i < len(images):
                    content.append({"type": "image", "image": images[i]})
        else:
            content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": text}]
        msgs = [{"role": "user", "content": content}]
        if self.system:
            msgs.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system}]})
        return msgs
