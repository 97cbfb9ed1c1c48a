"""The per-GPU memory of a critic SFT experiment (``module.name: critic_sft``): `firm plan experiments/critic/...`.

What is counted, and how:

* **Weights, trainable parameters, gradients, AdamW states** from the real model: the checkpoint's ``config.json``
  (shipped in ``configs/<org>--<name>/config.json`` for the hub ids FIRM trains, or read from a local
  ``save_pretrained`` directory) built with ``AutoModelForImageTextToText.from_config`` on the meta device, in
  ``module.dtype`` (``bf16-true`` precision casts it to bfloat16), with peft's LoRA applied when
  ``module.finetune: lora``, as :meth:`firm.critics.sft.CriticSFTModule.build_model` does. Gradients and AdamW's two
  states have the dtype of the parameters they belong to (torch's AdamW keeps ``zeros_like(p)``).
* **Activations** of one micro-batch (``data.batch_size`` examples per GPU), measured with fake tensors
  (:mod:`firm.plan.measure`) through the model's own vision tower and decoder layers, forward and backward, with and
  without gradient checkpointing, under bf16 autocast when the precision is ``*-mixed``. Every example is
  ``data.max_length`` tokens (a batch is padded to its longest example, and longer ones are dropped), of which
  :attr:`CriticShapes.image_tokens` are image tokens and the last :data:`ANSWER_TOKENS` are the answer (the
  positions whose logits the loss computes). How many image tokens: :func:`critic_shapes`.
* **Sharding** as the RL plan counts it: DDP holds everything on every GPU plus its gradient buckets (one more copy
  of the gradients); FSDP2 (``CriticSFTModule.configure_model`` shards every decoder layer and vision block, then the
  root) divides the weights, gradients and AdamW states by N and holds whole the running and the prefetched layer,
  the root's own weights (embeddings, LM head, the vision tower's patch embedding and mergers: FSDP2 does not
  reshard the root after its forward), and before their reduce-scatter the gradients of the root and of one layer.
  FIRM's FSDP2 strategy gives no mixed-precision policy, so gathered weights keep the parameters' dtype.

What is not: the CUDA context, NCCL buffers and fragmentation (the ``USABLE`` share), the optimizer step's
temporaries (the activations are gone by then), the validation's generation (its KV cache at ``val_max_new_tokens``)
and a padding mask of ``attn_implementation: sdpa`` on a padded batch (flash attention, the GPU default, has none).

How the fake-tensor forward differs from :meth:`CriticSFTModule.answer_loss`: the ops that read token values (the
placeholder mask, the M-RoPE index, the boolean ``logits_to_keep``) have no fake-tensor rule, so
:func:`critic_step` places the image tokens at the start of each example and the answer at its end and does the same
ops on fixed slices. :mod:`firm.plan.check` (``--measure``) runs the real ``answer_loss`` on the CPU for the tiny
experiments and tests/plan/test_critic.py compares the two.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from firm.config import ConfigError
from firm.plan.checkpoints import CONFIGS
from firm.plan.measure import fake_weights, peak_above
from firm.plan.plan import GIB, GPUS, SHARDED_STRATEGIES, STRATEGIES, USABLE, PlanRows, _bytes, _world

ANSWER_TOKENS = 512  # answer tokens per example the plan counts logits for (FIRM's answers: a few hundred tokens)
DEFAULT_IMAGE_PIXELS = 1024 * 1024  # an image's pixels when data.max_image_pixels is unset (FIRM's images: ~1 MP)
EDIT_IMAGES, GEN_IMAGES = 2, 1  # images per example: the source and the edited image; the generated image
ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class CriticSetting:
    """One way to run the critic SFT."""

    strategy: str  # ddp | fsdp2
    checkpointing: bool  # module.gradient_checkpointing

    @property
    def label(self) -> str:
        return f"{self.strategy}, ckpt {'on' if self.checkpointing else 'off'}"


@dataclass(frozen=True)
class CriticShapes:
    """The sizes the plan is for (per GPU)."""

    world: int  # GPUs: trainer.devices x trainer.num_nodes
    batch: int  # data.batch_size: examples per GPU per micro-step
    seq: int  # tokens per example: data.max_length
    images: int  # images per example
    grid: tuple[int, int]  # one image's patch grid (h, w) before the 2 x 2 merge
    answer_tokens: int  # per example, at its end
    dtype: str  # the parameters' dtype
    autocast: str | None  # bfloat16 / float16 under *-mixed precision, else None

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1] // 4

    @property
    def image_tokens(self) -> int:
        """Image tokens per example."""
        return self.images * self.tokens_per_image


@dataclass
class CriticFootprint:
    """Whole-model bytes (not per GPU)."""

    weights: int  # every parameter and buffer
    trainable: int  # the trained parameters (all of them, or the LoRA adapters)
    root: int  # weights outside the decoder layers and vision blocks (FSDP2's root unit)
    root_trainable: int  # its trained part
    largest_layer: int  # the largest decoder layer or vision block (what FSDP2 gathers at once)
    largest_layer_trainable: int  # its trained part
    params: int  # parameter count
    trainable_params: int


@dataclass
class CriticRow:
    """Per-GPU bytes of one setting."""

    setting: CriticSetting
    parts: dict[str, int]
    peak: int
    fits: dict[str, bool]


@dataclass
class CriticPlan(PlanRows):
    """The plan of one critic SFT experiment: its setting's row first."""

    experiment: str
    name: str
    model: str
    finetune: str
    setting: CriticSetting
    shapes: CriticShapes
    footprint: CriticFootprint
    activations: dict[str, int]  # "on" / "off" (gradient checkpointing) -> one micro-batch's fwd + bwd peak
    rows: list[CriticRow]
    target: str
    seconds: float = 0.0
    suggestion: str | None = None
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------------------
# The model's architecture


def critic_config_path(model: str) -> Path:
    """The ``config.json`` of ``module.model``: a local ``save_pretrained`` directory as given, else the shipped copy.

    Raises:
        FileNotFoundError: neither exists; the message lists the shipped ones.
    """
    local = Path(model).expanduser() / "config.json"
    if local.is_file():
        return local
    shipped = CONFIGS / model.replace("/", "--", 1) / "config.json"
    if shipped.is_file():
        return shipped
    have = sorted(p.parent.name.replace("--", "/", 1) for p in CONFIGS.glob("*/config.json"))
    raise FileNotFoundError(
        f"no architecture for module.model={model!r}: it is neither a local save_pretrained directory nor one of the "
        f"critics whose config.json ships with FIRM ({', '.join(have)}); add it as {shipped}"
    )


def build_critic_on_meta(module_cfg: Any, dtype: torch.dtype) -> nn.Module:
    """The critic as :meth:`CriticSFTModule.build_model` makes it (LoRA, frozen vision, checkpointing left off), on
    the meta device from its ``config.json`` alone."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    c = module_cfg
    raw = json.loads(critic_config_path(c.model).read_text(encoding="utf-8"))
    hf_config = AutoConfig.for_model(**raw)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    if c.freeze_vision:
        for n, p in model.named_parameters():
            if ".visual." in f".{n}" or n.startswith("visual."):
                p.requires_grad_(False)
    if c.finetune == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
            target_modules=list(c.lora_target_modules), bias="none",
        )  # fmt: skip
        with torch.device("meta"):
            model = get_peft_model(model, lora)
        # peft makes adapters in the base layer's dtype; on the meta device that is what a real run gets too
    return model.train()


def _wrapped_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers and vision blocks (``_no_split_modules``): FSDP2's units below the root."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def critic_footprint(model: nn.Module) -> CriticFootprint:
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    layers = _wrapped_layers(model)
    sizes = [_bytes(m.parameters()) for m in layers]
    largest = layers[sizes.index(max(sizes))] if layers else model
    in_layers = {id(p) for m in layers for p in m.parameters()}
    root = [p for p in params if id(p) not in in_layers]
    return CriticFootprint(
        weights=_bytes(params) + _bytes(model.buffers()),
        trainable=_bytes(trainable),
        root=_bytes(root),
        root_trainable=_bytes(p for p in root if p.requires_grad),
        largest_layer=max(sizes, default=0),
        largest_layer_trainable=_bytes(p for p in largest.parameters() if p.requires_grad),
        params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in trainable),
    )


# --------------------------------------------------------------------------------------------------------------------
# The sizes


def _vision(model: nn.Module) -> Any:
    return _core(model).visual


def _core(model: nn.Module) -> Any:
    """The ``Qwen3VLModel``-like inner model (under a peft wrapper when LoRA is on)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def _image_pixels(model_path: str, max_image_pixels: int | None) -> int:
    """Pixels of one image as the processor sees it: a processor that resizes every image to one size (the tiny
    critic: ``shortest_edge == longest_edge``) fixes it; else ``data.max_image_pixels``, else ~1 MP, capped by the
    processor's ``longest_edge``."""
    pre = Path(model_path).expanduser() / "preprocessor_config.json"
    size = json.loads(pre.read_text(encoding="utf-8")).get("size", {}) if pre.is_file() else {}
    lo, hi = size.get("shortest_edge"), size.get("longest_edge")
    if lo is not None and lo == hi:
        return int(hi)
    pixels = max_image_pixels or DEFAULT_IMAGE_PIXELS
    return min(pixels, int(hi)) if hi else pixels


def critic_shapes(cfg: Any, model: nn.Module) -> CriticShapes:
    """The plan's sizes. Images per example: 2 when the data has editing judgements (the source and the edited image),
    else 1; each a square of :func:`_image_pixels`, whose side is rounded down to whole merged patches, as the
    Qwen-VL processors round it."""
    from firm.critics.sft_data import EDIT_JUDGEMENTS

    d, t = cfg.data, cfg.trainer
    vc = _vision(model).config
    unit = vc.patch_size * vc.spatial_merge_size  # pixels per merged token side
    side = max(1, int(math.isqrt(_image_pixels(cfg.module.model, d.max_image_pixels)) // unit))
    images = EDIT_IMAGES if any(j in EDIT_JUDGEMENTS for j in d.judgements) else GEN_IMAGES
    grid = (side * vc.spatial_merge_size, side * vc.spatial_merge_size)
    image_tokens = images * side * side
    frame = 2 * images + 1  # vision start / end around each image, and at least one text token
    if image_tokens + frame >= d.max_length:
        raise ConfigError(
            f"data.max_length={d.max_length} cannot hold {images} image(s) of {side * side} tokens: raise it or lower "
            f"data.max_image_pixels"
        )
    answer = min(ANSWER_TOKENS, d.max_length - image_tokens - frame)
    precision = str(t.precision)
    autocast = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}.get(precision)
    dtype = "bfloat16" if precision == "bf16-true" else cfg.module.dtype
    return CriticShapes(_world(t), d.batch_size, d.max_length, images, grid, answer, dtype, autocast)


# --------------------------------------------------------------------------------------------------------------------
# One micro-step with fake tensors


def _vision_inputs(vc: Any, s: CriticShapes) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Real (not fake) ``grid_thw`` and what the vision tower computes from its values, for ``batch x images`` equal
    images: handed to the tower as precomputed kwargs, so that no op reads a fake tensor's values."""
    from transformers.vision_utils import (
        get_vision_cu_seqlens,
        get_vision_interpolation_indices_and_weights,
        get_vision_position_ids,
    )

    n = s.batch * s.images
    grid = torch.tensor([[1, *s.grid]] * n)  # (images, 3): t, h, w in patches
    num_grid = int(vc.num_position_embeddings**0.5)
    indices, weights = get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=num_grid, mode="bilinear", align_corners=True, spatial_merge_size=vc.spatial_merge_size
    )
    return grid, {
        "interp_indices": indices,
        "interp_weights": weights,
        "position_ids": get_vision_position_ids(grid, vc.spatial_merge_size),
        "cu_seqlens": get_vision_cu_seqlens(grid),
        "max_seqlen": int(s.grid[0] * s.grid[1]),
    }


def _equal_chunks_attention(per_image: int) -> Callable[..., tuple[torch.Tensor, None]]:
    """The vision tower's attention over equal images without ``cu_seqlens``' values: each image's patches attend to
    themselves (``scaled_dot_product_attention`` per image, the kernels' saved state)."""

    def attend(module, q, k, v, attention_mask=None, scaling=None, dropout=0.0, is_causal=False, **_):  # noqa: ANN001, ANN202
        _, h, p, d = q.shape  # (1, heads, patches, head_dim)

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(h, p // per_image, per_image, d).transpose(0, 1)  # (images, heads, per_image, d)

        out = torch.nn.functional.scaled_dot_product_attention(split(q), split(k), split(v), scale=scaling)
        return out.permute(0, 2, 1, 3).reshape(1, p, h, d), None  # (1, patches, heads, d), as the interface returns

    return attend


def critic_step(model: nn.Module, s: CriticShapes, inputs: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> None:
    """The forward, answer-only loss and backward of one micro-batch (call under ``FakeTensorMode``), the ops of
    ``CriticSFTModule.answer_loss`` on fixed positions: each example's image tokens first, its answer last."""
    core = _core(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vis, text = core.visual, core.language_model
    vc = vis.config
    b, n_img, t_img = s.batch, s.batch * s.images, s.image_tokens
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    grid, kwargs = inputs
    pixel = torch.empty(n_img * s.grid[0] * s.grid[1], patch_dim)  # (patches, C*t*p*p) float32, as the processor
    ids = torch.zeros(b, s.seq, dtype=torch.long)
    dev = "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(s.autocast or "", torch.float32)
    with torch.autocast(dev, dtype=dtype, enabled=s.autocast is not None):
        out = vis(pixel.type(vis.dtype), grid_thw=grid, return_dict=True, **dict(kwargs))
        image_embeds = out.pooler_output  # (b * t_img, D)
        embeds = text.embed_tokens(ids)  # (b, L, D)
        pos = torch.zeros(b, s.seq, 1, dtype=torch.bool)
        embeds = embeds.masked_scatter(pos.expand_as(embeds), image_embeds.to(embeds.dtype))  # the placeholder fill
        deep = [f.to(embeds.dtype).reshape(b, t_img, -1) for f in out.deepstack_features]

        def deepstack(hidden: torch.Tensor, _mask: Any, visual: torch.Tensor) -> torch.Tensor:
            hidden = hidden.clone()
            hidden[:, :t_img] = hidden[:, :t_img] + visual
            return hidden

        text._deepstack_process = deepstack
        try:
            position_ids = torch.zeros(3, b, s.seq, dtype=torch.long)  # (3, b, L) M-RoPE
            hidden = text(
                inputs_embeds=embeds, position_ids=position_ids, deepstack_visual_embeds=deep
            ).last_hidden_state
        finally:
            del text._deepstack_process
        a = s.answer_tokens
        kept = hidden[:, s.seq - a - 1 : s.seq - 1].reshape(b * a, -1)  # the positions that predict an answer token
        logits = base.lm_head(kept)  # (N, V)
    targets = torch.zeros(b * a, dtype=torch.long)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / (b * a)
    loss.backward()


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if on:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_disable()


def measure_activations(model: nn.Module, s: CriticShapes, progress: ProgressFn) -> dict[str, int]:
    """One micro-batch's forward + backward peak above the weights and the gradients, checkpointing off and on."""
    from transformers import AttentionInterface

    from firm.plan.plan import _fake_mode

    name = "firm_plan_flash_equal_images"  # "flash" in the name: the tower passes cu_seqlens, never reads them
    vis = _vision(model)
    AttentionInterface.register(name, _equal_chunks_attention(s.grid[0] * s.grid[1]))
    vis.config._attn_implementation = name
    grid, real = _vision_inputs(vis.config, s)
    mode = _fake_mode()
    fake_weights(model, mode)
    inputs = (grid, {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in real.items()})
    out = {}
    with mode:
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)  # counted on their own line, not as activations
        grads = [p.grad for p in params]
        for ckpt in (False, True):
            label = "on" if ckpt else "off"
            progress(f"activations of {s.batch} x {s.seq} tokens ({s.image_tokens} image), checkpointing {label}")
            _set_checkpointing(model, ckpt)
            out[label] = peak_above(lambda: critic_step(model, s, inputs), model, grads)
        for p in params:
            p.grad = None
    return out


# --------------------------------------------------------------------------------------------------------------------
# Per-GPU bytes


def critic_row(
    setting: CriticSetting, fp: CriticFootprint, activations: dict[str, int], world: int, reshard: bool
) -> CriticRow:
    """The per-GPU bytes of one setting (see the module docstring)."""
    fsdp = setting.strategy == "fsdp2" and world > 1
    n = world if fsdp else 1
    parts = {
        "weights": math.ceil(fp.weights / n),
        "gradients": math.ceil(fp.trainable / n),
        "optimizer": math.ceil(2 * fp.trainable / n),  # AdamW: exp_avg, exp_avg_sq in the parameters' dtype
        "ddp_buckets": fp.trainable if setting.strategy == "ddp" and world > 1 else 0,
        "fsdp_gathered": 0,
        "fsdp_unsharded_grads": 0,
        "activations": activations["on" if setting.checkpointing else "off"],
    }
    if fsdp:
        if reshard:  # the running and the prefetched layer, the root (not resharded after its forward)
            gathered = 2 * fp.largest_layer + fp.root
            parts["fsdp_gathered"] = gathered - math.ceil((2 * fp.largest_layer + fp.root) / n)
            parts["fsdp_unsharded_grads"] = fp.root_trainable + fp.largest_layer_trainable
        else:  # SHARD_GRAD_OP: every layer stays gathered from its forward to its backward
            parts["fsdp_gathered"] = fp.weights - parts["weights"]
            parts["fsdp_unsharded_grads"] = fp.root_trainable + fp.largest_layer_trainable
    peak = sum(parts.values())
    return CriticRow(setting, parts, peak, {gpu: peak <= USABLE * total for gpu, total in GPUS.items()})


def plan_critic(experiment: str, cfg: Any, *, target: str = "80GB", progress: ProgressFn | None = None) -> CriticPlan:
    """The memory plan of a critic SFT experiment (``cfg``: its loaded config)."""
    say = progress or (lambda _msg: None)
    m = cfg.module
    s0 = time.perf_counter()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = torch.bfloat16 if str(cfg.trainer.precision) == "bf16-true" else dtypes[m.dtype]
    say(f"building {m.model} on the meta device ({m.finetune} fine-tune)")
    model = build_critic_on_meta(m, dtype)
    shapes = critic_shapes(cfg, model)
    fp = critic_footprint(model)
    with torch.random.fork_rng(devices=[]):
        activations = measure_activations(model, shapes, say)
    world = shapes.world
    reshard = getattr(cfg.trainer, "fsdp_sharding", "FULL_SHARD") != "SHARD_GRAD_OP"
    own = CriticSetting(
        "fsdp2" if cfg.trainer.strategy in SHARDED_STRATEGIES else "ddp", bool(m.gradient_checkpointing)
    )
    settings = [own] + [
        CriticSetting(st, ck) for st in STRATEGIES for ck in (False, True) if CriticSetting(st, ck) != own
    ]
    rows = [critic_row(st, fp, activations, world, reshard) for st in settings]
    plan = CriticPlan(
        experiment=str(experiment),
        name=cfg.name,
        model=m.model,
        finetune=m.finetune,
        setting=own,
        shapes=shapes,
        footprint=fp,
        activations=activations,
        rows=rows,
        target=target,
        seconds=time.perf_counter() - s0,
    )
    plan.suggestion = suggest_critic(plan, cfg)
    return plan


def suggest_critic(plan: CriticPlan, cfg: Any) -> str | None:
    """What to change when the experiment does not fit: a fitting setting with the fewest changes, else a smaller
    per-GPU batch (activations scale with it; gradient accumulation keeps the global batch), else LoRA."""
    if plan.fits:
        return None
    own = plan.setting

    def changes(st: CriticSetting) -> list[str]:
        out = [f"trainer.strategy={st.strategy}"] if st.strategy != own.strategy else []
        if st.checkpointing != own.checkpointing:
            out.append(f"module.gradient_checkpointing={str(st.checkpointing).lower()}")
        return out

    usable = USABLE * GPUS[plan.target]
    fitting = [r for r in plan.rows if r.fits[plan.target]]
    if fitting:
        best = min(fitting, key=lambda r: (len(changes(r.setting)), r.peak))
        return f"set {' '.join(changes(best.setting))} (peak {best.peak / GIB:.1f} GiB)"
    lowest = min(plan.rows, key=lambda r: r.peak)
    b = plan.shapes.batch
    per_example = lowest.parts["activations"] / b  # activations grow linearly with the batch
    room = usable - (lowest.peak - lowest.parts["activations"])
    fit_b = int(room // per_example) if per_example > 0 else 0
    if fit_b >= 1:
        acc = cfg.trainer.accumulate_grad_batches or 1
        total = b * acc  # examples per GPU per optimizer step: kept when a divisor of it fits
        fit_b = max((d for d in range(1, fit_b + 1) if total % d == 0), default=fit_b)
        new_acc = math.ceil(total / fit_b)
        change = changes(lowest.setting)
        return (
            f"set {' '.join([*change, f'data.batch_size={fit_b}', f'trainer.accumulate_grad_batches={new_acc}'])} "
            f"(about {(lowest.peak - lowest.parts['activations'] + fit_b * per_example) / GIB:.1f} GiB; activations "
            f"scaled from the measured batch of {b}, re-plan to measure; {fit_b * new_acc} examples per GPU per "
            f"optimizer step, were {b * acc})"
        )
    return (
        f"no setting fits {plan.target} even at one example per GPU; the lowest peak is {lowest.peak / GIB:.1f} GiB "
        f"({lowest.setting.label}): use module.finetune=lora, a shorter data.max_length or more GPUs"
    )


# --------------------------------------------------------------------------------------------------------------------
# The table

PART_LABELS = {
    "weights": "weights",
    "gradients": "gradients",
    "optimizer": "AdamW states",
    "ddp_buckets": "DDP gradient buckets",
    "fsdp_gathered": "FSDP2 gathered weights",
    "fsdp_unsharded_grads": "FSDP2 unsharded gradients",
    "activations": "activations",
}


def render_critic(plan: CriticPlan, console: Any = None) -> None:
    """Print the plan: the experiment's setting part by part, then every setting's peak."""
    from rich.console import Console
    from rich.table import Table

    from firm.plan.report import _count, _is_terminal

    con = console or Console(width=None if _is_terminal() else 120)
    unit, div = ("GiB", 2**30) if max(r.peak for r in plan.rows) >= 2**30 else ("MiB", 2**20)
    s, fp, row = plan.shapes, plan.footprint, plan.row
    fsdp = plan.setting.strategy == "fsdp2" and s.world > 1
    shard = f", / {s.world} (FSDP2)" if fsdp else ""

    def fmt(n: float) -> str:
        return f"{n / div:.2f}"

    con.print(
        f"[bold]firm plan[/bold] {plan.name}: critic SFT ({plan.finetune}) of {plan.model}, {s.world} GPU(s), "
        f"{plan.setting.label}"
    )
    con.print(
        f"  per GPU: {s.batch} examples of {s.seq} tokens ({s.images} image(s) x {s.tokens_per_image} tokens, "
        f"answer {s.answer_tokens}); weights {s.dtype}, autocast {s.autocast or 'off'}"
    )
    how = {
        "weights": f"{_count(fp.params)} params, {s.dtype}{shard}",
        "gradients": f"of {_count(fp.trainable_params)} trained params{shard}",
        "optimizer": f"2 per trained parameter{shard}",
        "ddp_buckets": "a copy of the gradients" if row.parts["ddp_buckets"] else "-",
        "fsdp_gathered": "running + prefetched layer, root" if fsdp else "-",
        "fsdp_unsharded_grads": "root's and one layer's, before reduce-scatter" if fsdp else "-",
        "activations": f"measured: fwd + bwd, checkpointing {'on' if plan.setting.checkpointing else 'off'}",
    }
    t = Table(title=f"per GPU, {plan.setting.label} ({unit})")
    for col in ("part", unit, "counted as"):
        t.add_column(col, justify="right" if col == unit else "left")
    for key, label in PART_LABELS.items():
        t.add_row(label, fmt(row.parts[key]), how[key])
    t.add_row("[bold]peak[/bold]", f"[bold]{fmt(row.peak)}[/bold]", "")
    con.print(t)
    g = Table(title=f"every setting, {s.world} GPU(s): peak per GPU ({unit}); fits: peak <= {USABLE:.0%} of the GPU")
    for name in ("strategy", "checkpointing", "activations", "peak", *(f"fits {x}" for x in GPUS)):
        g.add_column(name, justify="right" if name in ("activations", "peak") else "left")
    for r in plan.rows:
        g.add_row(
            r.setting.strategy + (" *" if r.setting == plan.setting else ""),
            "on" if r.setting.checkpointing else "off",
            fmt(r.parts["activations"]),
            fmt(r.peak),
            *("[green]yes[/green]" if r.fits[x] else "[red]no[/red]" for x in GPUS),
        )
    con.print(g)
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    con.print(f"  * the experiment's setting {verdict} a {plan.target} GPU (peak {fmt(row.peak)} {unit})")
    if plan.suggestion:
        con.print(f"  suggestion: {plan.suggestion}")
    con.print(f"  measured with fake tensors in {plan.seconds:.0f} s; how it counts: docs/running.md#memory-plan")


# --------------------------------------------------------------------------------------------------------------------
# Checking the plan against a real CPU run (tiny experiments): `firm plan EXP.yaml --measure`


def planned_batch(hf_config: Any, s: CriticShapes, seed: int = 0) -> dict[str, torch.Tensor]:
    """A real batch of the plan's shapes, as ``CriticSFTDataModule`` collates one: each example's images (vision start,
    one pad token per merged patch, vision end) first, then text, its last ``answer_tokens`` labelled."""
    g = torch.Generator().manual_seed(seed)
    vc = hf_config.vision_config
    special = min(hf_config.image_token_id, hf_config.vision_start_token_id, hf_config.vision_end_token_id)
    vocab = hf_config.text_config.vocab_size
    text_hi = special if special > 100 else vocab  # the tiny tokenizer's specials come first: draw above them
    text_lo = 0 if special > 100 else max(hf_config.image_token_id, hf_config.vision_end_token_id) + 1
    ids = torch.randint(text_lo, text_hi, (s.batch, s.seq), generator=g)  # (B, L)
    types = torch.zeros_like(ids)
    pos = 0
    for _ in range(s.images):
        ids[:, pos] = hf_config.vision_start_token_id
        ids[:, pos + 1 : pos + 1 + s.tokens_per_image] = hf_config.image_token_id
        types[:, pos + 1 : pos + 1 + s.tokens_per_image] = 1
        ids[:, pos + 1 + s.tokens_per_image] = hf_config.vision_end_token_id
        pos += s.tokens_per_image + 2
    labels = torch.full_like(ids, -100)
    labels[:, -s.answer_tokens :] = ids[:, -s.answer_tokens :]
    n_img = s.batch * s.images
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "mm_token_type_ids": types,
        "pixel_values": torch.randn(n_img * s.grid[0] * s.grid[1], patch_dim, generator=g),  # (patches, C*t*p*p)
        "image_grid_thw": torch.tensor([[1, *s.grid]] * n_img),  # (images, 3)
    }


def measure_critic_micro_step(plan: CriticPlan, cfg: Any) -> Any:
    """Load the tiny critic for real on the CPU, give AdamW its states (one step on zero gradients), run
    ``CriticSFTModule.answer_loss`` and its backward on a batch of the plan's shapes; the peak from torch.profiler
    (:func:`firm.plan.check.cpu_peak`) next to the plan's peak of its own setting (one GPU: nothing sharded)."""
    from firm.critics.sft import CriticSFTModule
    from firm.plan.check import Check, cpu_peak

    s = plan.shapes
    if s.world > 1 or Path(cfg.module.model).expanduser().joinpath("config.json").is_file() is False:
        raise ValueError("--measure loads the critic for real on the CPU: use it on tiny one-GPU experiments whose "
                         "module.model is a local directory (experiments/critic/tiny_*_cpu.yaml)")  # fmt: skip
    autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(s.autocast or "")

    def run() -> None:
        torch.manual_seed(0)
        module = CriticSFTModule(cfg.module)
        module.model = module.build_model(torch.device("cpu"))
        batch = planned_batch(module.model.config, s)
        params = [p for p in module.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.module.lr)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()  # AdamW's states exist from the first step on; the gradients stay (accumulation)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss, _ = module.answer_loss(batch)
        loss.backward()
        del opt

    return Check(plan.row.peak, cpu_peak(run))


def critic_config(experiment: str | Path, overrides: list[str] | None = None) -> Any | None:
    """The loaded config of ``experiment`` when its module is the critic SFT, else None (an RL experiment)."""
    from firm.config import load_experiment, to_object
    from firm.critics.sft import CriticSFTModule
    from firm.registry import resolve

    cfg = to_object(load_experiment(experiment, overrides))
    cls = resolve("modules", cfg.module.name)
    return cfg if isinstance(cls, type) and issubclass(cls, CriticSFTModule) else None


def write_critic_json(plan: CriticPlan, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(plan.to_json(), indent=2) + "\n", encoding="utf-8")
    return p
