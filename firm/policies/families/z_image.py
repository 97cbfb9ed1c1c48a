"""Z-Image / Z-Image-Turbo, pinned to diffusers' ``ZImagePipeline`` (diffusers/pipelines/z_image/pipeline_z_image.py).

What the pipeline does, and so what this family does:

* Conditioning (``ZImagePipeline._encode_prompt``): each prompt becomes one user turn of the tokenizer's own chat
  template (``apply_chat_template(..., tokenize=False, add_generation_prompt=True, enable_thinking=True)``), is
  tokenised padded to ``max_sequence_length`` (512) tokens with truncation, and goes through Qwen3 (``Qwen3Model``);
  the features are the **second-to-last** hidden states (``hidden_states[-2]``) of the real tokens only, so every
  prompt keeps its own length (no padding tokens, nothing dropped from the template). The transformer takes the
  captions as a list of (L_i, D) tensors; FIRM stacks them with a token mask and unstacks them in ``forward``.
* Latents: the FLUX-style ``AutoencoderKL`` (16 channels, 8x) with ``(z - shift_factor) * scaling_factor``; the
  sampler state is (B, 16, H/8, W/8), the pipeline's own latent layout. ``ZImageTransformer2DModel`` takes a list of
  per-sample (C, F=1, h, w) latents and patchifies them itself (2x2 patches, position ids from the caption length).
* Time: the transformer's time runs the other way (0 = noise, 1 = clean). The pipeline calls it with
  ``timestep = (1000 - 1000 sigma) / 1000`` (i.e. ``1 - sigma``) and steps the scheduler with the *negated* output,
  so FIRM's velocity (``x_next = x + (sigma_next - sigma) v``, sigma from 1 to 0) is ``-transformer(...)``.
* Sigmas: ``linspace(1, 1/T, T)`` (``get_default_z_image_sigmas``) through ``set_timesteps(sigmas=..., mu=...)``,
  ``mu`` from the image token count (``calculate_shift``); the scheduler only uses ``mu`` when its config asks for
  dynamic shifting. Z-Image-Turbo's scheduler has a static ``shift: 3.0`` and no dynamic shifting.
* Guidance (``ZImagePipeline.__call__``): one batched pass over ``[positive..., negative...]`` and, per sample,
  ``pred = pos + g (pos - neg)``; optionally (``cfg_normalization`` > 0) ``pred`` is scaled down to at most
  ``cfg_normalization * |pos|`` (whole-sample L2 norms), and guidance is switched off at the steps whose
  ``1 - sigma`` exceeds ``cfg_truncation``. Pipeline defaults: ``cfg_normalization=False``, ``cfg_truncation=1.0``
  (never truncates); they are this family's class attributes.
* LoRA: FIRM-Reward's Z-Image-Turbo targets (``generation/config/nft_zimage_turbo.py``): the attention projections
  ``to_q, to_k, to_v, to_out.0`` and the SwiGLU feed-forward ``w1, w2, w3`` of every block (main layers and the
  noise / context refiners); exports load with ``ZImageLoraLoaderMixin.load_lora_weights``.

Deliberate differences from the pipeline's interface (not its numbers):

* ``guidance_scale`` here is FIRM's classifier-free guidance weight ``w`` (1 = off, ``v_u + w (v_c - v_u)``), as for
  every other family and as FIRM-Reward's Z-Image trainer uses it (``guidance_scale <= 1`` skips the negative pass).
  ``ZImagePipeline`` writes the same combination as ``pos + g (pos - neg)`` with ``g = w - 1`` (0 = off; its
  ``__call__`` default is 5, Z-Image-Turbo is run at 0). So FIRM ``guidance_scale = w`` is the pipeline's
  ``guidance_scale = w - 1``; with the pipeline's scale passed unchanged the results differ (the test checks it).
* The pipeline decides truncation once per step; FIRM decides it per sample (rows may sit at different sigmas while
  training) with a select instead of a host-side branch, so a truncated row still runs in the batched pass (the
  batch composition moves the last bits: 5e-7 in the parity test, 0 without truncation).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from firm.policies.encoders import Conditioning, PromptEmbedding
from firm.policies.families.base import KLCodec, ModelFamily
from firm.vocab import Task

# FIRM-Reward generation/config/nft_zimage_turbo.py: config.lora.target_modules (suffixes of module names).
ZIMAGE_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "w1", "w2", "w3")
ZIMAGE_TIME_SCALE = 1000.0  # ZImagePipeline.__call__: timestep = (1000 - t) / 1000 with t = 1000 * sigma
# The FLUX VAE's latent normalisation, which Z-Image ships in vae/config.json (used by the tiny VAE too).
ZIMAGE_VAE_SCALING, ZIMAGE_VAE_SHIFT = 0.3611, 0.1159


class ZImage(ModelFamily):
    name = "z_image"
    task = Task.GEN
    pipeline = "ZImagePipeline"
    lora_loader = "ZImageLoraLoaderMixin"
    lora_targets = ZIMAGE_LORA_TARGETS
    keeps_mask = True  # captions are variable-length lists; the mask says which stacked tokens are real
    max_sequence_length = 512  # ZImagePipeline.__call__(max_sequence_length=512), template tokens included
    cfg_normalization: float = 0.0  # ZImagePipeline's cfg_normalization (False): cap |pred| at this x |pos| if > 0
    cfg_truncation: float = 1.0  # ZImagePipeline's cfg_truncation: no guidance where 1 - sigma > this (if <= 1)

    # ------------------------------------------------------------------------------------------------ components

    def transformer_class(self) -> type:
        from diffusers import ZImageTransformer2DModel

        return ZImageTransformer2DModel

    def vae_class(self) -> type:
        from diffusers import AutoencoderKL

        return AutoencoderKL

    def block_classes(self) -> set[type]:
        from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock

        return {ZImageTransformerBlock}

    def codec(self, vae: nn.Module) -> nn.Module:
        return KLCodec(vae)  # ZImagePipeline decodes latents / scaling_factor + shift_factor

    def load_text_encoder(self, root: Path, transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
        return ZImageTextEncoder.from_pretrained(
            str(root), dtype=dtype, max_sequence_length=self.config.max_sequence_length or self.max_sequence_length
        )

    def check(self, components: dict[str, Any]) -> None:
        super().check(components)
        want = components["transformer"].config.cap_feat_dim
        enc = components["text_encoder"]
        if isinstance(enc, ZImageTextEncoder):
            width = enc.model.config.hidden_size
        else:  # the hash text encoder of tiny policies
            width = getattr(getattr(enc, "config", None), "dim", None)
        if width is not None and width != want:
            raise ValueError(
                f"the transformer takes {want}-wide caption features (cap_feat_dim) but the text encoder gives "
                f"{width}; the checkpoint's text_encoder/ does not belong to its transformer/"
            )

    def tiny_transformer(self, latent_size: int, channels: int) -> nn.Module:
        t = self.config.tiny
        if sum(t.rope_axes) != t.head_dim:
            raise ValueError(f"tiny.rope_axes {t.rope_axes} must sum to tiny.head_dim={t.head_dim} for z_image")
        if any(a % 2 for a in t.rope_axes):
            raise ValueError(f"tiny.rope_axes {t.rope_axes}: every RoPE axis needs an even width for z_image")
        return self.transformer_class()(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=channels,
            dim=t.num_heads * t.head_dim,
            n_layers=t.num_layers,
            n_refiner_layers=1,
            n_heads=t.num_heads,
            n_kv_heads=t.num_heads,
            cap_feat_dim=t.text_dim,
            axes_dims=list(t.rope_axes),
            # positions: captions along the first axis (up to max_text_length rounded up to 32), then the image
            axes_lens=[max(64, 2 * (t.max_text_length + 32)), max(64, latent_size), max(64, latent_size)],
        )

    def tiny_vae(self, channels: int) -> nn.Module:
        from diffusers import AutoencoderKL

        return AutoencoderKL(  # the FLUX / Z-Image VAE's structure (no quant convs) at two tiny levels (2x)
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=channels,
            norm_num_groups=4,
            scaling_factor=ZIMAGE_VAE_SCALING,
            shift_factor=ZIMAGE_VAE_SHIFT,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    # -------------------------------------------------------------------------------------------------- schedule

    def sigmas(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        # ZImagePipeline.__call__: sigmas = get_default_z_image_sigmas(T) = torch.linspace(1, 1/T, T).tolist(), and
        # mu = calculate_shift(image tokens, ...) is passed always (the scheduler ignores it without dynamic shifting)
        base = torch.linspace(1.0, 1.0 / num_steps, num_steps).tolist()
        scheduler.set_timesteps(sigmas=base, mu=self.shift_mu(scheduler, latent_shape))
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    # ----------------------------------------------------------------------------------------------------- model

    def forward(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """``ZImageTransformer2DModel`` on per-sample (C, 1, h, w) latents and per-sample caption features, at the
        pipeline's reversed time ``(1000 - 1000 sigma) / 1000``; its output negated into FIRM's velocity."""
        t = (ZIMAGE_TIME_SCALE - sigma * ZIMAGE_TIME_SCALE) / ZIMAGE_TIME_SCALE  # (B,) ZImagePipeline.__call__
        latents = list(x.to(transformer.dtype).unsqueeze(2).unbind(0))  # B x (C, 1, h, w)
        out = transformer(latents, t, caption_features(cond), return_dict=False)[0]  # B x (C, 1, h, w)
        return -torch.stack(out).squeeze(2)  # (B, C, h, w); the pipeline steps with noise_pred = -model_out

    def velocity(
        self,
        transformer: nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning | None,
        scale: float,
    ) -> torch.Tensor:
        """ZImagePipeline's guidance with its ``guidance_scale = scale - 1`` (see the module docstring)."""
        if not self.needs_uncond(scale):  # the pipeline's do_classifier_free_guidance: guidance_scale > 0
            return self.forward(transformer, x, sigma, cond)
        if uncond is None:
            raise ValueError(f"guidance_scale {scale} needs the unconditional conditioning (`uncond`)")
        b = x.shape[0]
        both = Conditioning.cat([cond, uncond])  # the pipeline's order: prompt_embeds + negative_prompt_embeds
        out = -self.forward(transformer, torch.cat([x, x]), torch.cat([sigma, sigma]), both).float()  # model output
        pos, neg = out[:b], out[b:]
        g = torch.full((b,), scale - 1.0, dtype=torch.float32, device=x.device)
        if self.cfg_truncation is not None and self.cfg_truncation <= 1:
            t_norm = (ZIMAGE_TIME_SCALE - sigma.float() * ZIMAGE_TIME_SCALE) / ZIMAGE_TIME_SCALE  # float32, as there
            late = t_norm.double() > self.cfg_truncation  # the pipeline compares Python floats (float64)
            g = torch.where(late, torch.zeros_like(g), g)  # truncated: the positive prediction only
        pred = pos + g.view(-1, 1, 1, 1) * (pos - neg)
        if self.cfg_normalization and self.cfg_normalization > 0:  # "Renormalization" in ZImagePipeline.__call__
            pos_norm = torch.linalg.vector_norm(pos.flatten(1), dim=1)  # (B,)
            pred_norm = torch.linalg.vector_norm(pred.flatten(1), dim=1)
            cap = pos_norm * float(self.cfg_normalization)
            shrink = (pred_norm > cap) & (g > 0)  # only where guidance ran, as the pipeline
            pred = torch.where(shrink.view(-1, 1, 1, 1), pred * (cap / pred_norm).view(-1, 1, 1, 1), pred)
        return -pred


def caption_features(cond: Conditioning) -> list[torch.Tensor]:
    """The batch's caption features as the transformer takes them: each row's real tokens, (L_i, D)."""
    if cond.mask is None:
        return list(cond.embeds.unbind(0))
    return [e[m.bool()] for e, m in zip(cond.embeds, cond.mask)]


class ZImageTextEncoder(nn.Module):
    """Qwen3 over the tokenizer's chat template, as ``ZImagePipeline._encode_prompt`` (subfolders ``text_encoder``
    and ``tokenizer``)."""

    hidden_layer = -2  # ZImagePipeline._encode_prompt: hidden_states[-2]

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_sequence_length: int = 512) -> None:
        super().__init__()
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(
                "the Z-Image tokenizer has no chat template (ZImagePipeline formats every prompt with "
                "apply_chat_template); use the checkpoint's tokenizer/ folder"
            )
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(
        cls, path: str, *, dtype: torch.dtype = torch.float32, max_sequence_length: int = 512
    ) -> ZImageTextEncoder:
        from transformers import AutoTokenizer, Qwen3Model

        model = Qwen3Model.from_pretrained(path, subfolder="text_encoder", dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
        return cls(model.eval(), tokenizer, max_sequence_length=max_sequence_length)

    def text(self, prompt: str) -> str:
        """The prompt as the pipeline shows it to Qwen3: one user turn and the assistant's generation prompt."""
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[Any] | None = None) -> list[PromptEmbedding]:
        if images is not None and any(im is not None for im in images):
            raise ValueError("z_image is a generation family: its text encoder takes no source images")
        tokens = self.tokenizer(
            [self.text(p) for p in prompts],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            return_tensors="pt",
        ).to(self.model.device)
        mask = tokens.attention_mask.bool()  # (B, L)
        hidden = self.model(input_ids=tokens.input_ids, attention_mask=mask, output_hidden_states=True).hidden_states[
            self.hidden_layer
        ]  # (B, L, D)
        out = []
        for h, m in zip(hidden, mask):
            states = h[m]  # (L_i, D) the real tokens
            out.append(PromptEmbedding(states, torch.ones(states.shape[0], dtype=torch.long, device=states.device)))
        return out
