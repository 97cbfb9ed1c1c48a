"""The plan as tables (rich) and as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from firm.plan.plan import GPUS, USABLE, Plan

SHARDED_PARTS = ("transformer", "lora", "lora_old", "ema", "gradients", "optimizer")  # divided by N under FSDP2


def _unit(plan: Plan) -> tuple[str, int]:
    """GiB, or MiB for a tiny experiment."""
    return ("GiB", 2**30) if max(r.peak for r in plan.rows) >= 2**30 else ("MiB", 2**20)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def _part_rows(plan: Plan) -> list[tuple[str, str, str]]:
    """(part, its key in Row.parts, how it is counted) in the table's order."""
    s, fp, row = plan.shapes, plan.footprint, plan.row
    fsdp = plan.setting.strategy == "fsdp2" and s.world > 1
    shard = f", / {s.world} (FSDP2)" if fsdp else ""
    placement = plan.setting.text_encoder
    enc = {
        "kept": "whole on every GPU",
        "sharded": f"/ {s.world} (FSDP2)" if fsdp else "whole (not sharded)",
        "freed": "0 while training (whole at the start)",
    }[placement]
    act = "on" if plan.setting.checkpointing else "off"
    out = [("transformer weights", "transformer", f"{_count(fp.frozen_params)} params, {s.dtype}{shard}")]
    out += [(name.replace("_", " "), name, enc) for name in fp.text_encoders]
    out += [
        ("VAE", "vae", "whole on every GPU"),
        ("LoRA (trained)", "lora", f"{_count(fp.trainable_params)} params{shard}"),
        ("LoRA (old policy)", "lora_old", "DiffusionNFT's sampling adapter" if fp.lora_old else "-"),
        ("EMA of the LoRA", "ema", "module.ema_decay" if fp.ema else "-"),
        ("gradients", "gradients", f"of the trained LoRA{shard}"),
        ("AdamW states", "optimizer", f"2 per trained parameter{shard}"),
        ("DDP gradient buckets", "ddp_buckets", "a copy of the gradients" if row.parts["ddp_buckets"] else "-"),
        ("FSDP2 gathered weights", "fsdp_gathered", "running + prefetched block, root" if fsdp else "-"),
        ("rollout buffers", "rollout_buffers", f"latents and conditioning of {s.local_batch} samples"),
        (
            "activations",
            "activations",
            f"measured: {s.micro_batch} x {s.update_passes} samples, fwd + bwd, checkpointing {act}",
        ),
    ]
    return out


def render(plan: Plan, console: Any = None) -> None:
    """Print the plan: the experiment's setting part by part, then every setting's peak."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console(width=None if _is_terminal() else 120)
    unit, div = _unit(plan)
    s, row = plan.shapes, plan.row

    def fmt(n: float) -> str:
        return f"{n / div:.2f}"

    con.print(
        f"[bold]firm plan[/bold] {plan.name}: {plan.algorithm} on {plan.pretrained or 'a tiny policy'} "
        f"({plan.family}), {s.world} GPU(s), {plan.setting.label}"
    )
    con.print(
        f"  per GPU: {s.local_batch} samples per RL step; a trained forward takes {s.micro_batch} x {s.update_passes} "
        f"samples (+ {s.no_grad_forwards} no-grad forwards), a rollout chunk {s.rollout_chunk} x {s.rollout_passes}; "
        f"tokens per sample: {s.image_tokens} image + {s.source_tokens} source + {s.text_tokens} text"
    )
    t = Table(title=f"per GPU, {plan.setting.label} ({unit})")
    t.add_column("part")
    t.add_column(unit, justify="right")
    t.add_column("counted as")
    for label, key, how in _part_rows(plan):
        t.add_row(label, fmt(row.parts[key]), how)
    for phase, value in row.phases.items():
        t.add_row(f"[bold]{phase} phase[/bold]", fmt(value), PHASES[phase])
    t.add_row("[bold]peak[/bold]", f"[bold]{fmt(row.peak)}[/bold]", "")
    con.print(t)
    g = Table(title=f"every setting, {s.world} GPU(s): peak per GPU ({unit}); fits: peak <= {USABLE:.0%} of the GPU")
    for name in ("strategy", "checkpointing", "text encoder", "activations", "peak", *(f"fits {x}" for x in GPUS)):
        g.add_column(name, justify="right" if name in ("activations", "peak") else "left")
    for r in plan.rows:
        g.add_row(
            r.setting.strategy + (" *" if r.setting == plan.setting else ""),
            "on" if r.setting.checkpointing else "off",
            r.setting.text_encoder + (" (as kept)" if r.notes else ""),
            fmt(r.parts["activations"]),
            fmt(r.peak),
            *("[green]yes[/green]" if r.fits[x] else "[red]no[/red]" for x in GPUS),
        )
    con.print(g)
    verdict = "[green]fits[/green]" if plan.fits else "[red]does not fit[/red]"
    con.print(f"  * the experiment's setting {verdict} a {plan.target} GPU (peak {fmt(row.peak)} {unit})")
    for note in row.notes:
        con.print(f"  note: {note}")
    if plan.suggestion:
        con.print(f"  suggestion: {plan.suggestion}")
    con.print(
        f"  measured with fake tensors in {plan.measured.seconds:.0f} s; how it counts: docs/running.md#memory-plan"
    )


PHASES = {
    "start": "the text encoder fills the prompt cache",
    "rollout": "+ the largest of: encoding, a chunk's forward, decoding",
    "update": "+ gradients, buckets and the micro-batch's activations",
}


def _is_terminal() -> bool:
    import sys

    return sys.stdout.isatty()


def write_json(plan: Plan, path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(plan.to_json(), indent=2) + "\n", encoding="utf-8")
    return p
