"""Every registry entry resolves; `firm list` shows every experiment. (That every shipped YAML, of each command,
resolves and validates is tested in tests/test_config.py, next to the one loader.)"""

import dataclasses

import pytest

from firm.cli import main
from firm.registry import REGISTRIES, resolve
from firm.runner import list_experiments
from firm.vocab import Task


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
