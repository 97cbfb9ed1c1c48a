"""Seeds and resume state of the RL step: every random draw comes from a generator seeded by stable parts.

All sampling randomness (initial noise, SDE noise, windows, timestep subsets, re-noising, minibatch order) comes from
``torch.Generator`` objects seeded by :func:`seed_of` over ``(purpose, seed, RL step, rank, ...)``, so a resumed run
draws exactly what the uninterrupted one would have. The global RNG states are saved too, for anything else.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any

import numpy as np
import torch


def seed_of(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (same on every machine and run)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: Any) -> torch.Generator:
    """A CPU generator seeded by :func:`seed_of` ``(*parts)``."""
    return torch.Generator().manual_seed(seed_of(*parts))


def rng_state() -> dict[str, Any]:
    """The global torch / python / numpy (and CUDA) RNG states, in a ``weights_only``-loadable form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved (missing entries are left alone)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(_as_tuple(state["python"]))
    if "numpy" in state:
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
