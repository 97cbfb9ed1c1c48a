"""`firm profile step`: the breakdown of an RL step, its table and its JSON."""

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY_GRPO = REPO / "experiments" / "rl" / "tiny_sd3_grpo.yaml"


@pytest.mark.slow
def test_profile_step_prints_a_breakdown_and_writes_json(tmp_path, capsys):
    from firm.cli import main

    with pytest.raises(SystemExit) as e:
        main(
            [
                "profile",
                "step",
                str(TINY_GRPO),
                f"output_root={tmp_path}",
                "module.log_images_every=0",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--out",
                str(tmp_path / "bench"),
                "--compare",
                "module.kl_beta=0",
            ]
        )
    assert e.value.code == 0
    out = capsys.readouterr().out
    for row in ("rollout fwd", "critic wait", "update fwd", "backward", "optimizer", "kernels", "other"):
        assert row in out, row
    (path,) = list((tmp_path / "bench").glob("*.json"))
    res = json.loads(path.read_text())
    assert res["device"].startswith("cpu") and len(res["runs"]) == 2
    base, no_kl = res["runs"]
    s = base["seconds"]
    assert s["step"] > 0 and s["rollout_fwd"] > 0 and s["update_fwd"] > 0 and s["backward"] > 0
    assert s["kernels"] > 0  # step_log_prob / clipped_surrogate / group_advantages were timed
    # Flow-GRPO with CFG 2: v at double batch, v_ref at double batch = 4 forwards per trained sample-step; no KL: 2
    assert base["forwards_per_trained_sample_step"] == pytest.approx(4.0)
    assert no_kl["forwards_per_trained_sample_step"] == pytest.approx(2.0)
    assert 1 <= base["host_syncs_per_optimizer_step"] <= 2  # the finite/norm read, plus the metrics read per RL step
    assert base["optimizer_steps_per_rl_step"] == 2
