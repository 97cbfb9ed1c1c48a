"""Conditioning encoders of the flow policies, and the batch of conditioning tensors they produce.

The encoders of real checkpoints live with their model family (:mod:`firm.policies.families`). Here:

* :class:`HashTextEncoder` — a small learned encoder for tiny CPU policies (the shapes world, tests): words are hashed
  into a fixed vocabulary, embedded and passed through a couple of transformer layers. It has no tokenizer files
  and saves / loads like a Hugging Face model (``config.json`` + ``model.safetensors``).

Every encoder maps ``(prompts, images or None)`` to a list of per-prompt :class:`PromptEmbedding`; the policy caches
them per prompt and stacks them into a :class:`Conditioning` batch.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class PromptEmbedding:
    """One prompt's conditioning: token states (L, D), an optional token mask (L,), an optional pooled vector (P,)."""

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None

    def to(self, device: Any) -> PromptEmbedding:
        return PromptEmbedding(*(None if t is None else t.to(device) for t in (self.embeds, self.mask, self.pooled)))


@dataclass
class Conditioning:
    """A batch of conditioning tensors.

    Attributes:
        embeds: (B, L, D) text (or text + image) token states.
        mask: (B, L) int64 1 for real tokens, 0 for padding; None when every token is real.
        pooled: (B, P) pooled embedding (SD3), or None.
        image_latents: (B, C, h, w) latents of the source image (editing), a tuple of them (one per source image
            position), or None.
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    image_latents: torch.Tensor | tuple[torch.Tensor, ...] | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> Conditioning:
        def apply(value: Any) -> Any:
            if value is None:
                return None
            return tuple(fn(v) for v in value) if isinstance(value, tuple) else fn(value)

        return Conditioning(**{f.name: apply(getattr(self, f.name)) for f in fields(self)})

    def index(self, idx: torch.Tensor | slice | list[int]) -> Conditioning:
        """Rows ``idx`` of every tensor."""
        return self._map(lambda t: t[idx])

    def to(self, device: Any, dtype: torch.dtype | None = None) -> Conditioning:
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)

        return self._map(move)

    @staticmethod
    def cat(items: list[Conditioning]) -> Conditioning:
        """Concatenate along the batch (token sequences padded to the longest, masks made explicit)."""
        first = items[0]
        length = max(c.embeds.shape[1] for c in items)

        def pad_tokens(c: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
            b, n, d = c.embeds.shape
            mask = c.mask if c.mask is not None else torch.ones(b, n, dtype=torch.long, device=c.embeds.device)
            if n < length:
                c_emb = torch.cat([c.embeds, c.embeds.new_zeros(b, length - n, d)], dim=1)
                mask = torch.cat([mask, mask.new_zeros(b, length - n)], dim=1)
                return c_emb, mask
            return c.embeds, mask

        padded = [pad_tokens(c) for c in items]
        any_mask = any(c.mask is not None for c in items) or any(c.embeds.shape[1] < length for c in items)
        return Conditioning(
            embeds=torch.cat([p[0] for p in padded]),
            mask=torch.cat([p[1] for p in padded]) if any_mask else None,
            pooled=None if first.pooled is None else torch.cat([c.pooled for c in items]),
            image_latents=_cat_latents([c.image_latents for c in items]),
        )

    def with_image_latents(self, image_latents: torch.Tensor | tuple[torch.Tensor, ...] | None) -> Conditioning:
        return replace(self, image_latents=image_latents)


def _cat_latents(values: list[Any]) -> Any:
    """Concatenate source latents along the batch: tensors, or tuples of tensors position by position."""
    if values[0] is None:
        return None
    if isinstance(values[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*values))
    return torch.cat(values)


def stack_embeddings(items: list[PromptEmbedding], *, keep_mask: bool, pad_to: int | None = None) -> Conditioning:
    """Per-prompt embeddings as a batch; token sequences are right-padded with zeros (mask 0).

    Args:
        items: per-prompt embeddings.
        keep_mask: always return the mask (models that take one); else only when some token is padding.
        pad_to: pad to this many tokens (at least), so that a prompt's batch row does not depend on the other
            prompts of the batch (models without a mask attend to the padding).
    """
    length = max(max(e.embeds.shape[0] for e in items), pad_to or 0)
    dim = items[0].embeds.shape[1]
    embeds = items[0].embeds.new_zeros(len(items), length, dim)
    mask = torch.zeros(len(items), length, dtype=torch.long, device=embeds.device)
    for i, e in enumerate(items):
        n = e.embeds.shape[0]
        embeds[i, :n] = e.embeds
        mask[i, :n] = 1 if e.mask is None else e.mask.to(torch.long)
    pooled = None if items[0].pooled is None else torch.stack([e.pooled for e in items])
    if not keep_mask and bool(mask.all()):
        mask = None
    return Conditioning(embeds=embeds, mask=mask, pooled=pooled)


# --------------------------------------------------------------------------------------------------------------------
# Tiny learned encoder (CPU policies)


class HashTextEncoder(nn.Module):
    """Words hashed into ``vocab_size`` buckets -> embeddings -> ``num_layers`` transformer layers.

    Token 0 is padding and token 1 a begin token that every prompt starts with (so the empty prompt of
    classifier-free guidance still has one token). Words are lower-cased runs of letters and digits; a word's id is
    ``2 + crc32(word) % (vocab_size - 2)``, stable across runs and machines. The pooled vector is the masked mean of
    the output states, projected to ``pooled_dim``.
    """

    @dataclass
    class Config:
        vocab_size: int = 1024  # hash buckets (2 are reserved: padding and the begin token)
        dim: int = 32  # token state width (the transformer's joint_attention_dim)
        pooled_dim: int = 32  # pooled vector width (SD3's pooled_projection_dim)
        max_length: int = 32  # tokens kept per prompt, begin token included
        num_layers: int = 1  # transformer encoder layers
        num_heads: int = 2  # attention heads

    WORD = re.compile(r"[a-z0-9]+")

    def __init__(self, config: Config | None = None) -> None:
        super().__init__()
        self.config = c = config or self.Config()
        if c.vocab_size < 3:
            raise ValueError("HashTextEncoder: vocab_size must be >= 3")
        self.tok = nn.Embedding(c.vocab_size, c.dim)
        self.pos = nn.Embedding(c.max_length, c.dim)
        layer = nn.TransformerEncoderLayer(c.dim, c.num_heads, 4 * c.dim, dropout=0.0, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, c.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        self.pool = nn.Linear(c.dim, c.pooled_dim)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) token ids and (B, L) int64 mask."""
        c = self.config
        rows = []
        for p in prompts:
            words = self.WORD.findall(p.lower())
            ids = [1] + [2 + zlib.crc32(w.encode()) % (c.vocab_size - 2) for w in words]
            rows.append(ids[: c.max_length])
        length = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        return ids, mask

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) ids and mask -> states (B, L, dim), pooled (B, pooled_dim)."""
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.tok(ids) + self.pos(pos)[None]
        h = self.norm(self.layers(h, src_key_padding_mask=mask == 0))
        m = mask.to(h.dtype)[..., None]
        pooled = self.pool((h * m).sum(1) / m.sum(1).clamp_min(1.0))
        return h * m, pooled

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[Any] | None = None) -> list[PromptEmbedding]:
        device = self.tok.weight.device
        ids, mask = self.tokenize(prompts)
        h, pooled = self(ids.to(device), mask.to(device))
        out = []
        for i in range(len(prompts)):
            n = int(mask[i].sum())
            out.append(PromptEmbedding(h[i, :n], torch.ones(n, dtype=torch.long, device=device), pooled[i]))
        return out

    def save_pretrained(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"class": "HashTextEncoder", **vars(self.config)}, indent=2))
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(d / "model.safetensors"))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> HashTextEncoder:
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"{d}: no config.json of a HashTextEncoder")
        conf = json.loads((d / "config.json").read_text())
        if conf.pop("class", None) != "HashTextEncoder":
            raise ValueError(f"{d}/config.json does not describe a HashTextEncoder")
        model = cls(cls.Config(**conf))
        model.load_state_dict(load_file(str(d / "model.safetensors")))
        return model


def is_hash_encoder_dir(directory: Path) -> bool:
    cfg = directory / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("class") == "HashTextEncoder"
    except (OSError, ValueError):
        return False
