"""Test-only helpers for the benchmark tests: tiny benchmark directories and a scripted critic."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from firm.critics.types import CriticRequest, CriticResult
from firm.registry import CRITICS


def make_bench(root: Path, items: list[dict[str, Any]], *, name: str = "tiny-bench") -> Path:
    """Write a benchmark: each item dict gives id, task, human_score (and split); images are made up."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    lines = []
    for n, it in enumerate(items):
        rec = dict(it)
        color = ((37 * n) % 256, (91 * n) % 256, (53 * n) % 256)
        if rec["task"] == "generation":
            Image.new("RGB", (8, 8), color).save(root / "images" / f"{rec['id']}.png")
            rec.setdefault("image", f"images/{rec['id']}.png")
            rec.setdefault("prompt", f"a square number {n}")
            rec.setdefault("split", "easy")
        else:
            Image.new("RGB", (8, 8), color).save(root / "images" / f"{rec['id']}_src.png")
            Image.new("RGB", (8, 8), color[::-1]).save(root / "images" / f"{rec['id']}_out.png")
            rec.setdefault("source", f"images/{rec['id']}_src.png")
            rec.setdefault("edited", f"images/{rec['id']}_out.png")
            rec.setdefault("instruction", f"change square {n}")
        lines.append(json.dumps(rec))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    (root / "bench.json").write_text(json.dumps({"name": name, "score_source": "rubric"}))
    return root


class ScriptedCritic:
    """Answers from a table (item id -> score, None, or a raw string), optionally failing or interrupting.

    Every call appends the ids it was asked about (one JSON list per line) to ``log_path`` when set.
    """

    @dataclass
    class Config:
        name: str = "test_scripted"
        answers: dict[str, Any] = field(default_factory=dict)  # item id -> int | None | "garbage"
        default_score: int = 3  # for ids not in `answers`
        fail_ids: list[str] = field(default_factory=list)  # a batch containing one of these raises RuntimeError
        interrupt_on_call: int = -1  # raise KeyboardInterrupt on this call number (1-based)
        log_path: str = ""  # append the ids of each call here
        sleep_s: float = 0.0  # per call

    def __init__(self, config: Config) -> None:
        self.config = config
        self.calls = 0

    def score(self, requests: list[CriticRequest]) -> list[CriticResult]:
        c = self.config
        self.calls += 1
        ids = [r.key for r in requests]
        if c.log_path:
            with open(c.log_path, "a") as f:
                f.write(json.dumps(ids) + "\n")
        if c.sleep_s:
            time.sleep(c.sleep_s)
        if self.calls == c.interrupt_on_call:
            raise KeyboardInterrupt
        if any(i in c.fail_ids for i in ids):
            raise RuntimeError("endpoint unreachable")
        out = []
        for r in requests:
            (dim,) = r.dimensions
            value = c.answers.get(r.key, c.default_score)
            if isinstance(value, str):
                out.append(
                    CriticResult(scores={dim: None}, raw={dim: value}, errors={dim: "no score found"}, key=r.key)
                )
            else:
                out.append(CriticResult(scores={dim: value}, raw={dim: f"SCORE: {value}"}, key=r.key))
        return out


def register_scripted(monkeypatch) -> None:
    monkeypatch.setitem(CRITICS, "test_scripted", ScriptedCritic)
