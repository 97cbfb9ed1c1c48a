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


# --------------------------------------------------------------------------------------------------------------------
# Range checks: the validate() hook

RL_TINY = TOY.parent.parent / "rl" / "tiny_sd3_nft.yaml"


@pytest.mark.parametrize(
    "override,key,needle",
    [
        ("module.policy.lora.rank=-1", "module.policy.lora.rank", "must be >= 1, got -1"),
        ("module.policy.lora.alpha=.nan", "module.policy.lora.alpha", "finite number > 0"),
        ("module.policy.resolution=0", "module.policy.resolution", "must be >= 1"),
        ("data.group_size=-2", "data.group_size", "must be >= 1, got -2"),
        ("data.group_size=1", "data.group_size", "zero group advantage"),
        ("data.batch_size=0", "data.batch_size", "must be >= 1"),
        ("trainer.checkpoint_every_n_steps=0", "trainer.checkpoint_every_n_steps", "must be >= 1"),
        ("trainer.gradient_clip_val=.inf", "trainer.gradient_clip_val", "finite number > 0"),
        ("name=../elsewhere", "name", "plain folder name"),
        ("module.lr=.nan", "module.lr", "must be finite and > 0, got nan"),
        ("module.lr=-1e-4", "module.lr", "must be finite and > 0"),
        ("module.kl_beta=-1", "module.kl_beta", "must be finite and >= 0"),
        ("module.timestep_fraction=0", "module.timestep_fraction", "must be in (0, 1]"),
        ("module.kl_fraction=2", "module.kl_fraction", "must be in (0, 1]"),
        ("module.rollout_chunk=0", "module.rollout_chunk", "must be >= 1"),
        ("module.beta=0", "module.beta", "must be > 0"),
        ("module.old_decay_unit=epoch", "module.old_decay_unit", "must be one of"),
    ],
)
def test_range_checks_run_at_load_time_naming_the_key_and_the_override(override, key, needle):
    with pytest.raises(ConfigError) as e:
        load_experiment(RL_TINY, [override])
    msg = str(e.value)
    assert msg.startswith(f"command-line override {override!r}: invalid value for '{key}'") and needle in msg


def test_group_of_one_is_allowed_only_on_purpose():
    overrides = ["data.group_size=1", "data.batch_size=1", "data.allow_group_of_one=true"]
    cfg = to_object(load_experiment(RL_TINY, overrides))
    assert cfg.data.group_size == 1


def test_a_range_error_set_in_a_yaml_names_that_file(tmp_path):
    exp = write(tmp_path / "bad.yaml", f"base: {TOY}\ntrainer:\n  accumulate_grad_batches: 0\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid value for 'trainer\.accumulate_grad_batches': must be"):
        load_experiment(exp)


def test_dry_run_catches_range_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", str(RL_TINY), "--dry-run", "module.policy.lora.rank=-1"])
    assert e.value.code == 2
    assert "'module.policy.lora.rank': must be >= 1, got -1" in capsys.readouterr().err


def test_post_init_errors_name_their_section():
    critic = TOY.parent.parent / "critic" / "tiny_shapes_cpu.yaml"
    with pytest.raises(ConfigError, match=r"invalid value for 'data\.reader\.on_corrupt': must be one of"):
        load_experiment(critic, ["data.reader.on_corrupt=ignore"])
    with pytest.raises(ConfigError, match=r"invalid value for 'data\.reader\.max_image_pixels'"):
        load_experiment(critic, ["data.reader.max_image_pixels=0"])


def test_validate_hook_contract():
    """Any config dataclass may define validate(); "field: problem" names the field, anything else the section."""
    from firm.config import validate_config

    @dataclasses.dataclass
    class Inner:
        lr: float = 1e-4

        def validate(self):
            if not self.lr > 0:
                raise ValueError(f"lr: must be a finite number > 0, got {self.lr}")

    @dataclasses.dataclass
    class Outer:
        inner: Inner = dataclasses.field(default_factory=Inner)
        items: list = dataclasses.field(default_factory=list)

        def validate(self):
            if len(self.items) > 2:
                raise ValueError("too many items")

    validate_config(Outer(), source="x.yaml")  # valid: no error
    with pytest.raises(ConfigError, match=r"^x\.yaml: invalid value for 'module\.inner\.lr': must be a finite"):
        validate_config(Outer(Inner(float("nan"))), "module.", source="x.yaml")
    with pytest.raises(ConfigError, match=r"invalid value for 'module': too many items"):
        validate_config(Outer(items=[1, 2, 3]), "module.", source="x.yaml")
    with pytest.raises(ConfigError, match=r"'module\.items\.0\.lr'"):  # inside lists too
        validate_config(Outer(items=[Inner(-1.0)]), "module.", source="x.yaml")


def test_every_shipped_default_config_passes_its_range_checks():
    from firm.config import validate_config
    from firm.policies.policy import LoRAConfig, PolicyConfig

    validate_config(ExperimentConfig(name="x"))
    validate_config(PolicyConfig())
    validate_config(LoRAConfig())


def test_rl_callbacks_are_checked_at_load_time():
    demo = TOY.parent / "shapes_edit_cme.yaml"
    with pytest.raises(ConfigError, match="unknown callback 'shapes_reprt'. Did you mean 'shapes_report'"):
        load_experiment(demo, ["module.callbacks.shapes_reprt.n_tasks=3"])
    with pytest.raises(ConfigError, match="unknown key 'n_taks'"):
        load_experiment(demo, ["module.callbacks.shapes_report.n_taks=3"])
    cfg = to_object(load_experiment(demo, ["module.callbacks.shapes_report=null"]))  # null leaves it out
    assert cfg.module.callbacks["shapes_report"] is None
