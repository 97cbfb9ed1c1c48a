"""Fuzzing the shard reader: random bytes and mutated valid shards never make `on_corrupt: skip` raise, every
sample it yields is valid, and `on_corrupt: fail` raises only CorruptShardError."""

import io
import tarfile

import pytest
from hypothesis import given
from hypothesis import strategies as st

from firm.data.reader import CorruptShardError, ReadStats, iter_samples
from firm.data.schema import SchemaError, decode_record, encode_sample, validate
from firm.data.writer import write_shards
from tests.helpers.data import edit_sample

SAMPLES = [edit_sample(i, size=6) for i in range(3)]
KEYS = {s["key"] for s in SAMPLES}


def _valid_shard() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        for s in SAMPLES:
            rec = encode_sample(s, "edit")
            for k, v in rec.items():
                if k != "__key__":
                    info = tarfile.TarInfo(f"{rec['__key__']}.{k}")
                    info.size = len(v)
                    t.addfile(info, io.BytesIO(v))
    return buf.getvalue()


VALID = _valid_shard()

mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, len(VALID)), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.binary(min_size=1, max_size=600)),
    st.tuples(st.just("zero"), st.integers(0, len(VALID) - 1), st.integers(1, 2048)),
)


def _mutate(data: bytes, mutations) -> bytes:
    b = bytearray(data)
    for kind, at, arg in mutations:
        at = min(at, len(b))
        if kind == "flip" and at < len(b):
            b[at] ^= arg
        elif kind == "cut":
            del b[at:]
        elif kind == "insert":
            b[at:at] = arg
        elif kind == "zero":
            b[at : at + arg] = bytes(len(b[at : at + arg]))
    return bytes(b)


def _read(tmp_path_factory, data: bytes):
    path = tmp_path_factory.mktemp("fuzz") / "f-000000.tar"
    path.write_bytes(data)
    stats = ReadStats()
    got = list(iter_samples(str(path), "edit", on_corrupt="skip", stats=stats))
    for s in got:
        assert s["key"] in KEYS
        validate({k: v for k, v in s.items() if not k.startswith("__")}, "edit")  # every sample yielded is valid
    try:
        list(iter_samples(str(path), "edit", on_corrupt="fail"))
    except CorruptShardError:
        pass
    return got, stats


@given(st.lists(mutation, min_size=1, max_size=4))
def test_mutated_shards_never_raise_under_skip(tmp_path_factory, mutations):
    got, stats = _read(tmp_path_factory, _mutate(VALID, mutations))
    assert len(got) + stats["skipped"] + stats["duplicates"] >= 0  # counted, never raised
    assert len({s["key"] for s in got}) == len(got)  # a key is never yielded twice


@given(st.binary(max_size=3000))
def test_random_bytes_never_raise_under_skip(tmp_path_factory, data):
    _read(tmp_path_factory, data)


member_bytes = st.one_of(st.binary(max_size=300), st.sampled_from([b"{}", b"[]", b"null", b'{"schema": "edit"}']))


@given(st.dictionaries(st.sampled_from(["json", "source.png", "edited.png", "source.jpg", "x.pyd"]), member_bytes))
def test_decode_record_raises_only_schema_errors(members):
    try:
        decode_record({"__key__": "k", **members}, "edit")
    except SchemaError:
        pass


def test_the_valid_shard_reads_back():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        write_shards(SAMPLES, Path(d) / "v", "edit")
        assert {s["key"] for s in iter_samples(d, "edit")} == KEYS
    with pytest.raises(AssertionError):  # the mutation helper does mutate
        assert _mutate(VALID, [("cut", 10, 0)]) == VALID
