"""What one sample feeds the transformer besides its latent, per model family: text tokens and their width, a pooled
vector, the source images' latents (editing); and how many tokens one prompt feeds each text encoder.

The numbers follow what each family's encoder does (firm/policies/families/<family>.py). Prompts are counted at their
cap, the longest a batch can hold (``policy.max_sequence_length`` or the pipeline's default), since a batch is
padded to its longest prompt; ``--prompt-tokens`` plans with a shorter cap. A tiny policy (``pretrained: null``)
takes the hash text encoder's settings and sources at the output's size, as its family builds it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from firm.policies.config import PolicyConfig
from firm.policies.encoders import Conditioning
from firm.policies.families.base import ModelFamily, fit_area
from firm.vocab import Task

CLIP_TOKENS = 77  # the CLIP tokenizers' model_max_length (SD3 and FLUX pad CLIP prompts to it)
VL_PIXELS_PER_TOKEN = 28  # Qwen2.5-VL: 14 px patches merged 2 x 2 into one token
QWEN_IMAGE_DROPPED = 34  # QwenImagePipeline drops the template's first 34 tokens (firm/policies/families/qwen_image.py)
QWEN_EDIT_DROPPED = 64  # the edit pipelines drop 64 (qwen_image_edit.py)
QWEN_EDIT_FRAME = 8  # tokens around each source image in the 2509 prompt: "Picture i: " and the vision start / end


@dataclass(frozen=True)
class SampleInputs:
    """The conditioning of one sample, as shapes."""

    text_tokens: int  # tokens of the text (or text + image) states the transformer attends to
    text_width: int  # their width (the transformer's joint attention / caption feature dim)
    pooled_width: int | None  # a pooled text vector (SD3, FLUX.1), or None
    sources: tuple[tuple[int, ...], ...] = ()  # each source image's latent (C, h, w) (editing families)
    encoder_tokens: dict[str, int] = field(default_factory=dict)  # text encoder component -> tokens of one prompt

    def conditioning(self, batch: int, dtype: torch.dtype) -> Conditioning:
        """A batch of this conditioning (call it under ``FakeTensorMode``: the tensors are empty). Every token is
        real, so no mask is made (a mask's boolean indexing has no fake-tensor shape rule)."""
        return Conditioning(
            embeds=torch.empty(batch, self.text_tokens, self.text_width, dtype=dtype),
            pooled=None if self.pooled_width is None else torch.empty(batch, self.pooled_width, dtype=dtype),
            image_latents=tuple(torch.empty(batch, *s, dtype=torch.float32) for s in self.sources) or None,
        )

    def bytes_per_sample(self, dtype: torch.dtype) -> int:
        """Device bytes of one sample's conditioning in the rollout (text states in ``dtype``, sources float32)."""
        size = torch.empty((), dtype=dtype).element_size()
        text = self.text_tokens * self.text_width + (self.pooled_width or 0)
        return text * size + sum(math.prod(s) * 4 for s in self.sources)


@dataclass
class InputsContext:
    """What the rules below read."""

    family: ModelFamily
    policy: PolicyConfig
    transformer: Any  # the transformer (its ``config``)
    codec: Any  # the latent codec (``channels``, ``scale_factor``)
    root: Path | None  # the checkpoint's config folder (None: a tiny policy)
    prompt_tokens: int | None = None  # plan with this prompt cap instead of the family's

    def cap(self) -> int:
        """The prompt tokens counted: ``--prompt-tokens``, else ``policy.max_sequence_length``, else the family's."""
        return self.prompt_tokens or self.policy.max_sequence_length or self.family.max_sequence_length

    def latent(self, width: int, height: int) -> tuple[int, int, int]:
        sf = self.codec.scale_factor
        return (self.codec.channels, height // sf, width // sf)


def tiny_inputs(ctx: InputsContext, encoder: Any) -> SampleInputs:
    """A tiny policy: the hash text encoder's fixed length, width and pooled vector; one source image at the output's
    size for editing families (the area tiny editors use)."""
    e = encoder.config
    res = ctx.policy.resolution
    sources = (ctx.latent(res, res),) if ctx.family.task == Task.EDIT else ()
    uses_pooled = ctx.family.name in POOLED_FAMILIES
    return SampleInputs(e.max_length, e.dim, e.pooled_dim if uses_pooled else None, sources, {"text_encoder": 0})


POOLED_FAMILIES = ("sd3", "flux_kontext")  # families whose transformer takes a pooled text vector


def _sd3(ctx: InputsContext) -> SampleInputs:
    # SD3TextEncoders.encode: CLIP-L and CLIP-G states (77 tokens) then T5 (max_sequence_length), or 77 zeros without T5
    tc, c = ctx.transformer.config, ctx.policy
    t5 = ctx.cap() if c.use_t5 else CLIP_TOKENS
    encoders = {"text_encoder": CLIP_TOKENS, "text_encoder_2": CLIP_TOKENS}
    if c.use_t5:
        encoders["text_encoder_3"] = t5
    return SampleInputs(CLIP_TOKENS + t5, tc.joint_attention_dim, tc.pooled_projection_dim, (), encoders)


def _qwen_image(ctx: InputsContext) -> SampleInputs:
    # QwenImageTextEncoder: the template's first 34 tokens dropped, at most max_sequence_length kept
    n = ctx.cap()
    width = ctx.transformer.config.joint_attention_dim
    return SampleInputs(n, width, None, (), {"text_encoder": n + QWEN_IMAGE_DROPPED})


def _qwen_image_edit(ctx: InputsContext) -> SampleInputs:
    from firm.policies.families.qwen_image_edit import PLUS, PLUS_CONDITION_AREA, VAE_AREA, pipeline_variant

    c, res = ctx.policy, ctx.policy.resolution
    # the VL encoder sees each source at 384^2 (2509 / 2511) or 1024^2 (the first release) pixels of area, in tokens of
    # 28 x 28 px (the processor rounds each side to a multiple of 28)
    vl_area = PLUS_CONDITION_AREA if pipeline_variant(ctx.root) == PLUS else VAE_AREA
    side = round(math.sqrt(vl_area) / VL_PIXELS_PER_TOKEN)
    text = side * side + QWEN_EDIT_FRAME + ctx.cap()
    w, h = fit_area(res, res, c.condition_area or VAE_AREA)  # square sources, VAE-encoded at ~1 MP by default
    width = ctx.transformer.config.joint_attention_dim
    return SampleInputs(text, width, None, (ctx.latent(w, h),), {"text_encoder": text + QWEN_EDIT_DROPPED})


def _flux_kontext(ctx: InputsContext) -> SampleInputs:
    # FluxTextEncoders: T5 states padded to max_sequence_length, CLIP-L's pooled vector; the source sized by the family
    tc, res = ctx.transformer.config, ctx.policy.resolution
    w, h = ctx.family.source_size(SimpleNamespace(size=(res, res)), ctx.codec)
    n = ctx.cap()
    encoders = {"text_encoder": CLIP_TOKENS, "text_encoder_2": n}
    return SampleInputs(n, tc.joint_attention_dim, tc.pooled_projection_dim, (ctx.latent(w, h),), encoders)


def _flux2_klein(ctx: InputsContext) -> SampleInputs:
    # Flux2KleinTextEncoder: every one of max_sequence_length positions, three Qwen3 layers side by side
    n = ctx.cap()
    return SampleInputs(n, ctx.transformer.config.joint_attention_dim, None, (), {"text_encoder": n})


def _z_image(ctx: InputsContext) -> SampleInputs:
    # ZImageTextEncoder: up to max_sequence_length tokens (template included) of Qwen3's second-to-last layer
    n = ctx.cap()
    return SampleInputs(n, ctx.transformer.config.cap_feat_dim, None, (), {"text_encoder": n})


# family name -> the inputs of one sample of a full-size checkpoint (tests/plan/test_inputs.py: one per family)
FULL_SIZE_INPUTS: dict[str, Callable[[InputsContext], SampleInputs]] = {
    "sd3": _sd3,
    "qwen_image": _qwen_image,
    "qwen_image_edit": _qwen_image_edit,
    "flux_kontext": _flux_kontext,
    "flux2_klein": _flux2_klein,
    "z_image": _z_image,
}


def full_size_inputs(ctx: InputsContext) -> SampleInputs:
    rule = FULL_SIZE_INPUTS.get(ctx.family.name)
    if rule is None:
        raise KeyError(
            f"firm plan has no input rule for the family {ctx.family.name!r}: add one to "
            "firm.plan.inputs.FULL_SIZE_INPUTS (text tokens and width, pooled vector, source latents)"
        )
    return rule(ctx)
