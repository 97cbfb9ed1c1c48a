"""Critics: prompts, output parsing, and backends (local transformers, OpenAI-compatible HTTP, rule-based)."""

from firm.critics.factory import build_component, build_critic
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
    GenRequest,
)

__all__ = [
    "CONSISTENCY",
    "EDIT_DIMENSIONS",
    "EXECUTION",
    "GEN_DIMENSIONS",
    "INSTRUCTION",
    "QUALITY",
    "Critic",
    "CriticRequest",
    "CriticResult",
    "EditRequest",
    "GenRequest",
    "build_component",
    "build_critic",
]
