"""Every shipped bench YAML (experiments/bench/) resolves, with its critics' settings type-checked."""

import pytest

from firm.bench.run import load_bench_config
from firm.paths import experiments_root

BENCH = sorted((experiments_root() / "bench").glob("*.yaml"))


def test_there_are_bench_experiments():
    assert len(BENCH) >= 3


@pytest.mark.parametrize("path", BENCH, ids=lambda p: p.name)
def test_bench_experiment_validates(path):
    cfg = load_bench_config(path)
    assert cfg.name and cfg.description, f"{path}: needs a name and a one-line description"
    assert cfg.critics
