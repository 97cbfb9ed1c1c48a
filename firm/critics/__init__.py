"""Critics: prompts, output parsing, and backends (local transformers, OpenAI-compatible HTTP, rule-based).

Backends are registered in the "critics" registry (``local``, ``http``; the shapes world adds a rule critic) and
built with :func:`build_critic`. Heavy backends are imported lazily: ``from firm.critics.local import LocalCritic``.
"""

from firm.critics.factory import build_component, build_critic
from firm.critics.parsing import (
    QUALITY_ASPECTS,
    ParseResult,
    explain_boxed_score,
    explain_checklist,
    explain_json_score,
    explain_quality_scores,
    parse_boxed_score,
    parse_checklist,
    parse_json_score,
    parse_quality_scores,
)
from firm.critics.prompts import DEFAULT_TEMPLATES, PromptConfig, PromptSet
from firm.critics.types import (
    CONSISTENCY,
    EDIT_DIMENSIONS,
    EXECUTION,
    GEN_DIMENSIONS,
    INSTRUCTION,
    QUALITY,
    Critic,
    CriticRequest,
    CriticResult,
    EditRequest,
    ErrorKind,
    GenRequest,
)

__all__ = [
    "CONSISTENCY",
    "DEFAULT_TEMPLATES",
    "EDIT_DIMENSIONS",
    "EXECUTION",
    "GEN_DIMENSIONS",
    "INSTRUCTION",
    "QUALITY",
    "QUALITY_ASPECTS",
    "Critic",
    "CriticRequest",
    "CriticResult",
    "ErrorKind",
    "EditRequest",
    "GenRequest",
    "ParseResult",
    "PromptConfig",
    "PromptSet",
    "build_component",
    "build_critic",
    "explain_boxed_score",
    "explain_checklist",
    "explain_json_score",
    "explain_quality_scores",
    "parse_boxed_score",
    "parse_checklist",
    "parse_json_score",
    "parse_quality_scores",
]
