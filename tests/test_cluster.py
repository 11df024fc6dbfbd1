"""The search on a real multi-node Ray cluster (``ray.cluster_utils.Cluster``: a head and two
worker nodes on this machine, one CPU each), with in-memory and streamed data, and a worker
node lost while trials run on it.

Data and teacher reach every node through the object store; trial checkpoints go to the run
folder, which every node of this test cluster shares (on a real cluster: ``storage_path`` on
NFS or a bucket). A lost node's trials are retried (``search.max_failures``) on another node
from their last checkpoint.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ensure_teacher, forget_cluster_address, search_with, tiny_search_cfg
from ray import cloudpickle
from ray._private.utils import get_ray_address_file
from ray.cluster_utils import Cluster

from casd_ray.config import DataConfig, ExperimentConfig
from casd_ray.search.session import start_ray
from casd_ray.search.trial import distill_trial
from casd_ray.stream.pack import pack

EPOCHS = 5


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [c.add_node(num_cpus=1) for _ in range(2)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()
    forget_cluster_address(c.address)


def make_cfg(root: Path, images: Path, name: str, **search) -> ExperimentConfig:
    return tiny_search_cfg(
        root, images, name, num_samples=4, max_epochs=EPOCHS, max_concurrent=3,
        scheduler="fifo", algorithm="random", **search,
    )  # fmt: skip


def test_a_search_without_address_starts_its_own_ray_beside_a_running_cluster(cluster, monkeypatch):
    """CI and a compare run crashed at ray.init: a cluster started earlier on the machine (here
    the test cluster; for a user, any ``ray start --head``, even one long gone) is recorded in
    Ray's current-cluster file, and a plain ``ray.init()`` joins it (or fails to reach it).
    Without ``--address`` a search starts its own instance; joining is asked for by name."""
    import ray

    c, _ = cluster
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert Path(get_ray_address_file(None)).read_text().strip() == c.address
    try:
        assert start_ray(None, False, lambda _: None) is True
        assert ray.get_runtime_context().gcs_address != c.address
        assert ray.cluster_resources()["CPU"] == os.cpu_count()
    finally:
        ray.shutdown()


def test_streamed_search_spreads_over_nodes(cluster, tmp_path, image_tree):
    """Trials on every node read the shards themselves (here a folder all nodes see; on a
    real cluster, ``s3://``): only shard names travel through the object store."""
    c, _ = cluster
    pack(image_tree, tmp_path / "shards", shard_rows=64, log=lambda _: None)
    cfg = make_cfg(tmp_path, image_tree, "stream")
    data = DataConfig(dataset="shards", root=str(tmp_path / "shards"), val_size=40,
                      stream="stream", window=64)  # fmt: skip
    cfg = cfg.model_copy(update={"data": data})
    ensure_teacher(cfg)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    df = pd.read_parquet(search_with(cfg, slow_trial, address=c.address))
    assert len(df) == 4 and (df["status"] == "TERMINATED").all()
    assert (df["epochs"] == EPOCHS).all() and df["node_id"].nunique() >= 2


def slow_trial(config, **kwargs):
    """:func:`distill_trial`, one second slower per epoch: time to lose a node mid-trial."""
    from ray import tune

    def report(metrics, checkpoint=None):
        time.sleep(1.0)
        tune.report(metrics, checkpoint=checkpoint)

    return distill_trial(config, report=report, **kwargs)


def reported(exp: Path) -> dict[str, list[dict]]:
    """Trial folder -> every result row it has written so far (Tune's result.json)."""
    out = {}
    for f in exp.glob("*/result.json"):
        rows = []
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line being written
        out[f.parent.name] = rows
    return out


def test_search_spreads_over_nodes(cluster, tmp_path, image_tree):
    c, _ = cluster
    cfg = make_cfg(tmp_path, image_tree, "spread")
    ensure_teacher(cfg)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    df = pd.read_parquet(search_with(cfg, slow_trial, address=c.address))
    assert len(df) == 4 and df["trial_id"].is_unique
    assert (df["status"] == "TERMINATED").all() and (df["epochs"] == EPOCHS).all()
    assert df["node_id"].notna().all() and (df["node_id"] != "local").all()
    assert df["node_id"].nunique() >= 2, df["node_id"].tolist()


def waits_to_be_lost(claim: Path, workers: set[str]):
    """:func:`slow_trial`, except that the first trial to report epoch 2 on a worker node
    writes ``claim`` (its trial and node) and then waits there until the node is removed: the
    node is lost mid-trial, never after the trial has run its last epoch (removing a node
    takes seconds on a loaded machine)."""

    def trial(config, **kwargs):
        from ray import tune

        def report(metrics, checkpoint=None):
            time.sleep(1.0)
            tune.report(metrics, checkpoint=checkpoint)
            if metrics["epoch"] != 2 or metrics["node_id"] not in workers:
                return
            try:
                fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return  # another trial is the victim
            lost = {"trial_id": tune.get_context().get_trial_id(), "node": metrics["node_id"]}
            os.write(fd, json.dumps(lost).encode())
            os.close(fd)
            time.sleep(240)  # killed with its node long before this ends

        return distill_trial(config, report=report, **kwargs)

    return trial


def test_lost_node_trials_resume_from_their_checkpoints(cluster, tmp_path, image_tree):
    c, workers = cluster
    cfg = make_cfg(tmp_path, image_tree, "lost", max_failures=2)
    ensure_teacher(cfg)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    exp = cfg.run_dir / "search"
    claim = tmp_path / "victim.json"
    victim = {w.node_id: w for w in workers}
    lost: dict = {}

    def kill_a_worker_mid_trial() -> None:
        deadline = time.time() + 240
        while time.time() < deadline and not claim.exists():
            time.sleep(0.2)
        time.sleep(0.5)  # the claim's bytes follow its creation
        found = json.loads(claim.read_text()) if claim.exists() else {}
        while time.time() < deadline and found:  # its epoch 2 is on record: now lose the node
            rows = {f: r for f, r in reported(exp).items() if found["trial_id"] in f}
            if any(r and r[-1]["epoch"] == 2 for r in rows.values()):
                c.remove_node(victim[found["node"]])  # its raylet and workers die, trial too
                lost.update(trial=next(iter(rows)), node=found["node"], epoch=2)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_a_worker_mid_trial, daemon=True)
    killer.start()
    df = pd.read_parquet(search_with(cfg, waits_to_be_lost(claim, set(victim)), address=c.address))
    killer.join()
    assert lost, "no trial reached epoch 2 on a worker node"
    assert len(df) == 4 and df["trial_id"].is_unique  # every trial exactly once
    assert (df["status"] == "TERMINATED").all() and (df["epochs"] == EPOCHS).all()
    epochs = [r["epoch"] for r in reported(exp)[lost["trial"]]]
    # resumed from its checkpoint on another node: epochs go on, never back to 1
    assert epochs[: lost["epoch"]] == list(range(1, lost["epoch"] + 1))
    assert 1 not in epochs[lost["epoch"] :] and epochs[-1] == EPOCHS, epochs
    (row,) = [r for _, r in df.iterrows() if r["trial_id"] in lost["trial"]]
    assert row["node_id"] != lost["node"]  # it finished on another node
