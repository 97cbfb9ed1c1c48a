"""FLUX.2 [klein] (generation), pinned to diffusers' ``Flux2KleinPipeline``.

What the pipeline does (diffusers 0.42 ``pipelines/flux2/pipeline_flux2_klein.py``), and so what this family does:

* Prompt: the user turn through the tokenizer's chat template (``add_generation_prompt=True``,
  ``enable_thinking=False``: Qwen3's empty ``<think>`` block), padded to ``max_sequence_length`` (512) tokens with the
  pad token; ``Qwen3ForCausalLM`` runs with the attention mask and the hidden states of layers 9, 18 and 27 are
  stacked on the feature axis, token by token: ``(L, 3 D)``. Every one of the 512 positions is kept, padding
  included: the transformer takes no text mask and attends to them.
* Positions: 4-D RoPE ids ``(t, h, w, l)``; text tokens are ``(0, 0, 0, i)`` (``_prepare_text_ids``), image tokens
  ``(0, i, j, 0)`` over the 2x2-patch grid (``_prepare_latent_ids``).
* Latents: ``AutoencoderKLFlux2`` latents (its distribution's mode) are patchified 2x2 into ``4 C`` channels, where
  the VAE's batch-norm running statistics normalise them, ``(z - mean) / sqrt(var + eps)``; each patch is one token.
* Timestep ``sigma`` (the pipeline passes ``t / 1000`` and the transformer multiplies by 1000); no guidance embedding
  (``guidance=None``).
* Sigmas: ``linspace(1, 1/T, T)`` shifted by the scheduler with the pipeline's *empirical* ``mu`` (a function of the
  image token count and of the number of steps, not FLUX.1's linear ``calculate_shift``).
* Guidance: classifier-free guidance ``v_u + w (v_c - v_u)`` with the empty negative prompt, only when ``w > 1`` and
  the checkpoint is not step-distilled (``model_index.json``'s ``is_distilled``: FLUX.2-klein-4B / 9B are,
  the ``-base`` checkpoints are not); a distilled checkpoint ignores the scale, as the pipeline does.
* LoRA: by default the modules FIRM-Reward's ``generation/config/nft_flux2_klein.py`` adapts: the double blocks'
  attention projections and feed-forwards, the single blocks' fused QKV/MLP input and output projections. Exports
  load with ``Flux2LoraLoaderMixin.load_lora_weights``.

The latent the sampler integrates is the normalised latent in the VAE's own layout, ``(C, H/8, W/8)``: the
pipeline's ``(4C, H/16, W/16)`` patchified latent with each 2x2 patch put back in place. The two hold the same
numbers (the normalisation is per element and the Euler step elementwise), so sampling is identical; this layout
keeps the codec's ``scale_factor`` the VAE's 8 (resolutions are multiples of 16, as for the pipeline) and lets tiny
CPU runs use pixel latents. To hand noise to the pipeline's ``latents=``, :func:`patchify` it.

Deliberate differences from the pipeline: CFG runs the negative and positive prompts as one batch of two (the
pipeline makes two transformer calls; the results agree to float rounding, see the parity test); the text encoder
computes the logits of the last position only (the pipeline computes them for all 512 and throws them away). Reference
images (the pipeline's ``image=`` for multi-reference editing) are not supported: this is a generation family.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from firm.policies.encoders import Conditioning, PromptEmbedding
from firm.policies.families.base import ModelFamily
from firm.vocab import Task

log = logging.getLogger(__name__)

HIDDEN_STATE_LAYERS = (9, 18, 27)  # Flux2KleinPipeline's text_encoder_out_layers
TIMESTEP_SCALE = 1000.0  # the scheduler's num_train_timesteps; the pipeline divides its timesteps by 1000

# FIRM-Reward generation/config/nft_flux2_klein.py (lora.target_modules), as module-name suffixes. Its pattern
# "single_transformer_blocks.*.attn.to_out*" is added per block in Flux2Klein.check: the suffix "attn.to_out" alone
# would also name the double blocks' output ModuleList, which LoRA cannot adapt.
FIRM_REWARD_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
    "attn.to_qkv_mlp_proj",
)


class Flux2Klein(ModelFamily):
    name = "flux2_klein"
    task = Task.GEN
    pipeline = "Flux2KleinPipeline"
    lora_loader = "Flux2LoraLoaderMixin"
    lora_targets = FIRM_REWARD_TARGETS  # + each single block's attn.to_out, once the transformer is known (check)
    keeps_mask = False  # the transformer takes no text mask: every prompt is max_sequence_length tokens long
    max_sequence_length = 512

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.is_distilled = False  # model_index.json's is_distilled (step-distilled checkpoints ignore CFG)
        self._warned_distilled = False

    # ------------------------------------------------------------------------------------------------ components

    def transformer_class(self) -> type:
        from diffusers import Flux2Transformer2DModel

        return Flux2Transformer2DModel

    def vae_class(self) -> type:
        from diffusers import AutoencoderKLFlux2

        return AutoencoderKLFlux2

    def block_classes(self) -> set[type]:
        from diffusers.models.transformers.transformer_flux2 import (
            Flux2SingleTransformerBlock,
            Flux2TransformerBlock,
        )

        return {Flux2TransformerBlock, Flux2SingleTransformerBlock}

    def codec(self, vae: nn.Module) -> nn.Module:
        return Flux2Codec(vae)

    def load(self, root: Path, dtype: torch.dtype) -> dict[str, Any]:
        components = super().load(root, dtype)
        # The policy loads with another instance of this family than the one it keeps (policy.load_components):
        # the pipeline's setting travels with the components and check() reads it.
        components["is_distilled"] = read_is_distilled(root)
        return components

    def load_text_encoder(self, root: Path, transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
        encoder = Flux2KleinTextEncoder.from_pretrained(
            str(root), dtype=dtype, max_sequence_length=self.config.max_sequence_length or self.max_sequence_length
        )
        want, have = transformer.config.joint_attention_dim, encoder.embed_dim
        if want != have:
            raise ValueError(
                f"{root}: the transformer takes {want}-wide text states but the text encoder stacks "
                f"{len(HIDDEN_STATE_LAYERS)} x {encoder.model.config.hidden_size} = {have}"
            )
        return encoder

    def transformer_in_channels(self, codec_channels: int) -> tuple[int, ...]:
        return (4 * codec_channels,)  # one token per 2x2 latent patch

    def check(self, components: dict[str, Any]) -> None:
        super().check(components)
        self.is_distilled = bool(components.get("is_distilled", False))
        transformer = components["transformer"]
        if transformer.config.patch_size != 1:
            raise ValueError(
                f"Flux2Klein packs 2x2 latent patches itself: transformer patch_size must be 1, got "
                f"{transformer.config.patch_size}"
            )
        singles = len(transformer.single_transformer_blocks)
        self.lora_targets = FIRM_REWARD_TARGETS + tuple(
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(singles)
        )

    def tiny_transformer(self, latent_size: int, channels: int) -> nn.Module:
        t = self.config.tiny
        axes = tuple(t.rope_axes) if len(t.rope_axes) == 4 else (t.head_dim // 4,) * 4
        if sum(axes) != t.head_dim or any(a % 2 for a in axes):
            raise ValueError(
                f"flux2_klein: the 4 RoPE axes {axes} must be even and sum to tiny.head_dim={t.head_dim} "
                "(set tiny.rope_axes to 4 even numbers, or a head_dim divisible by 8)"
            )
        return self.transformer_class()(
            patch_size=1,
            in_channels=4 * channels,
            num_layers=t.num_layers,
            num_single_layers=t.num_layers,
            attention_head_dim=t.head_dim,
            num_attention_heads=t.num_heads,
            joint_attention_dim=t.text_dim,
            axes_dims_rope=axes,
            guidance_embeds=False,
        )

    def tiny_vae(self, channels: int) -> nn.Module:
        return self.vae_class()(
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=channels,
            norm_num_groups=4,
        )

    # -------------------------------------------------------------------------------------------------- schedule

    def sigmas(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        # Flux2KleinPipeline.__call__ step 6: linspace sigmas (none when the scheduler makes its own flow sigmas),
        # the empirical mu of the packed token count and the step count, passed to set_timesteps as retrieve_timesteps
        # does (sigmas given: without num_inference_steps).
        mu = empirical_mu(self.image_seq_len(latent_shape), num_steps)
        if scheduler.config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(num_steps, mu=mu)
        else:
            scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps), mu=mu)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    # ----------------------------------------------------------------------------------------------------- model

    def forward(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"flux2_klein latents need even sides (2x2 patches), got {h}x{w}")
        p = patchify(x)  # (B, 4C, h/2, w/2)
        tokens = p.flatten(2).transpose(1, 2)  # (B, N, 4C), row-major as Flux2Pipeline._pack_latents
        device = x.device
        img_ids = latent_ids(h // 2, w // 2, device)  # (N, 4)
        txt_ids = text_ids(cond.embeds.shape[1], device)  # (L, 4)
        # Flux2KleinPipeline: timestep = (1000 sigma) / 1000 and the transformer multiplies by 1000 again
        timestep = (sigma.float() * TIMESTEP_SCALE / 1000.0).to(x.dtype)
        out = transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond.embeds,
            timestep=timestep,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=None,
            return_dict=False,
        )[0]  # (B, N, 4C_out)
        out = out.transpose(1, 2).reshape(b, -1, h // 2, w // 2)  # (B, 4C_out, h/2, w/2)
        return unpatchify(out)  # (B, C_out, h, w)

    def needs_uncond(self, scale: float) -> bool:
        # Flux2KleinPipeline.do_classifier_free_guidance: guidance_scale > 1 and not config.is_distilled
        if scale > 1.0 and self.is_distilled:
            if not self._warned_distilled:
                log.warning("guidance_scale %s is ignored: this FLUX.2 [klein] checkpoint is step-distilled", scale)
                self._warned_distilled = True
            return False
        return scale > 1.0

    # The guided velocity is the base class's batched CFG v_u + w (v_c - v_u), the pipeline's
    # `neg_noise_pred + guidance_scale * (noise_pred - neg_noise_pred)`.


# --------------------------------------------------------------------------------------------------------------------
# Formulas of the pipeline


def empirical_mu(image_seq_len: int, num_steps: int) -> float:
    """FLUX.2's dynamic-shift ``mu`` (diffusers ``pipeline_flux2.compute_empirical_mu``): two lines in the token count
    fitted at 10 and 200 steps, interpolated linearly in the step count; beyond 4300 tokens the 200-step line alone."""
    a1, b1 = 8.73809524e-05, 1.89833333  # the 10-step fit
    a2, b2 = 0.00016927, 0.45666666  # the 200-step fit
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    mu_200 = a2 * image_seq_len + b2
    mu_10 = a1 * image_seq_len + b1
    slope = (mu_200 - mu_10) / 190.0
    return float(slope * num_steps + mu_200 - 200.0 * slope)


def patchify(z: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, 4C, h/2, w/2), channel ``4c + 2dy + dx`` (Flux2Pipeline._patchify_latents)."""
    b, c, h, w = z.shape
    z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)  # (B, C, 2, 2, h/2, w/2)
    return z.reshape(b, 4 * c, h // 2, w // 2)


def unpatchify(p: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, 4C, h/2, w/2) -> (B, C, h, w) (Flux2Pipeline._unpatchify_latents)."""
    b, c4, h2, w2 = p.shape
    p = p.reshape(b, c4 // 4, 2, 2, h2, w2).permute(0, 1, 4, 2, 5, 3)  # (B, C, h/2, 2, w/2, 2)
    return p.reshape(b, c4 // 4, 2 * h2, 2 * w2)


def latent_ids(h: int, w: int, device: Any = None) -> torch.Tensor:
    """(h w, 4) RoPE ids ``(0, i, j, 0)`` of the image tokens, row-major (Flux2Pipeline._prepare_latent_ids)."""
    zero = torch.arange(1, device=device)
    return torch.cartesian_prod(zero, torch.arange(h, device=device), torch.arange(w, device=device), zero)


def text_ids(length: int, device: Any = None) -> torch.Tensor:
    """(L, 4) RoPE ids ``(0, 0, 0, i)`` of the text tokens (Flux2Pipeline._prepare_text_ids)."""
    zero = torch.arange(1, device=device)
    return torch.cartesian_prod(zero, zero, zero, torch.arange(length, device=device))


def read_is_distilled(root: Path) -> bool:
    """``is_distilled`` of a checkpoint's ``model_index.json`` (the pipeline's config; False when absent)."""
    index = Path(root) / "model_index.json"
    if not index.is_file():
        return False
    try:
        return bool(json.loads(index.read_text()).get("is_distilled", False))
    except (OSError, ValueError) as e:
        raise ValueError(f"{index}: unreadable model_index.json ({e})") from e


# --------------------------------------------------------------------------------------------------------------------
# Codec and text encoder


class Flux2Codec(nn.Module):
    """``AutoencoderKLFlux2`` with its batch-norm latent normalisation, in the VAE's (C, H/8, W/8) layout.

    The statistics live in the 2x2-patchified space (``bn`` over ``4 C`` channels): latents are patchified,
    normalised and put back (``Flux2KleinPipeline._encode_vae_image`` and the end of ``__call__``).
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        if tuple(vae.config.patch_size) != (2, 2):
            raise ValueError(f"AutoencoderKLFlux2 with patch_size {vae.config.patch_size}: expected (2, 2)")
        self.vae = vae
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = vae.config.latent_channels

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device, like.dtype)
        return mean, std  # (1, 4C, 1, 1) each

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents (B, C, h, w) -> the sampler's normalised latents (B, C, h, w)."""
        p = patchify(z)
        mean, std = self._stats(p)
        return unpatchify((p - mean) / std)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`: what ``Flux2KleinPipeline(output_type="latent")`` returns."""
        p = patchify(x)
        mean, std = self._stats(p)
        return unpatchify(p * std + mean)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mode()  # the pipeline's "argmax"
        return self.normalize(z.float())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = self.denormalize(latents.float()).to(self.vae.dtype)
        image = self.vae.decode(z).sample.float()  # [-1, 1]
        return (image / 2 + 0.5).clamp(0, 1)  # VaeImageProcessor.postprocess (denormalize)


class Flux2KleinTextEncoder(nn.Module):
    """Qwen3 over the chat template, hidden states of three layers stacked (subfolders ``text_encoder`` and
    ``tokenizer``): ``Flux2KleinPipeline._get_qwen3_prompt_embeds``."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        max_sequence_length: int = 512,
        layers: tuple[int, ...] = HIDDEN_STATE_LAYERS,
    ) -> None:
        super().__init__()
        n = model.config.num_hidden_layers
        if max(layers) > n:
            raise ValueError(
                f"the text encoder has {n} layers, but Flux2KleinPipeline stacks the hidden states of layers "
                f"{tuple(layers)} (the real Qwen3 encoders have 36)"
            )
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template: Flux2KleinPipeline formats prompts with it")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token: Flux2KleinPipeline pads prompts to max_length")
        self.model = model
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length
        self.layers = tuple(layers)
        self.embed_dim = len(self.layers) * model.config.hidden_size

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype: torch.dtype = torch.float32, max_sequence_length: int = 512
    ) -> Flux2KleinTextEncoder:
        from transformers import Qwen2TokenizerFast, Qwen3ForCausalLM

        model = Qwen3ForCausalLM.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        tokenizer = Qwen2TokenizerFast.from_pretrained(path, subfolder="tokenizer")
        return cls(model.eval(), tokenizer, max_sequence_length=max_sequence_length)

    def text(self, prompt: str) -> str:
        """The prompt as the pipeline formats it: one user turn, the assistant's turn opened, thinking off."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[Any] | None = None) -> list[PromptEmbedding]:
        if images is not None and any(im is not None for im in images):
            raise ValueError("flux2_klein is a generation family: reference images are not supported")
        tokens = self.tokenizer(
            [self.text(p) for p in prompts],
            return_tensors="pt",
            padding="max_length",
            truncation=True,
            max_length=self.max_sequence_length,
        ).to(self.model.device)
        out = self.model(
            input_ids=tokens.input_ids,
            attention_mask=tokens.attention_mask,
            output_hidden_states=True,
            use_cache=False,
            logits_to_keep=1,
        )
        states = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)  # (B, 3, L, D)
        b, k, n, d = states.shape
        embeds = states.permute(0, 2, 1, 3).reshape(b, n, k * d)  # (B, L, 3D): layer-major per token
        return [PromptEmbedding(e) for e in embeds]
