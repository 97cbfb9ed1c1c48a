import numpy as np
import torch
from torch.utils.data import DataLoader

from firm.synthetic import Scene, WorldConfig, render
from firm.synthetic.data import (
    EditPairs,
    GenSamples,
    collate,
    from_tensor,
    scored_edit_samples,
    scored_gen_samples,
    to_tensor,
)

from .conftest import Obj


def test_tensor_round_trip():
    img = render(Scene((Obj(4, "red", "circle"),)))
    x = to_tensor(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert np.array_equal(np.asarray(from_tensor(x)), np.asarray(img))
    assert np.array_equal(np.asarray(from_tensor(x * 2 - 1, (-1, 1))), np.asarray(img))


def test_edit_pairs_batch_through_a_dataloader():
    ds = EditPairs(12, world=WorldConfig(size=64))
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["source"].shape == batch["target"].shape == (4, 3, 64, 64)
    assert len(batch["instruction"]) == 4 and all(isinstance(s, str) for s in batch["instruction"])
    assert not torch.equal(batch["source"], batch["target"])  # every task changes something


def test_gen_samples_and_pil_mode():
    ds = GenSamples(6, as_tensor=False)
    s = ds[0]
    assert s["image"].size == (32, 32) and s["prompt"] and s["checklist"][0].startswith("object 1")
    b = collate([GenSamples(3)[i] for i in range(3)])
    assert b["image"].shape == (3, 3, 32, 32) and len(b["checklist"]) == 3


def test_train_and_test_datasets_are_disjoint():
    train = {t.canonical() for t in EditPairs(200, "train").tasks}
    test = {t.canonical() for t in EditPairs(50, "test").tasks}
    assert not train & test
    assert {t.prompt for t in GenSamples(100, "train").tasks}.isdisjoint(t.prompt for t in GenSamples(30, "test").tasks)


def test_scored_samples_carry_images_scores_and_ground_truth():
    rows = list(scored_edit_samples(16, degrade_prob=0.5, seed=3))
    assert len(rows) == 16
    r = rows[0]
    assert set(r) >= {"source", "edited", "instruction", "mode", "scores", "reasoning", "ground_truth", "task"}
    assert all(1 <= v <= 5 for row in rows for v in row["scores"].values())
    clean = [row for row in rows if row["degradation"] is None]
    assert clean and all(row["scores"] == row["ground_truth"] for row in clean)
    again = list(scored_edit_samples(16, degrade_prob=0.5, seed=3))  # seeded: the same samples again
    assert [(a["mode"], a["degradation"], a["scores"]) for a in rows] == [
        (b["mode"], b["degradation"], b["scores"]) for b in again
    ]
    assert all(np.array_equal(np.asarray(a["edited"]), np.asarray(b["edited"])) for a, b in zip(rows, again))
    g = list(scored_gen_samples(8, split="test"))
    assert len(g) == 8 and all(row["scores"]["instruction"] == row["ground_truth"]["instruction"] for row in g)


def test_export_prompt_records_for_rl(tmp_path):
    import json

    from PIL import Image

    from firm.synthetic import make_edit_task, parse_instruction
    from firm.synthetic.data import export_prompt_records

    path = export_prompt_records(tmp_path / "edit", "edit", 5, "test")
    recs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(recs) == 5
    for r in recs:
        assert set(r) == {"prompt", "image", "key", "meta"} and r["meta"]["split"] == "test"
        task = make_edit_task(r["meta"]["seed"])
        assert parse_instruction(r["prompt"]) == task.edit
        src = Image.open(path.parent / r["image"])
        assert np.array_equal(np.asarray(src.convert("RGB")), np.asarray(render(task.source)))
    gpath = export_prompt_records(tmp_path / "gen", "gen", 3, "train")
    g = [json.loads(line) for line in gpath.read_text().splitlines()]
    assert all(r["checklist"] and "image" not in r for r in g)
