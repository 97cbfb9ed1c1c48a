"""The synthetic shapes benchmark: layout, balance, splits; the rule critic agrees with the ground truth on it."""

import collections

import pytest

from firm.bench.data import load_benchmark
from firm.bench.run import load_bench_config, run_bench
from firm.synthetic.bench import build_shapes_bench


@pytest.fixture(scope="module")
def shapes_bench(tmp_path_factory):
    return build_shapes_bench(tmp_path_factory.mktemp("shapes") / "bench", n_per_task=10, size=32, seed=1)


def test_shapes_bench_layout(shapes_bench):
    b = load_benchmark(shapes_bench)
    assert b.score_source == "rubric" and "shapes-bench" in b.name
    tasks = collections.Counter(it.task for it in b.items)
    assert tasks == {"edit-execution": 10, "edit-consistency": 10, "generation": 10}
    assert {it.split for it in b.items if it.task == "generation"} <= {"easy", "hard"}
    assert all(it.checklist for it in b.items if it.task == "generation")
    # Execution and consistency items come from different tasks.
    seeds = {t: {it.meta["seed"] for it in b.items if it.task == t} for t in ("edit-execution", "edit-consistency")}
    assert not seeds["edit-execution"] & seeds["edit-consistency"]
    # Balanced: no score value takes more than ceil(10/5) = 2 places unless the pool lacked the others.
    per_score = collections.Counter(it.human_score for it in b.items if it.task == "edit-execution")
    assert len(per_score) >= 4
    again = build_shapes_bench(shapes_bench.parent / "again", n_per_task=10, size=32, seed=1)
    assert (again / "items.jsonl").read_text() == (shapes_bench / "items.jsonl").read_text()  # seeded


def test_rule_critic_matches_ground_truth(shapes_bench, tmp_path):
    cfg = load_bench_config(
        None, [f"output_root={tmp_path}", "plot=false", "bootstrap_samples=50"], data=str(shapes_bench),
        critics=["shapes_rule"],
    )  # fmt: skip
    report = run_bench(cfg, progress=False, echo=False)
    overall = report["critics"]["shapes_rule"]["metrics"]["groups"]["overall"]
    assert overall["n_parsed"] == 30
    assert overall["mae"] <= 0.2  # the rule critic reads the same rubrics from pixels


def test_constant_critic_baseline(shapes_bench, tmp_path):
    import json

    cfg = load_bench_config(
        None, ["critic.execution=3", "critic.consistency=5", "critic.instruction=3", f"output_root={tmp_path}",
               "plot=false", "bootstrap_samples=0"], data=str(shapes_bench), critics=["constant"],
    )  # fmt: skip
    groups = run_bench(cfg, progress=False, echo=False)["critics"]["constant"]["metrics"]["groups"]
    items = [json.loads(x) for x in (shapes_bench / "items.jsonl").read_text().splitlines()]
    const = {"edit-execution": 3, "edit-consistency": 5, "generation": 3}
    expected = sum(abs(const[it["task"]] - it["human_score"]) for it in items) / len(items)
    assert groups["overall"]["mae"] == pytest.approx(expected)
    assert groups["edit-execution"]["pearson"] is None  # constant within a task: no correlation
    with pytest.raises(ValueError, match="scores must be in 1..5"):
        from firm.bench.baselines import ConstantCritic

        ConstantCritic(ConstantCritic.Config(execution=0))
