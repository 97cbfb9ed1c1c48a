"""The step-time machinery: asynchronous rollouts, the delayed critic, the KL on a subset (`firm profile step` in
tests/profile/test_step.py)."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
import torch

from firm.critics.factory import build_critic
from firm.critics.types import GenRequest
from firm.runner import run

REPO = Path(__file__).resolve().parents[2]
TINY_NFT = REPO / "experiments" / "rl" / "tiny_sd3_nft.yaml"
TINY_GRPO = REPO / "experiments" / "rl" / "tiny_sd3_grpo.yaml"


def _rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("reward/mean")]


def test_delayed_critic_answers_like_its_inner_critic_after_the_delay():
    from PIL import Image

    reqs = [GenRequest(image=Image.new("RGB", (8, 8), (200, 10, 10)), prompt="a red square", key="k")]
    inner = build_critic({"name": "image_stats"}).score(reqs)
    delayed = build_critic({"name": "delayed", "inner": {"name": "image_stats"}, "seconds": 0.2})
    t0 = time.perf_counter()
    out = delayed.score(reqs)
    assert time.perf_counter() - t0 >= 0.2
    assert [r.scores for r in out] == [r.scores for r in inner]
    with pytest.raises(ValueError, match=">= 0"):
        build_critic({"name": "delayed", "inner": {"name": "image_stats"}, "seconds": -1})


@pytest.mark.slow
@pytest.mark.parametrize("yaml", [TINY_NFT, TINY_GRPO], ids=["nft", "grpo"])
def test_async_rollouts_train_and_are_reproducible_from_the_seed(tmp_path, monkeypatch, yaml):
    monkeypatch.delenv("FIRM_RUN_DIR", raising=False)
    # a critic as slow as a few chunks of sampling, so that the scores really arrive while the update runs
    critic = "module.critic={name: delayed, inner: {name: image_stats}, seconds: 0.05}"
    ov = [f"output_root={tmp_path}", "module.async_rollout=true", critic, "module.log_images_every=0"]
    steps = 2 if yaml == TINY_NFT else 4  # 2 optimizer steps of NFT, 2 RL steps x 2 of Flow-GRPO
    a = run(str(yaml), [*ov, f"trainer.max_steps={steps}", "name=a"])
    b = run(str(yaml), [*ov, f"trainer.max_steps={steps}", "name=b"])
    ra, rb = _rows(a), _rows(b)
    assert len(ra) == 2  # the first RL step only samples: its rollout is trained on in the second
    keys = [k for k in ra[0] if not k.startswith("perf/") and ra[0][k] != ""]
    assert [[r[k] for k in keys] for r in ra] == [[r[k] for k in keys] for r in rb]  # same seed, same numbers
    assert float(ra[0]["adv/abs_mean"]) > 0 and float(ra[0]["train/grad_norm"]) > 0
    wa = torch.load(a / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    wb = torch.load(b / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    if yaml == TINY_GRPO:  # off-policy by one step: the ratio is taken against the rollout's own log-probs
        assert all(float(r["train/logp_rollout_gap"]) > 0 for r in ra)


@pytest.mark.slow
def test_kl_on_a_subset_of_steps_runs_fewer_reference_forwards(tmp_path):
    from firm.profile.step import profile_experiment

    ov = [
        f"output_root={tmp_path}",
        "module.kl_beta=1e-2",
        "module.sampler.num_steps=4",
        "module.timestep_fraction=1.0",
    ]
    full = profile_experiment(str(TINY_NFT), ov, steps=1, warmup=0)
    quarter = profile_experiment(str(TINY_NFT), [*ov, "module.kl_fraction=0.25"], steps=1, warmup=0)
    off = profile_experiment(str(TINY_NFT), [*ov, "module.kl_beta=0"], steps=1, warmup=0)
    # NFT: v and v_old always; v_ref on every trained step (3 forwards), 1 of 4 (2.25), never (2)
    assert full["forwards_per_trained_sample_step"] == pytest.approx(3.0)
    assert quarter["forwards_per_trained_sample_step"] == pytest.approx(2.25)
    assert off["forwards_per_trained_sample_step"] == pytest.approx(2.0)
