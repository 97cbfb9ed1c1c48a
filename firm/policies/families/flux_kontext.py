"""FLUX.1-Kontext (editing), pinned to diffusers' ``FluxKontextPipeline``.

What the pipeline does (diffusers 0.42 ``pipelines/flux/pipeline_flux_kontext.py``), and so what this family does:

* Source image: its sides are first floored to multiples of ``2 * vae_scale_factor`` (16; the image processor's
  ``get_default_height_width``), then (``_auto_resize``, on by default) it is resized to the entry of
  ``PREFERRED_KONTEXT_RESOLUTIONS`` (about 1 MP each) closest in aspect ratio, lanczos (``VaeImageProcessor``), encoded
  (the distribution's mode), normalised ``(z - shift_factor) * scaling_factor``, packed into 2x2-patch tokens and
  appended after the target tokens. Target tokens have position ids ``(0, row, col)``, source tokens ``(1, row, col)``,
  text tokens ``(0, 0, 0)``; only the target tokens' velocity is kept. One source image per prompt.
* Prompt: CLIP-L's pooled output (``pooler_output``, padded to the tokenizer's ``model_max_length``, 77) and T5's last
  hidden states padded to ``max_sequence_length`` (512) tokens; no text mask (the transformer attends to T5's padding).
* Timestep ``sigma`` (the pipeline's ``t / 1000``); sigmas ``linspace(1, 1/T, T)`` with the dynamic shift ``mu`` of the
  *target* token count (``calculate_shift``; source tokens do not count).
* Guidance. FLUX.1-Kontext-dev is guidance-distilled: the pipeline's ``guidance_scale`` (3.5) is not a second pass but
  a value embedded in every transformer call, like the prompt. Its ``true_cfg_scale`` (1.0: off) with a negative prompt
  adds a real CFG pass, ``v_neg + s (v_pos - v_neg)`` with no rescale, the negative pass seeing the same source tokens.
  In FIRM:

  - ``sampler.guidance_scale`` is the pipeline's ``true_cfg_scale`` (1: off; > 1: the second pass with
    ``policy.negative_prompt``), so that it means what it means for every other family: the CFG of a second pass;
  - the embedded guidance is a property of the policy (:attr:`FluxKontext.guidance`, the pipeline's default 3.5),
    used by *every* forward: rollouts, the trained policy, the ``old`` adapter and the reference. FIRM-Reward's
    Kontext trainer (``editing/scripts/train_nft_kontext.py``) embeds the same ``config.sample.guidance_scale`` in its
    rollouts and its training forwards; tying the embedded value to the sampler instead would train DiffusionNFT at
    another guidance than it samples at (its loss calls the policy without a guidance scale). A ``PolicyConfig`` field
    ``embedded_guidance`` sets it when present (FIRM-Reward uses 2.5).

* ``policy.condition_area`` (FIRM, not the pipeline): when set, the source is resized to about that many pixels with its
  aspect ratio kept (sides multiples of 16) instead of the preferred resolutions; FIRM-Reward trains Kontext this way
  (square sources at the output size, ``_auto_resize=False``). Tiny models built with ``pretrained: null``, and
  checkpoints with pixel latents, default to the output's area (as :mod:`~firm.policies.families.qwen_image_edit`).
  ``policy.shift`` replaces the dynamic shift by a static one.
* LoRA: the joint attention projections (which also match the single blocks' ``attn.to_q/k/v``), as FIRM-Reward's
  Kontext trainer adapts; exports load with ``FluxLoraLoaderMixin.load_lora_weights``.

Nothing here needs torchvision: the text side is two tokenizers, the source goes through ``VaeImageProcessor`` (PIL).

Deliberate differences from the pipeline: sources are converted to RGB (the pipeline would hand an RGBA image's four
channels to the VAE); a batch whose sources resize to different sizes is an error (the pipeline resizes every image of
a batch to the first one's size, distorting the others).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from firm.policies.encoders import Conditioning, PromptEmbedding
from firm.policies.families.base import (
    KLCodec,
    ModelFamily,
    PixelCodec,
    fit_area,
    pack_latents,
    rows_as_lists,
    unpack_latents,
    vae_preprocess,
)
from firm.vocab import Task

# FluxKontextPipeline's PREFERRED_KONTEXT_RESOLUTIONS, (width, height): the sizes Kontext was trained at.
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)
DEFAULT_GUIDANCE = 3.5  # FluxKontextPipeline.__call__'s guidance_scale (the embedded guidance)
MAX_T5_TOKENS = 512  # FluxKontextPipeline.check_inputs refuses a longer max_sequence_length
# The FLUX.1 VAE's latent normalisation (vae/config.json of FLUX.1-Kontext-dev); the tiny VAE uses it too.
FLUX_SHIFT_FACTOR, FLUX_SCALING_FACTOR = 0.1159, 0.3611


class FluxKontext(ModelFamily):
    name = "flux_kontext"
    task = Task.EDIT
    pipeline = "FluxKontextPipeline"
    lora_loader = "FluxLoraLoaderMixin"
    keeps_mask = False  # FLUX attends to every T5 token: prompts are padded to a fixed length
    max_sequence_length = 512

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        g = getattr(config, "embedded_guidance", None)  # a PolicyConfig field when present (see the module docstring)
        self.guidance: float = DEFAULT_GUIDANCE if g is None else float(g)  # embedded in every transformer call

    # ------------------------------------------------------------------------------------------------ components

    def transformer_class(self) -> type:
        from diffusers import FluxTransformer2DModel

        return FluxTransformer2DModel

    def vae_class(self) -> type:
        from diffusers import AutoencoderKL

        return AutoencoderKL

    def block_classes(self) -> set[type]:
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock

        return {FluxTransformerBlock, FluxSingleTransformerBlock}

    def codec(self, vae: nn.Module) -> nn.Module:
        return KLCodec(vae)

    def load_text_encoder(self, root: Path, transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
        return FluxTextEncoders.from_pretrained(
            str(root),
            max_sequence_length=self.config.max_sequence_length or self.max_sequence_length,
            dtype=dtype,
            revision=self.config.revision,
        )

    def load(self, root: Path, dtype: torch.dtype) -> dict[str, Any]:
        comps = super().load(root, dtype)
        sched = comps["scheduler"]
        if self.config.shift is not None and sched.config.get("use_dynamic_shifting", False):
            # policy.shift asks for a static shift: without this, the dynamic shift would silently ignore it
            static = {"shift": self.config.shift, "use_dynamic_shifting": False}
            comps["scheduler"] = type(sched).from_config(sched.config, **static)
        return comps

    def transformer_in_channels(self, codec_channels: int) -> tuple[int, ...]:
        return (4 * codec_channels,)

    def tiny_transformer(self, latent_size: int, channels: int) -> nn.Module:
        t = self.config.tiny
        if sum(t.rope_axes) != t.head_dim:
            raise ValueError(f"tiny.rope_axes {t.rope_axes} must sum to tiny.head_dim={t.head_dim} for flux_kontext")
        if t.source_conditioning != "sequence":
            raise ValueError("flux_kontext appends the source tokens: tiny.source_conditioning must be sequence")
        return self.transformer_class()(
            patch_size=1,
            in_channels=4 * channels,  # packed 2x2 patches; out_channels defaults to the same width
            num_layers=t.num_layers,  # double-stream (joint) blocks
            num_single_layers=t.num_layers,  # single-stream blocks
            attention_head_dim=t.head_dim,
            num_attention_heads=t.num_heads,
            joint_attention_dim=t.text_dim,
            pooled_projection_dim=t.text_dim,
            guidance_embeds=True,  # guidance-distilled, as FLUX.1-Kontext-dev
            axes_dims_rope=tuple(t.rope_axes),
        )

    def tiny_vae(self, channels: int) -> nn.Module:
        """The FLUX.1 VAE's structure (8x: four levels, no quant convs, its latent normalisation), 4 channels wide and
        without the mid-block attention: a ~1 MP source (~16k latent pixels) encodes in ~0.4 s on one CPU thread
        (2.3 s with the attention, measured on a busy 2-core machine)."""
        return self.vae_class()(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(4, 4, 4, 4),
            layers_per_block=1,
            latent_channels=channels,
            norm_num_groups=2,
            mid_block_add_attention=False,
            shift_factor=FLUX_SHIFT_FACTOR,
            scaling_factor=FLUX_SCALING_FACTOR,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )

    # ---------------------------------------------------------------------------------------------- conditioning

    def source_size(self, image: Any, codec: nn.Module) -> tuple[int, int]:
        """(width, height) the source ``image`` is VAE-encoded at by ``codec`` (see the module docstring)."""
        multiple = 2 * codec.scale_factor  # the pipeline's multiple_of: VAE downsampling x 2x2 packing
        c = self.config
        # tiny models (built with pretrained: null, or on pixel latents, which no pipeline runs) take the output's
        # area: the preferred ~1 MP would make a 32 px policy's source a quarter of a million tokens
        tiny = c.pretrained is None or isinstance(codec, PixelCodec)
        if c.condition_area is None and not tiny:
            # FluxKontextPipeline.__call__ step 3: floor to the image processor's multiple, then the preferred
            # Kontext resolution of the nearest aspect ratio (ties: the smaller width, as Python's tuple min)
            w, h = (s - s % multiple for s in image.size)
            if w < multiple or h < multiple:
                size = f"{image.size[0]}x{image.size[1]}"
                raise ValueError(f"the source image is {size} px: FLUX.1-Kontext needs sides of >= {multiple} px")
            _, w, h = min((abs(w / h - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
        else:
            w, h = fit_area(*image.size, c.condition_area or c.resolution**2, multiple)
        return w // multiple * multiple, h // multiple * multiple

    def encode_sources(self, codec: nn.Module, images: list[Any], device: torch.device) -> tuple[torch.Tensor, ...]:
        """The batch's source latents, ``((B, C, h, w),)``: one source image per prompt, all resizing to one size."""
        rows = rows_as_lists(images)
        if any(len(r) != 1 for r in rows):
            raise ValueError(f"FLUX.1-Kontext edits one source image per prompt, got {[len(r) for r in rows]}")
        sources = [r[0] for r in rows]
        sizes = [self.source_size(im, codec) for im in sources]
        if len(set(sizes)) != 1:
            raise ValueError(
                f"the source images resize to different sizes across the batch {sorted(set(sizes))} (different aspect "
                "ratios); batch prompts whose sources share an aspect ratio, or set policy.condition_area and "
                "pre-crop the sources"
            )
        w, h = sizes[0]
        pixels = vae_preprocess(sources, w, h).to(device)  # (B, 3, h, w) in [0, 1], lanczos
        return (codec.encode(pixels).float(),)

    # -------------------------------------------------------------------------------------------------- schedule

    def sigmas(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return self.linspace_sigmas(scheduler, num_steps, latent_shape)

    # ----------------------------------------------------------------------------------------------------- model

    def forward(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        src = cond.image_latents
        sources = () if src is None else (tuple(src) if isinstance(src, (tuple, list)) else (src,))
        if len(sources) != 1:
            raise ValueError(f"FLUX.1-Kontext takes one source image latent per prompt, got {len(sources)}")
        if cond.pooled is None:
            raise ValueError("FLUX.1-Kontext needs the pooled text embedding (CLIP's pooler output)")
        b, _, h, w = x.shape
        source = sources[0].to(x.dtype)  # (B, C, h_s, w_s)
        tokens = torch.cat([pack_latents(x), pack_latents(source)], dim=1)  # (B, N + N_s, 4C)
        img_ids = kontext_image_ids((h, w), source.shape[-2:], x.device, x.dtype)  # (N + N_s, 3)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=x.dtype)  # encode_prompt's text_ids
        guidance = None
        if transformer.config.guidance_embeds:  # the pipeline: torch.full([1], guidance_scale, float32).expand(B)
            guidance = torch.full((b,), self.guidance, device=x.device, dtype=torch.float32)
        out = transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            timestep=(sigma * 1000.0) / 1000.0,  # the pipeline's timesteps (1000 sigma, float32) divided by 1000
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=guidance,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, : (h // 2) * (w // 2)], h, w)  # the target tokens' velocity (B, C, h, w)

    # velocity / needs_uncond: the base class's batched CFG ``v_u + s (v_c - v_u)`` at s > 1 is exactly the pipeline's
    # true CFG (no rescale); the embedded guidance rides inside forward().


def kontext_image_ids(
    target_hw: tuple[int, int], source_hw: tuple[int, int], device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Position ids of the target tokens then the source tokens, (N + N_s, 3): ``(0, row, col)`` and ``(1, row, col)``
    over the 2x2-packed grids (``FluxKontextPipeline.prepare_latents``)."""

    def grid(h: int, w: int, frame: float) -> torch.Tensor:
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 0] = frame
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3)

    ids = torch.cat([grid(*target_hw, 0.0), grid(*source_hw, 1.0)])
    return ids.to(device=device, dtype=dtype)


class FluxTextEncoders(nn.Module):
    """CLIP-L (pooled) + T5 (token states) of a FLUX.1 checkpoint (``text_encoder``, ``text_encoder_2``, tokenizers)."""

    def __init__(self, clip: nn.Module, t5: nn.Module, tokenizers: tuple[Any, Any], *, max_sequence_length: int = 512):
        super().__init__()
        if not 1 <= max_sequence_length <= MAX_T5_TOKENS:
            raise ValueError(f"max_sequence_length must be in [1, {MAX_T5_TOKENS}] for FLUX, got {max_sequence_length}")
        self.clip, self.t5 = clip, t5
        self.tokenizers = tokenizers
        self.max_sequence_length = max_sequence_length

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        *,
        max_sequence_length: int = 512,
        dtype: torch.dtype = torch.float32,
        revision: str | None = None,
    ) -> FluxTextEncoders:
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        kw = {"revision": revision}
        clip = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw)
        t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, **kw)
        tok_clip = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
        tok_t5 = AutoTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw)
        return cls(clip, t5, (tok_clip, tok_t5), max_sequence_length=max_sequence_length)

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[Any] | None = None) -> list[PromptEmbedding]:
        """Per prompt: T5 states (max_sequence_length, D) and CLIP's pooled vector (P,); the source image is not
        shown to the text encoders (``FluxPipeline.encode_prompt``)."""
        tok_clip, tok_t5 = self.tokenizers
        # _get_clip_prompt_embeds: padded to the tokenizer's model_max_length (77 on the hub), pooler_output
        ids = tok_clip(
            prompts,
            padding="max_length",
            max_length=getattr(tok_clip, "model_max_length", 77),
            truncation=True,
            return_tensors="pt",
        ).input_ids
        pooled = self.clip(ids.to(self.clip.device), output_hidden_states=False).pooler_output  # (B, P)
        # _get_t5_prompt_embeds: padded to max_sequence_length, last hidden states, no attention mask
        ids = tok_t5(
            prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True, return_tensors="pt"
        ).input_ids
        states = self.t5(ids.to(self.t5.device), output_hidden_states=False)[0]  # (B, L, D)
        return [PromptEmbedding(states[i], None, pooled[i]) for i in range(len(prompts))]
