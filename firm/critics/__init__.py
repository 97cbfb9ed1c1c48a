"""Critics: prompts, output parsing, and backends (local transformers, OpenAI-compatible HTTP, rule-based)."""

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
]
