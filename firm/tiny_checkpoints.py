"""Tiny random reward-model checkpoints in the real hub layouts, built on demand into a cache (nothing is downloaded).

The builders live in :mod:`firm.rewards.tiny`; this leaf module holds only their table (import strings, as
:mod:`firm.registry` does) and the cache, so that the config layer's ``${tiny_reward:NAME}`` resolver
(:mod:`firm.config`) can reach them without importing the rewards layer. ``${tiny_reward:NAME}`` (or
``NAME/SUBDIR``) builds checkpoint ``NAME`` once into ``$FIRM_TINY_CACHE`` (default ``~/.cache/firm/tiny``) and
returns its path.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from pathlib import Path

VERSION = 2  # bump when a builder changes, so that stale caches are not reused

# name -> (module, function, keyword arguments); the function writes a checkpoint under the given directory.
BUILDERS: dict[str, tuple[str, str, dict]] = {
    "pickscore": ("firm.rewards.tiny.clip", "build", {"seed": 0, "logit_scale": 4.6}),  # model/ and processor/
    "clip": ("firm.rewards.tiny.clip", "build", {"seed": 1}),
    "got_ocr": ("firm.rewards.tiny.got_ocr", "build_tiny_got_ocr", {"seed": 0}),
    "hpsv3": ("firm.rewards.tiny.qwen_vl", "build_tiny_hpsv3", {"head_scale": 20.0}),  # base/, HPSv3.safetensors
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
