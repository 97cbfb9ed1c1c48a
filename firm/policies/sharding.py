"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for a :class:`~firm.policies.policy.FlowPolicy` (passed in; not
imported here, since the policy imports :func:`full` from this module).

The transformer is sharded block by block (the family's ``block_classes``), then at its root, over a 1-D data-parallel
mesh. Each parameter becomes a DTensor sharded on dim 0: the frozen base weights and the LoRA adapters (``default``,
``old``) alike, so adapter arithmetic (the old-policy decay, the EMA) stays shard-local. A block's weights are
gathered for its forward and freed after it (``reshard_after_forward``), in the rollout as in the update.

The text encoder is placed by ``policy.text_encoder``:

- ``kept``: a whole copy on every device (no communication; the encoder's memory on every GPU);
- ``sharded``: ``fully_shard`` per encoder layer. A sharded forward is a collective, so every rank must encode the
  same prompts in the same order: the cache misses of all ranks are exchanged first and each rank encodes their union;
- ``freed``: the caller fills the prompt cache with every prompt it will need, then :func:`free_text_encoder` moves
  the encoder off the device; a later cache miss is an error, never a silent re-encode.

Helpers :func:`full` and :func:`like` convert between a sharded parameter and the whole tensor a checkpoint holds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def is_sharded(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) parameter or gradient; a collective when sharded (every rank calls)."""
    return t.full_tensor() if is_sharded(t) else t


def like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, e.g. from a checkpoint) laid out as ``param``: sharded the same way, same device."""
    if is_sharded(param):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device, param.dtype), param.device_mesh, param.placements)
    return value.to(param.device, param.dtype)


def _layer_classes(model: nn.Module) -> tuple[type, ...]:
    """The repeated layer classes of an encoder: transformers' ``_no_split_modules``, else torch's encoder layer."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in names}
    if not found:
        found = {type(m) for m in model.modules() if isinstance(m, nn.TransformerEncoderLayer)}
    return tuple(found)


def _shard_tree(root: nn.Module, layer_classes: tuple[type, ...], mesh: Any, **kwargs: Any) -> int:
    from torch.distributed.fsdp import fully_shard

    n = 0
    for m in list(root.modules()):
        if m is not root and isinstance(m, layer_classes):
            fully_shard(m, mesh=mesh, **kwargs)
            n += 1
    fully_shard(root, mesh=mesh, **kwargs)
    return n


def shard_policy(policy: Any, mesh: Any, *, reshard_after_forward: bool = True) -> dict[str, int]:
    """Apply ``fully_shard`` to ``policy`` over ``mesh`` (1-D); returns the number of sharded units per component.

    ``reshard_after_forward=False`` keeps each block's gathered weights from its forward to its backward (FSDP1's
    SHARD_GRAD_OP): less communication, more memory."""
    blocks = tuple(policy.family.block_classes())
    if not blocks:
        raise ValueError(f"family {policy.family.name} declares no transformer block classes to shard")
    kw = {"reshard_after_forward": reshard_after_forward}
    out = {"transformer_blocks": _shard_tree(policy.transformer, blocks, mesh, **kw)}
    placement = policy.config.text_encoder
    if placement == "sharded":
        encoders = [m for m in policy.text_encoder.children() if any(p.numel() for p in m.parameters())]
        if not encoders:
            encoders = [policy.text_encoder]
        out["text_encoder_layers"] = sum(_shard_tree(m, _layer_classes(m), mesh, **kw) for m in encoders)
        policy.encode_collectively(mesh.get_group())
    return out


def free_text_encoder(policy: Any) -> None:
    """Release the text encoder's weights (each becomes an empty CPU tensor; the module stays, so moving the policy
    between devices still works); the prompt cache must hold every prompt, since the encoder cannot run again."""
    with torch.no_grad():
        for t in [*policy.text_encoder.parameters(), *policy.text_encoder.buffers()]:
            t.data = torch.empty(0, dtype=t.dtype)
    policy.text_encoder_freed = True


def reshard(policy: Any) -> None:
    """Free the gathered weights that no-grad forwards leave behind (the root module, and every block under
    ``SHARD_GRAD_OP``, stay gathered until a backward that never comes in the rollout), so that the sharded
    parameters are again the ones the optimizer, the old-adapter decay and checkpoints see."""
    from torch.distributed.fsdp import FSDPModule

    for m in policy.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
