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


# --------------------------------------------------------------------------------------------------------------------
# One loader for every command: `firm run`, `firm curate`, `firm critic bench` and `firm eval` resolve their YAML
# through firm.config.load_config, with the same lookup, inheritance, resolver, types, range checks and messages.


def _load_curation(spec, overrides=()):
    from firm.curation.runner import load_curation

    return to_object(load_curation(spec, list(overrides)))


def _load_bench(spec, overrides=()):
    from firm.bench.run import load_bench_config

    return to_object(load_bench_config(spec, list(overrides)))


def _load_eval(spec, overrides=()):
    from firm.eval.run import load_eval_config

    return load_eval_config(spec, list(overrides))


def _load_run(spec, overrides=()):
    return to_object(load_experiment(spec, list(overrides)))


def _schema(kind):
    from firm.bench.run import BenchConfig
    from firm.curation.runner import CurationConfig
    from firm.eval.run import EvalConfig

    return {"run": ExperimentConfig, "curate": CurationConfig, "bench": BenchConfig, "eval": EvalConfig}[kind]


# kind -> (the command's loader, a shipped experiment, an integer setting)
KINDS = {
    "run": (_load_run, "demo/toy_regression", "trainer.log_every_n_steps"),
    "curate": (_load_curation, "curation/shapes_edit_tiny", "concurrency.batch_size"),
    "bench": (_load_bench, "bench/shapes_rule", "batch_size"),
    "eval": (_load_eval, "eval/shapes_edit", "score_batch_size"),
}
FOLDER_KINDS = {"curation": "curate", "bench": "bench", "eval": "eval"}  # any other folder of experiments/: run


def _kind_of(path: Path) -> str:
    from firm.paths import experiments_root

    return FOLDER_KINDS.get(path.relative_to(experiments_root()).parts[0], "run")


def _shipped_yamls() -> list[Path]:
    from firm.paths import experiments_root

    return sorted(experiments_root().rglob("*.yaml"))


def test_every_kind_of_experiment_ships():
    counts = {kind: sum(_kind_of(p) == kind for p in _shipped_yamls()) for kind in KINDS}
    assert counts["run"] >= 2 and counts["bench"] >= 3 and counts["eval"] >= 2, counts
    from firm.paths import experiments_root

    names = {p.name for p in (experiments_root() / "curation").glob("*.yaml")}
    assert names >= {"shapes_edit_tiny.yaml", "shapes_gen_tiny.yaml", "edit_vllm.yaml"}


@pytest.mark.parametrize("path", _shipped_yamls(), ids=lambda p: "/".join(p.parts[-2:]))
def test_every_shipped_experiment_loads_through_the_one_loader(path):
    """Each YAML under experiments/ resolves with its command's schema: components, types and ranges checked."""
    from firm.config import load_config
    from firm.registry import resolve

    kind = _kind_of(path)
    cfg = to_object(load_config(path, schema=_schema(kind)))
    assert isinstance(cfg, _schema(kind))
    assert cfg.name and cfg.description, f"{path}: needs a name and a one-line description"
    cfg = KINDS[kind][0](path)  # and through the command's own entry point
    if kind == "run":
        assert resolve("modules", cfg.module.name) is not None and resolve("datamodules", cfg.data.name) is not None
    elif kind == "curate":
        assert resolve("curation_sources", cfg.source.name) is not None
        roles = ("default", "reporter", "evaluator", "planner", "scorer", "rewriter")
        teachers = [getattr(cfg.teachers, r) for r in roles if getattr(cfg.teachers, r)]
        assert teachers and all(resolve("teachers", t.name) for t in teachers)
    elif kind == "bench":
        assert cfg.critics and all(dataclasses.is_dataclass(c) for c in cfg.critics.values())
    else:
        assert cfg.policies and dataclasses.is_dataclass(cfg.judge) and dataclasses.is_dataclass(cfg.prompts)


BAD_OVERRIDES = [
    # (override, the message as a regex); {int} is the kind's integer setting
    ("descripton=x", r"command-line override 'descripton=x': unknown key 'descripton' .*Did you mean.*'description'"),
    ("description=[1,2]", r"command-line override 'description=\[1,2\]': invalid value for 'description'"),
    ("{int}=abc", r"command-line override '{int}=abc': invalid value for '{int}': .* could not be converted"),
    ("{int}=0", r"command-line override '{int}=0': invalid value for '{int}': must be >= 1"),
    ("name=../x", r"command-line override 'name=\.\./x': invalid value for 'name': must be a plain folder name"),
    ("base=x.yaml", r"command-line override 'base=\.\.\.' is not allowed"),
    ("name", r"override 'name' must look like key\.sub=value"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("override,message", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_the_same_bad_override_gives_the_same_error_in_every_kind(kind, override, message):
    load, name, int_key = KINDS[kind]
    override, message = override.replace("{int}", int_key), message.replace("{int}", int_key.replace(".", r"\."))
    with pytest.raises(ConfigError, match="^" + message):
        load(name, [override])


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_found_by_name_from_any_directory_and_a_typo_is_suggested(kind, monkeypatch, tmp_path):
    load, name, _ = KINDS[kind]
    monkeypatch.chdir(tmp_path)
    for spec in (name, f"{name}.yaml", f"experiments/{name}.yaml"):
        assert load(spec).name
    with pytest.raises(ConfigError, match=f"experiment file not found: {name}x .*did you mean '{name}'"):
        load(name + "x")


def test_a_folder_or_an_unknown_name_is_not_an_experiment(tmp_path):
    with pytest.raises(ConfigError, match="experiment file not found: .* is a folder"):
        load_experiment(tmp_path)
    with pytest.raises(ConfigError, match=r"experiment file not found: nowhere/nothing \(.*`firm list` shows them"):
        load_experiment("nowhere/nothing")


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_inherits_with_base_and_resolves_shipped_paths(kind, tmp_path):
    from firm.paths import experiments_root, shipped

    load, name, int_key = KINDS[kind]
    child = write(
        tmp_path / "child.yaml",
        f"base: {experiments_root() / name}.yaml\ndescription: '${{shipped:experiments/{name}.yaml}}'\n",
    )
    cfg = load(child, [f"{int_key}=3"])
    parent = load(name)
    assert cfg.name == parent.name  # inherited
    assert cfg.description == str(shipped(f"experiments/{name}.yaml"))  # the resolver, in every kind
    section, _, key = int_key.rpartition(".")
    assert getattr(getattr(cfg, section) if section else cfg, key) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_names_the_file_that_set_a_bad_value(kind, tmp_path):
    from firm.paths import experiments_root

    load, name, int_key = KINDS[kind]
    section, _, key = int_key.rpartition(".")
    body = f"{section}: {{{key}: 0}}" if section else f"{key}: 0"
    write(tmp_path / "mid.yaml", f"base: {experiments_root() / name}.yaml\n{body}\n")
    leaf = write(tmp_path / "leaf.yaml", "base: mid.yaml\ndescription: leaf\n")
    with pytest.raises(ConfigError, match=rf"mid\.yaml: invalid value for '{int_key}': must be >= 1"):
        load(leaf)


@pytest.mark.parametrize(
    "command,name,override,check",
    [
        ("run", "demo/toy_regression", "module.hidden=3", lambda c: c.module.hidden == 3),
        ("curate", "curation/shapes_edit_tiny", "source.count=3", lambda c: c.source.count == 3),
        ("eval", "eval/shapes_edit", "limit=2", lambda c: c.limit == 2),
        ("critic bench", "bench/shapes_rule", "limit=2", lambda c: c.limit == 2),
    ],
)
def test_dry_run_prints_the_resolved_config(command, name, override, check, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command.split(), name, "--dry-run", override])
    assert e.value.code == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    assert check(printed) and printed.name == name.split("/")[-1]


# `firm critic bench --data DIR --critic NAME [critic.key=value]`: command-line flags on top of (or instead of) a YAML


@pytest.fixture
def bench_dir(tmp_path, monkeypatch):
    from tests.bench.helpers import make_bench, register_scripted

    register_scripted(monkeypatch)
    items = [{"id": f"e{i}", "task": "edit-execution", "human_score": 1 + i % 5} for i in range(3)]
    return make_bench(tmp_path / "bench", items, name="tiny-bench")


def test_bench_flags_errors_name_the_key(bench_dir, tmp_path):
    from firm.bench.run import load_bench_config, run_bench

    def load(overrides, critics=("test_scripted",)):
        return load_bench_config(None, overrides, data=str(bench_dir), critics=list(critics))

    assert to_object(load(["critic.default_score=5"])).critics["test_scripted"].default_score == 5
    with pytest.raises(ConfigError, match=r"unknown key 'critics\.test_scripted\.colour'"):
        load(["critic.colour=1"])
    with pytest.raises(ConfigError, match=r"invalid value for 'critics\.test_scripted\.default_score'"):
        load(["critic.default_score=high"])
    with pytest.raises(ConfigError, match=r"--critic\): 'critics\.nonexistent\.name': unknown critic 'nonexistent'"):
        load([], critics=["nonexistent"])
    with pytest.raises(ConfigError, match="invalid value for 'critics': nothing to evaluate"):
        load([], critics=[])
    with pytest.raises(ConfigError, match="unknown key 'limt'.*Did you mean.*'limit'"):
        load(["limt=3"])
    with pytest.raises(ConfigError, match="invalid value for 'critics': label 'a b': use letters"):
        load(["critics={'a b': {name: test_scripted}}"])
    with pytest.raises(ConfigError, match="no items.jsonl"):
        run_bench(load_bench_config(None, [], data=str(tmp_path), critics=["test_scripted"]), echo=False)


def test_bench_critic_flag_replaces_the_yamls_critics_and_null_drops_one(bench_dir, tmp_path):
    from firm.bench.run import load_bench_config

    exp = write(
        tmp_path / "b.yaml",
        f"name: b\ndata: {bench_dir}\ncritics:\n  one: {{name: test_scripted, default_score: 2}}\n"
        "  two: {name: test_scripted, default_score: 4}\n",
    )
    child = write(tmp_path / "child.yaml", "base: b.yaml\ncritics: {one: null}\n")
    assert list(to_object(load_bench_config(child)).critics) == ["one", "two"]
    assert to_object(load_bench_config(child)).critics["one"] is None  # left out of the evaluation
    cfg = to_object(load_bench_config(exp, ["critic.default_score=5"], critics=["test_scripted"]))
    assert list(cfg.critics) == ["test_scripted"] and cfg.critics["test_scripted"].default_score == 5
    bad = write(tmp_path / "bad.yaml", "base: b.yaml\ncritics: {two: {default_scor: 1}}\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'critics\.two\.default_scor'.*'default_score'"):
        load_bench_config(bad)


def test_eval_sections_are_components_checked_at_load_time():
    load = KINDS["eval"][0]
    with pytest.raises(ConfigError, match=r"unknown key 'generation\.nope'"):
        load("eval/shapes_edit", ["generation.nope=1"])
    with pytest.raises(ConfigError, match=r"'judge\.name': unknown judge 'not_a_judge'"):
        load("eval/shapes_edit", ["judge.name=not_a_judge"])
    with pytest.raises(ConfigError, match=r"unknown key 'prompts\.n_taks'.*'n_tasks'"):
        load("eval/shapes_edit", ["prompts.n_taks=3"])
    with pytest.raises(ConfigError, match=r"invalid value for 'generation\.seeds': give distinct seeds"):
        load("eval/shapes_edit", ["generation.seeds=[0,0]"])
    with pytest.raises(ConfigError, match=r"invalid value for 'baseline': 'nobody' is not one of the policies"):
        load("eval/shapes_edit", ["baseline=nobody"])


def test_curation_pipeline_is_checked_at_load_time():
    with pytest.raises(ConfigError, match=r"invalid value for 'pipeline': unknown 'difference_frist'"):
        KINDS["curate"][0]("curation/shapes_edit_tiny", ["pipeline=difference_frist"])
