"""Stage 1, generate: sample every (item, seed) of a prompt set with each policy; images + a manifest, resumable.

**Determinism.** Item ``k`` under evaluation seed ``s`` starts from noise drawn by a generator seeded with
``(s, k.noise_key)``; the sampler is deterministic (``ode`` / ``dpm2``, no injected noise). So every policy starts from
the same noise on each (item, seed): base vs trained is a paired comparison, and the images do not depend on the
order, the batch or the rank that produced them (up to the last bits of batched matmuls).

**Layout and resume.** ``images/<label>/<item id>__s<seed>.png`` is written to a temporary name and renamed, so a PNG
that exists is complete; the manifest ``manifest/<label>.rank<r>.jsonl`` gets one line per image (``generated: true``
when this process sampled it). A relaunch after a kill samples only the (item, seed) pairs without a PNG, and adds the
lines of PNGs whose line the kill lost (``generated: false``). Settings are recorded in ``manifest/<label>.json``;
a relaunch with different settings fails instead of mixing images.

**Sharding.** Rank ``r`` of ``W`` (``RANK`` / ``WORLD_SIZE``, as torchrun and Lightning's launcher set them) takes
items ``r, r + W, ...``; the report merges every rank's manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from firm.eval.items import PromptItem, PromptSet


@dataclass
class GenerationConfig:
    """How every policy samples (recorded with the results)."""

    num_steps: int = 28  # sampling steps
    method: str = "ode"  # deterministic sampler: ode (the pipelines' Euler loop) | dpm2
    guidance_scale: float = 1.0  # classifier-free guidance scale of the family (1: off)
    resolution: int | None = None  # output size in pixels (null: each policy's policy.resolution)
    seeds: list[int] = field(default_factory=lambda: [0])  # evaluation seeds: images per prompt = len(seeds)
    batch_size: int = 4  # prompts per sampling batch

    def validate(self) -> None:
        from firm.policies.samplers import DETERMINISTIC_SOLVERS

        if self.method not in DETERMINISTIC_SOLVERS:
            raise ValueError(f"generation.method: must be one of {DETERMINISTIC_SOLVERS}, got {self.method!r}")
        if self.num_steps < 1 or self.batch_size < 1:
            raise ValueError("generation.num_steps and generation.batch_size must be >= 1")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"generation.seeds: give distinct seeds, got {self.seeds}")


def noise_seed(seed: int, key: str) -> int:
    """The generator seed of the initial noise of item ``key`` under evaluation seed ``seed``."""
    blob = repr(("eval", seed, key)).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def initial_noise(shape: Sequence[int], seed: int, keys: Sequence[str]) -> torch.Tensor:
    """(B, *shape) float32 noise, row ``i`` from ``noise_seed(seed, keys[i])`` (on the CPU)."""
    return torch.stack(
        [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(noise_seed(seed, k))) for k in keys]
    )


@torch.no_grad()
def sample_images(
    policy: Any,
    items: Sequence[PromptItem],
    *,
    seed: int,
    num_steps: int,
    method: str = "ode",
    guidance_scale: float = 1.0,
    adapter: str | None = None,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "sampling",
) -> list[Image.Image]:
    """The images ``policy`` produces for ``items`` under evaluation seed ``seed`` (deterministic sampler).

    Args:
        policy: a :class:`~firm.policies.policy.FlowPolicy` (any family).
        items: prompts (edit items carry their source image).
        seed: the evaluation seed (see the module docstring).
        num_steps: sampling steps.
        method: ``ode`` or ``dpm2``.
        guidance_scale: the family's CFG scale (1: off).
        adapter: ``None`` samples the base (adapters off), ``"default"`` the loaded / trained LoRA.
        batch_size: items per batch.
        progress: show a progress bar labelled ``desc``.
    """
    from firm.policies.samplers import DETERMINISTIC_SOLVERS

    if method not in DETERMINISTIC_SOLVERS:
        raise ValueError(
            f"evaluation samples deterministically: method must be one of {DETERMINISTIC_SOLVERS}, got {method!r}"
        )
    shape = policy.latent_shape()
    out: list[Image.Image] = []
    for lo in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, leave=False):
        chunk = items[lo : lo + batch_size]
        sources = [it.source_image() for it in chunk]
        images_in = None if all(s is None for s in sources) else sources
        noise = initial_noise(shape, seed, [it.noise_key for it in chunk]).to(policy.device)  # (b, *latent)
        with policy.adapter(adapter):
            final = policy.sample_latents(
                [it.prompt for it in chunk],
                noise,
                num_steps,
                images=images_in,
                guidance_scale=guidance_scale,
                method=method,
            )
        images = policy.decode(final).cpu()  # (b, 3, H, W) in [0, 1]
        arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (b, H, W, 3)
        out.extend(Image.fromarray(a, mode="RGB") for a in arr)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Ranks


def rank_and_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment (torchrun, Lightning's launcher), ``(0, 1)`` when unset."""
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return rank, world


def shard(items: Sequence[Any], rank: int, world: int) -> list[Any]:
    """Items ``rank, rank + world, ...``: disjoint over ranks, their union is ``items``."""
    return list(items[rank::world])


# --------------------------------------------------------------------------------------------------------------------
# The stage


def sample_id(item: PromptItem, seed: int) -> str:
    return f"{item.id}__s{seed}"


def image_path(out: Path, label: str, item: PromptItem, seed: int) -> Path:
    return out / "images" / label / f"{sample_id(item, seed)}.png"


def read_manifest(out: Path, label: str) -> dict[str, dict[str, Any]]:
    """``sample id -> manifest line`` over every rank's manifest of ``label`` (torn last lines skipped)."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted((out / "manifest").glob(f"{label}.rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                rows.setdefault(rec["sample_id"], rec)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    return rows


def _append(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    needs_newline = path.is_file() and path.stat().st_size > 0 and path.read_bytes()[-1:] != b"\n"
    with open(path, "a", encoding="utf-8") as f:
        if needs_newline:
            f.write("\n")
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _record(label: str, item: PromptItem, seed: int, path: Path, out: Path, generated: bool) -> dict[str, Any]:
    return {
        "sample_id": sample_id(item, seed),
        "label": label,
        "item_id": item.id,
        "seed": seed,
        "category": item.category,
        "path": str(path.relative_to(out)),
        "generated": generated,
        "pid": os.getpid(),
    }


def _check_settings(path: Path, settings: dict[str, Any], label: str) -> None:
    if path.is_file():
        old = json.loads(path.read_text())
        if old != settings:
            diff = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            raise ValueError(
                f"{label}: images in this output folder were generated with other settings (differ in {diff}); "
                "use another `name` (or delete the folder) to generate with the new ones"
            )
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")


def generate(
    out: Path,
    prompt_set: PromptSet,
    policies: dict[str, Any],
    gen: GenerationConfig,
    *,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> dict[str, dict[str, int]]:
    """Generate this rank's share of every policy's images; returns per label ``{sampled, reused, lines_added}``.

    Args:
        out: the evaluation's output folder.
        prompt_set: the items.
        policies: label -> :class:`~firm.eval.policies.PolicySpec`.
        gen: the generation settings.
        rank, world: this process's shard.
        progress: progress bars.
    """
    from firm.eval.policies import load_policy, resolve_spec

    items = shard(prompt_set.items, rank, world)
    counts: dict[str, dict[str, int]] = {}
    for label, spec in policies.items():
        _, desc = resolve_spec(spec, label, gen.resolution)
        settings = {"policy": desc, "generation": dataclasses.asdict(gen), "prompt_set": prompt_set.name}
        _check_settings(out / "manifest" / f"{label}.json", settings, label)
        lines = read_manifest(out, label)
        todo, recovered = [], []
        for it in items:
            for s in gen.seeds:
                p = image_path(out, label, it, s)
                if not p.is_file():
                    todo.append((it, s))
                elif sample_id(it, s) not in lines:
                    recovered.append(_record(label, it, s, p, out, False))
        manifest = out / "manifest" / f"{label}.rank{rank}.jsonl"
        if recovered:
            _append(manifest, recovered)
        counts[label] = {"sampled": 0, "reused": len(items) * len(gen.seeds) - len(todo), "lines_added": len(recovered)}
        if not todo:
            continue
        policy, adapter = load_policy(spec, label, gen.resolution)
        bar = tqdm(total=len(todo), desc=f"generate {label}", unit="img", disable=not progress)
        t0 = time.perf_counter()
        by_seed: dict[int, list[PromptItem]] = {}
        for it, s in todo:
            by_seed.setdefault(s, []).append(it)
        for s, its in by_seed.items():
            for lo in range(0, len(its), gen.batch_size):
                chunk = its[lo : lo + gen.batch_size]
                images = sample_images(
                    policy,
                    chunk,
                    seed=s,
                    num_steps=gen.num_steps,
                    method=gen.method,
                    guidance_scale=gen.guidance_scale,
                    adapter=adapter,
                    batch_size=gen.batch_size,
                )
                recs = []
                for it, im in zip(chunk, images, strict=True):
                    p = image_path(out, label, it, s)
                    p.parent.mkdir(parents=True, exist_ok=True)
                    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
                    im.save(tmp, format="PNG")
                    os.replace(tmp, p)
                    recs.append(_record(label, it, s, p, out, True))
                _append(manifest, recs)
                counts[label]["sampled"] += len(recs)
                bar.update(len(recs))
        bar.close()
        counts[label]["seconds"] = round(time.perf_counter() - t0, 2)
        del policy
    return counts
