"""The architecture of a checkpoint without its weights: its ``config.json`` files, and its modules built on the meta
device from them.

FIRM ships the configs of the checkpoints its full-size experiments train (``configs/<org>--<name>/``, the hub id with
``/`` spelled ``--``, in the diffusers layout: ``model_index.json`` and one ``<component>/config.json`` per model);
``configs/README.md`` says where each value comes from. A local diffusers-layout directory works too: only its
``model_index.json`` and ``*/config.json`` are read, never a weight file.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIGS = Path(__file__).resolve().parent / "configs"
# model_index.json entries that are not models (nothing to build, no memory on the GPU)
NOT_MODELS = ("scheduler", "tokenizer", "processor", "feature_extractor", "image_encoder", "image_processor")


@dataclass(frozen=True)
class Component:
    """One model of a checkpoint (``transformer``, ``text_encoder_2``, ``vae``, ...), as ``model_index.json`` names
    it, with its ``config.json``."""

    name: str  # the subfolder
    library: str  # diffusers | transformers
    class_name: str  # e.g. SD3Transformer2DModel, T5EncoderModel
    config: dict[str, Any]

    @property
    def is_text_encoder(self) -> bool:
        return self.name.startswith("text_encoder")


def shipped_checkpoints() -> list[str]:
    """The hub ids whose configs ship with FIRM (``org/name``)."""
    return sorted(p.name.replace("--", "/", 1) for p in CONFIGS.iterdir() if (p / "model_index.json").is_file())


def checkpoint_dir(pretrained: str) -> Path:
    """The folder with ``pretrained``'s configs: a local directory as given, else the shipped copy of a hub id.

    Raises:
        FileNotFoundError: neither exists; the message lists the shipped ones.
    """
    local = Path(pretrained).expanduser()
    if (local / "model_index.json").is_file():
        return local
    shipped = CONFIGS / pretrained.replace("/", "--", 1)
    if (shipped / "model_index.json").is_file():
        return shipped
    raise FileNotFoundError(
        f"no architecture for policy.pretrained={pretrained!r}: it is neither a local diffusers-layout directory nor "
        f"one of the checkpoints whose configs ship with FIRM ({', '.join(shipped_checkpoints())}); add its "
        f"model_index.json and */config.json under {CONFIGS}/{pretrained.replace('/', '--', 1)}/"
    )


def read_components(root: Path) -> dict[str, Component]:
    """The models of the checkpoint in ``root`` by subfolder (schedulers, tokenizers and processors left out)."""
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    out = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or name.startswith(NOT_MODELS) or entry[0] is None:
            continue
        cfg = root / name / "config.json"
        if not cfg.is_file():
            raise FileNotFoundError(f"{root}: model_index.json lists {name} but {cfg} is missing")
        out[name] = Component(name, entry[0], entry[1], json.loads(cfg.read_text(encoding="utf-8")))
    return out


def build_on_meta(component: Component, dtype: torch.dtype) -> nn.Module:
    """The component's model class built from its config on the meta device (no memory, no weights), in ``dtype``."""
    module = importlib.import_module(component.library)
    cls = getattr(module, component.class_name)
    with torch.device("meta"), quiet_diffusers():
        if component.library == "diffusers":
            model = cls.from_config(component.config)
        else:
            from transformers import AutoConfig

            config = AutoConfig.for_model(**component.config)
            model = cls(config)
        return model.to(dtype)


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' notes on keys its class ignores (``pooled_projection_dim`` in Qwen-Image's config) and on ``.to()``
    casts are about loading weights, which this does not do."""
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def read_config(root: Path, name: str) -> dict[str, Any]:
    """``root/name/config.json`` as a dict."""
    return json.loads((root / name / "config.json").read_text(encoding="utf-8"))
