"""What a model family implements, and the pieces several families share.

A *family* is everything :class:`firm.policies.policy.FlowPolicy` must not know about one kind of diffusers model:
which classes to load, how prompts (and source images) become conditioning, how latents are laid out, how the
transformer is called, how classifier-free guidance is combined, which sigmas the scheduler gives, which modules LoRA
adapts by default and which diffusers LoRA loader reads the export. Each family is one file next to this one,
registered by name in :data:`firm.registry.FAMILIES`, and pinned by a parity test to its official diffusers pipeline
(``tests/policies/families/test_<name>.py``). docs/models.md walks through adding one.

The contract, in the order the policy uses it:

* ``load(root)`` / ``build_tiny()`` -> components ``{"transformer", "scheduler", "codec", "text_encoder"}``;
* ``check(components)``: channel counts agree (a clear error otherwise);
* ``latent_shape(codec)``: the per-sample latent the sampler integrates (the Euler step is elementwise, so any layout
  works; packing into tokens happens inside ``forward``);
* ``text_encoder.encode([prompt], [image] or None)`` -> one :class:`PromptEmbedding` (the family's encoder class,
  with its pipeline's ``encode_prompt`` semantics) and ``stack(items)`` -> a :class:`Conditioning` batch;
* ``encode_sources(codec, images)`` -> the source images' latents (editing families);
* ``sigmas(scheduler, num_steps)`` -> the pipeline's (T + 1,) sigma schedule (static or resolution-dependent shift);
* ``velocity(transformer, x, sigma, cond, uncond, scale)`` -> the guided velocity exactly as the pipeline combines it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from firm.policies.encoders import Conditioning, HashTextEncoder, PromptEmbedding, is_hash_encoder_dir, stack_embeddings
from firm.vocab import Task

if TYPE_CHECKING:
    from firm.policies.config import PolicyConfig

# Attention projections of the joint (image + text) attention blocks of SD3, Qwen-Image and FLUX.
JOINT_ATTENTION_PROJECTIONS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


class ModelFamily:
    """Base class of the model families; subclasses set the class attributes and override what differs.

    Args:
        config: the policy settings (``resolution``, ``max_sequence_length``, ``condition_area``, ``tiny``, ...).
    """

    name: ClassVar[str] = ""  # the registry name (policy.family)
    task: ClassVar[Task] = Task.GEN  # GEN | EDIT (edit families condition on source images)
    pipeline: ClassVar[str] = ""  # the official diffusers pipeline class the parity test pins this family to
    lora_loader: ClassVar[str] = ""  # diffusers LoRA loader mixin (diffusers.loaders) whose saver writes exports
    lora_targets: ClassVar[tuple[str, ...]] = JOINT_ATTENTION_PROJECTIONS  # default LoRA target module suffixes
    keeps_mask: ClassVar[bool] = True  # the transformer takes a text mask (else prompts are padded to a fixed length)
    max_sequence_length: ClassVar[int] = 512  # the pipeline's default text tokens (policy.max_sequence_length: null)

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config

    # ------------------------------------------------------------------------------------------------ components

    def transformer_class(self) -> type:
        raise NotImplementedError

    def vae_class(self) -> type:
        raise NotImplementedError

    def block_classes(self) -> set[type]:
        """The transformer block classes (FSDP wrapping units, activation checkpointing)."""
        raise NotImplementedError

    def codec(self, vae: nn.Module) -> nn.Module:
        """Wrap the checkpoint's VAE into a latent codec (images in [0, 1] <-> normalised latents)."""
        raise NotImplementedError

    def load_text_encoder(self, root: Path, transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
        """The family's conditioning encoder from a diffusers-layout checkpoint directory."""
        raise NotImplementedError

    def tiny_transformer(self, latent_size: int, channels: int) -> nn.Module:
        """A tiny random transformer of the family's class for ``channels``-channel latents of ``latent_size``."""
        raise NotImplementedError

    def tiny_vae(self, channels: int) -> nn.Module:
        raise NotImplementedError

    def tiny_text_encoder(self) -> nn.Module:
        t = self.config.tiny
        heads = max(1, min(t.num_heads, t.text_dim // 8))
        while t.text_dim % heads:  # attention needs a divisor of the width (4096 text width with 24 heads: 16)
            heads -= 1
        return HashTextEncoder(
            HashTextEncoder.Config(
                vocab_size=t.vocab_size,
                dim=t.text_dim,
                pooled_dim=t.text_dim,
                max_length=t.max_text_length,
                num_layers=t.text_layers,
                num_heads=heads,
            )
        )

    def scheduler_class(self) -> type:
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler

    def load(self, root: Path, dtype: torch.dtype) -> dict[str, Any]:
        """Components from a diffusers-layout checkpoint directory (``transformer/``, ``scheduler/``, ``vae/``, ...)."""
        c = self.config
        if not (root / "transformer").is_dir():
            raise FileNotFoundError(f"{root}: no transformer/ folder (expected a diffusers-layout checkpoint)")
        transformer = self.transformer_class().from_pretrained(root, subfolder="transformer", torch_dtype=dtype)
        sched_cls = self.scheduler_class()
        scheduler = sched_cls.from_pretrained(root, subfolder="scheduler")
        if c.shift is not None:
            scheduler = sched_cls.from_config(scheduler.config, shift=c.shift)
        if c.vae not in ("auto", "pixel"):
            raise ValueError(f"policy.vae must be auto or pixel, got {c.vae!r}")
        vae_dir = root / "vae"
        if vae_dir.is_dir() and pixel_codec_config(vae_dir) is not None:
            codec: nn.Module = PixelCodec.from_pretrained(vae_dir)  # a parameter-free pixel codec (tiny policies)
        elif c.vae == "auto" and vae_dir.is_dir():
            codec = self.codec(self.vae_class().from_pretrained(root, subfolder="vae", torch_dtype=dtype))
        else:
            codec = PixelCodec()
        enc_dir = root / "text_encoder"
        if is_hash_encoder_dir(enc_dir):
            encoder: nn.Module = HashTextEncoder.from_pretrained(enc_dir)
        else:
            encoder = self.load_text_encoder(root, transformer, dtype)
        return {"transformer": transformer, "scheduler": scheduler, "codec": codec, "text_encoder": encoder}

    def build_tiny(self) -> dict[str, Any]:
        """Random tiny components of the family's classes (seeded by ``init_seed``; every rank builds the same)."""
        c, t = self.config, self.config.tiny
        if t.vae not in ("pixel", "tiny"):
            raise ValueError(f"policy.tiny.vae must be pixel or tiny, got {t.vae!r}")
        if torch.device(t.init_device).type not in ("cpu", "cuda"):
            raise ValueError(f"policy.tiny.init_device must be cpu or cuda, got {t.init_device!r}")
        if t.init_device != "cpu" and not torch.cuda.is_available():
            raise ValueError("policy.tiny.init_device: cuda, but no CUDA device is available")
        on_device = contextlib.ExitStack()
        if t.init_device != "cpu":  # a real-size benchmark: build on the GPU, directly in the policy's dtype
            device = torch.device(t.init_device)
            if device.index is None:  # this process's GPU (Lightning has not set one yet when the module is built)
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            on_device.enter_context(device)
            on_device.enter_context(_default_dtype(getattr(torch, c.dtype)))
        with torch.random.fork_rng(devices=[]), on_device:
            torch.manual_seed(c.init_seed)
            codec = PixelCodec(t.pixel_patch) if t.vae == "pixel" else self.codec(self.tiny_vae(t.latent_channels))
            if c.resolution % (codec.scale_factor * 2):
                raise ValueError(
                    f"policy.resolution={c.resolution} must be a multiple of {codec.scale_factor * 2} "
                    "(VAE downsampling x patch size 2)"
                )
            transformer = self.tiny_transformer(c.resolution // codec.scale_factor, codec.channels)
            encoder = self.tiny_text_encoder()
        scheduler = self.scheduler_class()(shift=c.shift or t.shift)
        return {"transformer": transformer, "scheduler": scheduler, "codec": codec, "text_encoder": encoder}

    def check(self, components: dict[str, Any]) -> None:
        """Raise a clear error when the transformer cannot take the codec's latents."""
        tc, codec = components["transformer"].config, components["codec"]
        want = self.transformer_in_channels(codec.channels)
        if tc.in_channels not in want:
            raise ValueError(
                f"the transformer takes {tc.in_channels} input channels but the latent codec gives "
                f"{codec.channels} ({type(codec).__name__}); check policy.vae / the checkpoint's vae/"
            )

    def transformer_in_channels(self, codec_channels: int) -> tuple[int, ...]:
        """The transformer input widths that fit ``codec_channels``-channel latents."""
        return (codec_channels,)

    # --------------------------------------------------------------------------------------------------- latents

    def latent_shape(self, codec: nn.Module) -> tuple[int, ...]:
        """The per-sample latent shape at ``config.resolution`` (default: the codec's (C, h, w))."""
        size = self.config.resolution // codec.scale_factor
        return (codec.channels, size, size)

    def image_seq_len(self, latent_shape: tuple[int, ...]) -> int:
        """Image tokens of one sample (2x2 latent patches by default): the input of dynamic shifting."""
        return (latent_shape[-2] // 2) * (latent_shape[-1] // 2)

    def decode(self, codec: nn.Module, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1]."""
        return codec.decode(latents)

    # ---------------------------------------------------------------------------------------------- conditioning

    def stack(self, items: list[PromptEmbedding], encoder: nn.Module) -> Conditioning:
        """Per-prompt embeddings -> a batch. Without a text mask, prompts are padded to the encoder's fixed length,
        so that a prompt's row does not depend on the other prompts of its batch."""
        pad_to = None if self.keeps_mask else getattr(getattr(encoder, "config", None), "max_length", None)
        return stack_embeddings(items, keep_mask=self.keeps_mask, pad_to=pad_to)

    def encode_sources(self, codec: nn.Module, images: list[Any], device: torch.device) -> Any:
        """Editing families: the source images' latents for the batch (one PIL image, or a list, per row)."""
        raise NotImplementedError(f"{self.name} is a generation family: it takes no source images")

    # -------------------------------------------------------------------------------------------------- schedule

    def sigmas(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """(T + 1,) float32 sigmas of a ``num_steps`` schedule, as the family's pipeline sets them (default: the
        scheduler's own ``set_timesteps(num_steps)``, with dynamic shifting when its config asks for it)."""
        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.shift_mu(scheduler, latent_shape)
        scheduler.set_timesteps(num_steps, **kwargs)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    def linspace_sigmas(self, scheduler: Any, num_steps: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
        """The FLUX / Qwen-Image pipelines' schedule: ``linspace(1, 1/T, T)``, shifted by the scheduler (dynamic
        shift from the image token count when its config asks for it)."""
        import numpy as np

        kwargs: dict[str, Any] = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            kwargs["mu"] = self.shift_mu(scheduler, latent_shape)
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / num_steps, num_steps).tolist(), **kwargs)
        return scheduler.sigmas.detach().to("cpu", torch.float32).clone()

    def shift_mu(self, scheduler: Any, latent_shape: tuple[int, ...]) -> float:
        """``mu`` of dynamic shifting: linear in the image token count (FLUX.1's ``calculate_shift``)."""
        conf = scheduler.config
        return calculate_shift(
            self.image_seq_len(latent_shape),
            conf.get("base_image_seq_len", 256),
            conf.get("max_image_seq_len", 4096),
            conf.get("base_shift", 0.5),
            conf.get("max_shift", 1.15),
        )

    # ----------------------------------------------------------------------------------------------------- model

    def forward(self, transformer: nn.Module, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """One transformer call: latents ``x`` (B, *latent_shape) at noise levels ``sigma`` (B,) -> the velocity
        (B, *latent_shape) in the sampler's convention ``x_{t+dt} = x_t + (sigma_next - sigma) * v``."""
        raise NotImplementedError

    def needs_uncond(self, scale: float) -> bool:
        """Whether guidance at ``scale`` needs the negative prompt's conditioning (a second pass)."""
        return scale > 1.0

    def velocity(
        self,
        transformer: nn.Module,
        x: torch.Tensor,
        sigma: torch.Tensor,
        cond: Conditioning,
        uncond: Conditioning | None,
        scale: float,
    ) -> torch.Tensor:
        """The guided velocity. Default: batched classifier-free guidance ``v_u + scale (v_c - v_u)`` (SD3)."""
        if not self.needs_uncond(scale):
            return self.forward(transformer, x, sigma, cond)
        if uncond is None:
            raise ValueError(f"guidance_scale {scale} needs the unconditional conditioning (`uncond`)")
        both = Conditioning.cat([uncond, cond])
        out = self.forward(transformer, torch.cat([x, x]), torch.cat([sigma, sigma]), both).float()  # (2B, ...)
        v_u, v_c = out.chunk(2)
        return self.combine(v_u, v_c, scale)

    def combine(self, v_u: torch.Tensor, v_c: torch.Tensor, scale: float) -> torch.Tensor:
        """How the pipeline combines the two passes. Default: ``v_u + scale (v_c - v_u)``."""
        return v_u + scale * (v_c - v_u)

    # ---------------------------------------------------------------------------------------------------- export

    def lora_saver(self) -> type:
        """The diffusers class whose ``save_lora_weights`` writes a LoRA its pipeline's ``load_lora_weights`` reads."""
        import diffusers.loaders.lora_pipeline as lp

        return getattr(lp, self.lora_loader)


# --------------------------------------------------------------------------------------------------------------------
# Shared helpers


def calculate_shift(seq_len: int, base_len: int, max_len: int, base_shift: float, max_shift: float) -> float:
    """The resolution-dependent ``mu`` of dynamic shifting (linear in the image token count; FLUX.1 / diffusers)."""
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + base_shift - m * base_len


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2 * w/2, 4C): 2x2 patches as tokens (the FLUX.1 / Qwen-Image layout)."""
    b, c, h, w = x.shape
    x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: (B, h/2 * w/2, 4C) -> (B, C, h, w)."""
    b, _, c4 = x.shape
    x = x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, h/2, 2, w/2, 2)
    return x.reshape(b, c4 // 4, h, w)


def fit_area(width: int, height: int, area: int, multiple: int = 32) -> tuple[int, int]:
    """(w, h) with the aspect ratio of (width, height), about ``area`` pixels, rounded to ``multiple`` (the
    ``calculate_dimensions`` of the Qwen-Image-Edit pipelines)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return max(multiple, round(w / multiple) * multiple), max(multiple, round(h / multiple) * multiple)


def vae_preprocess(images: list[Any], width: int, height: int) -> torch.Tensor:
    """diffusers' ``VaeImageProcessor.preprocess`` (its default resize filter, lanczos) -> (B, 3, H, W) in [0, 1]."""
    from diffusers.image_processor import VaeImageProcessor

    proc = VaeImageProcessor(vae_scale_factor=1)
    x = torch.cat([proc.preprocess(im.convert("RGB"), height=height, width=width) for im in images])  # [-1, 1]
    return (x.float() + 1.0) / 2.0


def rows_as_lists(images: list[Any]) -> list[list[Any]]:
    """Each batch row's source images as a list (a row may hold one PIL image or several)."""
    return [list(im) if isinstance(im, (list, tuple)) else [im] for im in images]


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
        conf = pixel_codec_config(Path(directory))
        if conf is None:
            raise ValueError(f"{directory}/config.json does not describe a PixelCodec")
        return cls(int(conf.get("patch", 1)))


def pixel_codec_config(directory: Path) -> dict | None:
    """The saved PixelCodec settings in ``directory`` (a checkpoint's ``vae/``), or None when it holds a real VAE."""
    cfg = directory / "config.json"
    if not cfg.is_file():
        return None
    try:
        conf = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return None
    return conf if conf.get("class") == "PixelCodec" else None


class KLCodec(nn.Module):
    """``AutoencoderKL`` with the ``(z - shift_factor) * scaling_factor`` latent normalisation (SD3, FLUX.1)."""

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


def tiny_kl_vae(channels: int) -> nn.Module:
    """A two-level ``AutoencoderKL`` (2x smaller latents) for tiny checkpoints, with SD3.5's latent scale and shift."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=channels,
        norm_num_groups=4,
        scaling_factor=1.5305,
        shift_factor=0.0609,
    )
