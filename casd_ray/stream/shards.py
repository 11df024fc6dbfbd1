"""The shard format: Parquet files (or WebDataset tars) of encoded images plus one
``manifest.json``.

A packed folder (local or ``s3://``) holds ``<split>-00000.parquet`` files with the columns
``image`` (the source file's bytes), ``label`` (int32) and ``row`` (the image's index in its
split, after packing's fixed shuffle, so every shard mixes classes) and a manifest: classes,
image shape, per-split counts per class, per-channel pixel sums (normalisation without a pass
over the data), and each shard's rows and SHA-256. The manifest is written last: a folder
without one is an unfinished pack.

A ``webdataset`` pack holds ``<split>-00000.tar`` files instead, in the WebDataset convention
(``<row>.cls`` the label, ``<row>.png``/``.jpg`` the source file's bytes, members adjacent
and in key order), so the shards are also readable by the ``webdataset`` library and Ray
Data's ``read_webdataset``; :func:`open_shard` gives both formats as the same table.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
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
IMAGE_EXTENSIONS = ("png", "jpg", "jpeg")
SHARD_SUFFIX = {"parquet": ".parquet", "webdataset": ".tar"}  # pack --format -> file suffix


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


def open_shard(
    fs: pafs.FileSystem, path: str, columns: list[str] | None = None, data: bytes | None = None
) -> pa.Table:
    """One shard's table, its schema checked first; DataError naming the file otherwise.
    ``data``: the shard's bytes when the caller has read them already (not read again)."""
    if path.endswith(SHARD_SUFFIX["webdataset"]):
        raw = read_bytes(fs, path) if data is None else data
        return tar_table(raw, path).select(columns or SCHEMA.names)
    try:
        with fs.open_input_file(path) if data is None else pa.BufferReader(data) as f:
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


def tar_member_name(row: int, suffix: str) -> str:
    """A WebDataset member: the sample key (the row, zero-padded so names sort in row order)
    and the extension that says what it holds (``cls``, ``png``, ``jpg``)."""
    return f"{row:08d}.{suffix}"


def tar_table(data: bytes, where: str) -> pa.Table:
    """A WebDataset tar (one ``.cls`` and one image member per key) as a shard table."""
    samples: dict[str, dict[str, bytes]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    key, _, ext = member.name.rpartition("/")[2].partition(".")
                    samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{where}: unreadable shard ({type(err).__name__}: {err})") from None
    images, labels, rows = [], [], []
    for key, sample in samples.items():
        pictures = [v for ext, v in sample.items() if ext.lower() in IMAGE_EXTENSIONS]
        problem = (
            "has no .cls label" if "cls" not in sample
            else f"holds {len(pictures)} images (.png/.jpg), expected 1" if len(pictures) != 1
            else "has a key that is not a row number" if not key.isdigit()
            else None
        )  # fmt: skip
        if problem:
            raise DataError(f"{where}: sample {key} {problem}; not a casd-ray WebDataset shard")
        try:
            labels.append(int(sample["cls"]))
        except ValueError:
            raise DataError(f"{where}: sample {key}: .cls is not an integer label") from None
        images.append(pictures[0])
        rows.append(int(key))
    return pa.table([images, labels, rows], schema=SCHEMA)


def split_labels(m: Manifest, split: str) -> np.ndarray:
    """Every row's label of ``split`` (int64, indexed by row): from a WebDataset pack's label
    file, or from the shards' label and row columns (Parquet reads them without the images)."""
    fs, _ = filesystem(m.root)
    labels = np.zeros(m.rows(split), dtype=np.int64)
    if "labels" in m.splits[split]:
        path = shard_path(m.root, m.splits[split]["labels"]["file"])
        try:
            tables = [(path, pq.read_table(pa.BufferReader(read_bytes(fs, path))))]
        except pa.ArrowException as err:
            raise DataError(f"{path}: unreadable label file ({err})") from None
    else:
        paths = [shard_path(m.root, s["file"]) for s in m.shards(split)]
        tables = [(p, open_shard(fs, p, ["label", "row"])) for p in paths]
    for path, table in tables:
        rows = table.column("row").to_numpy()
        if len(rows) and (rows.min() < 0 or rows.max() >= len(labels)):
            raise DataError(f"{path}: row numbers beyond the {len(labels)} of {MANIFEST}")
        labels[rows] = table.column("label").to_numpy()
    return labels


def shard_spans(m: Manifest, split: str) -> list[tuple[int, int]]:
    """Each shard's rows ``[lo, hi)``: packing numbers rows in shard order, from the manifest
    alone (a stream's start-up reads no shard for them)."""
    ends = np.cumsum([s["rows"] for s in m.shards(split)], dtype=np.int64)
    return [(int(e - s["rows"]), int(e)) for e, s in zip(ends, m.shards(split), strict=True)]


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
        by_row = np.full(m.rows(split), -1, dtype=np.int64)
        for i, shard in enumerate(m.shards(split)):
            path = shard_path(root, shard["file"])
            data = read_bytes(fs, path)
            if sha256(data) != shard["sha256"]:
                raise DataError(f"{path}: checksum differs from {MANIFEST} (a changed shard)")
            table = open_shard(fs, path, data=data)
            if table.num_rows != shard["rows"]:
                raise DataError(f"{path}: {table.num_rows} rows, {MANIFEST} says {shard['rows']}")
            labels = table.column("label").to_numpy()
            by_row[np.clip(table.column("row").to_numpy(), 0, len(by_row) - 1)] = labels
            found += np.bincount(labels, minlength=len(m.classes))[: len(m.classes)]
            digest.update(shard["sha256"].encode())
            log(f"verify: {split} shard {i + 1}/{len(m.shards(split))} ok")
        if "labels" in m.splits[split]:  # a WebDataset pack's label file must agree
            path = shard_path(root, m.splits[split]["labels"]["file"])
            if sha256(read_bytes(fs, path)) != m.splits[split]["labels"]["sha256"]:
                raise DataError(f"{path}: checksum differs from {MANIFEST} (a changed file)")
            if not np.array_equal(split_labels(m, split), by_row):
                raise DataError(f"{path}: labels differ from the shards' .cls members")
        want = m.splits[split]["counts"]
        counts[split] = dict(zip(m.classes, map(int, found), strict=True))
        if counts[split] != want:
            raise DataError(f"{root}/{MANIFEST}: {split} counts per class {want}, shards hold "
                            f"{counts[split]}")  # fmt: skip
    return {"counts": counts, "checksum": digest.hexdigest()}
