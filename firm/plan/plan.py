"""The per-GPU memory of an RL experiment, for each way of running it.

What is counted, and how:

* **Weights, LoRA, gradients, optimizer states** from the real modules: the experiment's policy (its family's
  transformer, VAE and text encoders, built from the checkpoint's ``config.json`` on the meta device, LoRA applied by
  :class:`~firm.policies.policy.FlowPolicy` with peft, as a run does) gives every parameter's size and dtype. The
  adapters take the dtype a real run gives them (:func:`adapter_dtype`); the trained adapter's gradient, AdamW's two
  states and the EMA (``ema_decay``) have that dtype too; DiffusionNFT keeps a second (``old``) adapter.
* **Activations** measured with fake tensors (:mod:`firm.plan.measure`): one trained micro-batch goes through what
  the update runs for it (the no-grad forwards of the old policy and the reference, then the forward and backward of
  the trained one, two passes when the algorithm trains with classifier-free guidance), with and without activation
  checkpointing; one rollout chunk through a no-grad forward (x2 with CFG), the VAE decode of the chunk, the VAE encode
  of the batch's source images (editing), and one prompt through each text encoder.
* **Rollout buffers**: what the rollout keeps on the device for the update, from the shapes (the trajectory's
  latents, the batch's conditioning and source latents).
* **Sharding**: DDP holds everything on every GPU, plus its gradient buckets (one more copy of the trained
  gradients). FSDP2 divides the transformer, the adapters, their gradients, the EMA and AdamW's states by N, and holds
  whole the blocks it has gathered: the running block and the prefetched next one, plus the root's own weights
  (``fsdp_sharding: SHARD_GRAD_OP`` keeps every gathered block from its forward to its backward: the whole
  transformer). The text encoder is ``kept`` (whole on every GPU), ``sharded`` (divided by N under FSDP2; DDP cannot
  shard it, so it counts as kept) or ``freed`` (whole while it fills the prompt cache at the start, then 0).

The peak is the largest of three phases: the start (``freed`` only: the encoder fills the cache before the first
step), the rollout (resident state + the buffers + the largest of: prompt encoding, source encoding, a chunk's
forward, its decode) and the update (resident state + gradients + buffers + the micro-batch's activations).
A GPU fits when the peak is at most ``USABLE`` of its memory: the rest is for the CUDA context, NCCL buffers and the
caching allocator's fragmentation, which this plan does not model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn

from firm.config import ConfigError, load_experiment, to_object
from firm.plan.checkpoints import build_on_meta, checkpoint_dir, quiet_diffusers, read_components
from firm.plan.inputs import InputsContext, SampleInputs, full_size_inputs, tiny_inputs
from firm.plan.measure import fake_weights, peak_above
from firm.policies.config import DTYPES, TEXT_ENCODER_PLACEMENTS
from firm.policies.families.base import PixelCodec
from firm.policies.policy import OLD_ADAPTER, TRAIN_ADAPTER, FlowPolicy, get_family
from firm.policies.samplers import SAMPLERS

GIB = 2**30
# Total memory as nvidia-smi reports it: H100 / A100 80 GB (81559 MiB) and H200 (143771 MiB).
GPUS: dict[str, int] = {"80GB": 81559 * 2**20, "141GB": 143771 * 2**20}
USABLE = 0.9  # share of a GPU's memory the tensors may take (the rest: CUDA context, NCCL, fragmentation)
STRATEGIES = ("ddp", "fsdp2")
SHARDED_STRATEGIES = ("fsdp", "fsdp2")  # trainer.strategy names that shard (fsdp is fsdp2's alias)
ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class Setting:
    """One way to run the experiment."""

    strategy: str  # ddp | fsdp2
    checkpointing: bool  # policy.gradient_checkpointing
    text_encoder: str  # kept | sharded | freed

    @property
    def label(self) -> str:
        return f"{self.strategy}, ckpt {'on' if self.checkpointing else 'off'}, encoder {self.text_encoder}"


@dataclass
class Footprint:
    """Whole-model bytes (not per GPU) of everything that lives on a GPU during training."""

    transformer: int  # frozen base weights (policy.dtype)
    transformer_root: int  # its part outside the blocks (FSDP2's root unit)
    largest_block: int  # the largest block, adapters included (what FSDP2 gathers at once)
    largest_block_lora: int  # that block's trained adapter (its unsharded gradient before the reduce-scatter)
    lora: int  # the trained adapter (in the dtype a run gives it, see adapter_dtype)
    lora_old: int  # DiffusionNFT's old adapter, else 0
    ema: int  # the EMA copy of the trained adapter, else 0
    vae: int
    text_encoders: dict[str, int]  # per component
    encoder_largest_layer: dict[str, int]  # per component: one layer (what a sharded encoder gathers at once)
    trainable_params: int = 0
    frozen_params: int = 0


@dataclass
class Measured:
    """Bytes measured with fake tensors, above what already exists (see the module docstring)."""

    update: dict[str, int]  # "on" / "off" (activation checkpointing) -> one trained micro-batch's peak
    rollout_forward: int  # one rollout chunk's no-grad forward
    vae_decode: int  # decoding one chunk
    vae_encode: int  # encoding the local batch's source images (0 for generation)
    encode: dict[str, int]  # one prompt through each text encoder
    seconds: float = 0.0


@dataclass
class Shapes:
    """The sizes the plan is for."""

    world: int  # GPUs: trainer.devices x trainer.num_nodes
    local_batch: int  # data.batch_size: samples per GPU per RL step
    micro_batch: int  # samples per trained forward
    update_passes: int  # 2 when the update's forward runs classifier-free guidance (both halves in one batch)
    rollout_chunk: int
    rollout_passes: int
    image_tokens: int  # transformer tokens of one sample's target
    source_tokens: int  # of its source images (editing)
    text_tokens: int
    latent: tuple[int, ...]
    dtype: str
    no_grad_forwards: int  # no-grad forwards before the trained one, per micro-batch (old policy, reference)


@dataclass
class Row:
    """Per-GPU bytes of one setting."""

    setting: Setting
    parts: dict[str, int]
    phases: dict[str, int]
    peak: int
    fits: dict[str, bool]
    notes: list[str] = field(default_factory=list)


class PlanRows:
    """What both plans (RL and critic SFT) derive from their ``rows``, ``setting`` and ``target``."""

    rows: list[Any]
    setting: Any
    target: str

    @property
    def row(self) -> Any:
        """The experiment's own setting."""
        return next(r for r in self.rows if r.setting == self.setting)

    @property
    def fits(self) -> bool:
        return self.row.fits[self.target]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["fits"] = self.fits
        out["peak_gib"] = self.row.peak / GIB
        out["usable_share"] = USABLE
        out["gpus"] = GPUS
        return out


@dataclass
class Plan(PlanRows):
    """The plan of one experiment: its setting's row first, then every other setting."""

    experiment: str
    name: str
    pretrained: str | None
    family: str
    algorithm: str
    setting: Setting  # the experiment's own
    shapes: Shapes
    footprint: Footprint
    measured: Measured
    buffers: int
    rows: list[Row]
    target: str  # the GPU "fits" refers to
    suggestion: str | None = None


# --------------------------------------------------------------------------------------------------------------------
# Building the policy


@dataclass
class Built:
    """The experiment's policy (fake weights), its text encoders (fake weights) and what the plan reads from them."""

    policy: FlowPolicy
    encoders: dict[str, nn.Module]
    inputs: SampleInputs
    footprint: Footprint


def _bytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _module_bytes(m: nn.Module) -> int:
    return _bytes(m.parameters()) + _bytes(m.buffers())


def _largest_layer(model: nn.Module) -> int:
    """Bytes of the largest repeated layer (transformers' ``_no_split_modules``, else a ModuleList's largest entry)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        layers = [x for m in model.modules() if isinstance(m, nn.ModuleList) for x in m]
    return max((_module_bytes(m) for m in layers), default=_module_bytes(model))


def build(module_cfg: Any, algorithm: type, prompt_tokens: int | None, progress: ProgressFn) -> Built:
    """The policy of ``module_cfg`` with the checkpoint's architecture (or the tiny one), weights fake."""
    pc = module_cfg.policy
    fam = get_family(pc)
    dtype = DTYPES[pc.dtype]
    encoders: dict[str, nn.Module] = {}
    if pc.pretrained is None:  # a tiny policy: ModelFamily.build_tiny's components, on the meta device
        t = pc.tiny
        scheduler = fam.scheduler_class()(shift=pc.shift or t.shift)
        with torch.device("meta"), quiet_diffusers():
            codec = PixelCodec(t.pixel_patch) if t.vae == "pixel" else fam.codec(fam.tiny_vae(t.latent_channels))
            transformer = fam.tiny_transformer(pc.resolution // codec.scale_factor, codec.channels)
            comps = {"transformer": transformer, "scheduler": scheduler, "codec": codec}
            policy = FlowPolicy(
                pc,
                old_adapter=algorithm.needs_old_adapter,
                components={**comps, "text_encoder": fam.tiny_text_encoder()},
            )
        encoders["text_encoder"] = policy.text_encoder
        root = None
    else:
        root = checkpoint_dir(pc.pretrained)
        parts = read_components(root)
        progress(f"building {pc.pretrained} on the meta device ({', '.join(parts)})")
        transformer = build_on_meta(parts["transformer"], dtype)
        if pc.vae == "auto" and "vae" in parts:
            vae = build_on_meta(parts["vae"], dtype)
            with torch.device("meta"):
                codec = fam.codec(vae)
        else:
            codec = PixelCodec()
        scheduler = fam.scheduler_class()()  # a default one: the plan never asks it for sigmas
        comps = {"transformer": transformer, "scheduler": scheduler, "codec": codec, "text_encoder": nn.Module()}
        with torch.device("meta"), quiet_diffusers():
            policy = FlowPolicy(pc, old_adapter=algorithm.needs_old_adapter, components=comps)
    _cast_adapters(policy, adapter_dtype(pc))
    ctx = InputsContext(fam, pc, policy.transformer, policy.codec, root, prompt_tokens)
    if root is None:
        inputs = tiny_inputs(ctx, policy.text_encoder)
    else:
        inputs = full_size_inputs(ctx)
        for name in inputs.encoder_tokens:
            encoders[name] = build_on_meta(parts[name], dtype)
    footprint = _footprint(policy, encoders, module_cfg)
    mode = _fake_mode()
    fake_weights(policy, mode)
    for enc in encoders.values():
        if enc is not policy.text_encoder:
            fake_weights(enc, mode)
    return Built(policy, encoders, inputs, footprint)


def adapter_dtype(pc: Any) -> torch.dtype:
    """The dtype a real run gives the LoRA adapters: a small real policy of the same family, dtype and LoRA settings
    is built to see it. (peft casts new adapters to the dtype of the layer they wrap, except on the meta device, so
    the meta-built policy cannot tell.)"""
    from firm.policies.config import TinyConfig

    probe = replace(pc, pretrained=None, resolution=32, tiny=TinyConfig(), gradient_checkpointing=False)
    if pc.lora.target_modules is not None:  # a target the tiny model lacks would fail; any target shows the dtype
        probe = replace(probe, lora=replace(pc.lora, target_modules=None))
    with quiet_diffusers():
        return FlowPolicy(probe).trainable_parameters()[0].dtype


def _cast_adapters(policy: FlowPolicy, dtype: torch.dtype) -> None:
    for m in policy.transformer.modules():
        for name in ("lora_A", "lora_B"):
            adapters = getattr(m, name, None)
            if isinstance(adapters, nn.ModuleDict):
                adapters.to(dtype)


_MODE: Any = None


def _fake_mode() -> Any:
    """One FakeTensorMode for the process: the policy's fake weights and the measured ops must share it."""
    global _MODE
    if _MODE is None:
        from torch._subclasses.fake_tensor import FakeTensorMode

        _MODE = FakeTensorMode()
    return _MODE


def _footprint(policy: FlowPolicy, encoders: dict[str, nn.Module], module_cfg: Any) -> Footprint:
    tr = policy.transformer
    named = list(tr.named_parameters())
    base = [p for n, p in named if "lora_" not in n]
    lora = [p for n, p in named if "lora_" in n and f".{TRAIN_ADAPTER}." in n]
    old = [p for n, p in named if "lora_" in n and f".{OLD_ADAPTER}." in n]
    block_types = tuple(policy.family.block_classes())
    blocks = [m for m in tr.modules() if isinstance(m, block_types)]
    block_bytes = [_module_bytes(b) for b in blocks]
    largest = blocks[block_bytes.index(max(block_bytes))] if blocks else tr
    block_lora = [p for n, p in largest.named_parameters() if "lora_" in n and f".{TRAIN_ADAPTER}." in n]
    base_blocks = sum(_bytes(p for n, p in b.named_parameters() if "lora_" not in n) for b in blocks)
    return Footprint(
        transformer=_bytes(base) + _bytes(tr.buffers()),
        transformer_root=_bytes(base) - base_blocks,
        largest_block=max(block_bytes, default=0),
        largest_block_lora=_bytes(block_lora),
        lora=_bytes(lora),
        lora_old=_bytes(old),
        ema=_bytes(lora) if module_cfg.ema_decay is not None else 0,
        vae=_module_bytes(policy.codec),
        text_encoders={k: _module_bytes(m) for k, m in encoders.items()},
        encoder_largest_layer={k: _largest_layer(m) for k, m in encoders.items()},
        trainable_params=sum(p.numel() for p in lora),
        frozen_params=sum(p.numel() for p in base),
    )


# --------------------------------------------------------------------------------------------------------------------
# What is measured


def update_step(
    policy: FlowPolicy, inputs: SampleInputs, micro: int, *, guidance: float, no_grad_forwards: int
) -> list[torch.Tensor]:
    """What the update runs for one micro-batch (firm/algorithms/diffusion_nft.py, flow_grpo.py ``micro_loss``):
    ``no_grad_forwards`` forwards without gradients (the old policy, the reference), kept, then the trained forward,
    a loss and its backward. Returns the kept velocities."""
    shape = policy.latent_shape()
    x = torch.randn(micro, *shape)  # (b, C, h, w) float32, as the rollout keeps latents
    t = torch.rand(micro)
    cond = inputs.conditioning(micro, policy.dtype)
    uncond = inputs.conditioning(micro, policy.dtype) if policy.needs_uncond(guidance) else None
    kept = []
    with torch.no_grad():
        for _ in range(no_grad_forwards):
            kept.append(policy.velocity(x, t, cond, guidance_scale=guidance, uncond=uncond))
    v = policy.velocity(x, t, cond, guidance_scale=guidance, uncond=uncond)
    ((v - x) ** 2).mean().backward()
    return kept


def _zero_grads(policy: FlowPolicy) -> list[torch.Tensor]:
    """The trained adapter's gradients, made up front: they are counted on their own line, not as activations."""
    for p in policy.trainable_parameters():
        p.grad = torch.zeros_like(p)
    return [p.grad for p in policy.trainable_parameters()]


def measure(built: Built, shapes: Shapes, module_cfg: Any, guidance_update: float, progress: ProgressFn) -> Measured:
    """Every fake-tensor measurement the plan needs (see the module docstring)."""
    policy, inputs = built.policy, built.inputs
    s = module_cfg.sampler
    t0 = time.perf_counter()
    mode = _fake_mode()
    resident = [policy, *built.encoders.values()]
    update: dict[str, int] = {}
    with mode:
        grads = _zero_grads(policy)
        tr = policy.transformer
        for ckpt in (False, True):
            label = "on" if ckpt else "off"
            progress(
                f"activations of a trained micro-batch ({shapes.micro_batch} x {shapes.update_passes} samples), "
                f"checkpointing {label}"
            )
            (tr.enable_gradient_checkpointing if ckpt else tr.disable_gradient_checkpointing)()
            update[label] = peak_above(
                lambda: update_step(
                    policy,
                    inputs,
                    shapes.micro_batch,
                    guidance=guidance_update,
                    no_grad_forwards=shapes.no_grad_forwards,
                ),
                *resident,
                grads,
            )
        progress(f"rollout: a chunk of {shapes.rollout_chunk} x {shapes.rollout_passes} samples, its decode")
        chunk = shapes.rollout_chunk

        def rollout_forward() -> torch.Tensor:
            x = torch.randn(chunk, *policy.latent_shape())
            cond = inputs.conditioning(chunk, policy.dtype)
            uncond = inputs.conditioning(chunk, policy.dtype) if policy.needs_uncond(s.guidance_scale) else None
            with torch.no_grad():
                return policy.velocity(x, torch.rand(chunk), cond, guidance_scale=s.guidance_scale, uncond=uncond)

        forward = peak_above(rollout_forward, *resident, grads)
        decode = peak_above(lambda: policy.decode(torch.randn(chunk, *policy.latent_shape())), *resident, grads)
        encode_sources = 0
        if inputs.sources:
            progress(f"encoding the source images of {shapes.local_batch} samples")
            sf = policy.codec.scale_factor

            def encode_all() -> list[torch.Tensor]:
                with torch.no_grad():
                    return [
                        policy.codec.encode(torch.rand(shapes.local_batch, 3, h * sf, w * sf))
                        for _, h, w in inputs.sources
                    ]

            encode_sources = peak_above(encode_all, *resident, grads)
        encode = {}
        for name, tokens in inputs.encoder_tokens.items():
            if not tokens:
                continue
            progress(f"one prompt ({tokens} tokens) through {name}")
            encode[name] = peak_above(lambda m=built.encoders[name], n=tokens: _encode(m, n), *resident, grads)
        for p in policy.trainable_parameters():
            p.grad = None
    return Measured(update, forward, decode, encode_sources, encode, time.perf_counter() - t0)


def _encode(model: nn.Module, tokens: int) -> Any:
    """One prompt through a text encoder, all hidden states returned (as the families ask for them)."""
    ids = torch.zeros(1, tokens, dtype=torch.long)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)


# --------------------------------------------------------------------------------------------------------------------
# Per-GPU bytes of a setting


def per_gpu(setting: Setting, fp: Footprint, meas: Measured, buffers: int, world: int, reshard: bool) -> Row:
    """The per-GPU bytes of ``setting`` over ``world`` GPUs (``reshard``: FSDP2 frees a block's gathered weights
    after its forward, FULL_SHARD)."""
    fsdp = setting.strategy == "fsdp2" and world > 1
    n = world if fsdp else 1
    notes = []
    parts: dict[str, int] = {"transformer": math.ceil(fp.transformer / n)}
    encoders_whole = sum(fp.text_encoders.values())
    placement = setting.text_encoder
    if placement == "sharded" and not fsdp:
        notes.append(
            "one GPU: nothing to shard" if world == 1 else "DDP cannot shard the text encoder: counted as kept"
        )
        placement = "kept"
    for name, size in fp.text_encoders.items():
        parts[name] = 0 if placement == "freed" else math.ceil(size / n) if placement == "sharded" else size
    parts["vae"] = fp.vae
    parts["lora"] = math.ceil(fp.lora / n)
    parts["lora_old"] = math.ceil(fp.lora_old / n)
    parts["ema"] = math.ceil(fp.ema / n)
    parts["optimizer"] = math.ceil(2 * fp.lora / n)  # AdamW: exp_avg and exp_avg_sq, in the adapter's dtype
    parts["gradients"] = math.ceil(fp.lora / n)
    parts["ddp_buckets"] = fp.lora if setting.strategy == "ddp" and world > 1 else 0
    if fsdp:
        # the running block and the prefetched next one, and the root's own weights, whole
        gathered = 2 * fp.largest_block + fp.transformer_root if reshard else fp.transformer + fp.lora + fp.lora_old
        parts["fsdp_gathered"] = gathered - math.ceil((fp.transformer_root if reshard else fp.transformer) / n)
    else:
        parts["fsdp_gathered"] = 0
    parts["rollout_buffers"] = buffers
    parts["activations"] = meas.update["on" if setting.checkpointing else "off"]

    resident = sum(parts[k] for k in ("transformer", *fp.text_encoders, "vae", "lora", "lora_old"))
    trained = parts["ema"] + parts["optimizer"]
    gathered = parts["fsdp_gathered"]
    encode = max(meas.encode.values(), default=0)
    if placement == "sharded":
        encode += 2 * max(fp.encoder_largest_layer.values(), default=0)  # its gathered layers
    phases = {}
    if placement == "freed":  # the encoder, whole, fills the cache before the first step (no optimizer state yet)
        phases["start"] = resident + encoders_whole + encode
    rollout_transient = max(
        0 if placement == "freed" else encode,
        meas.vae_encode,
        meas.rollout_forward + gathered,
        meas.vae_decode,
    )
    phases["rollout"] = resident + trained + buffers + rollout_transient
    phases["update"] = (
        resident
        + trained
        + parts["gradients"]
        + parts["ddp_buckets"]
        + buffers
        + parts["activations"]
        + gathered
        + (fp.largest_block_lora if fsdp else 0)  # a block's gradient before its reduce-scatter
    )
    peak = max(phases.values())
    fits = {gpu: peak <= USABLE * total for gpu, total in GPUS.items()}
    return Row(setting, parts, phases, peak, fits, notes)


# --------------------------------------------------------------------------------------------------------------------
# The plan


def _world(trainer: Any) -> int:
    devices = trainer.devices
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        count = int(devices)
    else:
        count = 1  # "auto": as many as the machine has; the plan cannot know, so it plans for one
    return max(1, count) * max(1, trainer.num_nodes)


def experiment_setting(cfg: Any) -> Setting:
    strategy = "fsdp2" if cfg.trainer.strategy in SHARDED_STRATEGIES else "ddp"
    p = cfg.module.policy
    return Setting(strategy, bool(p.gradient_checkpointing), p.text_encoder)


def shapes_of(cfg: Any, built: Built, algorithm: type) -> tuple[Shapes, float]:
    """The plan's sizes, and the guidance scale of the update's forward."""
    m, fam = cfg.module, built.policy.family
    b = cfg.data.batch_size
    train = min(m.train_batch_size or b, b)
    micro = min(m.micro_batch_size or b, train)
    guided = trains_with_guidance(algorithm)
    guidance = m.sampler.guidance_scale if guided else 1.0
    latent = tuple(built.policy.latent_shape())
    image_tokens = fam.image_seq_len(latent)
    source_tokens = sum((h // 2) * (w // 2) for _, h, w in built.inputs.sources)
    shapes = Shapes(
        world=_world(cfg.trainer),
        local_batch=b,
        micro_batch=micro,
        update_passes=2 if fam.needs_uncond(guidance) else 1,
        rollout_chunk=min(m.rollout_chunk, b),
        rollout_passes=2 if fam.needs_uncond(m.sampler.guidance_scale) else 1,
        image_tokens=image_tokens,
        source_tokens=source_tokens,
        text_tokens=built.inputs.text_tokens,
        latent=latent,
        dtype=m.policy.dtype,
        no_grad_forwards=int(algorithm.needs_old_adapter) + int(m.kl_beta > 0),
    )
    return shapes, guidance


def trains_with_guidance(algorithm: type) -> bool:
    """Whether the update's forward runs at the sampler's guidance scale: the Flow-GRPO family recomputes the
    rollout's guided step (flow_grpo.py ``step_terms``); DiffusionNFT trains the unguided velocity."""
    from firm.algorithms.flow_grpo import FlowGRPO

    return issubclass(algorithm, FlowGRPO)


def rollout_buffers(cfg: Any, built: Built, algorithm: type, shapes: Shapes) -> int:
    """Bytes the rollout leaves on the device for the update (firm/algorithms/rollout.py ``Rollout``): the
    trajectory's latents (every step when the sampler is stochastic, else the first and last), the step log-probs
    (and step means for GRPO-Guard), and the batch's conditioning (twice with CFG) with its source latents."""
    s, b = cfg.module.sampler, shapes.local_batch
    latent = math.prod(shapes.latent) * 4
    steps = s.num_steps + 1 if SAMPLERS[s.method].stochastic else 2
    out = b * steps * latent + b * s.num_steps * 4
    if algorithm.records_means:
        out += b * s.num_steps * latent
    cond = built.inputs.bytes_per_sample(DTYPES[cfg.module.policy.dtype])
    return out + b * cond * shapes.rollout_passes


def plan_experiment(
    experiment: str,
    overrides: list[str] | None = None,
    *,
    prompt_tokens: int | None = None,
    target: str = "80GB",
    progress: ProgressFn | None = None,
) -> Plan:
    """The memory plan of an RL experiment YAML (with ``key=value`` overrides)."""
    from firm.algorithms.base import RLAlgorithm
    from firm.registry import resolve

    say = progress or (lambda _msg: None)
    if target not in GPUS:
        raise ConfigError(f"--gpu: must be one of {list(GPUS)}, got {target!r}")
    cfg = to_object(load_experiment(experiment, overrides))
    algorithm = resolve("modules", cfg.module.name)
    if not (isinstance(algorithm, type) and issubclass(algorithm, RLAlgorithm)):
        raise ConfigError(
            f"{experiment}: module {cfg.module.name!r} is not an RL experiment (firm plan plans RL and critic SFT ones)"
        )
    with torch.random.fork_rng(devices=[]):  # the tiny probe policy draws its LoRA init; leave the caller's RNG be
        built = build(cfg.module, algorithm, prompt_tokens, say)
        shapes, guidance = shapes_of(cfg, built, algorithm)
        measured = measure(built, shapes, cfg.module, guidance, say)
    buffers = rollout_buffers(cfg, built, algorithm, shapes)
    reshard = getattr(cfg.trainer, "fsdp_sharding", "FULL_SHARD") != "SHARD_GRAD_OP"
    own = experiment_setting(cfg)
    settings = [own] + [
        Setting(st, ck, te)
        for st in STRATEGIES
        for ck in (False, True)
        for te in TEXT_ENCODER_PLACEMENTS
        if Setting(st, ck, te) != own and not (st == "ddp" and te == "sharded")
    ]
    rows = [per_gpu(st, built.footprint, measured, buffers, shapes.world, reshard) for st in settings]
    plan = Plan(
        experiment=str(experiment),
        name=cfg.name,
        pretrained=cfg.module.policy.pretrained,
        family=cfg.module.policy.family,
        algorithm=cfg.module.name,
        setting=own,
        shapes=shapes,
        footprint=built.footprint,
        measured=measured,
        buffers=buffers,
        rows=rows,
        target=target,
    )
    plan.suggestion = suggest(plan)
    return plan


def suggest(plan: Plan) -> str | None:
    """What to change when the experiment's setting does not fit the target GPU: the fitting setting that changes the
    fewest things (then the one with the lowest peak), or, when none fits, what dominates."""
    own = plan.setting
    if plan.fits:
        return None

    def changes(s: Setting) -> list[str]:
        out = []
        if s.strategy != own.strategy:
            out.append(f"trainer.strategy={s.strategy}")
        if s.checkpointing != own.checkpointing:
            out.append(f"module.policy.gradient_checkpointing={str(s.checkpointing).lower()}")
        if s.text_encoder != own.text_encoder:
            out.append(f"module.policy.text_encoder={s.text_encoder}")
        return out

    fitting = [r for r in plan.rows if r.fits[plan.target]]
    if fitting:
        best = min(fitting, key=lambda r: (len(changes(r.setting)), r.peak))
        return f"set {' '.join(changes(best.setting))} (peak {best.peak / GIB:.1f} GiB)"
    lowest = min(plan.rows, key=lambda r: r.peak)
    big = max(lowest.parts, key=lambda k: lowest.parts[k])
    return (
        f"no setting fits {plan.target}; the lowest peak is {lowest.peak / GIB:.1f} GiB ({lowest.setting.label}), "
        f"led by {big} ({lowest.parts[big] / GIB:.1f} GiB): lower module.micro_batch_size (now "
        f"{plan.shapes.micro_batch}), data.batch_size or the resolution, or use more GPUs"
    )
