"""The flow policy: a diffusers flow-matching transformer with LoRA adapters, its scheduler, encoders and VAE.

:class:`FlowPolicy` is a plain ``nn.Module``. It owns

* the transformer — ``SD3Transformer2DModel`` (family ``sd3``: SD3 / SD3.5) or ``QwenImageTransformer2DModel``
  (family ``qwen_image_edit``: Qwen-Image-Edit / -2509, conditioned on the source image's latents);
* a ``FlowMatchEulerDiscreteScheduler`` used only for its sigma schedule (shift / dynamic shift);
* the conditioning encoder (:mod:`firm.policies.encoders`), with prompt embeddings cached per prompt;
* a latent codec: the checkpoint's VAE, or pixel-space latents (RGB in [-1, 1]) for tiny CPU policies;
* LoRA adapters (peft): ``default`` is trained; ``old`` (DiffusionNFT's sampling policy) is a second adapter moved
  towards ``default`` by decay; the reference policy is the base with adapters disabled.

The sampling loop is not here: :mod:`firm.policies.samplers` runs it with :meth:`FlowPolicy.velocity`.

Loading is ``from_pretrained`` from a diffusers-layout directory or hub id (``transformer/``, ``scheduler/``,
``vae/``, ``text_encoder*/``, ``tokenizer*/``, ``processor/``). With ``pretrained: null`` a tiny random model of the
same classes is built from the ``tiny`` settings (seeded, so every rank and every resume builds the same weights);
:func:`build_tiny_components` + :func:`save_components` write one to a directory that loads like a real checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from firm.policies.encoders import (
    Conditioning,
    HashTextEncoder,
    PromptEmbedding,
    QwenVLTextEncoder,
    SD3TextEncoders,
    is_hash_encoder_dir,
    stack_embeddings,
)

FAMILIES = ("sd3", "qwen_image_edit")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Attention projections of the joint (image + text) attention blocks of both SD3 and Qwen-Image.
ATTENTION_PROJECTIONS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
TRAIN_ADAPTER, OLD_ADAPTER = "default", "old"
CHECKPOINT_PATTERNS = [
    "model_index.json",
    "transformer/*",
    "scheduler/*",
    "vae/*",
    "text_encoder*/*",
    "tokenizer*/*",
    "processor/*",
]


@dataclass
class LoRAConfig:
    """LoRA adapter settings (peft)."""

    rank: int = 32  # r, the adapter rank
    alpha: float = 64.0  # lora_alpha; the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: list[str] = field(default_factory=lambda: list(ATTENTION_PROJECTIONS))  # module name suffixes
    init: str = "default"  # peft init: default (B = 0: the policy starts as the base) | gaussian

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank: must be >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha: must be a finite number > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules: name at least one module (suffix) to adapt")


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


@dataclass
class PolicyConfig:
    """What to load (or build), how to adapt it, and at which resolution to sample."""

    family: str = "sd3"  # sd3 (SD3 / SD3.5) | qwen_image_edit (Qwen-Image-Edit / -2509)
    pretrained: str | None = None  # diffusers-layout directory or hub id; null builds the `tiny` random model
    revision: str | None = None  # hub revision of `pretrained`
    dtype: str = "float32"  # frozen weights: float32 | bfloat16 | float16 (LoRA weights stay float32)
    resolution: int = 512  # output images are resolution x resolution pixels
    vae: str = "auto"  # auto (the checkpoint's vae/ if present, else pixel latents) | pixel
    use_t5: bool = True  # sd3: use the T5 encoder (else zeros in its place, as diffusers does without it)
    max_sequence_length: int = 256  # sd3: T5 tokens per prompt
    shift: float | None = None  # override the scheduler's shift (null: the checkpoint's)
    negative_prompt: str = ""  # the unconditional prompt of classifier-free guidance
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    gradient_checkpointing: bool = False  # recompute transformer blocks in backward (less memory, ~30% slower)
    cache_size: int = 4096  # prompt embeddings kept in the cache (on the CPU)
    init_seed: int = 0  # seeds the tiny model's weights and the LoRA initialisation
    tiny: TinyConfig = field(default_factory=TinyConfig)

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family: must be one of {FAMILIES}, got {self.family!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for name in ("resolution", "max_sequence_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.cache_size < 0:
            raise ValueError(f"cache_size: must be >= 0, got {self.cache_size}")
        if self.shift is not None and not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift: must be a finite number > 0 or null, got {self.shift}")


# --------------------------------------------------------------------------------------------------------------------
# Latent codecs: images in [0, 1] (B, 3, H, W) <-> latents (B, C, h, w)


class PixelCodec(nn.Module):
    """Pixel-space latents: ``latent = 2 * image - 1`` (no VAE). For tiny policies.

    With ``patch > 1`` the latent is the space-to-depth rearrangement of the pixels (``pixel_unshuffle``): an exact,
    parameter-free "VAE" with ``scale_factor = patch`` and ``3 * patch**2`` channels, so that a tiny transformer sees
    ``patch**2`` times fewer tokens (the shapes world uses ``patch: 2``: 32x32 images, 8x8 tokens of 4x4 pixels).
    It saves as ``vae/config.json`` (``{"class": "PixelCodec", "patch": p}``) so checkpoints load with it.
    """

    def __init__(self, patch: int = 1) -> None:
        super().__init__()
        if patch < 1:
            raise ValueError(f"PixelCodec: patch must be >= 1, got {patch}")
        self.patch = patch
        self.scale_factor = patch
        self.channels = 3 * patch * patch

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2.0 - 1.0  # (B, 3, H, W)
        return nn.functional.pixel_unshuffle(x, self.patch) if self.patch > 1 else x  # (B, 3 p^2, H/p, W/p)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.float()
        if self.patch > 1:
            x = nn.functional.pixel_shuffle(x, self.patch)  # (B, 3, H, W)
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    def save_pretrained(self, directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"class": "PixelCodec", "patch": self.patch}, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PixelCodec:
        conf = _pixel_codec_config(Path(directory))
        if conf is None:
            raise ValueError(f"{directory}/config.json does not describe a PixelCodec")
        return cls(int(conf.get("patch", 1)))


def _pixel_codec_config(directory: Path) -> dict | None:
    """The saved PixelCodec settings in ``directory`` (a checkpoint's ``vae/``), or None when it holds a real VAE."""
    cfg = directory / "config.json"
    if not cfg.is_file():
        return None
    try:
        conf = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    return conf if conf.get("class") == "PixelCodec" else None


class SD3VAECodec(nn.Module):
    """``AutoencoderKL`` with SD3's ``(z - shift_factor) * scaling_factor`` latent normalisation."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.channels = vae.config.latent_channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        z = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist.mode()
        return (z - (self.vae.config.shift_factor or 0.0)) * self.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.vae.config.scaling_factor + (self.vae.config.shift_factor or 0.0)
        return ((self.vae.decode(z.to(self.vae.dtype)).sample.float() + 1) / 2).clamp(0, 1)


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


# --------------------------------------------------------------------------------------------------------------------
# Families: how each transformer is called


class SD3Family:
    """SD3 / SD3.5: latents (B, C, h, w) in, velocity out; timestep = 1000 * sigma; pooled text projection."""

    name = "sd3"
    uses_source_image = False
    keeps_mask = False

    @staticmethod
    def transformer_class():
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    @staticmethod
    def block_classes() -> set[type]:
        from diffusers.models.attention import JointTransformerBlock

        return {JointTransformerBlock}

    @staticmethod
    def codec(vae: nn.Module) -> nn.Module:
        return SD3VAECodec(vae)

    @staticmethod
    def vae_class():
        from diffusers import AutoencoderKL

        return AutoencoderKL

    @staticmethod
    def tiny_transformer(t: TinyConfig, latent_size: int, channels: int) -> nn.Module:
        inner = t.num_heads * t.head_dim
        return SD3Family.transformer_class()(
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

    @staticmethod
    def tiny_vae(channels: int) -> nn.Module:
        return SD3Family.vae_class()(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 8),
            layers_per_block=1,
            latent_channels=channels,
            norm_num_groups=4,
        )

    @staticmethod
    def forward(transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return transformer(
            hidden_states=x,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            timestep=sigma * 1000.0,
            return_dict=False,
        )[0]


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens (the Qwen-Image layout)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, c4 // 4, h, w)


class QwenEditFamily:
    """Qwen-Image-Edit: packed target tokens followed by the source image's tokens; timestep = sigma."""

    name = "qwen_image_edit"
    uses_source_image = True
    keeps_mask = True

    @staticmethod
    def transformer_class():
        from diffusers import QwenImageTransformer2DModel

        return QwenImageTransformer2DModel

    @staticmethod
    def block_classes() -> set[type]:
        from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock

        return {QwenImageTransformerBlock}

    @staticmethod
    def codec(vae: nn.Module) -> nn.Module:
        return QwenVAECodec(vae)

    @staticmethod
    def vae_class():
        from diffusers import AutoencoderKLQwenImage

        return AutoencoderKLQwenImage

    @staticmethod
    def tiny_transformer(t: TinyConfig, latent_size: int, channels: int) -> nn.Module:
        if sum(t.rope_axes) != t.head_dim:
            raise ValueError(f"tiny.rope_axes {t.rope_axes} must sum to tiny.head_dim={t.head_dim} for qwen")
        if t.source_conditioning not in ("sequence", "channels"):
            raise ValueError(f"tiny.source_conditioning must be sequence or channels, got {t.source_conditioning!r}")
        return QwenEditFamily.transformer_class()(
            patch_size=2,
            in_channels=channels * 4 * (2 if t.source_conditioning == "channels" else 1),
            out_channels=channels,
            num_layers=t.num_layers,
            attention_head_dim=t.head_dim,
            num_attention_heads=t.num_heads,
            joint_attention_dim=t.text_dim,
            axes_dims_rope=tuple(t.rope_axes),
        )

    @staticmethod
    def tiny_vae(channels: int) -> nn.Module:
        return QwenEditFamily.vae_class()(
            base_dim=8,
            z_dim=channels,
            dim_mult=[1, 2],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False],
            latents_mean=[0.0] * channels,
            latents_std=[1.0] * channels,
        )

    @staticmethod
    def forward(transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, _, h, w = x.shape
        tokens = pack_latents(x)  # (B, N, 4C)
        n = tokens.shape[1]
        shapes = [(1, h // 2, w // 2)]
        if transformer.config.in_channels == 2 * tokens.shape[-1]:
            # Channel conditioning (tiny CPU editors, InstructPix2Pix-style): each target token carries the source
            # token of the same position, so copying is easy to learn and the sequence stays half as long.
            if cond.image_latents is None:
                raise ValueError("this editing transformer takes the source image along channels: give image_latents")
            src = pack_latents(cond.image_latents.to(x.dtype))  # (B, N, 4C)
            tokens = torch.cat([tokens, src], dim=-1)  # (B, N, 8C)
        elif cond.image_latents is not None:
            src = cond.image_latents.to(x.dtype)
            tokens = torch.cat([tokens, pack_latents(src)], dim=1)  # (B, N + N_src, 4C)
            shapes.append((1, src.shape[2] // 2, src.shape[3] // 2))
        out = transformer(
            hidden_states=tokens,
            encoder_hidden_states=cond.embeds,
            encoder_hidden_states_mask=cond.mask,
            timestep=sigma,
            img_shapes=[shapes] * b,
            return_dict=False,
        )[0]
        return unpack_latents(out[:, :n], h, w)


def family(name: str) -> type:
    if name == "sd3":
        return SD3Family
    if name == "qwen_image_edit":
        return QwenEditFamily
    raise ValueError(f"policy.family must be one of {FAMILIES}, got {name!r}")


# --------------------------------------------------------------------------------------------------------------------
# Building / loading components


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"policy.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def tiny_scheduler(shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=shift)


def build_tiny_components(config: PolicyConfig) -> dict[str, Any]:
    """Random tiny transformer / scheduler / codec / hash text encoder of ``config.family`` (seeded by init_seed)."""
    fam, t = family(config.family), config.tiny
    if t.vae not in ("pixel", "tiny"):
        raise ValueError(f"policy.tiny.vae must be pixel or tiny, got {t.vae!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.init_seed)
        if t.vae == "pixel":
            codec: nn.Module = PixelCodec(t.pixel_patch)
        else:
            codec = fam.codec(fam.tiny_vae(t.latent_channels))
        if config.resolution % (codec.scale_factor * 2):
            raise ValueError(
                f"policy.resolution={config.resolution} must be a multiple of {codec.scale_factor * 2} "
                "(VAE downsampling x patch size 2)"
            )
        latent = config.resolution // codec.scale_factor
        transformer = fam.tiny_transformer(t, latent, codec.channels)
        encoder = HashTextEncoder(
            HashTextEncoder.Config(
                vocab_size=t.vocab_size,
                dim=t.text_dim,
                pooled_dim=t.text_dim,
                max_length=t.max_text_length,
                num_layers=t.text_layers,
                num_heads=max(1, min(t.num_heads, t.text_dim // 8)),
            )
        )
    return {
        "transformer": transformer,
        "scheduler": tiny_scheduler(config.shift or t.shift),
        "codec": codec,
        "text_encoder": encoder,
    }


def save_components(components: dict[str, Any], directory: str | Path) -> Path:
    """Write components in the diffusers layout (``transformer/``, ``scheduler/``, ``vae/``, ``text_encoder/``)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    components["transformer"].save_pretrained(d / "transformer")
    components["scheduler"].save_pretrained(d / "scheduler")
    codec = components["codec"]
    if hasattr(codec, "vae"):
        codec.vae.save_pretrained(d / "vae")
    elif isinstance(codec, PixelCodec) and codec.patch > 1:
        codec.save_pretrained(d / "vae")
    components["text_encoder"].save_pretrained(d / "text_encoder")
    return d


def _local_checkpoint(path: str, revision: str | None) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    beside = Path(__file__).resolve().parents[2] / path  # a relative path of a shipped YAML, from the repository root
    if not p.is_absolute() and beside.is_dir():
        return beside
    if p.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"policy.pretrained: {path} is not a directory (nor a hub id like org/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))


def load_components(config: PolicyConfig) -> dict[str, Any]:
    """Components from a diffusers-layout checkpoint (a directory, or a hub id fetched once into the HF cache)."""
    fam = family(config.family)
    dtype = _dtype(config.dtype)
    root = _local_checkpoint(config.pretrained, config.revision)
    if not (root / "transformer").is_dir():
        raise FileNotFoundError(f"{root}: no transformer/ folder (expected a diffusers-layout checkpoint)")
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = fam.transformer_class().from_pretrained(root, subfolder="transformer", torch_dtype=dtype)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root, subfolder="scheduler")
    if config.shift is not None:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=config.shift)
    if config.vae not in ("auto", "pixel"):
        raise ValueError(f"policy.vae must be auto or pixel, got {config.vae!r}")
    if (root / "vae").is_dir() and _pixel_codec_config(root / "vae") is not None:
        codec = PixelCodec.from_pretrained(root / "vae")  # a parameter-free pixel codec (tiny policies)
    elif config.vae == "auto" and (root / "vae").is_dir():
        codec = fam.codec(fam.vae_class().from_pretrained(root, subfolder="vae", torch_dtype=dtype))
    else:
        codec = PixelCodec()
    enc_dir = root / "text_encoder"
    if is_hash_encoder_dir(enc_dir):
        encoder: nn.Module = HashTextEncoder.from_pretrained(enc_dir)
    elif fam is SD3Family:
        encoder = SD3TextEncoders.from_pretrained(
            str(root),
            joint_attention_dim=transformer.config.joint_attention_dim,
            use_t5=config.use_t5,
            max_sequence_length=config.max_sequence_length,
            dtype=dtype,
        )
    else:
        encoder = QwenVLTextEncoder.from_pretrained(str(root), dtype=dtype)
    return {"transformer": transformer, "scheduler": scheduler, "codec": codec, "text_encoder": encoder}


def calculate_shift(seq_len: int, base_len: int, max_len: int, base_shift: float, max_shift: float) -> float:
    """The resolution-dependent ``mu`` of dynamic shifting (linear in the image token count)."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + base_shift - m * base_len


def _image_key(image: Any) -> str | None:
    if image is None:
        return None
    return hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


def pil_to_tensor(images: list[Any], size: int) -> torch.Tensor:
    """PIL images -> (B, 3, size, size) float32 in [0, 1] (bicubic resize)."""
    import numpy as np
    from PIL import Image

    arrs = [
        np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0 for im in images
    ]
    return torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).contiguous()


def tensor_to_pil(images: torch.Tensor) -> list[Any]:
    """(B, 3, H, W) in [0, 1] -> PIL RGB images."""
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


# --------------------------------------------------------------------------------------------------------------------
# The policy


class FlowPolicy(nn.Module):
    """A flow-matching image model with LoRA adapters; see the module docstring.

    Args:
        config: the policy settings.
        old_adapter: also create the ``old`` adapter (DiffusionNFT).
        components: prebuilt components (tests); default: loaded from ``config.pretrained`` or built tiny.
    """

    def __init__(self, config: PolicyConfig, *, old_adapter: bool = False, components: dict | None = None) -> None:
        super().__init__()
        self.config = config
        self.family = family(config.family)
        if components is None:
            components = build_tiny_components(config) if config.pretrained is None else load_components(config)
        self.transformer: nn.Module = components["transformer"]
        self.scheduler = components["scheduler"]
        self.codec: nn.Module = components["codec"]
        self.text_encoder: nn.Module = components["text_encoder"]
        self.dtype = _dtype(config.dtype)
        for module in (self.transformer, self.codec, self.text_encoder):
            module.requires_grad_(False)
            module.eval()
        if self.dtype != torch.float32:
            self.transformer.to(self.dtype)
        if config.resolution % (self.codec.scale_factor * 2):
            raise ValueError(
                f"policy.resolution={config.resolution} must be a multiple of {self.codec.scale_factor * 2}"
            )
        self.latent_size = config.resolution // self.codec.scale_factor
        self._check_channels()
        self.has_old_adapter = old_adapter
        self._add_adapters(old_adapter)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self._cache: OrderedDict[tuple, PromptEmbedding] = OrderedDict()
        self._sigma_cache: dict[tuple[int, int], torch.Tensor] = {}
        self._adapter_state: str | None = TRAIN_ADAPTER

    # ---------------------------------------------------------------------------------------------------- structure

    def train(self, mode: bool = True) -> FlowPolicy:
        """Only the transformer (its adapters' dropout) follows ``mode``; encoders and the VAE stay in eval mode."""
        super().train(mode)
        self.text_encoder.eval()
        self.codec.eval()
        return self

    def _check_channels(self) -> None:
        tc = self.transformer.config
        want = self.codec.channels * (4 if self.family is QwenEditFamily else 1)
        if tc.in_channels != want and not (self.family is QwenEditFamily and tc.in_channels == 2 * want):
            raise ValueError(
                f"the transformer takes {tc.in_channels} input channels but the latent codec gives "
                f"{self.codec.channels} ({type(self.codec).__name__}); check policy.vae / the checkpoint's vae/"
            )

    def _add_adapters(self, old_adapter: bool) -> None:
        from peft import LoraConfig

        lc = self.config.lora
        if lc.rank < 1:
            raise ValueError(f"policy.lora.rank must be >= 1, got {lc.rank}")
        init = True if lc.init == "default" else lc.init
        names = {n for n, _ in self.transformer.named_modules()}
        targets = [t for t in lc.target_modules if any(n == t or n.endswith("." + t) for n in names)]
        if not targets:
            raise ValueError(
                f"policy.lora.target_modules {lc.target_modules} match no module of {type(self.transformer).__name__}"
            )
        peft_config = LoraConfig(
            r=lc.rank, lora_alpha=lc.alpha, lora_dropout=lc.dropout, target_modules=targets, init_lora_weights=init
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*multiple adapters.*")  # two adapters is what we want
            torch.manual_seed(self.config.init_seed + 1)
            self.transformer.add_adapter(peft_config, adapter_name=TRAIN_ADAPTER)
            if old_adapter:
                self.transformer.add_adapter(peft_config, adapter_name=OLD_ADAPTER)
        self._lora_layers = [
            m for m in self.transformer.modules() if hasattr(m, "lora_A") and TRAIN_ADAPTER in m.lora_A
        ]
        self._set_adapter(TRAIN_ADAPTER)
        if old_adapter:
            self.update_old(0.0)  # old = default

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The ``default`` adapter's parameters (float32)."""
        return [p for n, p in self.transformer.named_parameters() if f".{TRAIN_ADAPTER}." in n and "lora_" in n]

    def named_adapter_parameters(self, adapter: str) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.transformer.named_parameters() if f".{adapter}." in n and "lora_" in n}

    def frozen_parameter_names(self, prefix: str = "") -> list[str]:
        """Every parameter name (with ``prefix``) except the adapters: what checkpoints leave out."""
        return [f"{prefix}{n}" for n, _ in self.named_parameters() if "lora_" not in n]

    def fsdp_wrap_modules(self) -> set[type]:
        return self.family.block_classes()

    def _set_adapter(self, name: str | None) -> None:
        """Activate the ``default`` / ``old`` adapter, or disable adapters (``None``, the reference policy).

        peft toggles ``requires_grad`` when switching; the trainable flags are restored so that only ``default``
        is ever trained.
        """
        for layer in self._lora_layers:
            if name is None:
                layer.enable_adapters(False)
            else:
                layer.enable_adapters(True)
                layer.set_adapter(name)
        for n, p in self.transformer.named_parameters():
            if "lora_" in n:
                p.requires_grad_(f".{TRAIN_ADAPTER}." in n)
        self._adapter_state = name

    @contextlib.contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """Run the block with adapter ``name`` (``default``, ``old``) or with adapters disabled (``None``)."""
        if name == OLD_ADAPTER and not self.has_old_adapter:
            raise ValueError("this policy has no `old` adapter (create it with old_adapter=True)")
        previous = self._adapter_state
        self._set_adapter(name)
        try:
            yield
        finally:
            self._set_adapter(previous)

    @torch.no_grad()
    def update_old(self, decay: float) -> None:
        """``old <- decay * old + (1 - decay) * default`` (decay 0 copies the trained adapter)."""
        if not self.has_old_adapter:
            raise ValueError("this policy has no `old` adapter")
        new = self.named_adapter_parameters(TRAIN_ADAPTER)
        old = self.named_adapter_parameters(OLD_ADAPTER)
        for name, p in new.items():
            q = old[name.replace(f".{TRAIN_ADAPTER}.", f".{OLD_ADAPTER}.")]
            q.mul_(decay).add_(p.detach().to(q.dtype), alpha=1.0 - decay)

    def lora_state_dict(self, adapter: str = TRAIN_ADAPTER) -> dict[str, torch.Tensor]:
        """The adapter in peft's naming (``...to_q.lora_A.weight``), as diffusers' LoRA savers expect."""
        from peft import get_peft_model_state_dict

        return {
            k: v.detach().cpu().contiguous()
            for k, v in get_peft_model_state_dict(self.transformer, adapter_name=adapter).items()
        }

    def base_fingerprint(self) -> torch.Tensor:
        """(3,) float64 summary of the frozen transformer weights, to catch resuming onto a different base model."""
        params = [p for n, p in self.transformer.named_parameters() if "lora_" not in n]
        first, last = params[0].detach().double(), params[-1].detach().double()
        return torch.stack([first.sum().cpu(), last.sum().cpu(), torch.tensor(float(sum(p.numel() for p in params)))])

    # ---------------------------------------------------------------------------------------------------- schedule

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """(T + 1,) float32 sigmas of a ``num_steps`` schedule (shifted as the checkpoint's scheduler says)."""
        seq_len = (self.latent_size // 2) ** 2
        key = (num_steps, seq_len)
        if key not in self._sigma_cache:
            import numpy as np

            sched, conf = self.scheduler, self.scheduler.config
            kwargs: dict[str, Any] = {}
            if conf.get("use_dynamic_shifting", False):
                kwargs["mu"] = calculate_shift(
                    seq_len,
                    conf.get("base_image_seq_len", 256),
                    conf.get("max_image_seq_len", 4096),
                    conf.get("base_shift", 0.5),
                    conf.get("max_shift", 1.15),
                )
            if self.family is QwenEditFamily:
                sched.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps).tolist(), **kwargs)
            else:
                sched.set_timesteps(num_steps, **kwargs)
            self._sigma_cache[key] = sched.sigmas.detach().to("cpu", torch.float32).clone()
        return self._sigma_cache[key]

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.codec.channels, self.latent_size, self.latent_size)

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ---------------------------------------------------------------------------------------------------- encoding

    def encode_prompts(self, prompts: list[str], images: list[Any] | None = None) -> Conditioning:
        """Conditioning for ``prompts`` (and their source images when editing), from the per-prompt cache."""
        fam = self.family
        if fam.uses_source_image and (images is None or any(im is None for im in images)):
            raise ValueError(f"{fam.name} edits a source image: every prompt needs one (data.task: edit)")
        use_images = images if fam.uses_source_image else None
        keys = [(p, _image_key(use_images[i]) if use_images else None) for i, p in enumerate(prompts)]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        if todo:
            uniq = list(dict.fromkeys(keys[i] for i in todo))
            first = {k: keys.index(k) for k in uniq}
            # One prompt per encoder call: an embedding must not depend on which other prompts missed the cache with
            # it (batched matmuls and padding change the last bits), or a resumed run, whose cache starts empty,
            # would drift from the uninterrupted one.
            embs = [self.text_encoder.encode([k[0]], [use_images[first[k]]] if use_images else None)[0] for k in uniq]
            for k, e in zip(uniq, embs):
                self._cache[k] = e.to("cpu")
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        items = []
        for k in keys:
            self._cache.move_to_end(k)
            items.append(self._cache[k])
        pad_to = getattr(getattr(self.text_encoder, "config", None), "max_length", None) if not fam.keeps_mask else None
        cond = stack_embeddings(items, keep_mask=fam.keeps_mask, pad_to=pad_to).to(self.device)
        if fam.uses_source_image:
            cond = cond.with_image_latents(self.encode_images(pil_to_tensor(use_images, self.config.resolution)))
        return cond

    def encode_negative(self, like: Conditioning, images: list[Any] | None = None) -> Conditioning:
        """The unconditional (negative-prompt) conditioning for a batch like ``like`` (same source images)."""
        neg = self.encode_prompts([self.config.negative_prompt] * len(like), images)
        return neg.with_image_latents(like.image_latents)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> latents (B, C, h, w), float32."""
        return self.codec.encode(images.to(self.device)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) -> images (B, 3, H, W) float32 in [0, 1]."""
        return self.codec.decode(latents)

    # ---------------------------------------------------------------------------------------------------- velocity

    def velocity(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        *,
        guidance_scale: float = 1.0,
        uncond: Conditioning | None = None,
    ) -> torch.Tensor:
        """The model velocity at ``(x, sigma)``; classifier-free guidance when ``guidance_scale > 1``.

        Args:
            x: (B, C, h, w) latents.
            sigma: (B,) noise levels in [0, 1].
            cond: the batch's conditioning.
            guidance_scale: ``v = v_uncond + w (v_cond - v_uncond)`` when > 1 (needs ``uncond``).
            uncond: the unconditional conditioning (:meth:`encode_negative`).

        Returns:
            (B, C, h, w) float32 velocity, differentiable w.r.t. the active adapter when grad is enabled.
        """
        cfg = guidance_scale > 1.0
        if cfg and uncond is None:
            raise ValueError("guidance_scale > 1 needs the unconditional conditioning (`uncond`)")
        if cfg:
            both = Conditioning.cat([uncond, cond])
            xin, sin = torch.cat([x, x]), torch.cat([sigma, sigma])  # (2B, ...)
        else:
            both, xin, sin = cond, x, sigma
        device_type = x.device.type
        with torch.autocast(device_type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.family.forward(
                self.transformer, xin.to(self.dtype), sin.to(torch.float32), both.to(x.device, self.dtype)
            ).float()
        if cfg:
            v_u, v_c = out.chunk(2)
            return v_u + guidance_scale * (v_c - v_u)
        return out


def images_per_second(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.nan
