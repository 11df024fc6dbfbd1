"""``casd-ray data pack SRC DST``: an image folder as Parquet (or WebDataset tar) shards,
resumable and verified.

Rows are shuffled once with a fixed seed before they are cut into shards, so every shard
mixes classes and a stream that reads shards in a seeded order (plus a shuffle inside each
window) sees well-mixed batches. Every image is decoded once while packing: a truncated or
unreadable file stops the pack with its name *before* anything of its shard is written. Each
shard is written atomically and recorded in ``.pack-state.json``, so an interrupted pack
resumes at the first missing shard; the manifest is written last, then the whole folder is
verified.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from casd_ray.data.imagefolder import IMAGE_SUFFIXES, MODE_CHANNELS, visible_dir
from casd_ray.errors import DataError
from casd_ray.files import atomic_write, read_json, write_json
from casd_ray.stream.decode import decode_one
from casd_ray.stream.shards import (
    FORMAT,
    MANIFEST,
    SCHEMA,
    SHARD_SUFFIX,
    SPLITS,
    sha256,
    tar_member_name,
    verify,
)

STATE = ".pack-state.json"
PACK_SEED = 0x5A4D  # the fixed row shuffle: a pack of the same folder is the same shards


def _listing(src: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names and each split's (file, label) list; one-line errors on a bad layout."""
    hint = "expected SRC/train/<class>/*.png|jpg and SRC/test/<class>/*"
    for split in SPLITS:
        if not (src / split).is_dir():
            raise DataError(f"{src / split}: no such folder; {hint}")
    classes = sorted(p.name for p in (src / "train").iterdir() if visible_dir(p))
    if len(classes) < 2:
        raise DataError(f"{src / 'train'}: fewer than 2 class folders; {hint}")
    files: dict[str, list[tuple[Path, int]]] = {}
    for split in SPLITS:
        found = sorted(p.name for p in (src / split).iterdir() if visible_dir(p))
        if found != classes:
            missing = sorted(set(classes) - set(found)) or sorted(set(found) - set(classes))
            raise DataError(
                f"{src / split / missing[0]}: class {missing[0]!r} is in one split but not "
                f"the other (train has {classes}); every split needs every class folder"
            )
        files[split] = []
        for label, cls in enumerate(classes):
            images = sorted(
                p for p in (src / split / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
            )
            if not images:
                raise DataError(f"{src / split / cls}: empty class folder; {hint}")
            files[split] += [(p, label) for p in images]
    return classes, files


def _reference(path: Path, image_size: int | None) -> tuple[str, tuple[int, int, int]]:
    """(PIL mode, CHW shape) every image must have, from the first training image."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            mode = img.mode if img.mode in MODE_CHANNELS else ("RGB" if image_size else img.mode)
            w, h = (image_size, image_size) if image_size else img.size
    except OSError as err:
        raise DataError(f"{path}: not a readable image ({err})") from None
    if mode not in MODE_CHANNELS:
        raise DataError(f"{path}: image mode {mode}, expected L or RGB (or pack --image-size)")
    return mode, (MODE_CHANNELS[mode], h, w)


def _plan_digest(files: dict[str, list[tuple[Path, int]]], shard_rows: int, size, fmt) -> str:
    h = hashlib.sha256(f"{FORMAT}{shard_rows}{size}{'' if fmt == 'parquet' else fmt}".encode())
    for split in SPLITS:
        for path, label in files[split]:
            h.update(f"{split}/{label}/{path.name}/{path.stat().st_size}\n".encode())
    return h.hexdigest()


def _write_shard(rows: list[tuple[int, Path, int]], out: Path, mode: str, shape, image_size):
    """Decode-check every image, then write the shard atomically; its record for the state."""
    c, h, w = shape
    blobs, sums, squares = [], np.zeros(c, np.uint64), np.zeros(c, np.uint64)
    for _, path, _ in rows:
        data = path.read_bytes()
        pixels = decode_one(data, mode, (w, h), image_size, str(path)).astype(np.uint64)
        sums += pixels.sum(axis=(1, 2))
        squares += (pixels * pixels).sum(axis=(1, 2))
        blobs.append(data)
    if out.suffix == SHARD_SUFFIX["webdataset"]:
        atomic_write(out, lambda p: p.write_bytes(_tar_bytes(rows, blobs)))
    else:
        table = pa.table(
            [blobs, [label for *_, label in rows], [row for row, *_ in rows]], schema=SCHEMA
        )
        atomic_write(out, lambda p: pq.write_table(table, p, compression="none"))
    labels = np.array([label for *_, label in rows])
    return {
        "file": out.name, "rows": len(rows), "sha256": sha256(out.read_bytes()),
        "label_counts": np.bincount(labels).tolist(),
        "pixel_sum": [int(v) for v in sums], "pixel_sq_sum": [int(v) for v in squares],
    }  # fmt: skip


def _tar_bytes(rows: list[tuple[int, Path, int]], blobs: list[bytes]) -> bytes:
    """A WebDataset shard: per row ``<row>.cls`` then ``<row>.<source suffix>``, with fixed
    member metadata so that packing the same folder twice gives the same bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for (row, path, label), data in zip(rows, blobs, strict=True):
            suffix = path.suffix.lower().lstrip(".").replace("jpeg", "jpg")
            for name, content in (("cls", str(label).encode()), (suffix, data)):
                info = tarfile.TarInfo(tar_member_name(row, name))
                info.size, info.mtime, info.mode = len(content), 0, 0o644
                tar.addfile(info, io.BytesIO(content))
    return buf.getvalue()


def _write_labels(items: list[tuple[int, Path, int]], out: Path) -> dict[str, str]:
    """Every row's label of a split in one small Parquet file, so a stream of tar shards
    learns its labels without reading every image (ImageNet: 15 MB instead of 150 GB)."""
    table = pa.table(
        [[row for row, *_ in items], [label for *_, label in items]],
        schema=pa.schema([("row", pa.int64()), ("label", pa.int32())]),
    )
    atomic_write(out, lambda p: pq.write_table(table, p))
    return {"file": out.name, "sha256": sha256(out.read_bytes())}


def pack(
    src: str | Path,
    dst: str | Path,
    *,
    shard_rows: int = 2048,
    image_size: int | None = None,
    shard_format: str = "parquet",
    log=print,
) -> dict[str, Any]:
    """Pack ``src`` (``train/<class>/*``, ``test/<class>/*``) into ``dst`` as ``parquet`` or
    ``webdataset`` shards; resumes an interrupted pack of the same folder; returns
    :func:`~casd_ray.stream.shards.verify`'s counts and checksum."""
    src, dst = Path(src), Path(dst)
    if shard_rows < 1:
        raise DataError(f"--shard-rows: {shard_rows}, expected at least 1")
    if shard_format not in SHARD_SUFFIX:
        raise DataError(f"--format: {shard_format!r}, expected one of {sorted(SHARD_SUFFIX)}")
    classes, files = _listing(src)
    mode, shape = _reference(files["train"][0][0], image_size)
    digest = _plan_digest(files, shard_rows, image_size, shard_format)
    state_path = dst / STATE
    state = {"plan": digest, "done": {}}
    if (dst / MANIFEST).is_file() and not state_path.is_file():
        raise DataError(f"{dst}: already holds a finished pack; verify it or pick an empty DST")
    if state_path.is_file():
        state = read_json(state_path)
        if state.get("plan") != digest:
            raise DataError(f"{state_path}: a pack of another source or settings; use an empty DST")
    elif dst.exists() and any(dst.iterdir()):
        raise DataError(f"{dst}: not empty and not a pack in progress; pick an empty DST")
    splits: dict[str, Any] = {}
    for split in SPLITS:
        rows = files[split]
        order = np.random.default_rng([PACK_SEED, SPLITS.index(split)]).permutation(len(rows))
        items = [(int(r), *rows[i]) for r, i in enumerate(order)]
        chunks = [items[i : i + shard_rows] for i in range(0, len(items), shard_rows)]
        records = []
        for k, chunk in enumerate(chunks):
            name = f"{split}-{k:05d}{SHARD_SUFFIX[shard_format]}"
            rec = state["done"].get(name)
            if (
                rec is None
                or not (dst / name).is_file()
                or sha256((dst / name).read_bytes()) != rec["sha256"]
            ):
                rec = _write_shard(chunk, dst / name, mode, shape, image_size)
                state["done"][name] = rec
                write_json(state_path, state)
            records.append(rec)
            done = sum(r["rows"] for r in records)
            log(f"pack: {split} shard {k + 1}/{len(chunks)} ({done}/{len(items)} images)")
        counts = np.sum([np.pad(r["label_counts"], (0, len(classes) - len(r["label_counts"])))
                         for r in records], axis=0)  # fmt: skip
        splits[split] = {
            "shards": [{k: r[k] for k in ("file", "rows", "sha256")} for r in records],
            "counts": dict(zip(classes, map(int, counts), strict=True)),
            "pixel_sum": [int(sum(r["pixel_sum"][c] for r in records)) for c in range(shape[0])],
            "pixel_sq_sum": [
                int(sum(r["pixel_sq_sum"][c] for r in records)) for c in range(shape[0])
            ],
        }
        if shard_format == "webdataset":  # a tar has no columns: the labels beside it
            splits[split]["labels"] = _write_labels(items, dst / f"{split}-labels.parquet")
    manifest = {"format": FORMAT, "classes": classes, "shape": list(shape),
                "image_size": image_size, "splits": splits}  # fmt: skip
    atomic_write(dst / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    state_path.unlink()
    return verify(str(dst), log=log)
