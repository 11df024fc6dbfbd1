"""Following a search in the Ray dashboard, with Ray 2.60's token authentication kept on.

A local Ray instance with its dashboard (127.0.0.1) and a known Prometheus export port runs a
small search. Without the token the dashboard's API refuses; with it, it lists the trial
actors (their ``repr`` is the trainable's name); each trial's gauges (``casd_trial_*``) appear
on Ray's metrics endpoint tagged with the trial id.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import ray
from conftest import (
    ensure_teacher,
    forget_cluster_address,
    search_with,
    tiny_search_cfg,
    write_fake_fashion_mnist,
    write_run_config,
)
from ray import cloudpickle
from ray._private.authentication.authentication_token_setup import (
    enable_token_auth_by_default,
    ensure_token_if_auth_enabled,
)
from ray.cluster_utils import Cluster

from casd_ray.search.trial import EXPORTED, distill_trial


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_dashboard():
    """A head node with its dashboard, every port picked free: another Ray instance on the
    machine (a search someone runs) holds Ray's fixed defaults (dashboard 8265, job agent
    52365), and ``ray.init`` cannot move the agent - jobs then found "No available agent"."""
    dash, agent, metrics = free_port(), free_port(), free_port()
    head = {"num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": dash, "dashboard_agent_listen_port": agent,
            "metrics_export_port": metrics}  # fmt: skip
    # what ray.init does before it starts a new local cluster: token mode, a token on disk
    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    cluster = Cluster(initialize_head=True, head_node_args=head)
    ray.init(address=cluster.address)
    yield f"http://127.0.0.1:{dash}", f"http://127.0.0.1:{metrics}/metrics"
    ray.shutdown()
    cluster.shutdown()
    forget_cluster_address(cluster.address)


def token() -> str:
    """Where Ray 2.60 keeps the token: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"]
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).read_text().strip()


def get(url: str, auth: bool) -> tuple[int, str]:
    req = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {token()}"} if auth else {}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def slow_trial(config, **kwargs):
    """:func:`distill_trial`, two seconds slower per epoch: time to look at it running."""
    from ray import tune

    def report(metrics, checkpoint=None):
        time.sleep(2.0)
        tune.report(metrics, checkpoint=checkpoint)

    return distill_trial(config, report=report, **kwargs)


def test_dashboard_needs_the_token(ray_dashboard):
    dashboard, _ = ray_dashboard
    assert get(f"{dashboard}/api/v0/actors", auth=False)[0] == 401
    status, body = get(f"{dashboard}/api/v0/actors", auth=True)
    assert status == 200 and json.loads(body)["result"]


def test_trials_show_as_actors_and_export_their_metrics(ray_dashboard, tmp_path, image_tree):
    dashboard, metrics_url = ray_dashboard
    cfg = tiny_search_cfg(tmp_path, image_tree, "watched", num_samples=2, max_epochs=8)
    ensure_teacher(cfg)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    seen: dict[str, object] = {}

    def watch() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not ("actors" in seen and "metrics" in seen):
            status, body = get(f"{dashboard}/api/v0/actors?detail=1&limit=1000", auth=True)
            if status == 200:
                alive = [
                    a
                    for a in json.loads(body)["data"]["result"]["result"]
                    if a.get("state") == "ALIVE" and a.get("repr_name") == "slow_trial"
                ]
                if alive:
                    seen["actors"] = alive
            try:
                with urllib.request.urlopen(metrics_url, timeout=10) as resp:
                    text = resp.read().decode()
            except OSError:
                text = ""
            found = re.findall(r'^ray_casd_trial_val_acc\{[^}]*trial_id="([0-9a-f_]+)"', text, re.M)
            if found:
                seen["metrics"], seen["text"] = set(found), text
            time.sleep(1.0)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    df = pd.read_parquet(search_with(cfg, slow_trial))
    watcher.join()
    assert seen.get("actors"), "no trial actor was listed while the search ran"
    assert seen.get("metrics"), "no trial gauge reached Ray's metrics endpoint"
    assert seen["metrics"] <= set(df["trial_id"])  # tagged with the trials' own ids
    for key in EXPORTED:
        assert f"ray_casd_trial_{key}" in seen["text"]


def _submit(client, entrypoint: str, wait_s: float = 120) -> str:
    """Submit a job, retrying while the head's job agent has not registered yet: on a loaded
    machine the dashboard answers 500 "No available agent to submit job, please try again
    later" for a while after the cluster starts (Ray's own advice is to retry)."""
    deadline = time.time() + wait_s
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)


def test_a_search_submitted_as_a_ray_job_runs_to_the_end(ray_dashboard, tmp_path):
    """``ray job submit -- casd-ray run CONFIG --address auto``, as on a cluster: the job
    succeeds, its log (on the dashboard's Jobs page) holds our progress lines, and the run
    folder is complete."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    dashboard, _ = ray_dashboard
    data = write_fake_fashion_mnist(tmp_path / "data", n=80, n_test=20)
    config = write_run_config(
        tmp_path / "job.yaml", tmp_path / "runs", data,
        search={"num_samples": 2, "max_epochs": 1, "batch_size": 32},
        audit={"top_k": 0},
    )  # fmt: skip
    client = JobSubmissionClient(dashboard, headers={"Authorization": f"Bearer {token()}"})
    job = _submit(client, f"{sys.executable} -m casd_ray.cli run {config} --address auto")
    deadline = time.time() + 400
    while not client.get_job_status(job).is_terminal() and time.time() < deadline:
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    assert "stage 5/5 report" in logs and "trial " in logs
    run = tmp_path / "runs" / "r"
    assert (run / "trials.parquet").is_file() and (run / "report.md").is_file()
    assert len(pd.read_parquet(run / "trials.parquet")) == 2
