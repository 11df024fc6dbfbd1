"""Streaming data (casd_ray.stream): packing, verification, bad shards, and common random
numbers — two trials of one seed see the same samples in the same order, however decoded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_image_tree

from casd_ray.data.batches import Batching, to_tensors
from casd_ray.errors import DataError
from casd_ray.stream.images import split_stream
from casd_ray.stream.pack import STATE, pack
from casd_ray.stream.shards import MANIFEST, read_manifest, verify

QUIET = {"log": lambda _: None}


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    src = write_image_tree(tmp_path_factory.mktemp("src"), per_class=30, test_per_class=5)
    dst = tmp_path_factory.mktemp("shards") / "p"
    pack(src, dst, shard_rows=25, **QUIET)
    return dst


def test_pack_writes_shards_counts_and_a_checksum(packed):
    m = read_manifest(str(packed))
    assert m.classes == ["c0", "c1", "c2", "c3"] and m.shape == (1, 8, 8)
    assert [s["rows"] for s in m.shards("train")] == [25, 25, 25, 25, 20]
    out = verify(str(packed), **QUIET)
    assert out["counts"]["train"] == {f"c{k}": 30 for k in range(4)}
    assert out["counts"]["test"] == {f"c{k}": 5 for k in range(4)}
    labels = pq.read_table(packed / "train-00000.parquet").column("label").to_numpy()
    assert len(set(labels.tolist())) > 1  # the pack's shuffle mixes classes in every shard


def test_pack_resumes_where_it_stopped(tmp_path):
    src = write_image_tree(tmp_path / "src", per_class=10, test_per_class=3)
    lines = []

    def stop_after_two(line):
        lines.append(line)
        if len(lines) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        pack(src, tmp_path / "dst", shard_rows=8, log=stop_after_two)
    assert (tmp_path / "dst" / STATE).is_file() and not (tmp_path / "dst" / MANIFEST).exists()
    first = (tmp_path / "dst" / "train-00000.parquet").stat().st_mtime_ns
    lines.clear()
    out = pack(src, tmp_path / "dst", shard_rows=8, log=lines.append)
    assert (tmp_path / "dst" / "train-00000.parquet").stat().st_mtime_ns == first  # kept
    assert out["counts"]["train"]["c0"] == 10 and not (tmp_path / "dst" / STATE).exists()


def test_repacked_shards_change_the_teacher_fingerprint(tmp_path, packed):
    """Shards packed again from other images are other data: every stage must redo, not
    reuse a teacher trained on the old ones (the manifest's shard checksums are in the
    teacher's fingerprint, and so, through ``after``, in every later stage's)."""
    from casd_ray.config import ExperimentConfig
    from casd_ray.pipeline.plan import fingerprints

    copy = tmp_path / "p"
    shutil.copytree(packed, copy)
    cfg = ExperimentConfig.model_validate({"data": {"dataset": "shards", "root": str(copy)}})
    before = fingerprints(cfg)
    assert fingerprints(cfg) == before  # reading it twice is the same data
    src = write_image_tree(tmp_path / "src", per_class=31, test_per_class=5)
    shutil.rmtree(copy)
    pack(src, copy, shard_rows=25, **QUIET)
    after = fingerprints(cfg)
    assert after["teacher"] != before["teacher"] and after["search"] != before["search"]


def test_the_stream_holds_every_kept_row_once_and_its_labels(packed):
    m = read_manifest(str(packed))
    keep = np.ones(m.rows("train"), bool)
    keep[::3] = False
    s = split_stream(m, "train", keep, window=16)
    rows = [(x, y) for x, y in s.windows(16, seed=0, epoch=0)]
    assert [len(y) for _, y in rows] == [16] * 4 + [80 - 64]
    assert len(s) == 80 and sorted(np.concatenate([y for _, y in rows])) == sorted(s.labels)
    assert rows[0][0].dtype == np.uint8 and rows[0][0].shape[1:] == (1, 8, 8)


def _epoch(stream, batching, epoch):
    x, y = to_tensors(stream, stream.labels, "cpu")
    return [(xb.clone(), yb.clone()) for xb, yb in batching.epoch(x, y, epoch)]


def test_two_trials_see_the_same_samples_in_the_same_order(packed):
    m = read_manifest(str(packed))
    batching = Batching(8, 3, "flip_crop", (0.5,), (0.25,))
    a = _epoch(split_stream(m, "train", None, window=20), batching, 1)  # trial A
    b = _epoch(split_stream(m, "train", None, window=20), batching, 1)  # trial B, own reader
    assert len(a) == batching.steps(120) == 15
    assert all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )
    other = _epoch(split_stream(m, "train", None, window=20), batching, 2)
    assert not all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a, other, strict=True))


def test_evaluation_reads_every_row_in_file_order(packed):
    m = read_manifest(str(packed))
    s = split_stream(m, "test", None, window=7)
    batching = Batching(4, 0, "none", (0.5,), (0.25,))
    ys = torch.cat([yb for _, yb in batching.evaluation(*to_tensors(s, s.labels, "cpu"))])
    assert len(ys) == 20 and sorted(ys.tolist()) == sorted(s.labels.tolist())


# ---------------------------------------------------------------- bad input: one line, the file


def test_a_truncated_image_names_its_file_and_loses_no_shard(tmp_path):
    src = write_image_tree(tmp_path / "src", per_class=10, test_per_class=3)
    bad = src / "train" / "c2" / "4.png"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(DataError, match=r"4\.png: not a readable image"):
        pack(src, tmp_path / "dst", shard_rows=8, **QUIET)
    state = json.loads((tmp_path / "dst" / STATE).read_text())
    for name in state["done"]:  # shards finished before the bad one stay, recorded
        assert (tmp_path / "dst" / name).is_file()


def test_a_class_missing_from_one_split_names_the_folder(tmp_path):
    src = write_image_tree(tmp_path / "src", per_class=4, test_per_class=2)
    shutil.rmtree(src / "test" / "c1")
    with pytest.raises(DataError, match=r"test/c1: class 'c1' is in one split"):
        pack(src, tmp_path / "dst", **QUIET)
    assert not (tmp_path / "dst").exists()


def test_a_changed_or_unreadable_shard_names_the_file(tmp_path, packed):
    copy = shutil.copytree(packed, tmp_path / "p")
    shard = copy / "train-00001.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(DataError, match=r"train-00001\.parquet: checksum differs"):
        verify(str(copy), **QUIET)
    m = read_manifest(str(copy))
    with pytest.raises(DataError, match=r"train-00001\.parquet: unreadable shard"):
        list(split_stream(m, "test", None).windows(8))  # the labels are read at once
        list(split_stream(m, "train", None).windows(8))


def test_a_shard_of_another_schema_names_the_file(tmp_path, packed):
    copy = shutil.copytree(packed, tmp_path / "p")
    pq.write_table(pa.table({"image": [b"x"], "label": [0.5]}), copy / "test-00000.parquet")
    with pytest.raises(DataError, match=r"test-00000\.parquet: schema"):
        split_stream(read_manifest(str(copy)), "test", None)


def test_a_folder_without_a_manifest_says_to_pack_it(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json: not found; pack an image folder"):
        read_manifest(str(tmp_path))


# ---------------------------------------------------------------- Ray Data decodes the same windows


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def both_decoders(root: Path, every: int, seed: int, epoch: int) -> list[int]:
    """Window sizes of an epoch read by the trial and by Ray Data, asserting them equal."""
    m = read_manifest(str(root))
    keep = np.arange(m.rows("train")) % every != 0
    mine = list(split_stream(m, "train", keep, window=32).windows(32, seed, epoch))
    ray_data = split_stream(m, "train", keep, window=32, decode="ray_data")
    theirs = list(ray_data.windows(32, seed, epoch))
    assert [len(y) for _, y in mine] == [len(y) for _, y in theirs]
    for (xa, ya), (xb, yb) in zip(mine, theirs, strict=True):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    return [len(y) for _, y in mine]


def test_ray_data_decodes_the_same_windows_as_the_trial(packed, ray_local):
    assert both_decoders(packed, every=4, seed=5, epoch=2) == [32, 32, 26]


# ---------------------------------------------------------------- WebDataset tar shards


@pytest.fixture(scope="module")
def packed_tar(tmp_path_factory) -> Path:
    src = write_image_tree(tmp_path_factory.mktemp("src"), per_class=30, test_per_class=5)
    dst = tmp_path_factory.mktemp("shards") / "w"
    pack(src, dst, shard_rows=25, shard_format="webdataset", **QUIET)
    return dst


def test_a_webdataset_pack_streams_what_the_parquet_pack_does(packed, packed_tar):
    """The same folder packed as WebDataset tars: the same counts, and every window of an
    epoch the same images and labels in the same order as from Parquet (common random
    numbers do not depend on the shard format)."""
    assert sorted(p.name for p in packed_tar.glob("train-*.tar")) == [
        f"train-{k:05d}.tar" for k in range(5)
    ]
    assert verify(str(packed_tar), **QUIET)["counts"] == verify(str(packed), **QUIET)["counts"]
    a = split_stream(read_manifest(str(packed)), "train", None, window=32)
    b = split_stream(read_manifest(str(packed_tar)), "train", None, window=32)
    assert np.array_equal(a.labels, b.labels)
    for (xa, ya), (xb, yb) in zip(a.windows(32, 3, 1), b.windows(32, 3, 1), strict=True):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_webdataset_shards_follow_the_convention(packed_tar, tmp_path):
    """One sample per key, ``<key>.cls`` the label and ``<key>.png`` the source file's bytes,
    members adjacent and named in order: what the ``webdataset`` library and Ray Data's
    ``read_webdataset`` expect."""
    import tarfile

    with tarfile.open(packed_tar / "train-00000.tar") as tar:
        names = tar.getnames()
        label = int(tar.extractfile(names[0]).read())
    assert names[:2] == ["00000000.cls", "00000000.png"] and names == sorted(names)
    assert len(names) == 50 and 0 <= label < 4
    src = write_image_tree(tmp_path / "src", per_class=30, test_per_class=5)
    again = pack(src, tmp_path / "again", shard_rows=25, shard_format="webdataset", **QUIET)
    assert again == verify(str(packed_tar), **QUIET)  # the same folder packs to the same bytes


def test_a_webdataset_stream_starts_without_reading_its_tars(tmp_path, packed_tar):
    """The labels come from the pack's small label file: with every tar gone the stream is
    still set up (and fails only when it reads one, naming it); a label file that disagrees
    with the tars' ``.cls`` members fails verification."""
    copy = tmp_path / "w"
    shutil.copytree(packed_tar, copy)
    for tar in copy.glob("train-*.tar"):
        tar.unlink()
    s = split_stream(read_manifest(str(copy)), "train", None, window=32)
    assert len(s) == 120 and np.bincount(s.labels).tolist() == [30] * 4
    with pytest.raises(DataError, match=r"train-0000\d\.tar: not readable"):
        next(iter(s.windows(32, seed=0, epoch=0)))
    shutil.rmtree(copy)
    shutil.copytree(packed_tar, copy)
    table = pq.read_table(copy / "train-labels.parquet")
    labels = table.column("label").to_numpy().copy()
    labels[:3] = (labels[:3] + 1) % 4
    pq.write_table(table.set_column(1, "label", pa.array(labels, pa.int32())),
                   copy / "train-labels.parquet")  # fmt: skip
    with pytest.raises(DataError, match=r"train-labels\.parquet: checksum differs"):
        verify(str(copy), **QUIET)


def test_ray_data_reads_webdataset_shards_as_the_trial_does(packed_tar, ray_local):
    """The trial parses tars itself; Ray Data reads them with ``read_webdataset``: the two
    must give the same windows."""
    assert both_decoders(packed_tar, every=3, seed=2, epoch=0) == [32, 32, 16]


def test_a_bad_webdataset_shard_names_the_file(tmp_path, packed_tar, ray_local):
    import io
    import tarfile

    copy = tmp_path / "w"
    shutil.copytree(packed_tar, copy)
    shard = copy / "train-00002.tar"
    shard.write_bytes(shard.read_bytes()[:700])  # truncated
    with pytest.raises(DataError, match=r"train-00002\.tar: checksum differs"):
        verify(str(copy), **QUIET)
    m = read_manifest(str(copy))
    with pytest.raises(DataError, match=r"train-00002\.tar: unreadable shard"):
        list(split_stream(m, "train", None, window=32).windows(32))
    shutil.copy(packed_tar / shard.name, shard)
    with tarfile.open(shard.with_name("train-00003.tar")) as tar:  # cut between samples
        cut = tar.getmembers()[20].offset
    shard = shard.with_name("train-00003.tar")
    shard.write_bytes(shard.read_bytes()[:cut])
    with pytest.raises(DataError, match=r"train-00003\.tar: 10 rows, manifest.json says 25"):
        list(split_stream(m, "train", None, window=32).windows(32, seed=0, epoch=0))
    with pytest.raises(DataError, match=r"Ray Data read 105 of 120 rows"):
        list(split_stream(m, "train", None, window=32, decode="ray_data").windows(32))
    with tarfile.open(copy / "test-00000.tar", "w") as tar:  # a sample without its label
        info = tarfile.TarInfo("00000000.png")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"png"))
    with pytest.raises(DataError, match=r"test-00000\.tar: sample 00000000 has no \.cls"):
        list(split_stream(m, "test", None, window=32).windows(32))


# ---------------------------------------------------------------- shards in a bucket (moto S3)


@pytest.fixture
def bucket(monkeypatch):
    """moto's S3 server on a free loopback port (started and stopped here by its pid)."""
    import socket
    import subprocess
    import sys
    import time

    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    try:
        client = boto3.client("s3")
        for _ in range(100):
            try:
                client.create_bucket(Bucket="shards")
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.1)
        yield client
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_shards_stream_from_a_bucket(packed, bucket):
    for f in packed.iterdir():
        bucket.upload_file(str(f), "shards", f"p/{f.name}")
    uri = "s3://shards/p"
    assert verify(uri, **QUIET) == verify(str(packed), **QUIET)
    local = split_stream(read_manifest(str(packed)), "train", None, window=32)
    remote = split_stream(read_manifest(uri), "train", None, window=32)
    for (xa, ya), (xb, yb) in zip(local.windows(32, 1, 0), remote.windows(32, 1, 0), strict=True):
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)


def test_a_stream_read_in_part_stops_its_reader_thread():
    import threading
    import time

    from casd_ray.stream.decode import prefetched

    it = prefetched(iter(range(100)))
    assert next(it) == 0 and next(it) == 1
    it.close()  # BN recalibration stops after a few batches
    time.sleep(0.5)
    assert not any(t.name == "casd-prefetch" and t.is_alive() for t in threading.enumerate())


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["pack", "{tmp}/nowhere", "{tmp}/dst"], "nowhere/train: no such folder"),
        (["verify", "{tmp}"], "manifest.json: not found"),
    ],
)
def test_the_data_commands_fail_in_one_line(tmp_path, args, names):
    import subprocess
    import sys

    argv = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run([sys.executable, "-m", "casd_ray.cli", "data", *argv],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2 and names in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "dst").exists()
