"""Critic requests, results and the protocol every critic backend implements.

A critic judges images on FIRM's 1..5 rubrics. An *edit* request is judged on Execution (did the requested change
happen) and Consistency (did anything else change); a *generation* request on Instruction following (against a
checklist) and Quality. A score that could not be obtained is ``None`` — never a default number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol, runtime_checkable

from PIL import Image

# The dimension names and the score range are FIRM's vocabulary (firm.vocab); they are re-exported here because every
# critic backend speaks in them.
from firm.vocab import (  # noqa: F401
    CONSISTENCY,
    EDIT_DIMENSIONS,
    EXECUTION,
    GEN_DIMENSIONS,
    INSTRUCTION,
    QUALITY,
    SCORE_MAX,
    SCORE_MIN,
)


@dataclass
class EditRequest:
    """Judge an edit: did ``edited`` carry out ``instruction`` on ``source``, and only that?"""

    source: Image.Image
    edited: Image.Image
    instruction: str
    key: str | None = None  # caller's id, echoed in the result
    dimensions: tuple[str, ...] = EDIT_DIMENSIONS  # which judgements to make


@dataclass
class GenRequest:
    """Judge a generated image against its prompt (and an explicit checklist when given)."""

    image: Image.Image
    prompt: str
    checklist: list[str] | None = None  # requirements to check; None lets the critic plan one
    key: str | None = None
    dimensions: tuple[str, ...] = GEN_DIMENSIONS


CriticRequest = EditRequest | GenRequest


class ErrorKind(str, Enum):
    """Why a judgement has no score (``CriticResult.error_kinds``); the message in ``errors`` says more."""

    UNPARSEABLE = "unparseable"  # the critic answered, but no valid score could be read from the answer
    NO_REPLY = "no_reply"  # no answer came back (the endpoint or model failed, after any retries)
    NO_PLAN = "no_plan"  # the planner's checklist was unusable, so Instruction could not be judged
    NOT_JUDGED = "not_judged"  # this critic does not judge that dimension for this kind of request
    CALL_FAILED = "call_failed"  # the whole critic call raised; the chunk's judgements count as missing
    OTHER = "other"  # a critic's own reason (see the message)


@dataclass
class CriticResult:
    """The critic's answer for one request.

    ``scores`` maps each judged dimension to an int in 1..5, or ``None`` when the critic's output could not be
    parsed (``errors`` then says why). ``details`` holds sub-scores, e.g. the three quality aspects.
    """

    scores: dict[str, int | None]
    reasoning: dict[str, str] = field(default_factory=dict)  # per dimension
    raw: dict[str, str] = field(default_factory=dict)  # per dimension: the model's raw output
    errors: dict[str, str] = field(default_factory=dict)  # per dimension: why the score is missing
    error_kinds: dict[str, ErrorKind] = field(default_factory=dict)  # per dimension: the kind of that failure
    details: dict[str, Any] = field(default_factory=dict)
    latency_s: float = 0.0  # wall time spent on this request
    key: str | None = None

    @property
    def complete(self) -> bool:
        """True when every judged dimension has a score."""
        return all(v is not None for v in self.scores.values())

    def missing(self) -> list[str]:
        return [k for k, v in self.scores.items() if v is None]

    def fail(self, dimension: str, kind: ErrorKind, message: str) -> None:
        """Record that ``dimension`` has no score: ``kind`` for code that counts failures, ``message`` for people."""
        self.scores[dimension] = None
        self.errors[dimension] = message
        self.error_kinds[dimension] = ErrorKind(kind)

    @classmethod
    def failed(cls, dimensions, kind: ErrorKind, message: str, key: str | None = None) -> CriticResult:
        """A result whose every dimension is missing for the same reason."""
        res = cls(scores={}, key=key)
        for d in dimensions:
            res.fail(d, kind, message)
        return res


@runtime_checkable
class Critic(Protocol):
    """Anything that scores a batch of requests: local model, HTTP client, rule critic, ..."""

    def score(self, requests: list[CriticRequest]) -> list[CriticResult]:
        """One result per request, in order. Missing scores are ``None``; transport failures raise."""
        ...


def check_score(value: Any) -> int | None:
    """``value`` as an int score if it is a whole number in 1..5, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and SCORE_MIN <= value <= SCORE_MAX:
        return value
    return None
