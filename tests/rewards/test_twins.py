"""The tiny CPU twins of the reward experiments train: every scorer loads its tiny checkpoint through the real code,
the advantages are nonzero, LoRA weights move, and the logged reward is the YAML's mix of the logged scores."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from firm.runner import run

REPO = Path(__file__).resolve().parents[2]
RL = REPO / "experiments" / "rl"
PICK = 1 / 26  # the YAMLs' PickScore scale (Flow-GRPO's normalisation)


def _rows(run_dir: Path) -> list[dict[str, float]]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("adv/abs_mean")]
    return [{k: float(v) for k, v in r.items() if v not in ("", None)} for r in rows]


def _lora_moved(run_dir: Path) -> bool:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    lora_b = [v for k, v in ckpt["state_dict"].items() if "lora_B" in k and ".default." in k]
    return bool(lora_b) and max(float(v.abs().max()) for v in lora_b) > 1e-5  # lora_B starts at exactly 0


TWINS = {
    # name: (overrides, the reward as a function of one logged row)
    "tiny_sd3_grpo_pickscore": ([], lambda r: PICK * r["reward/pickscore"]),
    "tiny_sd3_grpo_ocr": ([], lambda r: r["reward/ocr"]),
    "tiny_sd3_nft_multi_reward": (
        [],
        lambda r: PICK * r["reward/pickscore"] + r["reward/hpsv3"] + 0.01 * r["reward/clip_score"],
    ),
    "tiny_sd3_nft_critic_pickscore": (
        ["module.reward_mix=gdpo", "module.rewards.critic.critic.seconds=0", "module.rewards.slow_pickscore.seconds=0"],
        lambda r: r["reward/qma"] + 0.5 * PICK * r["reward/pickscore"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TWINS))
def test_reward_twin_trains(tmp_path, monkeypatch, name):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    overrides, reward = TWINS[name]
    run_dir = run(str(RL / f"{name}.yaml"), [f"output_root={tmp_path}", "module.log_images_every=0", *overrides])
    rows = _rows(run_dir)
    assert len(rows) >= 2
    assert max(r["adv/abs_mean"] for r in rows) > 0.3  # a learning signal, whatever the random scorers say
    assert all(r["reward/missing_frac"] == 0 for r in rows)
    for r in rows:  # the logged mean reward is the mix of the logged mean scores (the mix is linear)
        assert r["reward/mean"] == pytest.approx(reward(r), rel=1e-4, abs=1e-5)
    assert _lora_moved(run_dir)
    if "module.reward_mix=gdpo" in overrides:  # GDPO's last step z-scores the batch: mean 0, std 1 exactly
        assert all(abs(r["adv/mean"]) < 1e-5 and abs(r["adv/std"] - 1) < 1e-4 for r in rows)
