"""Qwen-Image (generation), pinned to diffusers' ``QwenImagePipeline``; also the parts Qwen-Image-Edit shares.

* Conditioning: Qwen2.5-VL's last hidden states over the pipeline's prompt template, with the template's first 34
  tokens dropped, at most ``max_sequence_length`` (512) tokens kept, and a token mask.
* Latents: ``AutoencoderKLQwenImage`` (a video VAE used with one frame), normalised per channel by the config's
  ``latents_mean`` / ``latents_std``; 2x2 patches are packed into tokens for the transformer.
* Timestep ``sigma``; sigmas ``linspace(1, 1/T, T)`` with the dynamic shift of the image token count.
* Guidance: the pipeline's *true* CFG, ``comb = v_u + w (v_c - v_u)`` rescaled per token to the norm of ``v_c``
  (``guidance_scale`` here is the pipeline's ``true_cfg_scale``).
* LoRA: the joint attention projections; exports load with ``QwenImageLoraLoaderMixin.load_lora_weights``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from firm.policies.encoders import Conditioning, PromptEmbedding
from firm.policies.families.base import ModelFamily, pack_latents, unpack_latents
from firm.vocab import Task

# QwenImagePipeline's prompt template; its first 34 tokens (the system turn) are dropped from the hidden states.
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWEN_IMAGE_DROP_TOKENS = 34
QWEN_TOKENIZER_MAX_LENGTH = 1024  # the pipelines' tokenizer_max_length (tokens after the dropped template prefix)


class QwenImage(ModelFamily):
    name = "qwen_image"
    task = Task.GEN
    pipeline = "QwenImagePipeline"
    lora_loader = "QwenImageLoraLoaderMixin"
    keeps_mask = True
    max_sequence_length = 512

    def transformer_class(self) -> type:
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel

    def vae_class(self) -> type:
        from diffusers import AutoencoderKLQwenImage

        return AutoencoderKLQwenImage

    def block_classes(self) -> set[type]:
        from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

        return {QwenImageTransformerBlock}

    def codec(self, vae: nn.Module) -> nn.Module:
        return QwenVAECodec(vae)

    def load_text_encoder(self, root: Path, transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
        return QwenImageTextEncoder.from_pretrained(
            str(root), dtype=dtype, max_sequence_length=self.config.max_sequence_length or self.max_sequence_length
        )

    def transformer_in_channels(self, codec_channels: int) -> tuple[int, ...]:
        return (4 * codec_channels,)

    def tiny_transformer(self, latent_size: int, channels: int, in_factor: int = 1) -> nn.Module:
        t = self.config.tiny
        if sum(t.rope_axes) != t.head_dim:
            raise ValueError(f"tiny.rope_axes {t.rope_axes} must sum to tiny.head_dim={t.head_dim} for qwen")
        return self.transformer_class()(
            patch_size=2,
            in_channels=channels * 4 * in_factor,
            out_channels=channels,
            num_layers=t.num_layers,
            attention_head_dim=t.head_dim,
            num_attention_heads=t.num_heads,
            joint_attention_dim=t.text_dim,
            axes_dims_rope=tuple(t.rope_axes),
        )

    def tiny_vae(self, channels: int) -> nn.Module:
        return self.vae_class()(
            base_dim=8,
            z_dim=channels,
            dim_mult=[1, 2],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False],
            latents_mean=[0.0] * channels,
            latents_std=[1.0] * channels,
        )

    def sigmas(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return self.linspace_sigmas(scheduler, num_steps, latent_shape)

    def forward(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return qwen_forward(transformer, x, sigma, cond, sources=())

    def combine(self, v_u: torch.Tensor, v_c: torch.Tensor, scale: float) -> torch.Tensor:
        return true_cfg(v_u, v_c, scale)


def true_cfg(v_u: torch.Tensor, v_c: torch.Tensor, scale: float) -> torch.Tensor:
    """The Qwen-Image pipelines' guidance: CFG, then each 2x2-patch token rescaled to the norm of the conditional
    velocity's token (diffusers ``QwenImagePipeline.__call__``)."""
    h, w = v_c.shape[-2:]
    comb = pack_latents(v_u + scale * (v_c - v_u))  # (B, N, 4C)
    cond_norm = torch.linalg.vector_norm(pack_latents(v_c), dim=-1, keepdim=True)
    comb_norm = torch.linalg.vector_norm(comb, dim=-1, keepdim=True)
    return unpack_latents(comb * (cond_norm / comb_norm), h, w)


def qwen_forward(
    transformer: nn.Module,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Conditioning,
    sources: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """The Qwen-Image transformer call: packed target tokens, then each source image's tokens (editing), with their
    (frame, h, w) shapes for the RoPE; the velocity of the target tokens, unpacked to (B, C_out, h, w)."""
    b, _, h, w = x.shape
    tokens = [pack_latents(x)]  # (B, N, 4C)
    shapes = [(1, h // 2, w // 2)]  # target first: with zero_cond_t (Edit-2511) the entries after it get timestep 0
    for src in sources:  # (B, C, h_s, w_s) each
        tokens.append(pack_latents(src.to(x.dtype)))
        shapes.append((1, src.shape[2] // 2, src.shape[3] // 2))
    n = tokens[0].shape[1]
    if getattr(transformer.config, "guidance_embeds", False):
        raise ValueError("a guidance-distilled Qwen-Image transformer (guidance_embeds) is not supported")
    out = transformer(
        hidden_states=torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0],
        encoder_hidden_states=cond.embeds,
        encoder_hidden_states_mask=cond.mask,
        timestep=sigma,
        img_shapes=[shapes] * b,
        return_dict=False,
    )[0]
    return unpack_latents(out[:, :n], h, w)


class QwenVAECodec(nn.Module):
    """``AutoencoderKLQwenImage`` (a video VAE used with one frame) with per-channel mean / std normalisation."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale_factor = 2 ** len(vae.config.temperal_downsample)
        self.channels = vae.config.z_dim
        self.register_buffer("mean", torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(vae.config.latents_std).view(1, -1, 1, 1), persistent=False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = (images * 2 - 1).to(self.vae.dtype)[:, :, None]  # (B, 3, 1, H, W)
        z = self.vae.encode(x).latent_dist.mode()[:, :, 0].float()  # (B, C, h, w)
        return (z - self.mean) / self.std

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = (latents.float() * self.std + self.mean).to(self.vae.dtype)[:, :, None]  # (B, C, 1, h, w)
        return ((self.vae.decode(z).sample[:, :, 0].float() + 1) / 2).clamp(0, 1)


def masked_rows(hidden: torch.Tensor, mask: torch.Tensor, drop: int) -> list[torch.Tensor]:
    """Each row's real tokens (mask 1) with the first ``drop`` removed: (L_i, D) per row."""
    return [h[m.bool()][drop:] for h, m in zip(hidden, mask)]


class QwenImageTextEncoder(nn.Module):
    """Qwen2.5-VL over the Qwen-Image prompt template (subfolders ``text_encoder`` and ``tokenizer``)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_sequence_length: int = 512) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype: torch.dtype = torch.float32, max_sequence_length: int = 512
    ) -> QwenImageTextEncoder:
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        return cls(model, tokenizer, max_sequence_length=max_sequence_length)

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[Any] | None = None) -> list[PromptEmbedding]:
        texts = [QWEN_IMAGE_TEMPLATE.format(p) for p in prompts]
        tokens = self.tokenizer(
            texts,
            max_length=QWEN_TOKENIZER_MAX_LENGTH + QWEN_IMAGE_DROP_TOKENS,
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(self.model.device)
        hidden = self.model(
            input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, output_hidden_states=True
        ).hidden_states[-1]  # (B, L, D)
        rows = masked_rows(hidden, tokens.attention_mask, QWEN_IMAGE_DROP_TOKENS)
        return [_embedding(r[: self.max_sequence_length]) for r in rows]


def _embedding(states: torch.Tensor) -> PromptEmbedding:
    return PromptEmbedding(states, torch.ones(states.shape[0], dtype=torch.long, device=states.device))
