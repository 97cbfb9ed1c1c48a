"""`firm critic bench` with reward models: scorers are read by rank agreement next to the critics."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from firm.bench.metrics import correlations
from firm.bench.run import load_bench_config, run_bench
from firm.registry import SCORERS
from firm.rewards.scorers.base import Scorer, ScorerConfig, Scores, request_image
from tests.bench.helpers import make_bench, register_scripted
from tests.bench.test_run import ITEMS


class Red(Scorer):
    @dataclass
    class Config(ScorerConfig):
        name: str = "test_red"
        gen_only: bool = False

    outputs = ("red",)

    def __init__(self, config):
        super().__init__(config)
        self.tasks = ("gen",) if config.gen_only else ("gen", "edit")

    def score_batch(self, requests):
        vals = [float(np.asarray(request_image(r).convert("RGB"))[..., 0].mean()) for r in requests]
        return Scores({"red": torch.tensor(vals)})


def test_bench_scores_reward_models_next_to_critics(tmp_path, monkeypatch):
    register_scripted(monkeypatch)
    monkeypatch.setitem(SCORERS, "test_red", Red)
    data = make_bench(tmp_path / "bench", ITEMS)
    yaml = tmp_path / "b.yaml"
    yaml.write_text(
        f"name: s\ndata: {data}\noutput_root: {tmp_path / 'out'}\nbootstrap_samples: 0\nplot: false\n"
        "critics:\n  good: {name: test_scripted, default_score: 3}\n"
        "scorers:\n  red: {name: test_red}\n  red_gen: {name: test_red, gen_only: true}\n"
    )
    report = run_bench(load_bench_config(yaml), progress=False, echo=False)
    saved = json.loads((tmp_path / "out" / "s" / "results.json").read_text())
    assert saved["scorers"].keys() == {"red", "red_gen"} and saved["critics"].keys() == {"good"}
    # the reference: each item's edited / generated image's mean red against its human score
    from PIL import Image

    vals, human = [], []
    for it in ITEMS:
        name = f"{it['id']}.png" if it["task"] == "generation" else f"{it['id']}_out.png"
        vals.append(float(np.asarray(Image.open(data / "images" / name).convert("RGB"))[..., 0].mean()))
        human.append(it["human_score"])
    ov = report["scorers"]["red"]["metrics"]["groups"]["overall"]
    assert ov["n_scored"] == ov["n_items"] == len(ITEMS)
    assert ov["spearman"] == pytest.approx(correlations(vals, human)["spearman"])
    assert ov["spearman"] is not None and abs(ov["spearman"]) > 0
    gen = report["scorers"]["red_gen"]["metrics"]
    assert gen["skipped"] == 10 and gen["groups"]["overall"]["n_items"] == 4
    table = (tmp_path / "out" / "s" / "table.md").read_text()
    assert "| good (this run) |" in table and f"| red | red | overall | {len(ITEMS)}/{len(ITEMS)} |" in table


def test_bench_config_checks(tmp_path):
    yaml = tmp_path / "b.yaml"
    yaml.write_text("name: s\ndata: x\ncritics:\n  a: {name: constant}\nscorers:\n  a: {name: pickscore}\n")
    with pytest.raises(Exception, match="unique"):
        load_bench_config(yaml)
