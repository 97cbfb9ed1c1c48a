"""Benchmark report: a markdown table (with the published reference rows, labelled as such), and a plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from firm.bench.metrics import GROUPS

# MAE on FIRM-Bench as published in the FIRM paper ("Trust Your Critic", arXiv:2603.12247). These numbers were NOT
# measured by this code; they are shown for reference, and only compare with our rows on the real FIRM-Bench.
# The zero-shot pair (.87 / .63) is read as (edit overall, generation), matching the order of the fine-tuned rows.
PUBLISHED: list[dict[str, Any]] = [
    {"critic": "FIRM-Edit-8B", "mae": {"edit-execution": 0.53, "edit-consistency": 0.73, "edit": 0.62}},
    {"critic": "FIRM-Gen-8B", "mae": {"generation": 0.51}},
    {"critic": "Qwen3-VL-8B-Instruct zero-shot", "mae": {"edit": 0.87, "generation": 0.63}},
]
PUBLISHED_SOURCE = "FIRM paper (arXiv:2603.12247), FIRM-Bench, 807 human-scored items"

_HEADERS = {
    "edit-execution": "Edit exec",
    "edit-consistency": "Edit cons",
    "edit": "Edit all",
    "generation": "Gen",
    "generation/easy": "Gen easy",
    "generation/hard": "Gen hard",
    "overall": "Overall",
}


def _f(x: float | None, nd: int = 2) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def _mae_cell(m: dict[str, Any]) -> str:
    if m["mae"] is None:
        return f"— (0/{m['n_items']} parsed)"
    ci = f" [{m['mae_ci'][0]:.2f}, {m['mae_ci'][1]:.2f}]" if m.get("mae_ci") else ""
    return f"{m['mae']:.2f}{ci}"


def present_groups(critics: dict[str, Any]) -> list[str]:
    seen = {g for c in critics.values() for g in c["metrics"]["groups"]}
    return [g for g in GROUPS if g in seen]


def markdown_tables(report: dict[str, Any], *, published: bool = True) -> str:
    """The MAE table (ours, then published rows) and a correlation table, as markdown."""
    critics = report["critics"]
    bench = report["benchmark"]
    groups = present_groups(critics)
    level = next(iter(critics.values()))["metrics"]["ci_level"] if critics else 0.95
    lines = [
        f"### MAE on {bench['name']} ({bench['n_items']} items; lower is better)",
        "",
        "| Critic | " + " | ".join(_HEADERS[g] for g in groups) + " | Parsed |",
        "|---|" + "---|" * (len(groups) + 1),
    ]
    for label, c in critics.items():
        gm = c["metrics"]["groups"]
        cells = [_mae_cell(gm[g]) if g in gm else "—" for g in groups]
        ov = gm["overall"]
        parsed = f"{ov['n_parsed']}/{ov['n_items']}"
        if ov["n_failed"]:
            parsed += f" ({100 * ov['parse_failure_rate']:.1f}% unparseable)"
        lines.append(f"| {label} (this run) | " + " | ".join(cells) + f" | {parsed} |")
    if published:
        for row in PUBLISHED:
            cells = [_f(row["mae"].get(g)) for g in groups]
            if all(c == "—" for c in cells):
                continue
            lines.append(f"| *{row['critic']} — published* | " + " | ".join(cells) + " | — |")
    lines += [
        "",
        f"MAE over parsed items, {int(100 * level)}% bootstrap CI in brackets "
        f"({next(iter(critics.values()))['metrics']['bootstrap_samples'] if critics else 0} resamples). "
        "Unparseable answers are excluded from MAE and counted in *Parsed*.",
    ]
    if published:
        note = f"*Published* rows are numbers reported in the {PUBLISHED_SOURCE}; they were not measured here"
        if bench.get("score_source") != "human" or "firm-bench" not in bench["name"].lower():
            note += f", and they are not comparable with rows measured on {bench['name']}"
        lines.append(note + ".")
    lines += ["", "### Correlation with the reference scores", ""]
    lines += ["| Critic | Group | n parsed | Pearson | Spearman | Kendall τb |", "|---|---|---|---|---|---|"]
    for label, c in critics.items():
        for g in groups:
            m = c["metrics"]["groups"].get(g)
            if m is None:
                continue
            lines.append(
                f"| {label} | {_HEADERS[g]} | {m['n_parsed']} | {_f(m['pearson'])} | {_f(m['spearman'])} "
                f"| {_f(m['kendall'])} |"
            )
    return "\n".join(lines) + "\n"


def plot_report(report: dict[str, Any], path: str | Path, *, published: bool = True) -> Path:
    """Per-group MAE bars (with CIs and published markers) and, per critic, predicted-vs-reference confusion."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    critics = report["critics"]
    groups = present_groups(critics)
    n = len(critics)
    fig, axes = plt.subplots(1, 1 + n, figsize=(6 + 3.6 * n, 4.2), gridspec_kw={"width_ratios": [2.2] + [1] * n})
    ax = axes[0]
    x = np.arange(len(groups))
    width = 0.8 / max(n, 1)
    for i, (label, c) in enumerate(critics.items()):
        gm = c["metrics"]["groups"]
        vals = [gm[g]["mae"] if g in gm and gm[g]["mae"] is not None else np.nan for g in groups]
        lo = [v - gm[g]["mae_ci"][0] if g in gm and gm[g].get("mae_ci") else 0 for g, v in zip(groups, vals)]
        hi = [gm[g]["mae_ci"][1] - v if g in gm and gm[g].get("mae_ci") else 0 for g, v in zip(groups, vals)]
        ax.bar(x + (i - (n - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=3, label=label)
    if published:
        for row, marker in zip(PUBLISHED, "Ds^v"):
            js = [j for j, g in enumerate(groups) if g in row["mae"]]
            if js:
                ys = [row["mae"][groups[j]] for j in js]
                ax.scatter(js, ys, marker=marker, color="k", s=28, zorder=3, label=f"{row['critic']} (published)")
    ax.set_xticks(x, [_HEADERS[g] for g in groups], rotation=25, ha="right")
    ax.set_ylabel("MAE (lower is better)")
    ax.set_title(f"MAE on {report['benchmark']['name']}")
    ax.legend(fontsize=7)
    for ax, (label, c) in zip(axes[1:], critics.items()):
        m = np.asarray(c["metrics"]["confusion"])
        ax.imshow(m, cmap="Blues", origin="lower", extent=(0.5, 5.5, 0.5, 5.5))
        for r in range(5):
            for col in range(5):
                if m[r, col]:
                    color = "white" if m[r, col] > m.max() / 2 else "black"
                    ax.text(col + 1, r + 1, str(m[r, col]), ha="center", va="center", fontsize=8, color=color)
        ax.set_xlabel("predicted score")
        ax.set_ylabel("reference score (rounded)")
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(1, 6))
        ax.set_yticks(range(1, 6))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
