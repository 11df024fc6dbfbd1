"""The Ray instance a search runs on: join a cluster or start one, and what it can hold.

Only an instance started here is shut down by the search. The dashboard, when asked for,
listens on 127.0.0.1 and keeps Ray 2.60's token authentication on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from casd_ray.config import SearchConfig
from casd_ray.data.splits import DataSplits
from casd_ray.errors import ConfigError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

Log = Callable[[str], None]


def dashboard_login_hint() -> str:
    """How to log into the dashboard: Ray 2.60 keeps token authentication on by default."""
    if os.environ.get(TOKEN_ENV):
        where = f"the token in ${TOKEN_ENV}"
    else:
        path = os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token"
        where = f"the token in {path}"
    return f"log in with {where} (print it with `ray get-auth-token`)"


def start_ray(address: str | None, dashboard: bool, log: Log) -> bool:
    """Connect to or start Ray; returns whether this call started it (and must stop it).

    A cluster is joined only when asked: by ``address`` or by ``RAY_ADDRESS`` (which Ray Jobs
    set). A plain ``ray.init()`` would also join whatever cluster was last started on this
    machine, recorded in Ray's current-cluster file even after it is gone; a search would then
    run on someone else's cluster, or fail to reach a dead one.
    """
    import ray

    if ray.is_initialized():
        if address or dashboard:
            log("ray: already initialised in this process; --address/--dashboard ignored")
        return False
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
        log(f"ray: joined cluster at {address}: {ray.cluster_resources()}")
        return True
    extra = {"dashboard_host": "127.0.0.1"} if dashboard else {}
    # Trial workers' own output stays in Ray's session logs: what a user needs from a trial
    # (its metrics, or its error) reaches the driver through Tune and trials.parquet, and
    # forwarding would print a SIGTERM traceback for every trial ASHA stops.
    ctx = ray.init(
        address="local",
        include_dashboard=dashboard,
        logging_level=logging.WARNING,
        log_to_driver=False,
        **extra,
    )
    if dashboard:
        log(f"ray dashboard: http://{ctx.dashboard_url} - {dashboard_login_hint()}")
    return True


def data_cpus(data: DataSplits) -> float:
    """CPUs the Ray Data tasks of one streaming trial use (``data.decode: ray_data``), else 0."""
    x = data.x_train
    return float(x.data_cpus) if getattr(x, "decode", None) == "ray_data" else 0.0


def check_resources(
    s: SearchConfig, have: dict[str, float] | None = None, data_cpus: float = 0.0
) -> None:
    """Refuse a trial size the Ray instance can never hold (Tune would wait forever).

    ``have``: the cluster's resources; by default what a local instance started here gets
    (every CPU, every visible GPU), so the check runs before Ray starts or anything is written.
    ``data_cpus``: each running trial's Ray Data decoding tasks, which run outside the trial's
    reservation; ``max_concurrent`` trials and their data tasks must fit the CPUs together,
    or they would oversubscribe the nodes (or the data tasks would wait behind trials).
    """
    if have is None:
        import torch

        have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    for name, key, want in (
        ("cpus_per_trial", "CPU", s.cpus_per_trial),
        ("gpus_per_trial", "GPU", s.gpus_per_trial),
    ):
        if want > have.get(key, 0.0):
            raise ConfigError(
                f"search.{name}: {want:g} per trial, but Ray sees {have.get(key, 0.0):g} "
                f"{key}s in total; lower search.{name}"
            )
    need = s.max_concurrent * (s.cpus_per_trial + data_cpus)
    if data_cpus and need > have.get("CPU", 0.0):
        raise ConfigError(
            f"search.max_concurrent: {s.max_concurrent} trials x ({s.cpus_per_trial:g} CPUs + "
            f"{data_cpus:g} data.data_cpus for Ray Data decoding) = {need:g} CPUs, but Ray sees "
            f"{have.get('CPU', 0.0):g}; lower search.max_concurrent or use data.decode: trial"
        )
