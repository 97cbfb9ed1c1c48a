"""Hostile shards: every error of one sample is that sample's error under `on_corrupt: skip` (deeply nested JSON
included), duplicate keys are warned about and counted, and the reader has a pixel cap of its own."""

import io
import json
import logging
import struct
import tarfile
import zlib

import pytest

from firm.data.reader import ReaderConfig, ReadStats, ShardDataset, iter_samples
from firm.data.schema import (
    MAX_JSON_NESTING,
    ImageTooLargeError,
    SchemaError,
    decode_image,
    decode_record,
    encode_sample,
)
from tests.helpers.data import edit_sample


def write_tar(path, records):
    """A shard from raw records ``{"__key__": ..., "<suffix>": bytes}``, members in the order given."""
    with tarfile.open(path, "w") as t:
        for rec in records:
            for k, v in rec.items():
                if k == "__key__":
                    continue
                info = tarfile.TarInfo(f"{rec['__key__']}.{k}")
                info.size = len(v)
                t.addfile(info, io.BytesIO(v))
    return str(path)


def _with_json(i, meta_update=None, raw=None):
    rec = encode_sample(edit_sample(i, size=8), "edit")
    if raw is not None:
        rec["json"] = raw
    elif meta_update:
        meta = json.loads(rec["json"])
        meta.update(meta_update)
        rec["json"] = json.dumps(meta).encode()
    return rec


@pytest.mark.parametrize("depth", [5000, 900, MAX_JSON_NESTING + 1])
def test_deeply_nested_json_is_one_skipped_sample(tmp_path, depth):
    deep = "[" * depth + "]" * depth
    meta = json.loads(encode_sample(edit_sample(1, size=8), "edit")["json"])
    raw = json.dumps(meta)[:-1] + ', "provenance": {"x": ' + deep + "}}"
    shard = write_tar(tmp_path / "s-000000.tar", [_with_json(0), _with_json(1, raw=raw.encode()), _with_json(2)])
    stats = ReadStats()
    keys = [s["key"] for s in iter_samples(shard, "edit", stats=stats)]  # raised RecursionError before
    assert keys == ["edit-00000", "edit-00002"] and stats["skipped"] == 1
    with pytest.raises(SchemaError, match="nested"):
        decode_record(_with_json(1, raw=raw.encode()), "edit")
    ds = ShardDataset(shard, "edit", ReaderConfig(shuffle_buffer=0))
    assert [s["key"] for s in ds] == ["edit-00000", "edit-00002"] and ds.stats["skipped"] == 1


@pytest.mark.parametrize(
    "raw",
    [
        b'{"schema": "edit", "execution": ' + b"9" * 5000 + b"}",  # a number over Python's int digit limit
        b"\xff\xfe not utf-8",
        b'["a list"]',
        _with_json(1, {"key": "someone-else"})["json"],  # a key spoofed from inside the json member
        b'{"schema": "edit", "provenance": {"x": NaN}}',
        b"",
    ],
    ids=["huge-int", "not-utf8", "list", "spoofed-key", "nan", "empty"],
)
def test_any_bad_json_member_is_one_skipped_sample(tmp_path, raw):
    shard = write_tar(tmp_path / "s-000000.tar", [_with_json(0), _with_json(1, raw=raw)])
    stats = ReadStats()
    assert [s["key"] for s in iter_samples(shard, "edit", stats=stats)] == ["edit-00000"]
    assert stats["skipped"] == 1


def test_a_duplicate_key_is_warned_about_counted_and_the_first_is_kept(tmp_path, caplog):
    first, other, again = _with_json(0), _with_json(1), _with_json(0, {"instruction": "the second copy"})
    shard = write_tar(tmp_path / "s-000000.tar", [first, other, again])
    stats = ReadStats()
    with caplog.at_level(logging.WARNING, logger="firm.data.reader"):
        got = list(iter_samples(shard, "edit", stats=stats))
    assert [s["key"] for s in got] == ["edit-00000", "edit-00001"]  # was yielded twice
    assert got[0]["instruction"] == edit_sample(0)["instruction"]  # the first one
    assert stats["duplicates"] == 1 and stats["skipped"] == 0
    assert "'edit-00000' appears again" in caplog.text
    ds = ShardDataset(shard, "edit", ReaderConfig(shuffle_buffer=0))
    assert [s["key"] for s in ds] == ["edit-00000", "edit-00001"] and ds.stats["duplicates"] == 1


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width x height`` pixels (a valid header, almost no data): what a bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_the_reader_has_a_pixel_cap_of_its_own(tmp_path):
    with pytest.raises(ImageTooLargeError, match="12000x12000 = 144000000 pixels"):
        decode_image(_png_header_only(12000, 12000))  # rejected from the header: nothing is allocated
    rec = encode_sample(edit_sample(0, size=40), "edit")  # 40 x 43 pixels
    shard = write_tar(tmp_path / "s-000000.tar", [rec, _with_json(1)])
    stats = ReadStats()
    got = [s["key"] for s in iter_samples(shard, "edit", stats=stats, max_image_pixels=1000)]
    assert got == ["edit-00001"] and stats["skipped"] == 1
    ds = ShardDataset(shard, "edit", ReaderConfig(shuffle_buffer=0, max_image_pixels=1000))
    assert [s["key"] for s in ds] == ["edit-00001"]
    assert len(list(iter_samples(shard, "edit", max_image_pixels=None))) == 2
    with pytest.raises(ValueError, match="max_image_pixels"):
        ReaderConfig(max_image_pixels=0)


def test_image_bytes_of_other_formats_are_never_decoded(tmp_path):
    from PIL import Image

    for fmt in ("TIFF", "BMP", "GIF", "ICO", "PCX", "TGA"):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8)).save(buf, format=fmt)
        rec = encode_sample(edit_sample(0, size=8), "edit")
        rec["source.png"] = buf.getvalue()  # another format behind a .png name
        shard = write_tar(tmp_path / f"{fmt}-000000.tar", [rec])
        stats = ReadStats()
        assert list(iter_samples(shard, "edit", stats=stats)) == [] and stats["skipped"] == 1, fmt
