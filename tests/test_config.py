import dataclasses
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from firm.cli import main
from firm.config import ConfigError, ExperimentConfig, load_experiment, save_config, to_object

TOY = Path(__file__).resolve().parent.parent / "experiments" / "demo" / "toy_regression.yaml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_resolution_order_defaults_yaml_overrides():
    cfg = to_object(load_experiment(TOY, ["module.hidden=7", "trainer.max_steps=5"]))
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.module.hidden == 7  # override beats YAML (32)
    assert cfg.trainer.max_steps == 5  # override beats YAML (300)
    assert cfg.module.lr == pytest.approx(1e-2)  # YAML beats default
    assert cfg.module.weight_decay == 0.0  # dataclass default
    assert cfg.data.num_train == 4096  # datamodule default
    assert cfg.module.in_dim == cfg.data.in_dim == 8  # interpolation resolved


def test_override_value_is_yaml_typed():
    cfg = to_object(load_experiment(TOY, ["module.lr=3e-4", "trainer.gradient_clip_val=null"]))
    assert cfg.module.lr == pytest.approx(3e-4) and isinstance(cfg.module.lr, float)
    assert cfg.trainer.gradient_clip_val is None


def test_base_inheritance_is_relative_and_recursive(tmp_path):
    write(tmp_path / "a" / "root.yaml", f"base: {TOY}\nname: root\nmodule: {{hidden: 11}}\n")
    write(tmp_path / "a" / "mid.yaml", "base: root.yaml\nname: mid\nmodule: {lr: 0.5}\n")
    leaf = write(tmp_path / "b" / "leaf.yaml", "base: ../a/mid.yaml\ntrainer: {max_steps: 9}\n")
    cfg = to_object(load_experiment(leaf))
    assert (cfg.name, cfg.module.hidden, cfg.module.lr, cfg.trainer.max_steps) == ("mid", 11, 0.5, 9)
    assert cfg.data.batch_size == 64  # from the toy file at the bottom of the chain


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "x.yaml", "base: y.yaml\nname: x\n")
    write(tmp_path / "y.yaml", "base: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_experiment(tmp_path / "x.yaml")


def test_unknown_key_names_key_and_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", f"base: {TOY}\ntrainer:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(bad)
    assert "trainer.max_stepz" in str(e.value) and "bad.yaml" in str(e.value)
    assert "max_steps" in str(e.value)  # suggestion


def test_unknown_key_in_a_base_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", f"base: {TOY}\nmodule: {{hiddn: 3}}\n")
    leaf = write(tmp_path / "leaf.yaml", "base: base.yaml\nname: leaf\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(leaf)
    assert "module.hiddn" in str(e.value) and "base.yaml" in str(e.value) and "leaf.yaml" not in str(e.value)


def test_unknown_override_names_the_override():
    with pytest.raises(ConfigError) as e:
        load_experiment(TOY, ["trainer.max_stepz=3"])
    assert "trainer.max_stepz" in str(e.value) and "command-line override" in str(e.value)


@pytest.mark.parametrize("override", ["trainer.max_steps=abc", "module.hidden=[1,2]", "seed=1.5x"])
def test_wrong_type_names_the_key(override):
    with pytest.raises(ConfigError) as e:
        load_experiment(TOY, [override])
    assert override.split("=")[0] in str(e.value)


def test_malformed_override():
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_experiment(TOY, ["trainer.max_steps"])


def test_missing_required_value_is_named(tmp_path):
    exp = write(tmp_path / "noname.yaml", "module: {name: toy_regression}\ndata: {name: synthetic_regression}\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(exp)
    assert "'name'" in str(e.value) and "noname.yaml" in str(e.value)
    assert to_object(load_experiment(exp, ["name=given"])).name == "given"


def test_missing_component_section(tmp_path):
    exp = write(tmp_path / "nomod.yaml", "name: x\ndata: {name: synthetic_regression}\n")
    with pytest.raises(ConfigError, match="'module'.*toy_regression"):
        load_experiment(exp)


def test_unknown_component_name_suggests(tmp_path):
    exp = write(tmp_path / "typo.yaml", f"base: {TOY}\nmodule: {{name: toy_regresion}}\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(exp)
    assert "module.name" in str(e.value) and "toy_regression" in str(e.value) and "typo.yaml" in str(e.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    exp = write(tmp_path / "broken.yaml", "name: x\ntrainer:\n  max_steps: [1, 2\nmodule: {}\n")
    with pytest.raises(ConfigError) as e:
        load_experiment(exp)
    msg = str(e.value)
    assert "broken.yaml:" in msg and "YAML syntax error" in msg
    line = int(msg.split("broken.yaml:")[1].split(":")[0])
    assert line in (3, 4)


def test_list_at_top_level_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="mapping"):
        load_experiment(write(tmp_path / "l.yaml", "- 1\n- 2\n"))


def test_saved_config_round_trips(tmp_path):
    node = load_experiment(TOY, ["module.hidden=5"])
    save_config(node, tmp_path / "config.yaml")
    again = load_experiment(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(node)
    assert dataclasses.asdict(to_object(again)) == dataclasses.asdict(to_object(node))


def test_imports_register_components(tmp_path, repo):
    probe = repo / "tests" / "helpers" / "probe_module.py"
    exp = write(tmp_path / "p.yaml", f"base: {TOY}\nimports: [{probe}]\nmodule: {{name: probe, nan_at_step: 4}}\n")
    cfg = to_object(load_experiment(exp))
    assert cfg.module.name == "probe" and cfg.module.nan_at_step == 4 and cfg.module.hidden == 32


def test_bad_import_is_named(tmp_path):
    exp = write(tmp_path / "p.yaml", f"base: {TOY}\nimports: [no_such_module_xyz]\n")
    with pytest.raises(ConfigError, match="no_such_module_xyz"):
        load_experiment(exp)


def test_cli_dry_run_prints_resolved_config(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(TOY), "--dry-run", "module.hidden=3"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    resolved = OmegaConf.create(out)
    assert resolved.module.hidden == 3 and resolved.module.in_dim == 8 and resolved.trainer.max_steps == 300


def test_cli_unknown_override_exits_2_naming_key(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(TOY), "trainer.max_stepz=3"])
    assert e.value.code == 2
    assert "trainer.max_stepz" in capsys.readouterr().err


def test_cli_finds_shipped_experiment_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["run", "demo/toy_regression", "--dry-run"])
    assert "name: toy_regression" in capsys.readouterr().out


def test_switching_a_component_name_drops_the_previous_components_settings(tmp_path, repo):
    # The probe module has a setting the toy module lacks; a child that switches back to the toy module must not
    # inherit it (it would be an unknown key), while the settings both share are inherited.
    helper = repo / "tests" / "helpers" / "probe_module.py"
    write(
        tmp_path / "base.yaml",
        f"base: {TOY}\nimports: [{helper}]\nmodule: {{name: probe, nan_at_step: 3, hidden: 9}}\n",
    )
    child = write(tmp_path / "child.yaml", "base: base.yaml\nmodule: {name: toy_regression, lr: 0.5}\n")
    cfg = to_object(load_experiment(child))
    assert cfg.module.name == "toy_regression" and (cfg.module.hidden, cfg.module.lr) == (9, 0.5)
    assert not hasattr(cfg.module, "nan_at_step")
    same = write(tmp_path / "same.yaml", "base: base.yaml\nmodule: {name: probe, hidden: 6}\n")
    cfg = to_object(load_experiment(same))
    assert (cfg.module.nan_at_step, cfg.module.hidden) == (3, 6)  # same name: sections merge as before
    write(tmp_path / "typo.yaml", f"base: {TOY}\nimports: [{helper}]\nmodule: {{name: probe, hiden: 9}}\n")
    switch = write(tmp_path / "switch.yaml", "base: typo.yaml\nmodule: {name: toy_regression}\n")
    with pytest.raises(ConfigError, match="hiden"):
        load_experiment(switch)  # a key of neither component is still an error
