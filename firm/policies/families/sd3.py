"""SD3 / SD3.5, pinned to diffusers' ``StableDiffusion3Pipeline``.

* Conditioning: CLIP-L and CLIP-G (penultimate hidden states, pooled projections) and optionally T5-XXL, combined
  as ``StableDiffusion3Pipeline.encode_prompt`` does: CLIP states concatenated on the feature axis, zero-padded to
  T5's width, then CLIP (77 tokens) and T5 (``max_sequence_length`` tokens, 256 by default) concatenated on the
  token axis; the pooled vector is CLIP-L's and CLIP-G's projections side by side. Without T5, zeros take its place.
* Latents (B, 16, H/8, W/8) with ``(z - shift_factor) * scaling_factor``; the transformer patchifies itself.
* Timestep ``1000 * sigma``; batched CFG ``v_u + w (v_c - v_u)``; static shift (3.0 for SD3.5) via
  ``set_timesteps(num_steps)``.
* LoRA: the joint attention projections; exports load with ``SD3LoraLoaderMixin.load_lora_weights``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from firm.policies.encoders import Conditioning, PromptEmbedding
from firm.policies.families.base import KLCodec, ModelFamily, tiny_kl_vae
from firm.vocab import Task


class SD3(ModelFamily):
    name = "sd3"
    task = Task.GEN
    pipeline = "StableDiffusion3Pipeline"
    lora_loader = "SD3LoraLoaderMixin"
    keeps_mask = False  # SD3 attends to every token: prompts are padded to a fixed length
    max_sequence_length = 256

    def transformer_class(self) -> type:
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def vae_class(self) -> type:
        from diffusers import AutoencoderKL

        return AutoencoderKL

    def block_classes(self) -> set[type]:
        from diffusers.models.attention import JointTransformerBlock

        return {JointTransformerBlock}

    def codec(self, vae: nn.Module) -> nn.Module:
        return KLCodec(vae)

    def load_text_encoder(self, root: Path, transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
        c = self.config
        return SD3TextEncoders.from_pretrained(
            str(root),
            joint_attention_dim=transformer.config.joint_attention_dim,
            use_t5=c.use_t5,
            max_sequence_length=c.max_sequence_length or self.max_sequence_length,
            dtype=dtype,
        )

    def tiny_transformer(self, latent_size: int, channels: int) -> nn.Module:
        t = self.config.tiny
        inner = t.num_heads * t.head_dim
        return self.transformer_class()(
            sample_size=latent_size,
            patch_size=2,
            in_channels=channels,
            out_channels=channels,
            num_layers=t.num_layers,
            attention_head_dim=t.head_dim,
            num_attention_heads=t.num_heads,
            joint_attention_dim=t.text_dim,
            caption_projection_dim=inner,
            pooled_projection_dim=t.text_dim,
            pos_embed_max_size=max(latent_size // 2, 8),
        )

    def tiny_vae(self, channels: int) -> nn.Module:
        return tiny_kl_vae(channels)

    def forward(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return transformer(
            hidden_states=x,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            timestep=sigma * 1000.0,
            return_dict=False,
        )[0]


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
        # diffusers' SD3 pipeline: tokenizer_max_length = the CLIP tokenizer's model_max_length (77 on the hub)
        length = getattr(tokenizer, "model_max_length", 77)
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        out = model(ids.input_ids.to(model.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]  # (B, 77, d), (B, p) the projected pooled output

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
        else:  # the pipeline without text_encoder_3: zeros as long as the CLIP sequence
            t5 = clip.new_zeros(len(prompts), clip.shape[1], self.joint_attention_dim)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        embeds = torch.cat([clip, t5.to(clip.dtype)], dim=1)  # (B, 77 + L5, d5)
        pooled = torch.cat([p_l, p_g], dim=-1)  # (B, p_l + p_g)
        return [PromptEmbedding(embeds[i], None, pooled[i]) for i in range(len(prompts))]
