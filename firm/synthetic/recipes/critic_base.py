"""`firm shapes pretrain-critic-base`: the tiny critic's pretrained base (the shapes world's Qwen3-VL-8B-Instruct).

FIRM's critics are supervised fine-tunes of a VLM that already sees and grounds. This recipe makes the miniature's
base: the tiny Qwen3-VL of :mod:`firm.synthetic.tiny_critic` (rotary base 10, see its ``rope_theta``), trained from
random weights on grounded questions about world-generated images (:mod:`firm.synthetic.grounding`: what is in a
cell, did a cell change and how, how many cells changed, captions, difference reports), never on rubric scores. It
stops once every question kind is at least ``target`` exact on held-out tasks (the ``test`` task split), or at
``steps``.

Writes ``<out>/base`` (``save_pretrained`` layout, loadable by the ``local`` critic backend and by critic SFT),
``<out>/curves.json`` (held-out exact match per kind, loss, seconds), ``<out>/curves.png`` and ``<out>/summary.json``.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CRITIC = {"rope_theta": 10.0, "grounding_texts": True, "hidden_size": 128, "layers": 4}


@dataclass
class CriticBaseConfig:
    """Sizes of the base's pretraining (defaults: see firm/synthetic/checkpoints/README.md for the time they take)."""

    out: str = "runs/critic-base"
    seed: int = 0
    steps: int = 6000  # most optimizer steps
    batch_size: int = 32
    lr: float = 5.0e-4  # AdamW; 1e-3 without the vision warm-up made the tiny model ignore the image (docs/bench.md)
    warmup: int = 100  # linear warm-up steps, then constant
    eval_every: int = 250  # steps between held-out evaluations
    eval_items: int = 64  # held-out questions per kind
    target: float = 0.95  # held-out exact match every kind must reach
    stop_at_target: bool = True  # stop at the first evaluation where every kind is at target
    adaptive: bool = True  # after each evaluation, draw each kind in proportion to 0.1 + its held-out error
    critic: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_CRITIC))  # TinyCriticConfig fields
    grounding: dict[str, Any] = field(default_factory=dict)  # GroundingConfig fields
    vision_warmup: int = 300  # steps of per-cell read-out training of the vision tower first (0: none)
    vision_lr: float = 1.0e-3
    init: str | None = None  # start from this checkpoint instead of random weights (to continue a run)
    threads: int | None = None  # torch threads (default: torch's choice)
    fresh: bool = False  # delete <out> first


def _batches(cfg: CriticBaseConfig, split: str, seed: int, start: int, kinds=None, weights=None):
    from firm.synthetic.grounding import GroundingConfig, grounding_items

    g = GroundingConfig(**{**cfg.grounding, "split": split, **({"kinds": kinds} if kinds else {})})
    return grounding_items(g, seed=seed, start=start, weights=weights)


def heldout_set(cfg: CriticBaseConfig, encoder) -> dict[str, list[tuple[dict, str]]]:
    """``eval_items`` encoded questions per kind from test-split tasks (the same for every run of a config)."""
    from firm.synthetic.grounding import GroundingConfig

    kinds = GroundingConfig(**cfg.grounding).kinds
    out: dict[str, list] = {}
    for i, kind in enumerate(kinds):
        items = _batches(cfg, "test", seed=10_000 + i, start=8_000_000, kinds=[kind])
        enc = []
        while len(enc) < cfg.eval_items:
            _, msgs, answer = next(items)
            e = encoder.encode(msgs, answer)
            if e is not None:
                enc.append((e, answer))
        out[kind] = enc
    return out


def exact_match(model, examples: list[tuple[dict, str]], pad: int, batch: int = 32) -> float:
    """Share of examples whose every answer token (end-of-turn included) is the model's argmax: greedy is exact."""
    import torch

    from firm.critics.sft_data import collate_examples

    right = 0
    with torch.no_grad():
        for i in range(0, len(examples), batch):
            b = collate_examples([e for e, _ in examples[i : i + batch]], pad)
            labels = b.pop("labels")
            logits = model(**b).logits[:, :-1]
            lab = labels[:, 1:]
            ok = (logits.argmax(-1) == lab) | (lab == -100)
            right += int(ok.all(-1).sum())
    return right / max(len(examples), 1)


def warm_start_vision(model, processor_path: str | Path, cfg: CriticBaseConfig) -> list[dict[str, float]]:
    """Teach the vision tower to see first: a linear read-out, shared by all visual tokens, of the colour and the shape
    in each token's grid cell (the issue's "warm start on per-cell read-out"). Returns the curve (step, accuracy).

    The tower's merged tokens come out in row-major cell order (48 px, patch 8, merge 2: one token per cell); the
    read-out is shared across cells, so a token's features must say what is in *its* cell, and where a thing is
    stays for the language model to find from the positions.
    """
    import numpy as np
    import torch
    from transformers import AutoImageProcessor

    from firm.synthetic.data import _maybe_degrade
    from firm.synthetic.world import GRID, PALETTE, SHAPES, WorldConfig, render, sample_scene

    proc = AutoImageProcessor.from_pretrained(processor_path)
    visual = model.model.visual
    vc = model.config.vision_config
    side = int(round((proc.size["longest_edge"]) ** 0.5))
    if side // (vc.patch_size * vc.spatial_merge_size) != GRID:
        raise ValueError(
            f"vision warm-up: the read-out needs one visual token per grid cell ({GRID}x{GRID}); this critic's "
            f"{side} px images with patch {vc.patch_size} give {side // (vc.patch_size * vc.spatial_merge_size)} per "
            "side (use image_size 48 with patch 8, or vision_warmup=0)"
        )
    width = model.config.text_config.hidden_size
    colours, shapes = list(PALETTE), list(SHAPES)
    head = torch.nn.Linear(width, len(colours) + len(shapes) + 2)
    opt = torch.optim.AdamW([*visual.parameters(), *head.parameters()], lr=cfg.vision_lr)
    rng = random.Random(f"firm.shapes.vision_warmup:{cfg.seed}")
    sizes = cfg.grounding.get("sizes", [32, 64])
    worlds = {s: WorldConfig(size=s, max_objects=9) for s in sizes}

    def batch(n: int):
        images, col, shp = [], [], []
        for _ in range(n):
            world = worlds[rng.choice(sizes)]
            scene = sample_scene(rng, world, n_objects=rng.randint(0, GRID * GRID))
            image, _ = _maybe_degrade(render(scene, world), rng, 0.25)
            images.append(image)
            for c in range(GRID * GRID):
                o = scene.at(c)
                col.append(colours.index(o.colour) if o else len(colours))
                shp.append(shapes.index(o.shape) if o else len(shapes))
        enc = proc(images=images, return_tensors="pt")
        return enc["pixel_values"], enc["image_grid_thw"], torch.tensor(col), torch.tensor(shp)

    curve: list[dict[str, float]] = []
    visual.train()
    for step in range(1, cfg.vision_warmup + 1):
        pv, grid, col, shp = batch(32)
        feats = visual(pv, grid_thw=grid, return_dict=True).pooler_output  # (n * 9, width)
        logits = head(feats)
        lc, ls = logits[:, : len(colours) + 1], logits[:, len(colours) + 1 :]
        loss = torch.nn.functional.cross_entropy(lc, col) + torch.nn.functional.cross_entropy(ls, shp)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vision_warmup:
            acc = float(np.mean(((lc.argmax(-1) == col) & (ls.argmax(-1) == shp)).numpy()))
            curve.append({"step": step, "loss": round(loss.item(), 4), "cell_accuracy": round(acc, 4)})
            print(f"[critic-base] vision warm-up {step}: cell read-out {acc:.3f} (loss {loss.item():.3f})",
                  file=sys.stderr, flush=True)  # fmt: skip
    return curve


def pretrain_critic_base(cfg: CriticBaseConfig, progress: bool = True) -> dict[str, Any]:
    """Build (or load) the tiny critic, train it on grounded questions, save it and its curves; returns summary."""
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from firm.critics.sft_data import ChatExampleEncoder, collate_examples
    from firm.synthetic.tiny_critic import TinyCriticConfig, build_tiny_critic

    out = Path(cfg.out).resolve()
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    base = out / "base"
    init = Path(cfg.init) if cfg.init else out / "init"
    if not cfg.init and not (init / "config.json").is_file():
        build_tiny_critic(init, TinyCriticConfig(**cfg.critic), seed=cfg.seed)
    encoder = ChatExampleEncoder(str(init), max_length=512)
    pad = encoder.pad_token_id
    torch.manual_seed(cfg.seed)
    model = Qwen3VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    vision_curve = warm_start_vision(model, init, cfg) if cfg.vision_warmup > 0 else []
    heldout = heldout_set(cfg, encoder)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup)))
    weights: dict[str, float] = {}  # kind -> draw weight (empty: uniform), updated after each evaluation
    train = _batches(cfg, "train", seed=cfg.seed, start=0, weights=weights)
    curves: list[dict[str, Any]] = []
    losses: list[float] = []
    t_train, t_start = 0.0, time.perf_counter()

    def save(step: int) -> None:
        """The newest weights, with the tokenizer and processor, under <out>/base (a stopped run keeps its progress)."""
        if step == 0:
            return
        model.save_pretrained(base)
        for f in init.iterdir():  # tokenizer, chat template, image processor: as built
            if f.is_file() and not (base / f.name).exists():
                shutil.copy(f, base / f.name)

    def evaluate(step: int) -> dict[str, Any]:
        model.eval()
        row = {"step": step, "exact": {k: exact_match(model, v, pad) for k, v in heldout.items()}}
        model.train()
        row["min_exact"] = min(row["exact"].values())
        row["loss"] = sum(losses[-50:]) / len(losses[-50:]) if losses else None
        row["train_seconds"] = round(t_train, 1)
        row["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        if cfg.adaptive and step > 0:
            weights.update({k: 0.1 + (1.0 - v) for k, v in row["exact"].items()})
            row["draw_weights"] = {k: round(v, 3) for k, v in weights.items()}
        curves.append(row)
        save(step)
        (out / "curves.json").write_text(json.dumps(curves, indent=1) + "\n")
        shown = " ".join(f"{k} {v:.2f}" for k, v in row["exact"].items())
        print(f"[critic-base] step {step}: {shown} (loss {row['loss'] or math.nan:.3f}, {t_train:.0f} s)",
              file=sys.stderr, flush=True)  # fmt: skip
        return row

    evaluate(0)
    model.train()
    reached = None
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        exs = []
        while len(exs) < cfg.batch_size:
            _, msgs, answer = next(train)
            e = encoder.encode(msgs, answer)
            if e is not None:
                exs.append(e)
        loss = model(**collate_examples(exs, pad)).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"critic base: loss is {loss.item()} at step {step}; nothing was saved")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        t_train += time.perf_counter() - t0
        losses.append(loss.detach().item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            row = evaluate(step)
            if row["min_exact"] >= cfg.target:
                reached = reached or step
                if cfg.stop_at_target:
                    break
    last = curves[-1]
    summary = {
        "config": asdict(cfg),
        "steps": last["step"],
        "reached_target_at": reached,
        "target_met": last["min_exact"] >= cfg.target,
        "heldout_exact": last["exact"],
        "train_seconds": last["train_seconds"],
        "wall_seconds": last["wall_seconds"],
        "seconds_per_step": round(last["train_seconds"] / max(1, last["step"]), 3),
        "torch_threads": torch.get_num_threads(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vision_warmup": vision_curve,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    plot_curves(curves, out / "curves.png", cfg.target)
    return summary


def plot_curves(curves: list[dict[str, Any]], path: Path, target: float) -> Path | None:
    """Held-out exact match per question kind, and the training loss, by step."""
    if len(curves) < 2:
        return None
    from firm.synthetic.recipes.report import _plt

    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = [r["step"] for r in curves]
    for kind in curves[0]["exact"]:
        a.plot(steps, [r["exact"][kind] for r in curves], "o-", ms=3, label=kind)
    a.axhline(target, color="k", lw=0.8, ls="--")
    a.set_ylim(0, 1.02)
    a.set_xlabel("optimizer step")
    a.set_title("held-out exact match per question kind", fontsize=9)
    a.legend(fontsize=7)
    pts = [(r["step"], r["loss"]) for r in curves if r["loss"] is not None]
    if pts:
        b.plot(*zip(*pts), "o-", ms=3)
        b.set_yscale("log")
    b.set_xlabel("optimizer step")
    b.set_title("training loss (answer tokens, last 50 steps)", fontsize=9)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def export_base(out: str | Path, dest: str | Path) -> Path:
    """Copy ``<out>/base`` with ``pretrain.json`` (summary, curves, the command) to ``dest`` (the committed base)."""
    out, dest = Path(out), Path(dest)
    if not (out / "base" / "config.json").is_file():
        raise FileNotFoundError(f"no pretrained base under {out / 'base'}")
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(out / "base", dest)
    record = json.loads((out / "summary.json").read_text())
    record["curves"] = json.loads((out / "curves.json").read_text())
    from firm.synthetic.recipes.ablation import current_command

    record["command"] = current_command()
    (dest / "pretrain.json").write_text(json.dumps(record, indent=1) + "\n")
    return dest
