"""Tiny random reward-model checkpoints in the real hub layouts, built on demand (nothing is downloaded).

Each builder writes what the real release ships (config, weights, tokenizer, processor files) at toy size, with the
real model classes, seeded; the scorers then load it through their ordinary ``from_pretrained`` path. The tests use
them, and so do the tiny CPU twins of the reward experiments, through a YAML resolver::

    rewards:
      pickscore: {name: pickscore, model: "${tiny_reward:pickscore}"}

``${tiny_reward:NAME}`` (or ``NAME/SUBDIR``) builds the checkpoint once into ``$FIRM_TINY_CACHE`` (default
``~/.cache/firm/tiny``) and returns its path. They are random models: their scores exercise the code, they mean
nothing.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path

VERSION = 1  # bump when a builder changes, so that stale caches are not reused

# name -> (module, function, keyword arguments); the function writes a checkpoint under the given directory.
BUILDERS: dict[str, tuple[str, str, dict]] = {
    "pickscore": ("firm.rewards.tiny.clip", "build", {"seed": 0, "logit_scale": 4.6}),  # model/ and processor/
    "clip": ("firm.rewards.tiny.clip", "build", {"seed": 1}),
    "got_ocr": ("firm.rewards.tiny.got_ocr", "build_tiny_got_ocr", {"seed": 0}),
    "hpsv3": ("firm.rewards.tiny.qwen2vl", "build_tiny_hpsv3", {"head_scale": 20.0}),  # base/, HPSv3.safetensors
}


def cache_root() -> Path:
    return Path(os.environ.get("FIRM_TINY_CACHE") or Path.home() / ".cache" / "firm" / "tiny").expanduser()


def tiny_checkpoint(spec: str) -> Path:
    """The directory of tiny checkpoint ``NAME`` (or its sub-directory ``NAME/SUB``), built on first use.

    Raises:
        KeyError: an unknown name (the message lists the known ones).
    """
    name, _, sub = str(spec).strip().partition("/")
    if name not in BUILDERS:
        raise KeyError(f"no tiny reward checkpoint {name!r}; known: {', '.join(sorted(BUILDERS))}")
    root = cache_root() / f"{name}-v{VERSION}"
    if not (root / ".complete").is_file():
        module, fn, kwargs = BUILDERS[name]
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root.parent))
        try:
            getattr(importlib.import_module(module), fn)(tmp, **kwargs)
            (tmp / ".complete").write_text("ok\n")
            try:
                tmp.rename(root)  # atomic: a concurrent builder of the same name loses the race harmlessly
            except OSError:
                if not (root / ".complete").is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out = root / sub if sub else root
    if not out.exists():
        raise FileNotFoundError(f"tiny reward checkpoint {name!r} has no {sub!r} (it has: {sorted(os.listdir(root))})")
    return out
