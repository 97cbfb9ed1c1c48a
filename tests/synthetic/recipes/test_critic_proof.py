"""`firm shapes critic-proof`: every stage runs on real (tiny) inputs, both arms fine-tune the same base, and the
summary reads the benchmark right."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from firm.synthetic.recipes.critic_proof import ProofConfig, markdown, run_critic_proof, summarize


@pytest.mark.slow
def test_the_proof_runs_every_stage_and_trains_the_critic(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = ProofConfig(
        out=str(tmp_path / "proof"), base="", bench_items=4, train_edits=48, train_gens=48, val_samples=8, steps=6,
        batch_size=8, critic={"layers": 1, "vision_depth": 1, "corpus_samples": 40},
        train_overrides=["trainer.log_every_n_steps=1"],
        bench_overrides=["critics.curated_sft.max_new_tokens=8", "critics.base_zero_shot.max_new_tokens=8"],
    )  # fmt: skip
    results = run_critic_proof(cfg)
    out = tmp_path / "proof"
    for name in ("results.json", "table.md", "training.png", "bench/results.json", "bench/bench.png"):
        assert (out / name).is_file(), name
    rows = {"shapes_rule", "median_prior", "mode_prior", "base_zero_shot", "uncurated_sft", "curated_sft"}
    assert set(results["critics"]) == rows
    assert results["critics"]["shapes_rule"]["overall_mae"] == 0.0  # the benchmark's reference is the rubric
    # the curation ran at both training sizes and the priors come from its labels
    for size in (64, 32):
        assert (out / "curation" / f"edit_train_{size}" / "final").is_dir()
        # the uncurated arm: the general judge's raw labels of the same tasks, nothing balanced
        manifest = json.loads((out / "curation" / f"edit_train_{size}_uncurated" / "manifest.json").read_text())
        assert not (out / "curation" / f"edit_train_{size}_uncurated" / "final").exists()
        assert manifest["config"]["teachers"]["default"]["name"] == "shapes_general"
    curated = json.loads((out / "curation" / "edit_train_64" / "manifest.json").read_text())
    assert "consistency" in curated["config"]["balance"]["joint"]  # Consistency balanced with Execution
    labels = results["training_labels"]
    assert set(labels) == {"curated", "uncurated"} and labels["uncurated"]["consistency"]
    assert set(results["priors"]["mode"]) == {"execution", "consistency", "instruction"}
    bench_cfg = json.loads((out / "bench" / "results.json").read_text())["critics"]["mode_prior"]["config"]
    assert bench_cfg["execution"] == results["priors"]["mode"]["execution"]
    # SFT moved each arm's weights away from the same init, differently
    before = load_file(out / "critic-init" / "model.safetensors")
    arms = {a: load_file(out / f"critic-{a}" / "model.safetensors") for a in ("curated", "uncurated")}
    for after in arms.values():
        moved = [k for k in before if not torch.equal(before[k], after[k])]
        assert len(moved) > len(before) // 2
        assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(arms["curated"][k], arms["uncurated"][k]) for k in before)
    assert set(results["gaps_to_curated"]) == {"base_zero_shot", "uncurated_sft"}
    assert results["acceptance"]["ok"] is False  # 6 steps teach nothing: the check must be able to fail
    # a rerun reuses every finished stage and reports the times they took
    again = run_critic_proof(cfg)
    assert again["seconds"]["train"] == results["seconds"]["train"] > 0


def _report(trained: dict[str, tuple[float, float]], overall: float) -> dict:
    groups = {
        g: {"mae": m, "spearman": r, "pearson": r, "n_items": 40, "n_failed": 0}
        for g, (m, r) in zip(("edit-execution", "edit-consistency", "generation"), trained.values())
    }
    groups["overall"] = {"mae": overall}
    return {"critics": {"curated_sft": {"metrics": {"groups": groups}}}}


def test_acceptance_needs_every_target():
    good = {"execution": (0.5, 0.8), "consistency": (0.5, 0.75), "instruction": (0.4, 0.9)}
    res = summarize(_report(good, 0.48), ProofConfig(), {"total": 1.0}, {}, {})
    assert res["acceptance"]["ok"] is True
    bad = dict(good, consistency=(0.5, 0.69))
    res = summarize(_report(bad, 0.48), ProofConfig(), {"total": 1.0}, {}, {})
    assert res["acceptance"]["ok"] is False and res["acceptance"]["checks"]["consistency_spearman"]["ok"] is False
    res = summarize(_report(good, 0.61), ProofConfig(), {"total": 1.0}, {}, {})
    assert res["acceptance"]["checks"]["overall_mae"]["ok"] is False
    assert "not met" in markdown(res)
