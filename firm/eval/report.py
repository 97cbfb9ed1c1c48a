"""Stage 3, report: per-category and overall metrics per policy, paired differences with bootstrap CIs, grids.

``table.md`` and ``results.json`` hold the numbers; ``grids/<category>.png`` show the first items of each category
(source, then each policy's image of the first seed, with its headline metric). Differences are paired: the same
items and seeds for both policies (they started from the same noise). The CI resamples *items* (with each item's
mean over seeds), stratified by category, ``bootstrap_samples`` times; the overall statistic is the judge's (mean over
samples, or the mean of the category means for GenEval). Published rows, from the YAML, are labelled as published.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from firm.eval.generate import image_path, sample_id
from firm.eval.items import PromptSet


@dataclass
class PublishedRow:
    """A published result shown beside ours (never mixed into our numbers)."""

    label: str = ""  # the model, as the paper names it
    source: str = ""  # where the number comes from
    overall: float | None = None  # the headline metric's overall value
    categories: dict[str, float] = field(default_factory=dict)  # per-category values, when published


@dataclass
class ReportConfig:
    """What the report computes and draws."""

    bootstrap_samples: int = 2000  # resamples of the paired-difference CIs (0: none)
    ci_level: float = 0.95  # their confidence level
    seed: int = 0  # seed of the bootstrap
    grid_items: int = 4  # items per category in the grids (0: no grids)
    grid_cell: int = 128  # pixels per grid cell
    published: list[PublishedRow] = field(default_factory=list)  # published rows of this benchmark


def _mean(xs: list[float]) -> float | None:
    return float(np.mean(xs)) if xs else None


def summarise(values: dict[str, dict[str, dict[str, Any]]], prompt_set: PromptSet, metric: str, overall: str) -> dict:
    """Per category and overall means of ``metric`` for one policy; ``values[item][seed] -> metrics``."""
    cats: dict[str, list[float]] = {}
    n_missing = 0
    for it in prompt_set.items:
        for m in values[it.id].values():
            v = m.get(metric)
            if v is None:
                n_missing += 1
            else:
                cats.setdefault(it.category, []).append(v)
    per_cat = {c: _mean(cats.get(c, [])) for c in prompt_set.categories()}
    if overall == "categories":
        present = [v for v in per_cat.values() if v is not None]
        ov = _mean(present)
    else:
        ov = _mean([v for vs in cats.values() for v in vs])
    return {"overall": ov, "categories": per_cat, "n_missing": n_missing}


def paired_difference(
    base: dict, other: dict, prompt_set: PromptSet, metric: str, overall: str, cfg: ReportConfig
) -> dict[str, Any]:
    """Mean of ``other - base`` over (item, seed) pairs where both have ``metric``, per category and overall, with
    stratified item-bootstrap CIs."""
    per_item: dict[str, list[tuple[str, float]]] = {}
    for it in prompt_set.items:
        ds = [
            other[it.id][s][metric] - base[it.id][s][metric]
            for s in base[it.id]
            if base[it.id][s].get(metric) is not None and other[it.id][s].get(metric) is not None
        ]
        if ds:
            per_item.setdefault(it.category, []).append((it.id, float(np.mean(ds))))
    cats = sorted(per_item)
    arrays = {c: np.array([d for _, d in per_item[c]]) for c in cats}

    def stat(samples: dict[str, np.ndarray]) -> float:
        if overall == "categories":
            return float(np.mean([samples[c].mean() for c in cats]))
        return float(np.concatenate([samples[c] for c in cats]).mean())

    rng = np.random.default_rng(cfg.seed)
    alpha = (1 - cfg.ci_level) / 2

    def ci(select: list[str]) -> tuple[float, float] | None:
        if cfg.bootstrap_samples <= 0 or sum(len(arrays[c]) for c in select) < 2:
            return None
        draws = []
        for _ in range(cfg.bootstrap_samples):
            res = {c: arrays[c][rng.integers(0, len(arrays[c]), len(arrays[c]))] for c in select}
            draws.append(stat(res) if len(select) > 1 else float(res[select[0]].mean()))
        lo, hi = np.quantile(draws, [alpha, 1 - alpha])
        return float(lo), float(hi)

    out: dict[str, Any] = {"categories": {}}
    for c in cats:
        out["categories"][c] = {"mean": float(arrays[c].mean()), "ci": ci([c]), "n_items": len(arrays[c])}
    out["overall"] = {"mean": stat(arrays) if cats else None, "ci": ci(cats) if cats else None}
    out["n_items"] = sum(len(a) for a in arrays.values())
    return out


def _fmt(v: float | None, nd: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{nd}f}"


def markdown(results: dict[str, Any]) -> str:
    """The report's tables."""
    labels, head = results["labels"], results["headline"]
    cats = results["categories"]
    base = results["baseline"]
    others = [x for x in labels if x != base]
    lines = [
        f"# {results['name']}: {results['prompt_set']} ({results['n_items']} prompts x {len(results['seeds'])} seeds)",
        "",
        f"Judge `{results['judge']['name']}`; {results['scale']}. Headline metric: **{head}**.",
    ]
    if results.get("note"):
        lines += ["", f"**{results['note']}**"]
    cols = [*labels, *(f"{o} − {base} [{int(results['ci_level'] * 100)}% CI]" for o in others)]
    lines += ["", f"| {head} | n | " + " | ".join(cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for c in [*cats, "overall"]:
        row = [c, str(results["counts"].get(c, results["n_items"]))]
        for lab in labels:
            s = results["policies"][lab]["metrics"][head]
            row.append(_fmt(s["overall"] if c == "overall" else s["categories"].get(c)))
        for o in others:
            d = results["differences"][o][head]
            e = d["overall"] if c == "overall" else d["categories"].get(c)
            if not e or e["mean"] is None:
                row.append("—")
            else:
                ci = e["ci"]
                row.append(f"{e['mean']:+.3f}" + (f" [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else ""))
        lines.append("| " + " | ".join(row) + " |")
    for p in results.get("published", []):
        vals = [_fmt(p["categories"].get(c)) for c in cats] + [_fmt(p["overall"])]
        lines.append(f"| published: {p['label']} ({p['source']}) | " + " / ".join(vals) + " |" + " |" * (len(cols)))
    others_m = [m for m in results["metrics"] if m != head]
    if others_m:
        lines += ["", "| overall | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
        for m in others_m:
            lines.append(
                f"| {m} | "
                + " | ".join(_fmt(results["policies"][lab]["metrics"][m]["overall"]) for lab in labels)
                + " |"
            )
    lines += ["", "| answers | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    lines.append(
        "| unparsed (not scored) | "
        + " | ".join(str(results["policies"][lab]["parse_failures"]) for lab in labels)
        + " |"
    )
    lines.append(
        "| samples without headline | "
        + " | ".join(str(results["policies"][lab]["metrics"][head]["n_missing"]) for lab in labels)
        + " |"
    )
    g = results["generation"]
    lines += [
        "",
        f"Generation: {g['num_steps']} steps, sampler `{g['method']}`, CFG {g['guidance_scale']}, "
        f"resolution {results['resolutions']}, seeds {g['seeds']}. Paired differences: same prompts and seeds (same "
        f"initial noise); CIs: {results['bootstrap_samples']} item resamples stratified by category.",
        "",
    ]
    return "\n".join(lines)


def draw_grid(
    out: Path,
    prompt_set: PromptSet,
    category: str,
    labels: list[str],
    seed: int,
    values: dict,
    head: str,
    cell: int,
    n: int,
) -> Path | None:
    """``grids/<category>.png``: rows = items; columns = source (edits), then each policy's image."""
    items = [it for it in prompt_set.items if it.category == category][:n]
    if not items:
        return None
    edit = prompt_set.kind == "edit"
    ncol = len(labels) + int(edit)
    pad = 28
    canvas = Image.new("RGB", (ncol * cell, len(items) * (cell + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    heads = (["source"] if edit else []) + labels
    for j, h in enumerate(heads):
        draw.text((j * cell + 4, 4), h[:20], fill="black")
    for i, it in enumerate(items):
        y = pad + i * (cell + pad)
        draw.text((4, y + 2), it.prompt[: max(20, ncol * cell // 7)], fill="black")
        imgs = ([it.source_image()] if edit else []) + [Image.open(image_path(out, lab, it, seed)) for lab in labels]
        for j, im in enumerate(imgs):
            canvas.paste(im.convert("RGB").resize((cell, cell - 12)), (j * cell, y + 14))
        for j, lab in enumerate(labels):
            v = values[lab][it.id][seed].get(head)
            draw.text(((j + int(edit)) * cell + 4, y + cell + 2), f"{head} {_fmt(v, 2)}", fill="black")
    path = out / "grids" / f"{category}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


__all__ = ["ReportConfig", "PublishedRow", "summarise", "paired_difference", "markdown", "draw_grid", "sample_id"]
