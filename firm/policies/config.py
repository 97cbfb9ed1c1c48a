"""The settings of a policy: which model (family, checkpoint, dtype, resolution), its LoRA adapters, the tiny model.

Plain dataclasses with their range checks, importable without building anything; :mod:`firm.policies.policy` and the
families (:mod:`firm.policies.families`) both read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def family_names() -> list[str]:
    from firm.registry import FAMILIES

    return sorted(FAMILIES)


@dataclass
class LoRAConfig:
    """LoRA adapter settings (peft)."""

    rank: int = 32  # r, the adapter rank
    alpha: float = 64.0  # lora_alpha; the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] | None = None  # module name suffixes; null: the family's default (its attention)
    init: str = "default"  # peft init: default (B = 0: the policy starts as the base) | gaussian

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha: must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError("target_modules: name at least one module (suffix) to adapt, or null for the default")


@dataclass
class TinyConfig:
    """A tiny random policy built in memory when ``pretrained`` is null (CPU runs, tests)."""

    num_layers: int = 1  # transformer blocks
    num_heads: int = 2  # attention heads
    head_dim: int = 16  # width per head (qwen: must equal the sum of the RoPE axes, see rope_axes)
    latent_channels: int = 4  # latent channels with a VAE (pixel latents have 3)
    vae: str = "pixel"  # pixel (latents are RGB in [-1, 1]) | tiny (a small random VAE of the family's class)
    pixel_patch: int = 1  # vae=pixel: space-to-depth factor of the pixel latents (2: 4x fewer tokens, exact)
    source_conditioning: str = "sequence"  # qwen: source tokens appended to the sequence (Qwen-Image-Edit) | channels
    text_dim: int = 32  # hash text encoder width (the transformer's joint_attention_dim)
    text_layers: int = 1  # hash text encoder layers
    vocab_size: int = 1024  # hash buckets of the text encoder
    max_text_length: int = 32  # tokens per prompt
    shift: float = 3.0  # scheduler shift of the tiny model
    rope_axes: list[int] = field(default_factory=lambda: [4, 6, 6])  # qwen: RoPE dims per axis (sum = head_dim)
    # where the random weights are created: cpu, or cuda for a real-size random-weight benchmark (a 20B model is
    # initialised in seconds there, directly in policy.dtype, instead of minutes on the CPU in float32)
    init_device: str = "cpu"


TEXT_ENCODER_PLACEMENTS = ("kept", "sharded", "freed")


@dataclass
class PolicyConfig:
    """What to load (or build), how to adapt it, and at which resolution to sample."""

    family: str = "sd3"  # a name in firm.registry.FAMILIES: sd3, qwen_image(_edit), flux_kontext, ... (docs/models.md)
    pretrained: str | None = None  # diffusers-layout directory or hub id; null builds the `tiny` random model
    revision: str | None = None  # hub revision of `pretrained`
    dtype: str = "float32"  # frozen weights: float32 | bfloat16 | float16 (LoRA weights stay float32)
    resolution: int = 512  # output images are resolution x resolution pixels
    vae: str = "auto"  # auto (the checkpoint's vae/ if present, else pixel latents) | pixel
    use_t5: bool = True  # sd3: use the T5 encoder (else zeros in its place, as diffusers does without it)
    max_sequence_length: int | None = None  # text tokens per prompt; null: the family's pipeline default
    condition_area: int | None = None  # edit: pixels the source image is VAE-encoded at; null: the pipeline's
    shift: float | None = None  # override the scheduler's shift (null: the checkpoint's)
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance
    embedded_guidance: float | None = None  # guidance-distilled families: the value in every forward; null: pipeline's
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    gradient_checkpointing: bool = False  # recompute transformer blocks in backward (less memory, ~30% slower)
    cache_size: int = 4096  # prompt embeddings kept in the cache (on the CPU)
    # Where the text encoder lives under trainer.strategy=fsdp2: kept (whole on every GPU), sharded (fully_shard per
    # layer, like the transformer), freed (encodes the training prompts once into the cache, then leaves the GPU)
    text_encoder: str = "kept"
    init_seed: int = 0  # seeds the tiny model's weights and the LoRA initialisation
    tiny: TinyConfig = field(default_factory=TinyConfig)

    def validate(self) -> None:
        if self.family not in family_names():
            raise ValueError(f"family: must be one of {family_names()}, got {self.family!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("resolution", "max_sequence_length", "condition_area"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value}")
        if self.text_encoder not in TEXT_ENCODER_PLACEMENTS:
            raise ValueError(f"text_encoder: must be one of {list(TEXT_ENCODER_PLACEMENTS)}, got {self.text_encoder!r}")
        if self.cache_size < 0:
            raise ValueError(f"cache_size: must be >= 0, got {self.cache_size}")
        if self.embedded_guidance is not None and not math.isfinite(self.embedded_guidance):
            raise ValueError(f"embedded_guidance: must be a finite number or null, got {self.embedded_guidance}")
        if self.shift is not None and not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift: must be a finite number > 0 or null, got {self.shift}")
