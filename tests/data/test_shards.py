"""Schemas, the validating shard writer, and the safe reader: round trips, validation errors, rolling, no pickle."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest

from firm.data.reader import ReadStats, expand_shards, iter_samples
from firm.data.schema import SchemaError, encode_sample, validate
from firm.data.writer import ShardWriter, write_shards
from tests.helpers.data import edit_sample, generation_sample, pixels, random_image, rl_prompt_sample

MAKERS = {"edit": edit_sample, "generation": generation_sample, "rl_prompt": rl_prompt_sample}


@pytest.mark.parametrize("schema", list(MAKERS))
def test_round_trip_is_bit_exact(tmp_path, schema):
    make = MAKERS[schema]
    samples = [make(i) for i in range(7)]
    shards = write_shards(samples, tmp_path / schema, schema, max_count=3)
    assert len(shards) == 3
    back = list(iter_samples(tmp_path, schema))
    assert [s["key"] for s in back] == [s["key"] for s in samples]
    for orig, got in zip(samples, back):
        for name, value in orig.items():
            if hasattr(value, "mode"):  # an image: same mode, size and every pixel
                assert got[name].mode == value.mode and got[name].size == value.size
                assert np.array_equal(pixels(got[name]), pixels(value)), (orig["key"], name)
            else:
                assert got[name] == value and type(got[name]) is type(value), (orig["key"], name)
        assert got["__schema__"] == schema


def test_jpeg_is_lossy_but_configured(tmp_path):
    s = edit_sample(1, size=64)
    write_shards([s], tmp_path / "j", "edit", image_format="jpg", jpeg_quality=90)
    with tarfile.open(tmp_path / "j-000000.tar") as t:
        names = sorted(t.getnames())
    assert names == ["edit-00001.edited.jpg", "edit-00001.json", "edit-00001.source.jpg"]
    (back,) = iter_samples(tmp_path, "edit")
    assert back["source"].size == s["source"].size


@pytest.mark.parametrize(
    "change,field,words",
    [
        ({"execution": 6}, "execution", "outside 1..5"),
        ({"execution": 3.0}, "execution", "int score"),
        ({"execution": True}, "execution", "int score"),
        ({"instruction": ""}, "instruction", "empty"),
        ({"source": None}, "source", "required"),
        ({"edited": "edited.png"}, "edited", "PIL.Image"),
        ({"provenance": {"x": float("nan")}}, "provenance", "non-finite"),
        ({"difference_report": {"detailed": {"smell": ["x"]}}}, "difference_report", "unknown aspect"),
        ({"colour": "red"}, "colour", "not a field"),
        ({"key": "a.b"}, "key", "not a valid key"),
    ],
)
def test_writer_rejects_bad_samples_naming_key_and_field(tmp_path, change, field, words):
    s = {**edit_sample(3), **change}
    w = ShardWriter(tmp_path / "bad", "edit")
    with pytest.raises(SchemaError) as e:
        w.write(s)
    assert e.value.field == field and words in str(e.value)
    assert repr(s["key"]) in str(e.value)
    w.close()
    assert w.shards == [] and not list(tmp_path.iterdir())  # nothing half-written


def test_generation_and_prompt_rules():
    g = generation_sample(0)
    with pytest.raises(SchemaError, match="unknown category"):
        validate({**g, "checklist": [{"category": "vibes", "text": "x"}]}, "generation")
    with pytest.raises(SchemaError, match="quality aspect"):
        validate({**g, "quality_aspects": {"beauty": 3}}, "generation")
    p = rl_prompt_sample(0)
    with pytest.raises(SchemaError, match="source image") as e:
        validate({**p, "source": None}, "rl_prompt")
    assert e.value.field == "source"
    with pytest.raises(SchemaError, match="task"):
        validate({**p, "task": "video"}, "rl_prompt")


def test_rolling_by_count_and_size_and_no_empty_shards(tmp_path):
    samples = [edit_sample(i, size=32) for i in range(10)]
    one = sum(len(v) for k, v in encode_sample(samples[0], "edit").items() if k != "__key__")
    shards = write_shards(samples, tmp_path / "s", "edit", max_count=100, max_size=2.5 * one)
    counts = [len(tarfile.open(p).getnames()) // 3 for p in shards]
    assert sum(counts) == 10 and max(counts) == 3  # a shard ends with the sample that crosses max_size
    w = ShardWriter(tmp_path / "empty", "edit")
    assert w.close() == [] and not list(tmp_path.glob("empty*"))


def test_duplicate_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate key"):
        write_shards([edit_sample(1), edit_sample(1)], tmp_path / "d", "edit")
    assert not list(tmp_path.glob("*.tar")), "a failed write leaves no sealed shard"


def test_unsealed_shard_is_invisible(tmp_path):
    w = ShardWriter(tmp_path / "u", "edit", max_count=2)
    for i in range(3):
        w.write(edit_sample(i))
    assert expand_shards(tmp_path) == [str(tmp_path / "u-000000.tar")]  # the open shard is still *.tar.tmp
    w.close()
    assert len(expand_shards(tmp_path)) == 2


def test_pickle_members_are_never_decoded(tmp_path):
    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    shard = tmp_path / "evil-000000.tar"
    rec = encode_sample(edit_sample(0), "edit")
    rec["pyd"] = pickle.dumps(Boom())
    rec["extra.pickle"] = pickle.dumps(Boom())
    with tarfile.open(shard, "w") as t:
        for k, v in rec.items():
            if k == "__key__":
                continue
            info = tarfile.TarInfo(f"{rec['__key__']}.{k}")
            info.size = len(v)
            t.addfile(info, io.BytesIO(v))
    (s,) = iter_samples(shard)
    assert not (tmp_path / "pwned").exists()
    assert "pyd" not in s and "extra.pickle" not in s and s["key"] == "edit-00000"


def test_json_member_records_schema_and_fields(tmp_path):
    write_shards([generation_sample(2)], tmp_path / "g", "generation")
    with tarfile.open(tmp_path / "g-000000.tar") as t:
        meta = json.load(t.extractfile("gen-00002.json"))
    assert meta["schema"] == "generation" and meta["prompt"] == "a red circle number 2"
    assert meta["checklist"][0] == {"category": "main_subject", "text": "a circle"}


def test_unreadable_image_member_is_a_corrupt_sample(tmp_path):
    rec = encode_sample(edit_sample(0), "edit")
    rec["source.png"] = b"\x89PNG\r\n\x1a\n garbage"
    shard = tmp_path / "c-000000.tar"
    with tarfile.open(shard, "w") as t:
        for k, v in rec.items():
            if k != "__key__":
                info = tarfile.TarInfo(f"{rec['__key__']}.{k}")
                info.size = len(v)
                t.addfile(info, io.BytesIO(v))
    write_shards([edit_sample(1)], tmp_path / "ok", "edit")
    stats = ReadStats()
    assert [s["key"] for s in iter_samples(tmp_path, "edit", stats=stats)] == ["edit-00001"]
    assert stats["skipped"] == 1
    with pytest.raises(Exception, match="c-000000.tar"):
        list(iter_samples(tmp_path, "edit", on_corrupt="fail"))


def test_random_image_modes_survive(tmp_path):
    ims = [random_image(i, 8, m) for i, m in enumerate(["RGB", "RGBA", "L"])]
    samples = [{"key": f"k{i}", "prompt": "p", "task": "edit", "source": im} for i, im in enumerate(ims)]
    write_shards(samples, tmp_path / "m", "rl_prompt")
    for im, s in zip(ims, iter_samples(tmp_path, "rl_prompt")):
        assert s["source"].mode == im.mode and np.array_equal(pixels(s["source"]), pixels(im))


def test_a_shard_prefix_names_the_shards_written_under_it(tmp_path):
    """`firm data import --out data/edit/raw` writes data/edit/raw-000000.tar ...; `source.path=data/edit/raw` (as the
    docs say) reads them."""
    from firm.data.reader import expand_shards, iter_samples
    from firm.data.writer import ShardWriter
    from firm.synthetic.curation import ShapesEditSource

    prefix = tmp_path / "data" / "edit" / "raw"
    samples = list(ShapesEditSource(ShapesEditSource.Config(count=5, size=32)))
    with ShardWriter(prefix, "edit", max_count=2) as w:
        for s in samples:
            w.write(s)
    assert expand_shards(str(prefix)) == w.shards and len(w.shards) == 3
    assert [s["key"] for s in iter_samples(str(prefix), "edit", decode_images=False)] == [s["key"] for s in samples]
    (tmp_path / "data" / "edit" / "rawer-000000.tar").write_bytes(b"")  # another prefix's shards are not taken
    assert expand_shards(str(prefix)) == w.shards
    with pytest.raises(FileNotFoundError, match="shard not found: .*nothing.*prefix with .*nothing-000000.tar"):
        expand_shards(str(tmp_path / "nothing"))
