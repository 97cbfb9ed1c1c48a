"""firm.paths: shipped files are found by their source-tree path from any working directory (checkout or wheel)."""

from pathlib import Path

import pytest

from firm.config import ConfigError, load_experiment, to_object
from firm.paths import PACKAGE, experiments_root, find_experiment, shipped


def test_shipped_maps_source_tree_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # nothing relative to the working directory
    assert shipped("experiments/demo/shapes_edit_cme.yaml") == experiments_root() / "demo" / "shapes_edit_cme.yaml"
    assert shipped("firm/synthetic/checkpoints/shapes_edit") == PACKAGE / "synthetic" / "checkpoints" / "shapes_edit"
    assert (shipped("firm/synthetic/checkpoints/shapes_edit") / "transformer" / "config.json").is_file()


@pytest.mark.parametrize("bad", ["/etc/passwd", "experiments/../setup.py", "docs/rl.md", ""])
def test_shipped_refuses_paths_outside_what_ships(bad):
    with pytest.raises(ValueError, match="starts with experiments/ or firm/"):
        shipped(bad)


def test_shipped_names_a_missing_file():
    with pytest.raises(FileNotFoundError, match="ships nothing at"):
        shipped("experiments/demo/no_such.yaml")


def test_find_experiment_by_name_or_source_path_from_anywhere(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    want = str(experiments_root() / "demo" / "shapes_edit_cme.yaml")
    for spec in ("demo/shapes_edit_cme", "demo/shapes_edit_cme.yaml", "experiments/demo/shapes_edit_cme.yaml"):
        assert find_experiment(spec) == want, spec
    local = tmp_path / "demo" / "shapes_edit_cme.yaml"  # a file of the user's own wins over the shipped one
    local.parent.mkdir()
    local.write_text("name: mine\n")
    assert find_experiment("demo/shapes_edit_cme.yaml") == "demo/shapes_edit_cme.yaml"
    assert find_experiment("demo/unknown") == "demo/unknown"


def test_the_yaml_resolver_gives_absolute_paths(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    cfg = to_object(load_experiment(find_experiment("demo/shapes_edit_cme")))
    assert Path(cfg.module.policy.pretrained) == shipped("firm/synthetic/checkpoints/shapes_edit")
    assert Path(cfg.module.policy.pretrained).is_absolute()


def test_a_bad_shipped_path_in_a_yaml_is_a_config_error():
    demo = find_experiment("demo/shapes_edit_cme")
    with pytest.raises(ConfigError, match="FIRM ships nothing at"):
        load_experiment(demo, ["module.policy.pretrained=${shipped:firm/synthetic/checkpoints/nope}"])
