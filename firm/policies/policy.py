"""The flow policy: a diffusers flow-matching transformer with LoRA adapters, its scheduler, encoders and VAE.

:class:`FlowPolicy` is a plain ``nn.Module`` and knows no model family. What differs between SD3, Qwen-Image(-Edit),
FLUX and the others (classes, conditioning, latent layout, the transformer call, guidance, sigmas, LoRA targets,
export naming) lives in one file per family under :mod:`firm.policies.families`, chosen by ``policy.family`` from
:data:`firm.registry.FAMILIES`. The policy owns what every family shares:

* the family's components: transformer, a flow-matching scheduler (used for its sigma schedule only), a latent codec
  (the checkpoint's VAE, or pixel-space latents for tiny CPU policies) and the conditioning encoder;
* LoRA adapters (peft): ``default`` is trained; ``old`` (DiffusionNFT's sampling policy) is a second adapter moved
  towards ``default`` by decay; the reference policy is the base with adapters disabled;
* gradient checkpointing, and the per-prompt conditioning cache.

The sampling loop is not here: :mod:`firm.policies.samplers` runs it with :meth:`FlowPolicy.velocity`.

Loading is ``from_pretrained`` from a diffusers-layout directory or hub id (``transformer/``, ``scheduler/``,
``vae/``, ``text_encoder*/``, ``tokenizer*/``, ``processor/``). With ``pretrained: null`` a tiny random model of the
family's classes is built from the ``tiny`` settings (seeded, so every rank and every resume builds the same
weights); :func:`build_tiny_components` + :func:`save_components` write one to a directory that loads like a real
checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from firm.policies.config import DTYPES, LoRAConfig, PolicyConfig, TinyConfig, family_names
from firm.policies.encoders import Conditioning, PromptEmbedding
from firm.policies.families.base import ModelFamily, PixelCodec
from firm.vocab import Task

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
__all__ = ["FlowPolicy", "PolicyConfig", "LoRAConfig", "TinyConfig", "PixelCodec", "family_names"]


def get_family(config: PolicyConfig) -> ModelFamily:
    """The family object of ``config.family`` (a name in :data:`firm.registry.FAMILIES`)."""
    from firm.registry import resolve

    return resolve("families", config.family)(config)


# --------------------------------------------------------------------------------------------------------------------
# Building / loading components


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"policy.dtype must be one of {sorted(DTYPES)}, got {name!r}")
    return DTYPES[name]


def build_tiny_components(config: PolicyConfig) -> dict[str, Any]:
    """Random tiny transformer / scheduler / codec / text encoder of ``config.family`` (seeded by init_seed)."""
    return get_family(config).build_tiny()


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
    if p.is_absolute() or path.startswith((".", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"policy.pretrained: {path} is not a directory (nor a hub id like org/name)")
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, revision=revision, allow_patterns=CHECKPOINT_PATTERNS))


def load_components(config: PolicyConfig) -> dict[str, Any]:
    """Components from a diffusers-layout checkpoint (a directory, or a hub id fetched once into the HF cache)."""
    root = _local_checkpoint(config.pretrained, config.revision)
    return get_family(config).load(root, _dtype(config.dtype))


def _image_key(image: Any) -> str | None:
    if image is None:
        return None
    if isinstance(image, (list, tuple)):
        return "+".join(str(_image_key(im)) for im in image)
    return hashlib.sha1(image.tobytes() + repr((image.size, image.mode)).encode()).hexdigest()


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
        self.family = fam = get_family(config)
        if components is None:
            if config.pretrained is None:
                components = fam.build_tiny()
            else:  # this family object loads, so that what it learns from the checkpoint stays with it
                components = fam.load(_local_checkpoint(config.pretrained, config.revision), _dtype(config.dtype))
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
        fam.check(components)
        self._latent_shape = tuple(fam.latent_shape(self.codec))
        self.has_old_adapter = old_adapter
        self._add_adapters(old_adapter)
        if config.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self._cache: OrderedDict[tuple, PromptEmbedding] = OrderedDict()
        self._encode_group: Any = None  # the process group of a sharded text encoder (see firm.policies.sharding)
        self.text_encoder_freed = False
        self._sigma_cache: dict[int, torch.Tensor] = {}
        self._adapter_state: str | None = TRAIN_ADAPTER

    # ---------------------------------------------------------------------------------------------------- structure

    def train(self, mode: bool = True) -> FlowPolicy:
        """Only the transformer (its adapters' dropout) follows ``mode``; encoders and the VAE stay in eval mode."""
        super().train(mode)
        self.text_encoder.eval()
        self.codec.eval()
        return self

    def _add_adapters(self, old_adapter: bool) -> None:
        from peft import LoraConfig

        lc = self.config.lora
        if lc.rank < 1:
            raise ValueError(f"policy.lora.rank must be >= 1, got {lc.rank}")
        init = True if lc.init == "default" else lc.init
        names = {n for n, _ in self.transformer.named_modules()}
        wanted = list(lc.target_modules) if lc.target_modules is not None else list(self.family.lora_targets)
        targets = [t for t in wanted if any(n == t or n.endswith("." + t) for n in names)]
        if not targets:
            raise ValueError(
                f"policy.lora.target_modules {wanted} match no module of {type(self.transformer).__name__}"
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
        # peft creates the adapters in the dtype of the layer they wrap (bf16 with a bf16 base); the references
        # train float32 adapters (peft's get_peft_model upcasts them: autocast_adapter_dtype), and so does FIRM
        for name, p in self.transformer.named_parameters():
            if "lora_" in name and p.dtype != torch.float32:
                p.data = p.data.float()
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

        from firm.policies.sharding import full

        return {
            k: full(v.detach()).cpu().contiguous()
            for k, v in get_peft_model_state_dict(self.transformer, adapter_name=adapter).items()
        }

    def base_fingerprint(self) -> torch.Tensor:
        """(3,) float64 summary of the frozen transformer weights, to catch resuming onto a different base model."""
        from firm.policies.sharding import full

        params = [p for n, p in self.transformer.named_parameters() if "lora_" not in n]
        first, last = full(params[0].detach()).double(), full(params[-1].detach()).double()  # whole: any world size
        return torch.stack([first.sum().cpu(), last.sum().cpu(), torch.tensor(float(sum(p.numel() for p in params)))])

    # ---------------------------------------------------------------------------------------------------- schedule

    def sigmas(self, num_steps: int) -> torch.Tensor:
        """(T + 1,) float32 sigmas of a ``num_steps`` schedule, as the family's pipeline sets them."""
        if num_steps not in self._sigma_cache:
            self._sigma_cache[num_steps] = self.family.sigmas(self.scheduler, num_steps, self._latent_shape)
        return self._sigma_cache[num_steps]

    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one sample's latent (the sampler's state; the family's layout)."""
        return self._latent_shape

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    # ---------------------------------------------------------------------------------------------------- encoding

    def encode_prompts(
        self, prompts: list[str], images: list[Any] | None = None, *, with_sources: bool = True
    ) -> Conditioning:
        """Conditioning for ``prompts`` (and their source images when editing: one PIL image, or a list, per prompt),
        from the per-prompt cache; ``with_sources=False`` leaves the source latents out (the caller has them)."""
        fam = self.family
        edit = fam.task == Task.EDIT
        if edit and (images is None or any(im is None for im in images)):
            raise ValueError(f"{fam.name} edits a source image: every prompt needs one (data.task: edit)")
        use_images = images if edit else None
        keys = [(p, _image_key(use_images[i]) if use_images else None) for i, p in enumerate(prompts)]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        misses = {keys[i]: (use_images[i] if use_images else None) for i in todo}  # key -> its source image
        if self._encode_group is not None:  # a sharded encoder: every rank encodes the union of all ranks' misses
            import torch.distributed as dist

            gathered: list[Any] = [None] * dist.get_world_size(self._encode_group)
            dist.all_gather_object(gathered, list(misses.items()), group=self._encode_group)
            # the union, encoded on every rank even where this rank has it cached: the ranks' caches evict
            # differently, and a sharded forward must run on all of them
            misses = {k: im for part in gathered for k, im in part}
        if misses and self.text_encoder_freed:
            raise RuntimeError(
                f"prompt {next(iter(misses))[0]!r} is not in the prompt cache and the text encoder was freed "
                "(policy.text_encoder: freed): every prompt must be encoded before training starts"
            )
        if misses:
            # One prompt per encoder call: an embedding must not depend on which other prompts missed the cache with
            # it (batched matmuls and padding change the last bits), or a resumed run, whose cache starts empty,
            # would drift from the uninterrupted one.
            uniq = list(misses)
            embs = [self.text_encoder.encode([k[0]], [misses[k]] if edit else None)[0] for k in uniq]
            for k, e in zip(uniq, embs):
                self._cache[k] = e.to("cpu")
                while len(self._cache) > self.config.cache_size:
                    self._cache.popitem(last=False)
        items = []
        for k in keys:
            self._cache.move_to_end(k)
            items.append(self._cache[k])
        cond = fam.stack(items, self.text_encoder).to(self.device)
        if edit and with_sources:
            cond = cond.with_image_latents(fam.encode_sources(self.codec, use_images, self.device))
        return cond

    def encode_collectively(self, group: Any) -> None:
        """From now on, exchange cache misses over ``group`` before encoding (a sharded encoder's forward is a
        collective: every rank must run it on the same prompts in the same order)."""
        self._encode_group = group

    def needs_uncond(self, guidance_scale: float) -> bool:
        """Whether sampling at ``guidance_scale`` needs :meth:`encode_negative` (the family's guidance rule)."""
        return self.family.needs_uncond(guidance_scale)

    def encode_negative(self, like: Conditioning, images: list[Any] | None = None) -> Conditioning:
        """The unconditional (negative-prompt) conditioning for a batch like ``like`` (same source images)."""
        neg = self.encode_prompts([self.config.negative_prompt] * len(like), images, with_sources=False)
        return neg.with_image_latents(like.image_latents)  # the same source latents: no second VAE pass

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> the codec's latents (B, C, h, w), float32."""
        return self.codec.encode(images.to(self.device)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, *latent_shape) -> images (B, 3, H, W) float32 in [0, 1]."""
        return self.family.decode(self.codec, latents)

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
        """The model velocity at ``(x, sigma)``, guided as the family's pipeline guides it.

        Args:
            x: (B, *latent_shape) latents.
            sigma: (B,) noise levels in [0, 1].
            cond: the batch's conditioning.
            guidance_scale: the family's guidance scale (the pipeline's ``guidance_scale``, or ``true_cfg_scale`` for
                Qwen-Image); when :meth:`needs_uncond` says so, ``uncond`` must be given.
            uncond: the unconditional conditioning (:meth:`encode_negative`).

        Returns:
            (B, *latent_shape) float32 velocity, differentiable w.r.t. the active adapter when grad is enabled.
        """
        with torch.autocast(x.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.family.velocity(
                self.transformer,
                x.to(self.dtype),
                sigma.to(torch.float32),
                cond.to(x.device, self.dtype),
                None if uncond is None else uncond.to(x.device, self.dtype),
                float(guidance_scale),
            ).float()

    @torch.no_grad()
    def sample_latents(
        self,
        prompts: list[str],
        noise: torch.Tensor,
        num_steps: int,
        *,
        images: list[Any] | None = None,
        guidance_scale: float = 1.0,
        method: str = "ode",
    ) -> torch.Tensor:
        """Deterministic sampling from ``noise`` (B, *latent_shape) with the active adapter: the final latents.

        With ``method: ode`` this is the family pipeline's Euler loop on the same sigmas (the parity tests check it).
        """
        from firm.policies.samplers import sample

        cond = self.encode_prompts(prompts, images)
        uncond = self.encode_negative(cond, images) if self.needs_uncond(guidance_scale) else None

        def vfn(x: torch.Tensor, sig: torch.Tensor) -> torch.Tensor:
            return self.velocity(x, sig, cond, guidance_scale=guidance_scale, uncond=uncond)

        return sample(
            vfn, noise.to(self.device), self.sigmas(num_steps), method=method, noise_level=0.0, record=False
        ).final


def images_per_second(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else math.nan
