"""Pretraining tiny base models of the shapes world (the policies the RL demo starts from).

The base models are flow-matching transformers of the same diffusers classes as the real policies, with tiny
configs (:class:`~firm.policies.policy.TinyConfig`), built by :func:`~firm.policies.policy.build_tiny_components`:

* editing (``task: edit``): ``QwenImageTransformer2DModel`` conditioned on the source image. Qwen-Image-Edit
  appends the source's latent tokens to the sequence; the tiny editors instead concatenate each source token to
  the noisy target token of the same position (``source_conditioning: channels``, as InstructPix2Pix does): a
  from-scratch transformer learns to copy the source in minutes this way, and the sequence is half as long (with
  ``sequence`` it had not learned to copy after 600 CPU steps);
* generation (``task: gen``): ``SD3Transformer2DModel`` with a pooled text projection.

Latents are pixels (``vae: pixel``) rearranged space-to-depth (``pixel_patch: 2``): an exact, parameter-free codec,
so a 32x32 image is 8x8 tokens of 4x4 pixels. The text encoder is the policies' small learned
:class:`~firm.policies.encoders.HashTextEncoder` (the shapes vocabulary has no hash collisions at 1024 buckets); it
is trained together with the transformer.

Training is plain rectified-flow matching: ``x_s = (1 - s) x0 + s noise`` with ``s`` drawn from a logit-normal
shifted like the sampling schedule, loss ``|| v(x_s, s, text, source) - (noise - x0) ||^2``; a share of prompts is
dropped to the empty prompt (so classifier-free guidance is possible), and an EMA of the weights is what gets
exported. Data are tasks of the **train** split only, so the RL demo's held-out tasks stay unseen.

At the end (and every ``eval_every`` steps) the EMA model is written in the diffusers layout that
``policy.pretrained`` loads, and sampled on held-out tasks; the rule critic's scores are logged (``eval/*``) and
saved next to the checkpoint (``eval.json``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torchdata.stateful_dataloader import StatefulDataLoader

from firm.module import FirmModule
from firm.policies.encoders import Conditioning
from firm.policies.policy import LoRAConfig, PolicyConfig, TinyConfig, get_family, save_components
from firm.synthetic.data import EditPairs, GenSamples
from firm.synthetic.tasks import SplitConfig, edit_tasks, gen_tasks
from firm.synthetic.world import WorldConfig

TASK_FAMILY = {"edit": "qwen_image_edit", "gen": "sd3"}


def shapes_tiny_config(**changes: Any) -> TinyConfig:
    """The tiny transformer settings the shapes base models use (see experiments/demo/pretrain_*.yaml)."""
    base = {
        "num_layers": 4,
        "num_heads": 4,
        "head_dim": 32,
        "text_dim": 64,
        "text_layers": 1,
        "vae": "pixel",
        "pixel_patch": 2,
        "rope_axes": [8, 12, 12],
        "shift": 1.0,
        "source_conditioning": "channels",
    }
    base.update(changes)
    return TinyConfig(**base)


def _command_line() -> str:
    """How this process was started, as a user would type it (``firm run ...`` rather than a path to __main__)."""
    argv = list(sys.argv)
    if argv and (argv[0].endswith("__main__.py") or Path(argv[0]).name == "firm"):
        argv[0] = "firm"
    return " ".join(argv)


# --------------------------------------------------------------------------------------------------------------------
# Data


class ShapesPairsDataModule(L.LightningDataModule):
    """Rendered training pairs of the shapes world: ``{target, source (edit), prompt}`` batches.

    ``target`` / ``source`` are (B, 3, H, W) float tensors in [0, 1]; ``prompt`` is the instruction (edit) or the
    generation prompt. Tasks are the first ``n_tasks`` of ``split_name`` from seed ``start`` on.
    """

    @dataclass
    class Config:
        name: str = "shapes_pairs"
        task: str = "edit"  # edit (source, instruction -> target) | gen (prompt -> image)
        n_tasks: int = 20000  # distinct tasks (an epoch)
        split_name: str = "train"  # which split the tasks come from (keep `train`: the demo evaluates on `test`)
        world: WorldConfig = field(default_factory=WorldConfig)  # scene settings (canvas, colours, shapes, ...)
        split: SplitConfig = field(default_factory=SplitConfig)  # how tasks are split into train / test
        kinds: list[str] | None = None  # edit: instruction kinds (null: all five)
        exclusive_prob: float = 0.5  # gen: share of prompts ending in "and nothing else"
        start: int = 0  # first task seed
        batch_size: int = 32  # samples per step
        shuffle: bool = True  # reshuffle every epoch
        num_workers: int = 0  # dataloader worker processes (rendering is cheap: 0 is usually fastest on 2 cores)

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.config = config
        if config.task not in TASK_FAMILY:
            raise ValueError(f"data.task must be edit or gen, got {config.task!r}")
        self.dataset: EditPairs | GenSamples | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        c = self.config
        if c.task == "edit":
            self.dataset = EditPairs(c.n_tasks, c.split_name, c.world, c.split, c.kinds, c.start)
        else:
            self.dataset = GenSamples(c.n_tasks, c.split_name, c.world, c.split, c.exclusive_prob, c.start)

    def train_dataloader(self) -> StatefulDataLoader:
        self.setup()
        return StatefulDataLoader(
            self.dataset,
            batch_size=self.config.batch_size,
            shuffle=self.config.shuffle,
            num_workers=self.config.num_workers,
            collate_fn=collate_pairs,
            drop_last=True,
        )


def collate_pairs(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """EditPairs / GenSamples items -> ``{target (B, 3, H, W), source (B, 3, H, W) | None, prompt [str]}``."""
    if "source" in samples[0]:
        return {
            "target": torch.stack([s["target"] for s in samples]),
            "source": torch.stack([s["source"] for s in samples]),
            "prompt": [s["instruction"] for s in samples],
        }
    target = torch.stack([s["image"] for s in samples])
    return {"target": target, "source": None, "prompt": [s["prompt"] for s in samples]}


# --------------------------------------------------------------------------------------------------------------------
# The module


@dataclass
class PretrainConfig:
    """Flow-matching pretraining of a tiny shapes-world base model."""

    name: str = "shapes_pretrain"
    task: str = "edit"  # edit (QwenImageTransformer2DModel on the source) | gen (SD3Transformer2DModel)
    resolution: int = 32  # image side in pixels (the world's canvas size)
    tiny: TinyConfig = field(default_factory=shapes_tiny_config)  # transformer / text-encoder / codec sizes
    init_seed: int = 0  # seeds the initial weights
    lr: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])  # AdamW betas
    warmup_steps: int = 100  # linear warm-up steps
    min_lr_ratio: float = 0.1  # cosine decay to this fraction of lr at trainer.max_steps
    max_grad_norm: float = 1.0  # gradient-norm clipping
    logit_mean: float = 0.0  # noise levels: s = shift(sigmoid(N(logit_mean, logit_std)))
    logit_std: float = 1.0
    text_dropout: float = 0.1  # share of prompts replaced by the empty prompt (enables classifier-free guidance)
    ema_decay: float = 0.995  # EMA of the weights (what is exported); 0 exports the raw weights
    export_dir: str | None = None  # also write the final model here (e.g. firm/synthetic/checkpoints/shapes_edit)
    export_dtype: str = "float16"  # dtype of the exported weights (float16 halves the committed files; loads as fp32)
    world: WorldConfig = field(default_factory=WorldConfig)  # for held-out evaluation (YAML: ${data.world})
    split: SplitConfig = field(default_factory=SplitConfig)  # for held-out evaluation (YAML: ${data.split})
    eval_every: int = 0  # evaluate on held-out tasks every N steps (0: only at the end)
    eval_tasks: int = 64  # held-out tasks per evaluation
    eval_seeds: list[int] = field(default_factory=lambda: [0])  # evaluation seeds (noise)
    eval_steps: int = 6  # sampling steps of the evaluation (the RL demo's)
    eval_method: str = "dpm2"  # deterministic sampler of the evaluation: dpm2 | ode
    num_threads: int | None = None  # torch CPU threads (null: torch's default); 1 is faster on a busy machine


class ShapesPretrainModule(FirmModule):
    """Trains a tiny flow-matching transformer and its text encoder on rendered shapes-world tasks."""

    Config = PretrainConfig

    def __init__(self, config: PretrainConfig) -> None:
        super().__init__()
        self.config = c = config
        if c.task not in TASK_FAMILY:
            raise ValueError(f"module.task must be edit or gen, got {c.task!r}")
        if c.resolution != c.world.size:
            raise ValueError(f"module.resolution={c.resolution} must equal the world's canvas size {c.world.size}")
        if not 0 <= c.text_dropout < 1:
            raise ValueError(f"module.text_dropout must be in [0, 1), got {c.text_dropout}")
        if c.num_threads:
            torch.set_num_threads(c.num_threads)
        self.policy_config = PolicyConfig(
            family=TASK_FAMILY[c.task], resolution=c.resolution, tiny=c.tiny, init_seed=c.init_seed
        )
        self.family = get_family(self.policy_config)
        comps = self.family.build_tiny()
        self.transformer: nn.Module = comps["transformer"]
        self.text_encoder: nn.Module = comps["text_encoder"]
        self.codec: nn.Module = comps["codec"]
        self.scheduler = comps["scheduler"]
        self.shift = float(self.scheduler.config.shift)
        self.ema: dict[str, torch.Tensor] | None = None
        self._t0 = time.perf_counter()

    # ---------------------------------------------------------------------------------------------------- training

    def trainable(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if n.startswith(("transformer.", "text_encoder."))}

    def conditioning(self, prompts: list[str], source: torch.Tensor | None) -> Conditioning:
        """Text (and source-image) conditioning as the policy builds it at sampling time, but differentiable."""
        enc = self.text_encoder
        ids, mask = enc.tokenize(prompts)
        if not self.family.keeps_mask:  # SD3 takes no mask: pad to max_length with zero states, as at sampling
            pad = enc.config.max_length - ids.shape[1]
            ids, mask = nn.functional.pad(ids, (0, pad)), nn.functional.pad(mask, (0, pad))
        ids, mask = ids.to(self.device), mask.to(self.device)
        states, pooled = enc(ids, mask)  # (B, L, D), (B, P)
        cond = Conditioning(embeds=states, mask=mask if self.family.keeps_mask else None, pooled=pooled)
        if source is not None:
            cond = cond.with_image_latents(self.codec.encode(source))
        return cond

    def sample_sigmas(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(n,) training noise levels: shifted logit-normal, like the sampling schedule."""
        c = self.config
        u = torch.sigmoid(c.logit_mean + c.logit_std * torch.randn(n, generator=generator))
        return (self.shift * u / (1 + (self.shift - 1) * u)).clamp(1e-4, 1.0)

    def loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Flow-matching loss of one batch."""
        c = self.config
        x0 = self.codec.encode(batch["target"].to(self.device))  # (B, C, h, w)
        prompts = list(batch["prompt"])
        if c.text_dropout > 0:
            drop = torch.rand(len(prompts)) < c.text_dropout
            prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
        cond = self.conditioning(prompts, batch.get("source"))
        sigma = self.sample_sigmas(x0.shape[0]).to(self.device)  # (B,)
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        v = self.family.forward(self.transformer, x_t, sigma, cond)
        return nn.functional.mse_loss(v.float(), noise - x0)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, on_step=True)
        return self.finite_or_skip(loss)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        d = self.config.ema_decay
        params = self.trainable()
        if self.ema is None:
            self.ema = {n: p.detach().clone() for n, p in params.items()}
        elif d > 0:
            # Warm-up of the decay (as in many EMA implementations): early weights are forgotten quickly.
            decay = min(d, (1 + self.global_step) / (10 + self.global_step))
            with torch.no_grad():
                for n, p in params.items():
                    self.ema[n].lerp_(p.detach(), 1 - decay)
        every = self.config.eval_every
        if every and self.global_step % every == 0 and self.global_step < self.trainer.max_steps:
            self.evaluate(final=False)

    def configure_optimizers(self) -> dict[str, Any]:
        c = self.config
        opt = torch.optim.AdamW(
            list(self.trainable().values()), lr=c.lr, betas=tuple(c.betas), weight_decay=c.weight_decay
        )
        total = max(self.trainer.max_steps, 1) if self._trainer is not None else 1000

        def factor(step: int) -> float:
            if step < c.warmup_steps:
                return (step + 1) / c.warmup_steps
            p = min(1.0, (step - c.warmup_steps) / max(1, total - c.warmup_steps))
            return c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(
        self, optimizer: Any, gradient_clip_val: Any = None, gradient_clip_algorithm: Any = None
    ) -> None:
        self.clip_gradients(optimizer, gradient_clip_val=self.config.max_grad_norm, gradient_clip_algorithm="norm")

    # ---------------------------------------------------------------------------------------------------- export

    def export(self, directory: str | Path) -> Path:
        """Write the EMA weights (raw weights before the first step) as a diffusers-layout checkpoint, in
        ``export_dtype``."""
        d = Path(directory)
        dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(
            self.config.export_dtype
        )
        if dtype is None:
            raise ValueError(f"module.export_dtype must be float32, float16 or bfloat16: {self.config.export_dtype}")
        params = self.trainable()
        backup = {n: p.detach().clone() for n, p in params.items()}
        try:
            if self.ema is not None and self.config.ema_decay > 0:
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(self.ema[n])
            # nn.Module.to (not diffusers' override, which warns about fp32-only modules: this model has none).
            nn.Module.to(self.transformer, dtype)
            nn.Module.to(self.text_encoder, dtype)
            tmp = d.with_name(f".{d.name}.tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            save_components(
                {
                    "transformer": self.transformer,
                    "scheduler": self.scheduler,
                    "codec": self.codec,
                    "text_encoder": self.text_encoder,
                },
                tmp,
            )
            if d.exists():
                shutil.rmtree(d)
            tmp.rename(d)
        finally:
            nn.Module.to(self.transformer, torch.float32)
            nn.Module.to(self.text_encoder, torch.float32)
            params = self.trainable()  # .to() keeps the Parameter objects, but look them up again to be safe
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(backup[n])
        return d

    def load_policy(self, directory: str | Path) -> Any:
        """The exported checkpoint as a :class:`FlowPolicy` (the way the RL demo loads it)."""
        from firm.policies.policy import FlowPolicy

        pc = PolicyConfig(
            family=self.policy_config.family,
            pretrained=str(directory),
            resolution=self.config.resolution,
            lora=LoRAConfig(rank=1, alpha=1.0),
        )
        return FlowPolicy(pc)

    def evaluate(self, final: bool) -> dict[str, Any]:
        """Export the EMA model, sample it on held-out tasks and score with the rule critic; logs ``eval/*``."""
        from firm.synthetic.critic import ShapesRuleCritic
        from firm.synthetic.evaluate import evaluate_policy

        c = self.config
        run_dir = Path(self.trainer.default_root_dir)
        model_dir = self.export(run_dir / "model")
        if c.task == "edit":
            tasks: list[Any] = list(edit_tasks("test", world=c.world, split_config=c.split, limit=c.eval_tasks))
        else:
            tasks = list(gen_tasks("test", world=c.world, split_config=c.split, limit=c.eval_tasks))
        policy = self.load_policy(model_dir)
        critic = ShapesRuleCritic(
            ShapesRuleCritic.Config(shapes=list(c.world.shapes), object_scale=c.world.shape_scale)
        )
        res = evaluate_policy(
            policy,
            tasks,
            c.world,
            seeds=c.eval_seeds,
            num_steps=c.eval_steps,
            method=c.eval_method,
            critic=critic,
            progress=final,
            desc="held-out eval",
        )
        summ = res.summary()
        metrics = {f"eval/{k}": summ[k] for k in ("reward", *res.components)}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        line = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items())
        print(f"[shapes] step {self.global_step}: held-out {line}", file=sys.stderr)
        if final:
            info = {
                "task": c.task,
                "family": self.policy_config.family,
                "steps": self.global_step,
                "train_seconds": round(time.perf_counter() - self._t0, 1),
                "heldout": {k: v for k, v in summ.items() if k != "per_seed"},
                "eval": {"tasks": c.eval_tasks, "seeds": c.eval_seeds, "steps": c.eval_steps, "method": c.eval_method},
                "world": asdict(c.world),
                "split": asdict(c.split),
                "init_seed": c.init_seed,
                "seed": int(os.environ.get("PL_GLOBAL_SEED", -1)),  # the experiment seed (set by the runner)
                "command": _command_line(),
            }
            (model_dir / "pretrain.json").write_text(json.dumps(info, indent=2) + "\n")
            if c.export_dir:
                out = Path(c.export_dir)
                if out.exists():
                    shutil.rmtree(out)
                shutil.copytree(model_dir, out)
                print(f"[shapes] exported the base model to {out}", file=sys.stderr)
        return summ

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            self.evaluate(final=True)

    # ---------------------------------------------------------------------------------------------------- checkpoints

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.ema is not None:
            checkpoint["shapes_ema"] = {k: v.detach().cpu() for k, v in self.ema.items()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        if "shapes_ema" in checkpoint:
            self.ema = {k: v.to(self.device) for k, v in checkpoint["shapes_ema"].items()}
