"""A search whose checkpoints and Tune state live in a bucket (``search.storage_path``), against
a local S3-compatible server (moto in server mode on 127.0.0.1, started and stopped here by
its pid); the driver is killed mid-search and the rerun resumes from the bucket."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest
import ray
from conftest import ensure_teacher, kill_search_midway, tiny_search_cfg

from casd_ray import errors
from casd_ray.artifacts.trials import TRIALS_FILE
from casd_ray.config import ExperimentConfig
from casd_ray.config_file import save_config
from casd_ray.errors import UntrustedRunError
from casd_ray.pipeline.run import execute
from casd_ray.search import restore_point, trust
from casd_ray.search.storage import SearchStorage

BUCKET = "casd-test"


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on a free loopback port; AWS_* pointed at it for us and Ray's workers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        client = boto3.client("s3")
        for _ in range(100):
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - the server is still starting
                time.sleep(0.1)
        # after the env: workers inherit it
        ray.init(address="local", num_cpus=2, include_dashboard=False)
        yield client, ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(timeout=30)


def make_cfg(root: Path, images: Path, name: str) -> ExperimentConfig:
    bucket = f"s3://{BUCKET}/runs"
    return tiny_search_cfg(
        root, images, name, num_samples=6, max_epochs=6, scheduler="fifo", storage_path=bucket
    )


def keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_search_in_a_bucket_survives_a_killed_driver(s3, tmp_path, image_tree):
    client, address = s3
    cfg = make_cfg(tmp_path, image_tree, "bucket")
    ensure_teacher(cfg)
    save_config(cfg, tmp_path / "bucket.yaml")
    store = SearchStorage.of(cfg.run_dir, cfg.search.storage_path)
    assert store.uri == f"s3://{BUCKET}/runs/bucket/search"
    log = tmp_path / "driver.log"
    early: dict[str, bytes] = {}  # the searcher's first saved state, as a torn copy leaves it

    def keep_early_searcher_state() -> None:
        for key in keys(client, "runs/bucket/search/"):
            name = key.rsplit("/", 1)[1]
            if name.startswith(("searcher-state-", "search_gen_state-")) and name not in early:
                early[name] = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()

    done = kill_search_midway(
        tmp_path / "bucket.yaml", address, store.uri, log, on_poll=keep_early_searcher_state
    )
    assert len(done) >= 2, log.read_text()[-2000:]
    assert not (cfg.run_dir / TRIALS_FILE).exists(), "the driver finished before it was killed"
    assert len(done) < 6, "every trial had finished before the kill: nothing to resume"
    stored = keys(client, "runs/bucket/search/")
    assert any("/checkpoint_" in k for k in stored)  # checkpoints went to the bucket
    assert "runs/bucket/search/casd-tuner-signature.json" in stored
    assert not (cfg.run_dir / "search").exists()  # ... and not to the run folder

    # Tune copies its state to the bucket file by file: a driver killed mid-copy can leave the
    # searcher's state behind the trial list (it met a trial it never proposed: KeyError).
    # Put that case in place for certain: the searcher's files as they were at the start.
    assert len(early) == 2, sorted(early)
    for name, body in early.items():
        client.put_object(Bucket=BUCKET, Key=f"runs/bucket/search/{name}", Body=body)

    lines: list[str] = []
    execute(cfg, ["search"], log=lines.append)  # the same command again: resumes
    assert any(ln.startswith(f"search: resuming {store.uri}") for ln in lines), lines
    assert any("restore point" in ln for ln in lines), lines  # the torn copy was repaired
    df = pd.read_parquet(cfg.run_dir / TRIALS_FILE).set_index("trial_id")
    assert len(df) == 6 and df.index.is_unique
    assert (df["status"] == "TERMINATED").all() and (df["epochs"] == 6).all()
    for trial_id, last in done.items():  # kept, not rerun
        assert df.loc[trial_id, "end_time"] == pytest.approx(last["timestamp"])

    # the state in the bucket is checked like a local one: changed, it is refused
    state = next(k for k in keys(client, "runs/bucket/search/") if "experiment_state" in k)
    client.put_object(Bucket=BUCKET, Key=state, Body=b"{}")
    with pytest.raises(UntrustedRunError, match=f"s3://{BUCKET}/runs/bucket/search"):
        store.verify()


def test_storage_places_the_experiment(tmp_path):
    run = tmp_path / "runs" / "r1"
    assert SearchStorage.of(run, None).uri == f"{run}/search"  # the run folder, as always
    nfs = SearchStorage.of(run, str(tmp_path / "nfs"))
    assert nfs.uri == f"{tmp_path}/nfs/r1/search" and not nfs.remote
    assert SearchStorage.of(run, "gs://b/p/").uri == "gs://b/p/r1/search"
    (tmp_path / "nfs" / "r1" / "search").mkdir(parents=True)
    (tmp_path / "nfs" / "r1" / "search" / "tuner.pkl").write_bytes(b"x")
    lines: list[str] = []
    nfs.set_aside(lines.append)  # an old experiment is moved aside, never deleted
    assert not nfs.exists()
    (aside,) = (tmp_path / "nfs" / "r1" / "previous").iterdir()
    assert (aside / "tuner.pkl").read_bytes() == b"x" and str(aside) in lines[0]


def test_signatures_cover_the_last_few_versions(tmp_path, monkeypatch):
    """A state file one snapshot behind its signatures (a copy cut short) still verifies; a
    version older than the kept ones, or one never signed, does not."""

    monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "key"))
    folder = tmp_path / "exp"
    folder.mkdir()
    state = folder / "experiment_state.json"
    versions = [f'{{"v": {i}}}'.encode() for i in range(trust.KEEP_VERSIONS + 1)]
    for v in versions:
        state.write_bytes(v)
        trust.sign(folder)
    for v in versions[1:]:
        state.write_bytes(v)
        trust.verify(folder)
    for bad in (versions[0], b'{"v": "never signed"}'):
        state.write_bytes(bad)
        with pytest.raises(errors.UntrustedRunError, match="experiment_state.json"):
            trust.verify(folder)


def test_restore_point_puts_back_one_whole_snapshot(tmp_path, monkeypatch):
    """The restore point (written before Tune's file-by-file copy) replaces whatever files a
    cut-short copy left from another snapshot; one not signed by this user writes nothing."""
    import pyarrow.fs as pafs

    monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "key"))
    staging, storage = tmp_path / "staging", tmp_path / "storage"
    staging.mkdir()
    storage.mkdir()
    assert restore_point.repair(str(storage), trusted=False, log=print) == []  # none yet

    def save(version: int) -> None:  # what one Tune save + StateCallback.get_state leave
        (staging / "experiment_state-s.json").write_text(f'{{"trials": {version}}}')
        (staging / "searcher-state-s.pkl").write_bytes(b"searcher %d" % version)
        trust.sign(staging)
        restore_point.write(staging, pafs.LocalFileSystem(), str(storage))

    save(1)
    for p in staging.iterdir():  # Tune's copy of snapshot 1 completes
        (storage / p.name).write_bytes(p.read_bytes())
    save(2)  # ... and of snapshot 2 only the trial list arrives
    (storage / "experiment_state-s.json").write_bytes(
        (staging / "experiment_state-s.json").read_bytes()
    )
    lines: list[str] = []
    assert restore_point.repair(str(storage), trusted=False, log=lines.append) == [
        "casd-signatures.json",
        "searcher-state-s.pkl",
    ]
    assert (storage / "searcher-state-s.pkl").read_bytes() == b"searcher 2"
    assert "searcher-state-s.pkl" in lines[0]
    trust.verify(storage)  # the repaired folder verifies
    assert restore_point.repair(str(storage), trusted=False, log=print) == []  # idempotent

    (storage / "searcher-state-s.pkl").write_bytes(b"searcher 1")
    monkeypatch.setenv(trust.KEY_ENV, str(tmp_path / "someone-else"))
    with pytest.raises(errors.UntrustedRunError, match=f"{restore_point.NAME}: experiment_state"):
        restore_point.repair(str(storage), trusted=False, log=print)
    assert (storage / "searcher-state-s.pkl").read_bytes() == b"searcher 1"  # nothing written
    assert restore_point.repair(str(storage), trusted=True, log=print)  # --trust-run-folder

    (storage / restore_point.NAME).write_bytes(b"not a zip")
    with pytest.raises(errors.UntrustedRunError, match=f"{restore_point.NAME}: unreadable"):
        restore_point.repair(str(storage), trusted=True, log=print)


def test_a_search_stopped_before_its_first_snapshot_is_not_restorable(tmp_path):
    """D2 (late0): Ctrl-C after Tune wrote ``tuner.pkl`` but before its first experiment
    snapshot. ``Tuner.can_restore`` says yes, and restoring (or counting its trials) then
    fails with Tune's "No experiment snapshot file"; such a search has nothing to resume."""
    from ray import tune

    store = SearchStorage.of(tmp_path / "run", None)
    folder = Path(store.uri)
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"")
    assert tune.Tuner.can_restore(store.uri)
    assert not store.restorable()
    (folder / "experiment_state-2026-12-05_07-00-00.json").write_text('{"trial_data": ["t1"]}')
    assert store.restorable()


def test_a_search_stopped_before_its_first_trial_is_not_restorable(tmp_path):
    """CI (late0): a Ctrl-C before Tune added its first trial still saves a snapshot, with no
    trials. The signing callback learns where Tune stages its state from the first trial, so
    that snapshot is unsigned and the resume refused it as "not signed by this user". It holds
    nothing to resume: the next run starts afresh (the folder set aside, not loaded)."""
    store = SearchStorage.of(tmp_path / "run", None)
    folder = Path(store.uri)
    folder.mkdir(parents=True)
    (folder / "tuner.pkl").write_bytes(b"")
    state = folder / "experiment_state-2026-12-05_07-00-00.json"
    state.write_text('{"trial_data": [], "runner_data": {}}')
    assert not store.restorable()
    # the newest snapshot decides: an older one with trials does not make it restorable
    (folder / "experiment_state-2026-12-05_06-00-00.json").write_text('{"trial_data": ["t"]}')
    assert not store.restorable()
    state.write_text('{"trial_data": ["t1"], "runner_data": {}}')
    assert store.restorable()


def test_every_snapshot_that_holds_a_trial_is_signed_from_the_first(tmp_path):
    """CI (late0, third cause): Ray 2.60 never calls a callback's ``on_trial_add``, and Tune
    takes its first snapshot in the step that adds the first trials, after ``on_step_begin``
    saw none. The signing callback did not yet know where Tune stages its state, so that
    snapshot went unsigned, as did the final one after a Ctrl-C in that step: the resume
    refused the folder as "not signed by this user"."""
    from ray import tune

    signed: list[bool] = []

    class Probe(restore_point.StateCallback):
        def get_state(self) -> None:
            super().get_state()
            if self.trials:  # Tune's own list: it holds the trials added later in the step
                staging = Path(self.trials[0].storage.experiment_driver_staging_path)
                try:
                    trust.verify(staging)
                    signed.append(True)
                except UntrustedRunError:
                    signed.append(False)

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=1, include_dashboard=False)
    try:
        tune.Tuner(
            lambda config: {"score": config["x"]},
            param_space={"x": tune.grid_search([1, 2])},
            run_config=tune.RunConfig(
                name="probe", storage_path=str(tmp_path), verbose=0, callbacks=[Probe()]
            ),
        ).fit()
    finally:
        if started:
            ray.shutdown()
    assert signed and all(signed), signed


def test_storage_path_is_checked_before_anything_runs(tmp_path):
    """D14: `search.storage_path=foo://x` was only refused after the teacher had trained."""
    from casd_ray.errors import ConfigError
    from casd_ray.search.storage import check_storage

    run = tmp_path / "runs" / "r"
    for fine in (None, str(tmp_path / "shared"), f"file://{tmp_path}/shared"):
        check_storage(run, fine)
    assert not (tmp_path / "shared").exists()  # a check writes nothing
    for bad, needle in (("foo://x", "Unrecognized filesystem"), ("/proc/x", "not writable")):
        with pytest.raises(ConfigError, match=rf"^search.storage_path: .*{needle}"):
            check_storage(run, bad)
