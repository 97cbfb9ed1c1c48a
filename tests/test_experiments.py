"""Every shipped experiment YAML resolves and validates; every registry entry resolves."""

import dataclasses

import pytest

from firm.cli import main
from firm.config import load_experiment, to_object
from firm.paths import experiments_root
from firm.registry import REGISTRIES, resolve
from firm.runner import list_experiments
from firm.vocab import Task

# experiments/curation/ holds `firm curate` configs (validated by tests/curation/test_experiments.py),
# experiments/bench/ `firm critic bench` configs (firm.bench.run.BenchConfig, validated in tests/bench/) and
# experiments/eval/ `firm eval` configs (validated in tests/eval/).
SHIPPED = sorted(
    p
    for p in experiments_root().rglob("*.yaml")
    if p.relative_to(experiments_root()).parts[0] not in ("curation", "bench", "eval")
)


def test_there_are_shipped_experiments():
    assert len(SHIPPED) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(experiments_root())))
def test_shipped_experiment_validates(path):
    cfg = to_object(load_experiment(path))
    assert cfg.name and cfg.description, f"{path}: needs a name and a one-line description"
    assert resolve("modules", cfg.module.name) is not None
    assert resolve("datamodules", cfg.data.name) is not None


@pytest.mark.parametrize("registry,name", [(r, n) for r, t in REGISTRIES.items() for n in list(t)])
def test_registry_entry_resolves_to_a_configurable_component(registry, name):
    comp = resolve(registry, name)
    if registry == "families":  # configured by PolicyConfig: the family class names itself and its pipeline
        from firm.policies.families.base import ModelFamily

        assert issubclass(comp, ModelFamily) and comp.name == name and comp.pipeline and comp.lora_loader
        assert comp.task in (Task.GEN, Task.EDIT)
        return
    conf = comp if dataclasses.is_dataclass(comp) else comp.Config
    assert dataclasses.is_dataclass(conf)
    assert conf().name == name, f"{registry}:{name}: its Config.name default must equal its registry key"


def test_firm_list_shows_every_experiment(capsys):
    with pytest.raises(SystemExit) as e:
        main(["list"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for rel, desc in list_experiments():
        assert rel in out and desc in out
