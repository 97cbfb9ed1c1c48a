"""Seeds and resume state of the RL step: every random draw comes from a generator seeded by stable parts.

All sampling randomness (initial noise, SDE noise, windows, timestep subsets, re-noising, minibatch order) comes from
``torch.Generator`` objects seeded by :func:`seed_of` over ``(purpose, seed, RL step, rank, ...)``, so a resumed run
draws exactly what the uninterrupted one would have. The global RNG states are saved too, for anything else.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from firm.policies.sharding import full

if TYPE_CHECKING:
    from firm.policies.policy import FlowPolicy


def seed_of(*parts: Any) -> int:
    """A stable 63-bit seed from any parts (same on every machine and run)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generator(*parts: Any, device: torch.device | str | None = None) -> torch.Generator:
    """A generator seeded by :func:`seed_of` ``(*parts)``, on ``device`` (default CPU).

    Noise drawn on the device needs no host copy; on the CPU the draws are those of a CPU generator, so CPU runs are
    unchanged. A CUDA generator gives other numbers than a CPU one with the same seed, but the same ones every run.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return torch.Generator(device=dev).manual_seed(seed_of(*parts))


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


def save_rl_state(
    checkpoint: dict,
    *,
    rl_step: int,
    policy: FlowPolicy,
    ema: dict[str, torch.Tensor] | None,
    rank_rngs: list[dict[str, Any]] | None = None,
) -> None:
    """Keep only the adapters of the state dict, and add the RL step, base fingerprint, EMA and RNG states.

    ``rank_rngs``: every rank's RNG states, in rank order (only rank 0 writes the file, so without them the other ranks
    would resume with rank 0's generators)."""
    sd = checkpoint.get("state_dict", {})
    checkpoint["state_dict"] = {k: v for k, v in sd.items() if "lora_" in k}
    checkpoint["firm_rl"] = {
        "rl_step": rl_step,
        "fingerprint": policy.base_fingerprint(),
        "ema": None if ema is None else {k: full(v.detach()).cpu() for k, v in ema.items()},  # whole when sharded
        "rng": rng_state(),
        "rank_rngs": rank_rngs,
    }


@dataclass
class RLState:
    """What an RL checkpoint restores besides the adapters and the optimizer."""

    rl_step: int
    ema: dict[str, torch.Tensor] | None  # on the CPU
    rng: dict[str, Any]  # the global RNG states, for :func:`set_rng_state` (empty: none saved)


def load_rl_state(checkpoint: dict, policy: FlowPolicy, *, rank: int = 0, world: int = 1) -> RLState:
    """Check a checkpoint against ``policy`` (same base weights, every adapter tensor present) and return its RL step,
    EMA and RNG states for the caller to restore when the time is right."""
    state = checkpoint.get("firm_rl")
    if state is None:
        raise ValueError("this checkpoint was not written by a FIRM RL module (no `firm_rl` entry)")
    fp = policy.base_fingerprint()
    if not torch.allclose(state["fingerprint"].double(), fp, rtol=1e-6, atol=1e-6):
        raise ValueError(
            "the checkpoint was trained on a different base model than policy.pretrained / policy.tiny now builds "
            f"(fingerprint {state['fingerprint'].tolist()} vs {fp.tolist()}); resume with the same policy settings"
        )
    own = {f"policy.{n}" for n, _ in policy.named_parameters() if "lora_" in n}
    missing = sorted(own - set(checkpoint.get("state_dict", {})))
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} adapter tensors, e.g. {missing[:3]}")
    rng = state.get("rng") or {}
    ranks = state.get("rank_rngs")
    if ranks and len(ranks) == world:
        rng = ranks[rank]
    elif ranks and rank > 0:
        warnings.warn(
            f"the checkpoint holds the RNG states of {len(ranks)} ranks and this run has {world}: rank {rank} resumes "
            "with rank 0's, so sampling noise drawn from the global generators will differ from the original run",
            stacklevel=2,
        )
    return RLState(rl_step=int(state["rl_step"]), ema=state.get("ema"), rng=rng)
