"""The shard reader: corrupt-member policy, rank/worker splitting, shuffling, exact mid-epoch resume."""

import tarfile
from collections import Counter

import pytest

from firm.data.reader import (
    CorruptShardError,
    ReaderConfig,
    ShardDataset,
    load_rl_prompt_records,
    make_loader,
    rl_prompt_dataset,
)
from firm.data.writer import write_shards
from tests.helpers.data import edit_sample, rl_prompt_sample


def _keys(loader) -> list[str]:
    return [s["key"] for batch in loader for s in batch]


@pytest.fixture
def shard_set(tmp_path):
    """24 edit samples in 6 shards of 4."""
    samples = [edit_sample(i, size=8) for i in range(24)]
    shards = write_shards(samples, tmp_path / "d" / "edit", "edit", max_count=4)
    return tmp_path / "d", [s["key"] for s in samples], shards


def _truncate_last_member(path) -> str:
    """Cut the shard in the middle of its last member's data; returns the key of that member."""
    with tarfile.open(path) as t:
        last = t.getmembers()[-1]
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: last.offset_data + last.size // 2])
    return last.name.split(".")[0]


def test_truncated_member_skip_yields_every_good_sample_and_counts_one(shard_set):
    root, keys, shards = shard_set
    lost = _truncate_last_member(shards[2])
    ds = ShardDataset(root, "edit", ReaderConfig(on_corrupt="skip", shuffle_buffer=0))
    got = _keys(make_loader(ds, batch_size=5, num_workers=2))
    assert sorted(got) == sorted(k for k in keys if k != lost)
    assert ds.stats["skipped"] == 1 and ds.stats["truncated_shards"] == 1
    assert ds.stats["samples"] == len(keys) - 1


def test_truncated_member_fail_names_the_shard(shard_set):
    root, _, shards = shard_set
    _truncate_last_member(shards[4])
    ds = ShardDataset(root, "edit", ReaderConfig(on_corrupt="fail"))
    with pytest.raises(CorruptShardError, match=shards[4].split("/")[-1]):
        list(ds)


def _cut_in_sample(path, sample: int, in_data: bool) -> list[str]:
    """Cut the shard inside the first member of its ``sample``-th sample (in its data, or at its header);
    returns the keys of the shard in order."""
    with tarfile.open(path) as t:
        members = t.getmembers()
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in members))
    first = next(m for m in members if m.name.startswith(keys[sample] + "."))
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: first.offset_data + first.size // 2 if in_data else first.offset])
    return keys


def test_cut_inside_the_next_samples_first_member_keeps_the_complete_one_before(shard_set, caplog):
    root, keys, shards = shard_set
    in_shard = _cut_in_sample(shards[2], 2, in_data=True)  # damage starts in the 3rd sample's first member
    ds = ShardDataset(root, "edit", ReaderConfig(on_corrupt="skip", shuffle_buffer=0))
    got = [s["key"] for s in ds]
    assert sorted(got) == sorted(k for k in keys if k not in in_shard[2:]), "the 2nd sample must not be dropped"
    assert ds.stats["skipped"] == 1 and ds.stats["truncated_shards"] == 1
    assert f"lost sample {in_shard[2]!r}" in caplog.text and repr(in_shard[1]) not in caplog.text

    seen = []
    with pytest.raises(CorruptShardError, match=f"lost sample {in_shard[2]!r}"):
        for s in ShardDataset(shards[2], "edit", ReaderConfig(on_corrupt="fail", shuffle_buffer=0)):
            seen.append(s["key"])
    assert seen == in_shard[:2]


def test_cut_between_two_samples_is_detected(shard_set):
    root, keys, shards = shard_set
    in_shard = _cut_in_sample(shards[1], 2, in_data=False)  # the shard stops right before its 3rd sample
    ds = ShardDataset(root, "edit", ReaderConfig(on_corrupt="skip", shuffle_buffer=0))
    assert sorted(s["key"] for s in ds) == sorted(k for k in keys if k not in in_shard[2:])
    assert ds.stats["truncated_shards"] == 1 and ds.stats["skipped"] == 0  # which samples followed is unknown
    with pytest.raises(CorruptShardError, match="end-of-archive marker"):
        list(ShardDataset(shards[1], "edit", ReaderConfig(on_corrupt="fail", shuffle_buffer=0)))


def test_fail_policy_errors_are_not_rewrapped(tmp_path):
    """A CorruptShardError raised while reading (here: a duplicate member) keeps its own message."""
    import io

    path = tmp_path / "dup.tar"
    with tarfile.open(path, "w") as t:
        for name in ("a.json", "a.json"):
            info = tarfile.TarInfo(name)
            info.size = 2
            t.addfile(info, io.BytesIO(b"{}"))
    with pytest.raises(CorruptShardError) as e:
        list(ShardDataset(str(path), None, ReaderConfig(on_corrupt="fail", shuffle_buffer=0)))
    assert "duplicate member 'json'" in str(e.value) and "ends early" not in str(e.value)


def test_bad_policy_is_refused():
    with pytest.raises(ValueError, match="on_corrupt"):
        ReaderConfig(on_corrupt="ignore")


@pytest.mark.parametrize("split,num_shards", [("shard", 6), ("sample", 6), ("auto", 3)])
def test_ranks_and_workers_cover_every_sample_exactly_once(tmp_path, split, num_shards):
    samples = [edit_sample(i, size=8) for i in range(23)]  # uneven on purpose
    write_shards(samples, tmp_path / "e", "edit", max_count=-(-23 // num_shards))
    for epoch in (0, 1):
        seen: Counter = Counter()
        per_reader = []
        for rank in (0, 1):
            ds = ShardDataset(tmp_path, "edit", ReaderConfig(split=split, seed=3), rank=rank, world_size=2)
            ds.set_epoch(epoch)
            loader = make_loader(ds, batch_size=4, num_workers=2)
            got = _keys(loader)
            per_reader.append(len(got))
            seen.update(got)
        assert sorted(seen) == sorted(s["key"] for s in samples), f"epoch {epoch}"
        assert set(seen.values()) == {1}, f"epoch {epoch}: some samples were read twice"
        assert all(n > 0 for n in per_reader)


def test_shard_split_needs_enough_shards(shard_set):
    root, _, _ = shard_set
    ds = ShardDataset(root, "edit", ReaderConfig(split="shard"), rank=0, world_size=4)
    with pytest.raises(ValueError, match="at least 8 shards"):
        ds.plan(worker=0, num_workers=2)


def test_shuffle_is_deterministic_per_epoch_and_changes_between_epochs(shard_set):
    root, keys, _ = shard_set
    cfg = ReaderConfig(shuffle_buffer=8, seed=7)
    orders = []
    for epoch in (0, 0, 1):
        ds = ShardDataset(root, "edit", cfg)
        ds.set_epoch(epoch)
        orders.append([s["key"] for s in ds])
    assert orders[0] == orders[1]
    assert orders[0] != orders[2] and sorted(orders[0]) == sorted(orders[2]) == sorted(keys)
    assert orders[0] != keys  # actually shuffled


def test_loader_advances_epochs(shard_set):
    root, _, _ = shard_set
    loader = make_loader(ShardDataset(root, "edit", ReaderConfig(shuffle_buffer=8)), batch_size=4)
    first, second = _keys(loader), _keys(loader)
    assert sorted(first) == sorted(second) and first != second


def test_stateful_loader_resumes_mid_epoch_exactly(shard_set):
    root, keys, _ = shard_set
    cfg = ReaderConfig(shuffle_buffer=6, seed=1)
    loader = make_loader(ShardDataset(root, "edit", cfg), batch_size=2, num_workers=2)
    it = iter(loader)
    before = [s["key"] for _ in range(5) for s in next(it)]
    state = loader.state_dict()
    del it

    resumed = make_loader(ShardDataset(root, "edit", cfg), batch_size=2, num_workers=2)
    resumed.load_state_dict(state)
    after = _keys(resumed)
    assert sorted(before + after) == sorted(keys), "resume must neither repeat nor drop samples"
    full = _keys(make_loader(ShardDataset(root, "edit", cfg), batch_size=2, num_workers=2))
    assert before + after == full, "the resumed epoch continues the very same order"


def _pair(sample):
    return [f"{sample['key']}/a", f"{sample['key']}/b", f"{sample['key']}/c"]


def test_resume_inside_a_transform_list(shard_set):
    root, keys, _ = shard_set
    cfg = ReaderConfig(shuffle_buffer=4, seed=2)
    full = [x for b in make_loader(ShardDataset(root, "edit", cfg, transform=_pair), 4, num_workers=2) for x in b]
    assert len(full) == 3 * len(keys) and len(set(full)) == len(full)
    loader = make_loader(ShardDataset(root, "edit", cfg, transform=_pair), 4, num_workers=2)
    it = iter(loader)
    before = [x for _ in range(5) for x in next(it)]  # 20 items: stops inside a record's list on each worker
    state = loader.state_dict()
    del it
    resumed = make_loader(ShardDataset(root, "edit", cfg, transform=_pair), 4, num_workers=2)
    resumed.load_state_dict(state)
    assert before + [x for b in resumed for x in b] == full


def test_rl_prompt_reader_filters_by_task(tmp_path):
    write_shards([rl_prompt_sample(i) for i in range(6)], tmp_path / "p", "rl_prompt")
    ds = rl_prompt_dataset(tmp_path, ReaderConfig(shuffle_buffer=0), task="edit")
    got = list(ds)
    assert [s["key"] for s in got] == ["prompt-00000", "prompt-00002", "prompt-00004"]
    assert all(s["source"] is not None and s["task"] == "edit" for s in got)


def test_load_rl_prompt_records_in_memory(tmp_path):
    from firm.data.schema import decode_image

    samples = [rl_prompt_sample(i) for i in range(5)]
    write_shards(samples, tmp_path / "p", "rl_prompt")
    recs = load_rl_prompt_records(tmp_path)
    assert [r["key"] for r in recs] == [s["key"] for s in samples]
    assert isinstance(recs[0]["image"], bytes) and recs[1]["image"] is None
    assert decode_image(recs[0]["image"]).tobytes() == samples[0]["source"].tobytes()
    assert recs[1]["checklist"] == samples[1]["checklist"]
    gens = load_rl_prompt_records(tmp_path, task="generation", decode_images=True)
    assert [r["key"] for r in gens] == ["prompt-00001", "prompt-00003"]
