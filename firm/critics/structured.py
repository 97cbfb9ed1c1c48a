"""Structured outputs: constrain a served critic's answer to the format its judgement's parser reads.

With constrained decoding the server only lets the model write answers of a given shape, so an answer that the
parsers cannot read (a missing score, a score of 7, prose after the JSON) cannot happen. The shapes are those the
built-in templates ask for (:mod:`firm.critics.prompts`):

- Execution / Consistency: ``{"reasoning": str, "score": 1..5}`` (a JSON schema);
- Quality: ``{"reasoning": str, "aesthetics": 1..5, "technical_quality": 1..5, "structure_texture": 1..5}``;
- Instruction: free text ending in ``\\boxed{N}``, N in 1..5 (a regular expression);
- the planner's checklist is not constrained.

``reasoning`` comes first in each schema: constrained decoders write properties in schema order, so the model
reasons before it scores. Two ways to send a constraint (``HTTPCritic.Config.structured_outputs``):

- ``vllm``: vLLM's ``structured_outputs`` request field, ``{"json": schema}`` or ``{"regex": pattern}`` (vLLM >= 0.11;
  older releases called these ``guided_json`` / ``guided_regex``, pass them through ``extra_body`` there);
- ``response_format``: OpenAI's ``{"type": "json_schema", ...}``, understood by OpenAI, vLLM and SGLang; it cannot
  express the Instruction judgement's boxed answer, which is then sent unconstrained.

A template replaced by a file that asks for another answer format must not be combined with these constraints.
"""

from __future__ import annotations

from typing import Any

from firm.critics.types import CONSISTENCY, EXECUTION, INSTRUCTION, QUALITY

MODES = ("off", "vllm", "response_format")

_SCORE = {"type": "integer", "enum": [1, 2, 3, 4, 5]}


def _object(**scores: dict) -> dict:
    props = {"reasoning": {"type": "string"}, **scores}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


JUDGEMENT_SCHEMA = _object(score=_SCORE)
QUALITY_SCHEMA = _object(aesthetics=_SCORE, technical_quality=_SCORE, structure_texture=_SCORE)
# Any text, then the score in a box as the last thing written.
BOXED_REGEX = r"[\s\S]*\\boxed\{[1-5]\}"

SCHEMAS: dict[str, dict] = {EXECUTION: JUDGEMENT_SCHEMA, CONSISTENCY: JUDGEMENT_SCHEMA, QUALITY: QUALITY_SCHEMA}
REGEXES: dict[str, str] = {INSTRUCTION: BOXED_REGEX}


def request_fields(dimension: str, mode: str) -> dict[str, Any]:
    """The request-body fields that constrain the answer of a ``dimension`` judgement (``{}``: unconstrained).

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`.
    """
    if mode not in MODES:
        raise ValueError(f"structured_outputs must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "off":
        return {}
    schema = SCHEMAS.get(dimension)
    if mode == "response_format":
        if schema is None:
            return {}
        return {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": f"firm_{dimension}", "schema": schema, "strict": True},
            }
        }
    if schema is not None:
        return {"structured_outputs": {"json": schema}}
    if dimension in REGEXES:
        return {"structured_outputs": {"regex": REGEXES[dimension]}}
    return {}
