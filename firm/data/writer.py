"""Validating WebDataset shard writer with max-count / max-size rolling and atomic shard sealing.

Every sample is validated against its schema before anything is written (a :class:`~firm.data.schema.SchemaError`
names the key and the field). Images are stored as PNG (lossless) or JPEG at a configured quality. A shard is written
under a temporary name (``<name>.tar.tmp``) and renamed to ``<name>.tar`` only when it is complete ("sealed"), so a
reader or a resumed job never sees half a shard: a ``.tar`` file is always whole.

Example::

    with ShardWriter("out/edit", schema="edit", max_count=1000) as w:
        for sample in samples:
            w.write(sample)
    print(w.shards)  # ['out/edit-000000.tar', ...]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import webdataset as wds

from firm.data.schema import PNG_COMPRESS_LEVEL, Schema, encode_sample, get_schema

TMP_SUFFIX = ".tmp"


class ShardWriter:
    """Writes validated samples into ``<prefix>-NNNNNN.tar`` shards.

    Args:
        prefix: output path prefix; shards are ``f"{prefix}-{index:06d}.tar"`` (parent folders are created).
        schema: sample schema name (``edit``, ``generation``, ``rl_prompt``) or a :class:`Schema`.
        image_format: ``png`` (lossless) or ``jpg``.
        jpeg_quality: JPEG quality when ``image_format`` is ``jpg``.
        png_compress_level: zlib level 0..9 of PNG members (lossless at every level; see schema.PNG_COMPRESS_LEVEL).
        max_count: start a new shard after this many samples.
        max_size: start a new shard once the current one holds this many bytes of member data (a shard ends with
            the sample that crosses the limit, so it can exceed ``max_size`` by at most one sample).
        start_index: index of the first shard (a resumed job continues after its sealed shards).
        on_seal: called as ``on_seal(path, keys)`` after a shard is complete and renamed to its final name.
        check_duplicates: refuse a key this writer has already written.
    """

    def __init__(
        self,
        prefix: str | Path,
        schema: str | Schema,
        *,
        image_format: str = "png",
        jpeg_quality: int = 95,
        png_compress_level: int = PNG_COMPRESS_LEVEL,
        max_count: int = 10_000,
        max_size: float = 1e9,
        start_index: int = 0,
        on_seal: Callable[[str, list[str]], Any] | None = None,
        check_duplicates: bool = True,
    ) -> None:
        if max_count < 1:
            raise ValueError(f"max_count must be >= 1, got {max_count}")
        if max_size <= 0:
            raise ValueError(f"max_size must be > 0 bytes, got {max_size}")
        if image_format not in ("png", "jpg", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
        self.prefix = str(prefix)
        self.schema = get_schema(schema)
        self.image_format = image_format
        self.jpeg_quality = jpeg_quality
        self.png_compress_level = png_compress_level
        self.max_count = max_count
        self.max_size = max_size
        self.on_seal = on_seal
        self.check_duplicates = check_duplicates
        self.index = start_index
        self.shards: list[str] = []  # sealed shard paths, in order
        self.total = 0  # samples written by this writer
        self._seen: set[str] = set()
        self._tar: wds.TarWriter | None = None
        self._file: Any = None
        self._path: str | None = None
        self._keys: list[str] = []
        self._size = 0
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)

    def shard_path(self, index: int) -> str:
        return f"{self.prefix}-{index:06d}.tar"

    def write(self, sample: dict) -> None:
        """Validate, encode and append one sample (rolls to a new shard when the current one is full).

        Raises:
            SchemaError: the sample does not match the schema (nothing is written).
            ValueError: the key was already written by this writer.
        """
        record = encode_sample(sample, self.schema, self.image_format, self.jpeg_quality, self.png_compress_level)
        key = record["__key__"]
        if self.check_duplicates:
            if key in self._seen:
                raise ValueError(f"sample {key!r}: duplicate key (already written to this shard set)")
            self._seen.add(key)
        if self._tar is None:
            self._open()
        assert self._tar is not None
        self._size += self._tar.write(record)
        self._keys.append(key)
        self.total += 1
        if len(self._keys) >= self.max_count or self._size >= self.max_size:
            self.seal()

    def _open(self) -> None:
        self._path = self.shard_path(self.index)
        self.index += 1
        self._file = open(self._path + TMP_SUFFIX, "wb")  # noqa: SIM115 - closed in seal()
        # A fixed mtime makes shards byte-reproducible; mode 0o444 as webdataset writes them.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        self._keys, self._size = [], 0

    def seal(self) -> str | None:
        """Finish the current shard (fsync + rename to its final name); returns its path, None if none was open."""
        if self._tar is None:
            return None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        path = self._path
        assert path is not None
        os.replace(path + TMP_SUFFIX, path)
        keys = self._keys
        self._tar, self._file, self._path, self._keys, self._size = None, None, None, [], 0
        self.shards.append(path)
        if self.on_seal is not None:
            self.on_seal(path, keys)
        return path

    def abort(self) -> None:
        """Drop the unsealed shard (its samples are lost; sealed shards stay)."""
        if self._tar is not None:
            try:
                self._tar.close()
                self._file.close()
            finally:
                Path(str(self._path) + TMP_SUFFIX).unlink(missing_ok=True)
                self._tar, self._file, self._path, self._keys, self._size = None, None, None, [], 0

    def close(self) -> list[str]:
        """Seal the last shard; returns all sealed shard paths."""
        self.seal()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        else:
            # On an error the partial shard is discarded rather than sealed: a sealed shard is always complete.
            self.abort()


def write_shards(
    samples: Any,
    prefix: str | Path,
    schema: str | Schema,
    **kwargs: Any,
) -> list[str]:
    """Write an iterable of samples to shards; returns the shard paths. ``kwargs`` go to :class:`ShardWriter`."""
    with ShardWriter(prefix, schema, **kwargs) as w:
        for s in samples:
            w.write(s)
    return w.shards
