"""Prompt templates: the one rule for every template FIRM fills, built in or read from a user's file.

A template is plain text with ``{name}`` placeholders. Each template declares its placeholder names (e.g.
``{instruction}`` for the critic's Execution prompt, ``{prompt}`` and ``{checklist}`` for instruction following);
exactly those are replaced, in one pass, and every other brace is literal text. So JSON examples in a template need
no escaping (write ``{"score": <1-5>}`` as it should appear), and a value that itself contains ``{prompt}`` is not
substituted again. A template file must contain the placeholders its judgement requires; a ``{word}`` that is not
one of the template's placeholders is left as it is, with a warning (it is usually a typo).

Used by :mod:`firm.critics.prompts` (critic templates) and :mod:`firm.curation.prompts` (teacher templates).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_WORD = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


def render_template(template: str, **values: Any) -> str:
    """Replace ``{name}`` by ``str(value)`` for each given name, in one pass; all other text is kept as it is."""
    if not values:
        return template
    pattern = re.compile(r"\{(" + "|".join(re.escape(k) for k in values) + r")\}")
    return pattern.sub(lambda m: str(values[m.group(1)]), template)


def placeholders_in(template: str, names: Iterable[str]) -> list[str]:
    """Which of ``names`` occur in ``template`` as ``{name}``."""
    return [n for n in names if "{" + n + "}" in template]


def read_template(path: str | Path, key: str) -> str:
    """The text of a template file; ``key`` (e.g. ``prompts.edit_execution``) names the setting in errors."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{key}: template file {p} not found (give a path to a text file)")
    return p.read_text(encoding="utf-8")


def check_template(
    text: str, key: str, source: str, required: Iterable[str], allowed: Iterable[str] | None = None
) -> None:
    """Check a template against its placeholders.

    Args:
        text: the template.
        key: the setting it came from (for messages), e.g. ``prompts.plan``.
        source: where it was read (a path, or ``built-in``).
        required: placeholders it must contain.
        allowed: every placeholder of this template (default: ``required``); other ``{word}`` are warned about.

    Raises:
        ValueError: a required placeholder is missing (the message names them and the file).
    """
    required = list(required)
    allowed = set(required if allowed is None else allowed) | set(required)
    missing = [f for f in required if "{" + f + "}" not in text]
    if missing:
        fields = ", ".join("{" + f + "}" for f in missing)
        raise ValueError(
            f"{key} ({source}): the template must contain {fields} (placeholders of this template: "
            f"{', '.join('{' + f + '}' for f in sorted(allowed)) or 'none'}; other braces are literal text)"
        )
    unknown = sorted({m.group(1) for m in _WORD.finditer(text)} - allowed)
    if unknown:
        log.warning(
            "%s (%s): %s %s not a placeholder of this template and stays as literal text (placeholders: %s)",
            key,
            source,
            ", ".join("{" + u + "}" for u in unknown),
            "is" if len(unknown) == 1 else "are",
            ", ".join("{" + f + "}" for f in sorted(allowed)) or "none",
        )
