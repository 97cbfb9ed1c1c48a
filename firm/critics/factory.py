"""Build a critic backend from its config through the "critics" registry."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from firm.critics.types import Critic
from firm.registry import resolve


def build_critic(config: Any) -> Critic:
    """A critic from its config: a registered backend's ``Config`` instance, or a mapping with a ``name:`` key.

    Example: ``build_critic({"name": "http", "endpoints": ["http://127.0.0.1:8000/v1"]})``.

    Raises:
        KeyError: the name is not in the "critics" registry (the message lists the known ones).
        ValueError: the mapping has settings the backend's ``Config`` does not know.
    """
    cls, conf = build_component("critics", config)
    return cls(conf)


def build_component(registry: str, config: Any) -> tuple[type, Any]:
    """(class, its ``Config`` instance) for a registered component given as a ``Config`` or a mapping with ``name``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        cls = resolve(registry, config.name)
        return cls, config
    if isinstance(config, str):
        config = {"name": config}
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    if not isinstance(config, Mapping) or "name" not in config:
        raise ValueError(f"{registry}: expected a Config dataclass or a mapping with a `name:` key, got {config!r}")
    cls = resolve(registry, str(config["name"]))
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(f"{registry} {config['name']!r}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    return cls, cls.Config(**dict(config))
