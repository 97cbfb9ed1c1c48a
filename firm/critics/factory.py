"""Build a critic backend from its config through the "critics" registry.

``build_component`` (any registry) lives in :mod:`firm.config`; it is re-exported here for existing imports.
"""

from __future__ import annotations

from typing import Any

from firm.config import build_component
from firm.critics.types import Critic

__all__ = ["build_component", "build_critic"]


def build_critic(config: Any) -> Critic:
    """A critic from its config: a registered backend's ``Config`` instance, or a mapping with a ``name:`` key.

    Example: ``build_critic({"name": "http", "endpoints": ["http://127.0.0.1:8000/v1"]})``.

    Raises:
        ConfigError: the name is not in the "critics" registry (the message lists the known ones), or the mapping
            has settings the backend's ``Config`` does not know or values of the wrong type.
    """
    cls, conf = build_component("critics", config, source="critic")
    return cls(conf)
