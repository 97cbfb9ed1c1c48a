"""RL prompt data: groups spread consistently over ranks, exact resume, JSONL records and their errors."""

import json
from collections import Counter

import pytest
from PIL import Image

from firm.data.prompts import GroupBatchSampler, PromptDataModule, collate_prompts, load_prompt_records


def test_each_step_holds_every_group_exactly_g_times_across_ranks():
    g, b, world = 4, 6, 2  # 12 images per step = 3 prompts x 4
    samplers = [GroupBatchSampler(5, g, b, world, r, seed=3) for r in range(world)]
    for step in range(7):
        slots = [s for smp in samplers for s in smp.step_slots(step)]
        assert len(slots) == world * b
        counts = Counter(slots)
        assert set(counts.values()) == {g}  # each (prompt, group) pair appears G times
        assert sorted({grp for _, grp in slots}) == [0, 1, 2]
        prompt_of = {grp: p for p, grp in slots}
        assert len(set(prompt_of.values())) == 3  # distinct prompts per step
    # shuffled: some group is split across the two ranks
    first = [{grp for _, grp in smp.step_slots(0)} for smp in samplers]
    assert first[0] & first[1]


def test_prompts_cycle_through_epochs_and_are_seeded():
    smp = GroupBatchSampler(5, 2, 2, 1, 0, seed=1)
    seen = [p for step in range(5) for p, _ in smp.step_slots(step)[::2]]
    assert sorted(seen) == [0, 1, 2, 3, 4]  # 5 steps of one prompt each: one epoch
    again = GroupBatchSampler(5, 2, 2, 1, 0, seed=1)
    assert [again.step_slots(s) for s in range(9)] == [smp.step_slots(s) for s in range(9)]
    other = GroupBatchSampler(5, 2, 2, 1, 0, seed=2)
    assert [other.step_slots(s) for s in range(9)] != [smp.step_slots(s) for s in range(9)]


def test_indivisible_world_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="multiple of group_size"):
        GroupBatchSampler(5, 4, 3, 1, 0)


def test_dataloader_resumes_at_the_same_batch():
    cfg = PromptDataModule.Config(prompts=[f"p{i}" for i in range(10)], group_size=2, batch_size=4)
    loader = PromptDataModule(cfg).train_dataloader()
    assert len(loader) == 5  # 2 prompts per step: an epoch is 5 steps
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(2)]
    loader2 = PromptDataModule(cfg).train_dataloader()
    loader2.load_state_dict(state)
    got = list(loader2)
    assert len(got) == 2
    for e, g in zip(expected, got):
        assert e["prompt"] == g["prompt"] and e["group"].tolist() == g["group"].tolist()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_loader_saved_at_the_end_of_an_epoch_resumes_with_the_next_epoch(workers):
    """A checkpoint at an epoch's last batch: the next epoch must start at its first batch. The plain
    StatefulDataLoader yields nothing for it, and the run skipped an epoch of data (2-process resumes diverged)."""
    cfg = PromptDataModule.Config(prompts=[f"p{i}" for i in range(10)], group_size=2, batch_size=4, num_workers=workers)
    loader = PromptDataModule(cfg).train_dataloader()
    it = iter(loader)
    for _ in range(len(loader)):  # epoch 0's batches, saved after the last one (before the iterator stops)
        next(it)
    state = loader.state_dict()
    loader.batch_sampler.sampler.set_epoch(1)
    expected = list(loader)
    loader2 = PromptDataModule(cfg).train_dataloader()
    loader2.load_state_dict(state)
    loader2.batch_sampler.sampler.set_epoch(1)
    got = list(loader2)
    assert len(got) == len(expected) == 5
    for e, g in zip(expected, got):
        assert e["prompt"] == g["prompt"] and e["group"].tolist() == g["group"].tolist()


def test_epochs_continue_the_stream():
    smp = GroupBatchSampler(10, 2, 4, 1, 0, seed=0)
    smp.sampler.set_epoch(1)  # what Lightning calls at the start of epoch 1
    assert list(smp) == [smp.step_slots(s) for s in range(5, 10)]


def test_jsonl_records_with_images(tmp_path):
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "src.png")
    lines = [
        {"prompt": "make it blue", "image": "src.png", "key": "k1"},
        {"prompt": "remove it", "image": str(tmp_path / "src.png"), "checklist": ["nothing left"]},
    ]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    dm = PromptDataModule(
        PromptDataModule.Config(task="edit", path=str(tmp_path / "p.jsonl"), group_size=2, batch_size=2)
    )
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"][0].size == (8, 8) and batch["group"].tolist() == [0, 0]
    assert batch["key"][0] in ("k1", "1")
    item = dm.dataset[(1, 5)]
    assert item["checklist"] == ["nothing left"] and item["group"] == 5
    assert collate_prompts([item])["index"].tolist() == [1]


@pytest.mark.parametrize(
    "line,match",
    [
        ("not json", "not valid JSON"),
        ('{"image": "x.png"}', "non-empty string `prompt`"),
        ('{"prompt": "p", "colour": 1}', "unknown field"),
        ('{"prompt": "edit me"}', "need an `image`"),
        ('{"prompt": "p", "image": "missing.png"}', "image not found"),
    ],
)
def test_bad_records_are_named(tmp_path, line, match):
    (tmp_path / "p.jsonl").write_text(line + "\n")
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_prompt_records(tmp_path / "p.jsonl", task="edit")


def test_config_needs_prompts_or_path():
    with pytest.raises(ValueError, match="inline list"):
        PromptDataModule(PromptDataModule.Config())
