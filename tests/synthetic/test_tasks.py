import random

import pytest

from firm.synthetic import (
    Edit,
    Scene,
    SplitConfig,
    WorldConfig,
    apply_edit,
    edit_tasks,
    gen_tasks,
    make_edit_task,
    make_gen_task,
    split_of,
)
from firm.synthetic.tasks import default_combos

from .conftest import Obj


def test_tasks_are_a_function_of_the_seed():
    assert make_edit_task(123) == make_edit_task(123)
    assert make_gen_task(123) == make_gen_task(123)
    assert len({make_edit_task(s).canonical() for s in range(50)}) > 45
    # Other global RNG use does not leak in.
    random.seed(0)
    a = make_edit_task(7)
    random.seed(1)
    assert make_edit_task(7) == a
    with pytest.raises(ValueError, match="seed"):
        make_edit_task(-1)


def test_edit_task_target_is_the_applied_edit():
    for t in edit_tasks(limit=200):
        assert apply_edit(t.source, t.edit) == t.target
        changed = {c for c in range(9) if t.source.at(c) != t.target.at(c)}
        assert changed == set(t.edit.affected_cells)


def test_apply_edit_per_kind_and_errors():
    src = Scene((Obj(0, "red", "circle"), Obj(4, "blue", "square")))
    assert apply_edit(src, Edit("recolour", Obj(0, "red", "circle"), Obj(0, "green", "circle"))).at(0).colour == "green"
    assert apply_edit(src, Edit("remove", old=Obj(4, "blue", "square"))).at(4) is None
    assert apply_edit(src, Edit("add", new=Obj(8, "cyan", "cross"))).at(8) == Obj(8, "cyan", "cross")
    moved = apply_edit(src, Edit("move", Obj(0, "red", "circle"), Obj(2, "red", "circle")))
    assert moved.at(0) is None and moved.at(2) == Obj(2, "red", "circle")
    assert apply_edit(src, Edit("replace", Obj(4, "blue", "square"), Obj(4, "blue", "cross"))).at(4).shape == "cross"
    with pytest.raises(ValueError, match="has no"):
        apply_edit(src, Edit("remove", old=Obj(8, "red", "circle")))
    with pytest.raises(ValueError, match="taken"):
        apply_edit(src, Edit("add", new=Obj(4, "red", "circle")))


def test_kinds_and_world_are_respected():
    world = WorldConfig(colours=["red", "blue"], shapes=["circle", "square"], max_objects=2)
    for t in edit_tasks(limit=50, world=world, kinds=["recolour", "move"]):
        assert t.kind in ("recolour", "move")
        assert all(o.colour in ("red", "blue") for o in t.target.objects)
        assert len(t.source) <= 2


def test_hash_split_is_disjoint_and_about_the_asked_size():
    train = {t.canonical() for t in edit_tasks("train", limit=400)}
    test = {t.canonical() for t in edit_tasks("test", limit=100)}
    assert not train & test
    n_test = sum(split_of(t) == "test" for t in edit_tasks(limit=1000))
    assert 150 <= n_test <= 250  # test_fraction 0.2
    gtrain = {t.prompt for t in gen_tasks("train", limit=300)}
    gtest = {t.prompt for t in gen_tasks("test", limit=100)}
    assert not gtrain & gtest


def test_combo_split_holds_out_attribute_combinations():
    world = WorldConfig()
    split = SplitConfig(mode="combo")
    held = set(default_combos(world))
    assert len(held) == len(world.shapes)
    for t in edit_tasks("train", split_config=split, limit=200):
        assert not {f"{o.colour} {o.shape}" for o in (*t.source.objects, *t.target.objects)} & held
    for t in gen_tasks("test", split_config=split, limit=100):
        assert {f"{o.colour} {o.shape}" for o in t.spec.objects} & held
    custom = SplitConfig(mode="combo", heldout_combos=["red circle"])
    for t in gen_tasks("train", split_config=custom, limit=100):
        assert all((o.colour, o.shape) != ("red", "circle") for o in t.spec.objects)


def test_split_config_validation():
    with pytest.raises(ValueError, match="mode"):
        SplitConfig(mode="random")
    with pytest.raises(ValueError, match="test_fraction"):
        SplitConfig(test_fraction=1.5)
    with pytest.raises(ValueError, match="split must be"):
        next(edit_tasks("val"))


def test_task_dicts_round_trip_through_json():
    import json

    t = make_edit_task(5)
    d = json.loads(json.dumps(t.to_dict()))
    assert Scene.from_dict(d["source"]) == t.source and d["instruction"] == t.instruction
    g = make_gen_task(5)
    assert json.loads(json.dumps(g.to_dict()))["checklist"] == list(g.checklist)
