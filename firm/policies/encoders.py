"""Conditioning encoders of the flow policies, and the batch of conditioning tensors they produce.

* :class:`SD3TextEncoders` — the SD3 / SD3.5 text stack: CLIP-L and CLIP-G (penultimate hidden states, pooled
  projections) and optionally T5-XXL, combined exactly as the diffusers SD3 pipeline does.
* :class:`QwenVLTextEncoder` — Qwen2.5-VL encoding the edit instruction together with the source image, with the
  prompt template and the dropped template prefix of the Qwen-Image-Edit(-2509) pipeline.
* :class:`HashTextEncoder` — a small learned encoder for tiny CPU policies (the shapes world, tests): words are hashed
  into a fixed vocabulary, embedded and passed through a couple of transformer layers. It has no tokenizer files
  and saves / loads like a Hugging Face model (``config.json`` + ``model.safetensors``).

Every encoder maps ``(prompts, images or None)`` to a list of per-prompt :class:`PromptEmbedding`; the policy caches
them per prompt and stacks them into a :class:`Conditioning` batch.
"""

from __future__ import annotations

import json
import math
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
        image_latents: (B, C, h, w) latents of the source image (editing), or None.
    """

    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    pooled: torch.Tensor | None = None
    image_latents: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def _map(self, fn) -> Conditioning:
        return Conditioning(
            **{f.name: None if getattr(self, f.name) is None else fn(getattr(self, f.name)) for f in fields(self)}
        )

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
            image_latents=None if first.image_latents is None else torch.cat([c.image_latents for c in items]),
        )

    def with_image_latents(self, image_latents: torch.Tensor | None) -> Conditioning:
        return replace(self, image_latents=image_latents)


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


# --------------------------------------------------------------------------------------------------------------------
# SD3 / SD3.5 text stack


class SD3TextEncoders(nn.Module):
    """CLIP-L + CLIP-G (+ T5) of an SD3 / SD3.5 checkpoint (subfolders ``text_encoder``, ``_2``, ``_3``)."""

    def __init__(
        self,
        clip_l: nn.Module,
        clip_g: nn.Module,
        t5: nn.Module | None,
        tokenizers: tuple[Any, Any, Any | None],
        *,
        joint_attention_dim: int,
        max_sequence_length: int = 256,
    ) -> None:
        super().__init__()
        self.clip_l, self.clip_g, self.t5 = clip_l, clip_g, t5
        self.tokenizers = tokenizers
        self.joint_attention_dim = joint_attention_dim
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        joint_attention_dim: int,
        use_t5: bool = True,
        max_sequence_length: int = 256,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
    ) -> SD3TextEncoders:
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        kw = {"revision": revision}
        clip_l = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw)
        clip_g = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, **kw)
        tok_l = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        tok_g = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
        t5 = tok_t5 = None
        if use_t5:
            t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype, **kw)
            tok_t5 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_3", **kw)
        return cls(
            clip_l,
            clip_g,
            t5,
            (tok_l, tok_g, tok_t5),
            joint_attention_dim=joint_attention_dim,
            max_sequence_length=max_sequence_length,
        )

    def _clip(self, model: nn.Module, tokenizer: Any, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        length = min(getattr(tokenizer, "model_max_length", 77), 77)
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        out = model(ids.input_ids.to(model.device), output_hidden_states=True)
        return out.hidden_states[-2], out.text_embeds  # (B, 77, d), (B, p)

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[Any] | None = None) -> list[PromptEmbedding]:
        h_l, p_l = self._clip(self.clip_l, self.tokenizers[0], prompts)
        h_g, p_g = self._clip(self.clip_g, self.tokenizers[1], prompts)
        clip = torch.cat([h_l, h_g], dim=-1)  # (B, 77, d_l + d_g)
        if self.t5 is not None:
            ids = self.tokenizers[2](
                prompts,
                padding="max_length",
                max_length=self.max_sequence_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            )
            t5 = self.t5(ids.input_ids.to(self.t5.device))[0]  # (B, L5, d5)
        else:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5.to(clip.dtype)], dim=1)  # (B, 77 + L5, d5)
        pooled = torch.cat([p_l, p_g], dim=-1)  # (B, p_l + p_g)
        return [PromptEmbedding(embeds[i], None, pooled[i]) for i in range(len(prompts))]


# --------------------------------------------------------------------------------------------------------------------
# Qwen-Image-Edit: Qwen2.5-VL over the instruction and the source image

# The input format the Qwen-Image-Edit(-2509) transformer was trained with: a fixed system prompt whose
# `DROP_TOKENS` leading tokens are removed from the hidden states, then the picture tokens and the instruction.
QWEN_EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_EDIT_DROP_TOKENS = 64
QWEN_PICTURE = "Picture 1: <|vision_start|><|image_pad|><|vision_end|>"
QWEN_CONDITION_AREA = 384 * 384  # pixels of the source image shown to the VL encoder


def fit_area(width: int, height: int, area: int, multiple: int = 32) -> tuple[int, int]:
    """(w, h) with the aspect ratio of (width, height), about ``area`` pixels, multiples of ``multiple``."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)


class QwenVLTextEncoder(nn.Module):
    """Qwen2.5-VL of a Qwen-Image-Edit(-2509) checkpoint (subfolders ``text_encoder`` and ``processor``)."""

    def __init__(self, model: nn.Module, processor: Any) -> None:
        super().__init__()
        self.model = model
        self.processor = processor

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype: torch.dtype = torch.float32, revision: str | None = None
    ) -> QwenVLTextEncoder:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, subfolder="text_encoder", dtype=dtype, revision=revision
        )
        processor = AutoProcessor.from_pretrained(path, subfolder="processor", revision=revision)
        return cls(model, processor)

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[Any] | None = None) -> list[PromptEmbedding]:
        out = []
        for i, prompt in enumerate(prompts):  # one at a time: each source image has its own size
            image = images[i] if images is not None else None
            text = QWEN_EDIT_TEMPLATE.format((QWEN_PICTURE if image is not None else "") + prompt)
            kwargs: dict[str, Any] = {"text": [text], "padding": True, "return_tensors": "pt"}
            if image is not None:
                w, h = fit_area(*image.size, QWEN_CONDITION_AREA)
                kwargs["images"] = [image.resize((w, h))]
            inputs = self.processor(**kwargs).to(self.model.device)
            hidden = self.model(
                input_ids=inputs["input_ids"],
                attention_mask=inputs["attention_mask"],
                pixel_values=inputs.get("pixel_values"),
                image_grid_thw=inputs.get("image_grid_thw"),
                output_hidden_states=True,
            ).hidden_states[-1][0]  # (L, D)
            keep = inputs["attention_mask"][0].bool()
            states = hidden[keep][QWEN_EDIT_DROP_TOKENS:]
            out.append(PromptEmbedding(states, torch.ones(states.shape[0], dtype=torch.long, device=states.device)))
        return out
