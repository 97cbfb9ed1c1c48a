"""Summaries of a shard set (`firm data inspect`): counts, score histograms (text and PNG), a few rendered samples."""

from __future__ import annotations

import json
import textwrap
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firm.data.reader import ReadStats, expand_shards, iter_samples
from firm.data.schema import decode_image, get_schema
from firm.vocab import SCORE_MAX, SCORE_MIN

MISSING = "missing"
BAR_WIDTH = 40


@dataclass
class InspectReport:
    """Counts and histograms of a shard set."""

    shards: int = 0
    samples: int = 0
    per_shard: dict[str, int] = field(default_factory=dict)
    per_schema: dict[str, int] = field(default_factory=dict)
    per_task: dict[str, int] = field(default_factory=dict)  # rl_prompt samples
    histograms: dict[str, dict[str, int]] = field(default_factory=dict)  # "schema.field" -> {"1".."5", "missing"}
    rewritten: int = 0  # samples whose provenance marks a rewritten instruction/prompt
    corrupt: dict[str, int] = field(default_factory=dict)
    rendered: list[str] = field(default_factory=list)
    plot: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}

    def text(self) -> str:
        lines = [f"{self.samples} sample(s) in {self.shards} shard(s)"]
        lines += [f"  {name}: {n}" for name, n in sorted(self.per_schema.items())]
        if self.per_task:
            lines += ["  tasks: " + ", ".join(f"{t}={n}" for t, n in sorted(self.per_task.items()))]
        if self.rewritten:
            lines.append(f"  rewritten (synthesised mismatches): {self.rewritten}")
        if self.corrupt.get("skipped") or self.corrupt.get("truncated_shards"):
            lines.append(
                f"  corrupt: {self.corrupt.get('skipped', 0)} sample(s) skipped, "
                f"{self.corrupt.get('truncated_shards', 0)} damaged shard(s)"
            )
        for name, hist in self.histograms.items():
            lines.append("")
            lines += format_histogram(name, hist)
        if self.plot:
            lines += ["", f"histogram plot: {self.plot}"]
        if self.rendered:
            lines += [f"rendered samples: {Path(self.rendered[0]).parent}/ ({len(self.rendered)} files)"]
        return "\n".join(lines)


def empty_histogram() -> dict[str, int]:
    return {**{str(s): 0 for s in range(SCORE_MIN, SCORE_MAX + 1)}, MISSING: 0}


def histogram(scores: list[int | None]) -> dict[str, int]:
    """Counts of scores 1..5 and of missing scores (keys ``"1"`` .. ``"5"``, ``"missing"``)."""
    h = empty_histogram()
    for s in scores:
        h[MISSING if s is None else str(s)] += 1
    return h


def format_histogram(name: str, hist: dict[str, int], width: int = BAR_WIDTH) -> list[str]:
    """Text bars, one line per score."""
    total = sum(hist.values())
    top = max(hist.values()) if hist else 0
    lines = [f"{name} (n={total})"]
    for label, n in hist.items():
        bar = "#" * (round(width * n / top) if top else 0)
        pct = 100.0 * n / total if total else 0.0
        lines.append(f"  {label:>7} {n:>8} {pct:5.1f}% {bar}")
    return lines


def plot_histograms(histograms: dict[str, dict[str, int]], path: str | Path, title: str = "") -> str:
    """One bar chart per histogram, side by side, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(histograms))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 2.8), squeeze=False)
    for ax, (name, hist) in zip(axes[0], histograms.items()):
        labels = list(hist)
        ax.bar(range(len(labels)), [hist[k] for k in labels], color="#4477aa")
        ax.set_xticks(range(len(labels)), ["miss" if k == MISSING else k for k in labels])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score")
    axes[0][0].set_ylabel("samples")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def _caption(sample: dict, schema: str) -> str:
    def score(name: str) -> str:
        v = sample.get(name)
        return "-" if v is None else str(v)

    if schema == "edit":
        head = f"instruction: {sample['instruction']}"
        scores = f"execution {score('execution')} | consistency {score('consistency')}"
        reason = sample.get("execution_reasoning") or ""
    elif schema == "generation":
        head = f"prompt: {sample['prompt']}"
        scores = f"instruction {score('instruction')} | quality {score('quality')}"
        reason = sample.get("instruction_reasoning") or ""
    else:
        head = f"[{sample['task']}] {sample['prompt']}"
        scores, reason = "", ""
    parts = [textwrap.fill(head, 70), scores]
    if reason:
        parts.append(textwrap.shorten(reason, 200))
    return "\n".join(p for p in parts if p)


def render_sample(sample: dict, schema: str, path: str | Path) -> str:
    """Save the sample's images side by side with its text and scores as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sch = get_schema(schema)
    images = []
    for f in sch.image_fields:
        v = sample.get(f.name)
        if v is None:
            continue
        images.append((f.name, decode_image(v) if isinstance(v, (bytes, bytearray)) else v))
    n = max(1, len(images))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 4.0), squeeze=False)
    for ax in axes[0]:
        ax.axis("off")
    for ax, (name, im) in zip(axes[0], images):
        ax.imshow(im)
        ax.set_title(name, fontsize=9)
    fig.text(0.01, 0.01, _caption(sample, schema), fontsize=7, va="bottom", family="monospace")
    fig.suptitle(sample["key"], fontsize=9)
    fig.subplots_adjust(bottom=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def inspect_shards(
    shards: Any,
    out_dir: str | Path | None = None,
    *,
    num_render: int = 4,
    schema: str | None = None,
    progress: bool = True,
) -> InspectReport:
    """Count samples, build score histograms and render a few samples of a shard set.

    Images are not decoded except for the rendered samples, so this reads at the speed of the disk.

    Args:
        shards: shard spec (a folder, glob, brace pattern or list).
        out_dir: where ``report.json``, ``histograms.png`` and ``samples/*.png`` go (None: text report only).
        num_render: how many samples to render (the first ones of the first shards).
        schema: expected schema (None: each sample's own).
    """
    from tqdm import tqdm

    urls = expand_shards(shards)
    stats = ReadStats()
    report = InspectReport(shards=len(urls))
    scores: dict[str, list[int | None]] = defaultdict(list)
    per_shard: Counter[str] = Counter()
    per_schema: Counter[str] = Counter()
    per_task: Counter[str] = Counter()
    to_render: list[tuple[dict, str]] = []
    for sample in tqdm(
        iter_samples(urls, schema, stats=stats, decode_images=False),
        desc="inspect",
        unit="sample",
        disable=not progress,
    ):
        url = sample["__url__"]
        name = sample["__schema__"]
        per_shard[url] += 1
        per_schema[name] += 1
        if name == "rl_prompt":
            per_task[sample["task"]] += 1
        for f in get_schema(name).score_fields:
            scores[f"{name}.{f}"].append(sample.get(f))
        prov = sample.get("provenance") or {}
        if prov.get("rewritten"):
            report.rewritten += 1
        if len(to_render) < num_render:
            to_render.append((sample, name))
    report.samples = sum(per_schema.values())
    report.per_shard = dict(per_shard)
    report.per_schema = dict(per_schema)
    report.per_task = dict(per_task)
    report.histograms = {k: histogram(v) for k, v in scores.items()}
    report.corrupt = stats.as_dict()
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if report.histograms:
            report.plot = plot_histograms(report.histograms, out / "histograms.png", f"{report.samples} samples")
        for sample, name in to_render:
            fname = sample["key"].replace("/", "_") + ".png"
            report.rendered.append(render_sample(sample, name, out / "samples" / fname))
        (out / "report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    return report
