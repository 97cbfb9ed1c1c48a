"""`firm plan` on every shipped full-size experiment: each RL one prints its tables and fits its GPUs (80 GB, the
plan's default target); each critic SFT one prints its tables and fits 141 GB, or 80 GB with the suggested batch.
Each plan builds the real architecture on the meta device and runs its forwards with fake tensors: 10-45 s per
experiment on a 2-core machine, hence slow."""

import json
from pathlib import Path

import pytest

from firm.plan.plan import GIB, plan_experiment
from firm.plan.report import render

REPO = Path(__file__).resolve().parents[2]
FULL_SIZE = sorted((REPO / "experiments" / "rl").glob("firm_*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", FULL_SIZE, ids=lambda p: p.stem)
def test_a_full_size_experiment_prints_its_plan_and_fits_its_gpus(path):
    from rich.console import Console

    plan = plan_experiment(path)
    console = Console(record=True, width=120)
    render(plan, console)
    text = console.export_text()
    assert "every setting" in text and "peak" in text and "fits 80GB" in text
    assert plan.fits, f"{path.name}: peak {plan.row.peak / GIB:.1f} GiB per GPU does not fit; {plan.suggestion}"


@pytest.mark.slow
def test_the_plan_of_the_sd35m_sized_benchmark_is_within_10_percent_of_its_h200_peak():
    """docs/benchmarks.md: `firm profile step experiments/rl/bench_sd35m_random.yaml` on one H200 measured the CUDA
    allocator's peak (max_memory_allocated) of a DiffusionNFT step with activation checkpointing."""
    res = json.loads((REPO / "docs" / "results" / "profile_step_bench_sd35m_random_nvidia-h200.json").read_text())
    measured = res["runs"][0]["peak_memory_mib"] * 2**20
    plan = plan_experiment(REPO / "experiments" / "rl" / "bench_sd35m_random.yaml")
    assert plan.setting.checkpointing  # the measured run had it on (inherited from firm_sd35_qma.yaml)
    assert abs(plan.row.peak - measured) <= 0.10 * measured, (plan.row.peak / 2**20, measured / 2**20)


CRITIC_FULL_SIZE = sorted((REPO / "experiments" / "critic").glob("firm_*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("path", CRITIC_FULL_SIZE, ids=lambda p: p.stem)
def test_a_full_size_critic_experiment_prints_its_plan(path):
    """The critic SFT YAMLs (10 s each) fit an 80 GB GPU as shipped (5 examples of 8192 tokens per GPU, 4 batches
    accumulated); the model card's 10 x 2 needs a 141 GB GPU, and the plan suggests a batch that fits 80 GB."""
    from rich.console import Console

    from firm.config import load_experiment, to_object
    from firm.plan.critic import plan_critic, render_critic

    cfg = to_object(load_experiment(path))
    plan = plan_critic(path, cfg)
    console = Console(record=True, width=120)
    render_critic(plan, console)
    text = console.export_text()
    assert "every setting" in text and "peak" in text and "fits 80GB" in text
    assert plan.fits and plan.row.fits["141GB"], f"{path.name}: peak {plan.row.peak / GIB:.1f} GiB per GPU"
    card = plan_critic(
        path, to_object(load_experiment(path, ["data.batch_size=10", "trainer.accumulate_grad_batches=2"]))
    )
    assert card.row.fits["141GB"] and not card.fits  # the model card's split: 141 GB only
    plan = card
    if not plan.fits:
        assert plan.suggestion and "data.batch_size=" in plan.suggestion, plan.suggestion
        overrides = [w for w in plan.suggestion.split("(")[0].split() if "=" in w]
        smaller = plan_critic(path, to_object(load_experiment(path, overrides)))
        assert smaller.fits, f"{path.name} with {overrides}: peak {smaller.row.peak / GIB:.1f} GiB per GPU"
