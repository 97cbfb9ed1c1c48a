"""FIRM's shared vocabulary: the two tasks, the judgement dimensions, the score range and the aspect names.

A leaf module: it imports nothing but the standard library, so every layer (data, critics, policies, rewards,
algorithms, the command line) can use it. The words here are also the words on disk (shards, YAML, JSON results),
so their spellings are a file format: change them only with a migration.
"""

from __future__ import annotations

from enum import Enum

# The rubric's score range: every judgement is an integer in SCORE_MIN..SCORE_MAX, or missing (None), never a
# substitute number.
SCORE_MIN, SCORE_MAX = 1, 5


class Task(str, Enum):
    """What a model is asked to do: edit a source image, or generate an image from text.

    A ``str`` enum, so ``Task.EDIT == "edit"`` holds and YAML / JSON keep the plain words. :meth:`parse` takes the
    spellings that older files and other tools use (``generate``, ``generation``, ``t2i``) and gives the member.
    """

    EDIT = "edit"
    GEN = "gen"

    @classmethod
    def parse(cls, value: object) -> Task:
        """The task named by ``value``: a member, ``edit``, or ``gen`` / ``generate`` / ``generation`` / ``t2i``.

        Raises:
            ValueError: any other value, naming the accepted words.
        """
        if isinstance(value, cls):
            return value
        word = value.strip().lower() if isinstance(value, str) else value
        if word in _ALIASES:
            return _ALIASES[word]
        raise ValueError(f"unknown task {value!r}: use 'edit' or 'gen' (also accepted: generate, generation, t2i)")

    @property
    def schema(self) -> str:
        """The name of this task's sample schema in shards (``edit`` or ``generation``; see firm.data.schema)."""
        return "edit" if self is Task.EDIT else "generation"

    @property
    def dimensions(self) -> tuple[str, ...]:
        """The judgements a critic makes for this task, in rubric order."""
        return EDIT_DIMENSIONS if self is Task.EDIT else GEN_DIMENSIONS

    def __str__(self) -> str:  # f"{task}" gives the word, as for a plain str
        return self.value


_ALIASES = {
    "edit": Task.EDIT,
    "gen": Task.GEN,
    "generate": Task.GEN,
    "generation": Task.GEN,
    "t2i": Task.GEN,
}

# Judgement dimensions, as used in results, logs, rewards and benchmark files. Editing is judged on Execution (did the
# requested change happen) and Consistency (did anything else change); generation on Instruction following (against
# a checklist) and Quality.
EXECUTION = "execution"
CONSISTENCY = "consistency"
INSTRUCTION = "instruction"
QUALITY = "quality"
EDIT_DIMENSIONS = (EXECUTION, CONSISTENCY)
GEN_DIMENSIONS = (INSTRUCTION, QUALITY)
DIMENSIONS = (*EDIT_DIMENSIONS, *GEN_DIMENSIONS)

# Aspects of the Quality judgement of a generated image; the Quality score is their minimum.
QUALITY_ASPECTS = ("aesthetics", "technical", "structure")
# Aspects of the detailed part of a difference report (difference-first curation), in the order teachers are asked.
DIFFERENCE_ASPECTS = (
    "quantity",
    "shape_form",
    "color",
    "texture_surface",
    "position_layout",
    "size_scale",
    "text_symbols",
    "background",
    "other",
)
# Categories of checklist items (plan-then-score curation).
CHECKLIST_CATEGORIES = ("main_subject", "attributes_actions", "style_composition", "negative_constraints", "other")
