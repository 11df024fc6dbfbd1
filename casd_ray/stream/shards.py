"""The shard format: Parquet files of encoded images plus one ``manifest.json``.

A packed folder (local or ``s3://``) holds ``<split>-00000.parquet`` files with the columns
``image`` (the source file's bytes), ``label`` (int32) and ``row`` (the image's index in its
split, after packing's fixed shuffle, so every shard mixes classes) and a manifest: classes,
image shape, per-split counts per class, per-channel pixel sums (normalisation without a pass
over the data), and each shard's rows and SHA-256. The manifest is written last: a folder
without one is an unfinished pack.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from casd_ray.errors import DataError

FORMAT = "casd-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
SCHEMA = pa.schema([("image", pa.binary()), ("label", pa.int32()), ("row", pa.int64())])


def filesystem(root: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path inside it) of a local folder or an object-store URI (``s3://``)."""
    try:
        if "://" in root:
            return pafs.FileSystem.from_uri(root)
        return pafs.LocalFileSystem(), str(root)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"{root}: cannot open this location ({err})") from None


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    try:
        with fs.open_input_file(path) as f:
            return f.read()
    except (OSError, pa.ArrowInvalid) as err:
        raise DataError(f"{path}: not readable ({err})") from None


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Manifest:
    """A packed folder's manifest: what :func:`verify` checks and readers rely on."""

    root: str
    classes: list[str]
    shape: tuple[int, int, int]
    image_size: int | None
    splits: dict[str, dict[str, Any]]

    def shards(self, split: str) -> list[dict[str, Any]]:
        return list(self.splits[split]["shards"])

    def rows(self, split: str) -> int:
        return int(sum(s["rows"] for s in self.shards(split)))

    def stats(self, split: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and std on the [0, 1] scale, from the packed integer sums."""
        part = self.splits[split]
        count = self.rows(split) * self.shape[1] * self.shape[2]
        mean = np.asarray(part["pixel_sum"], dtype=np.float64) / count
        var = np.asarray(part["pixel_sq_sum"], dtype=np.float64) / count - mean**2
        std = np.sqrt(np.maximum(var, 0.0))
        std[std == 0] = 255.0
        return tuple(float(m) for m in mean / 255.0), tuple(float(s) for s in std / 255.0)


def read_manifest(root: str) -> Manifest:
    """The manifest of ``root``; DataError naming the file when it is absent or malformed."""
    fs, base = filesystem(root)
    path = f"{base.rstrip('/')}/{MANIFEST}"
    try:
        raw = json.loads(read_bytes(fs, path))
        if raw.get("format") != FORMAT:
            raise DataError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
        m = Manifest(
            root=str(root),
            classes=[str(c) for c in raw["classes"]],
            shape=tuple(int(v) for v in raw["shape"]),
            image_size=raw.get("image_size"),
            splits={s: raw["splits"][s] for s in SPLITS},
        )
        for split in SPLITS:
            for shard in m.shards(split):
                int(shard["rows"]), str(shard["file"]), str(shard["sha256"])
    except DataError as err:
        if "not readable" in str(err):
            raise DataError(
                f"{path}: not found; pack an image folder first (casd-ray data pack SRC {root})"
            ) from None
        raise
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{path}: not a casd-ray shard manifest ({err!r})") from None
    return m


def content_digest(root: str) -> str:
    """One checksum of a packed folder's content (its shards' SHA-256 and the classes), from
    the manifest alone: what the stage fingerprints record, so re-packed data is new data."""
    m = read_manifest(root)
    shards = {split: [s["sha256"] for s in m.shards(split)] for split in SPLITS}
    return sha256(json.dumps([m.classes, shards], sort_keys=True).encode())[:16]


def open_shard(fs: pafs.FileSystem, path: str, columns: list[str] | None = None) -> pa.Table:
    """One shard's table, its schema checked first; DataError naming the file otherwise."""
    try:
        with fs.open_input_file(path) as f:
            schema = pq.read_schema(f)
            wanted = [SCHEMA.field(c) for c in (columns or SCHEMA.names)]
            have = {(f.name, f.type) for f in schema}
            if any((w.name, w.type) not in have for w in wanted):
                shown = ", ".join(f"{f.name}: {f.type}" for f in schema)
                raise DataError(f"{path}: schema ({shown}) does not match a casd-ray shard "
                                "(image: binary, label: int32, row: int64)")  # fmt: skip
            return pq.read_table(f, columns=columns or SCHEMA.names)
    except (OSError, pa.ArrowException) as err:
        msg = " ".join(str(err).split())
        raise DataError(f"{path}: unreadable shard ({type(err).__name__}: {msg})") from None


def shard_path(root: str, file: str) -> str:
    return f"{filesystem(root)[1].rstrip('/')}/{file}"


def verify(root: str, log=print) -> dict[str, Any]:
    """Check every shard of ``root`` against the manifest: present, same SHA-256, the shard
    schema, row counts and counts per class. Returns ``{split: {class: count}}`` and one
    checksum over all shards; raises DataError naming the first file that does not match."""
    m = read_manifest(root)
    fs, _ = filesystem(root)
    digest = hashlib.sha256()
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        found = np.zeros(len(m.classes), dtype=np.int64)
        for i, shard in enumerate(m.shards(split)):
            path = shard_path(root, shard["file"])
            data = read_bytes(fs, path)
            if sha256(data) != shard["sha256"]:
                raise DataError(f"{path}: checksum differs from {MANIFEST} (a changed shard)")
            table = open_shard(fs, path)
            if table.num_rows != shard["rows"]:
                raise DataError(f"{path}: {table.num_rows} rows, {MANIFEST} says {shard['rows']}")
            labels = table.column("label").to_numpy()
            found += np.bincount(labels, minlength=len(m.classes))[: len(m.classes)]
            digest.update(shard["sha256"].encode())
            log(f"verify: {split} shard {i + 1}/{len(m.shards(split))} ok")
        want = m.splits[split]["counts"]
        counts[split] = dict(zip(m.classes, map(int, found), strict=True))
        if counts[split] != want:
            raise DataError(f"{root}/{MANIFEST}: {split} counts per class {want}, shards hold "
                            f"{counts[split]}")  # fmt: skip
    return {"counts": counts, "checksum": digest.hexdigest()}
