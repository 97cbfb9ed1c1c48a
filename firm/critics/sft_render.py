"""Critic SFT examples: a curated sample + a judgement -> (the critic's prompt, the answer the critic should give).

:class:`CriticSFTRenderer` is the ``renderer`` that :class:`firm.critics.sft_data.CriticSFTDataModule` uses by
default (another one can be named in its config as ``"module:Factory"``). The prompt
is exactly what a FIRM critic backend sends for that judgement (:class:`firm.critics.prompts.PromptSet`, with the
same template overrides), and the answer is written in the format that prompt asks for and that
:mod:`firm.critics.parsing` reads back:

==============  ================================  ====================================================
judgement       template                          answer
==============  ================================  ====================================================
execution       edit_execution (source, edited)   ``{"reasoning": "...", "score": N}``
consistency     edit_consistency (source, edited) ``{"reasoning": "...", "score": N}``
instruction     gen_instruction (image)           item-by-item reasoning, then ``\\boxed{N}``
quality         gen_quality (image)               ``{"reasoning": ..., "aesthetics": a, "technical_quality": t,
                                                  "structure_texture": s}``
==============  ================================  ====================================================

``answer_order`` moves the score in front of the reasoning (``score_first``: ``{"score": N, "reasoning": "..."}``,
``\\boxed{N}`` then the reasoning) or drops the reasoning (``score_only``). The parsers read all three. Score-first
answers make the score a direct function of the inputs instead of a copy of the reasoning written before it: what a
small critic trained from scratch needs to learn the judgement itself (measured in docs/faithfulness.md).
"""

from __future__ import annotations

import json
from typing import Any

from firm.critics.prompts import PromptConfig, PromptSet
from firm.critics.types import CONSISTENCY, EXECUTION, INSTRUCTION, QUALITY
from firm.vocab import QUALITY_ASPECTS

DIMENSIONS = (EXECUTION, CONSISTENCY, INSTRUCTION, QUALITY)
ANSWER_ORDERS = ("reasoning_first", "score_first", "score_only")
_EDIT = {EXECUTION: "edit_execution", CONSISTENCY: "edit_consistency"}


def checklist_texts(checklist: list | None) -> list[str] | None:
    """Checklist items as plain strings (a generation sample stores ``[{category, text}]``)."""
    if checklist is None:
        return None
    return [c["text"] if isinstance(c, dict) else str(c) for c in checklist]


def format_answer(
    dimension: str,
    score: int,
    reasoning: str,
    aspects: dict[str, int] | None = None,
    order: str = "reasoning_first",
) -> str:
    """The critic's answer for one judgement, in the format its prompt asks for (``order``: see the module doc)."""
    if order not in ANSWER_ORDERS:
        raise ValueError(f"unknown answer order {order!r}; known: {', '.join(ANSWER_ORDERS)}")
    reasoning = "" if order == "score_only" else (reasoning or "").strip()
    if dimension in _EDIT:
        if order == "reasoning_first":
            return json.dumps({"reasoning": reasoning, "score": int(score)}, ensure_ascii=False)
        body = {"score": int(score), **({"reasoning": reasoning} if reasoning else {})}
        return json.dumps(body, ensure_ascii=False)
    if dimension == INSTRUCTION:
        box = f"\\boxed{{{int(score)}}}"
        if not reasoning:
            return box
        return f"{box}\n\n{reasoning}" if order == "score_first" else f"{reasoning}\n\n{box}"
    if dimension == QUALITY:
        if not aspects or set(aspects) != set(QUALITY_ASPECTS):
            raise ValueError(f"a quality answer needs the three aspect scores, got {aspects!r}")
        return json.dumps(
            {
                "reasoning": reasoning,
                "aesthetics": int(aspects["aesthetics"]),
                "technical_quality": int(aspects["technical"]),
                "structure_texture": int(aspects["structure"]),
            },
            ensure_ascii=False,
        )
    raise ValueError(f"unknown judgement {dimension!r}; known: {', '.join(DIMENSIONS)}")


class CriticSFTRenderer:
    """``render(sample, dimension) -> (messages, answer)`` or None when the sample has no usable label for it.

    Args:
        prompts: template overrides (paths), as in a critic backend's ``prompts:`` section, so the critic is
            trained on exactly the prompts it will be served with.
        require_reasoning: skip judgements whose reasoning is empty (a bare score teaches the critic to answer
            without reasons).
        answer_order: ``reasoning_first`` (the released FIRM formats), ``score_first`` or ``score_only``.
    """

    def __init__(
        self,
        prompts: dict[str, Any] | PromptConfig | None = None,
        require_reasoning: bool = True,
        answer_order: str = "reasoning_first",
    ) -> None:
        if isinstance(prompts, dict):
            prompts = PromptConfig(**prompts)
        if answer_order not in ANSWER_ORDERS:
            raise ValueError(f"answer_order must be one of {', '.join(ANSWER_ORDERS)}, got {answer_order!r}")
        self.prompt_set = PromptSet(prompts)
        self.require_reasoning = require_reasoning
        self.answer_order = answer_order

    def __call__(self, sample: dict, dimension: str) -> tuple[list[dict], str] | None:
        schema = sample.get("__schema__") or ("edit" if "edited" in sample else "generation")
        if dimension in _EDIT:
            if schema != "edit":
                return None
            score, reasoning = sample.get(dimension), sample.get(f"{dimension}_reasoning") or ""
            if score is None or (self.require_reasoning and not reasoning.strip()):
                return None
            msgs = self.prompt_set.messages(
                _EDIT[dimension], [sample["source"], sample["edited"]], instruction=sample["instruction"]
            )
            return msgs, format_answer(dimension, score, reasoning, order=self.answer_order)
        if dimension not in (INSTRUCTION, QUALITY):
            raise ValueError(f"unknown judgement {dimension!r}; known: {', '.join(DIMENSIONS)}")
        if schema != "generation":
            return None
        score, reasoning = sample.get(dimension), sample.get(f"{dimension}_reasoning") or ""
        if score is None or (self.require_reasoning and not reasoning.strip()):
            return None
        if dimension == INSTRUCTION:
            checklist = checklist_texts(sample.get("checklist"))
            if not checklist:
                return None  # the instruction prompt judges against an explicit checklist
            msgs = self.prompt_set.messages(
                "gen_instruction", [sample["image"]], prompt=sample["prompt"], checklist=checklist
            )
            return msgs, format_answer(INSTRUCTION, score, reasoning, order=self.answer_order)
        aspects = sample.get("quality_aspects")
        if not aspects:
            return None
        msgs = self.prompt_set.messages("gen_quality", [sample["image"]], prompt=sample["prompt"])
        return msgs, format_answer(QUALITY, score, reasoning, aspects)
