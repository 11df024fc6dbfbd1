"""Soak test (opt-in: ``pytest -m soak``): 30 tiny trials on 2 CPUs with injected failures.

Each trial's fault is drawn from its genome (seeded, so a rerun injects the same ones): it
raises at a random epoch, diverges (NaN loss from a huge learning rate), has its worker
process SIGKILLed at a random epoch (once: the retry resumes from the checkpoint), or runs
clean. The search must finish and account for every trial in ``trials.parquet``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
from conftest import ensure_teacher, search_with
from ray import cloudpickle

from casd_ray.config import ExperimentConfig
from casd_ray.errors import SearchInterrupted
from casd_ray.search.trial import distill_trial

pytestmark = pytest.mark.soak
TRIALS, EPOCHS = 30, 3
FAULTS = ("clean", "raise", "nan", "kill")


def fault_of(genome: dict) -> tuple[str, int]:
    """(fault, epoch it strikes at) from the genome alone: the driver can recompute it."""
    key = json.dumps({k: round(v, 6) for k, v in sorted(genome.items())}).encode()
    h = int(hashlib.sha256(key).hexdigest(), 16)
    return FAULTS[h % len(FAULTS)], 1 + (h // 7) % EPOCHS


def faulty_trial(config, **kwargs):
    """:func:`distill_trial` with the fault its genome draws (markers: ``$CASD_SOAK_MARKERS``)."""
    from ray import tune

    genome = {k: float(v) for k, v in config.items()}
    fault, at = fault_of(genome)
    if fault == "nan":
        kwargs["plan"] = dataclasses.replace(kwargs["plan"], lr=1e6)
    key = hashlib.sha256(json.dumps(genome, sort_keys=True).encode()).hexdigest()
    marker = Path(os.environ["CASD_SOAK_MARKERS"]) / key

    def report(metrics, checkpoint=None):
        if metrics["epoch"] >= at and fault == "raise":  # before the checkpoint: every retry
            raise RuntimeError(f"injected failure at epoch {at}")
        tune.report(metrics, checkpoint=checkpoint)
        if metrics["epoch"] == at and fault == "kill" and not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-trial, once

    return distill_trial(config, report=report, **kwargs)


def soak_config(tmp_path: Path, image_tree: Path) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": "soak",
            "output_dir": str(tmp_path),
            "model": {"arch": "resnet8", "width": 4},
            "data": {"dataset": "imagefolder", "root": str(image_tree), "val_size": 40},
            "teacher": {"epochs": 1, "batch_size": 32},
            "space": {"budget": {"target": 0.5}},
            "search": {
                "num_samples": TRIALS,
                "max_epochs": EPOCHS,
                "batch_size": 32,
                "max_concurrent": 2,
                "max_failures": 1,
                "algorithm": "random",
                "scheduler": "fifo",  # every trial that does not fail runs all epochs
            },
        }
    )


def check_every_trial_accounted_for(df: pd.DataFrame, markers: Path) -> None:
    assert len(df) == TRIALS and df["trial_id"].is_unique
    faults = df["genome"].map(lambda g: fault_of(json.loads(g))[0])
    counts = faults.value_counts().to_dict()
    assert all(counts.get(f, 0) >= 2 for f in FAULTS), counts  # every fault was exercised
    assert (df.loc[faults == "raise", "status"] == "ERROR").all()
    assert df.loc[faults == "raise", "error"].str.contains("injected failure").all()
    assert (df.loc[faults == "nan", "status"] == "ERROR").all()
    assert df.loc[faults == "nan", "error"].str.contains("non-finite").all()
    for fault in ("clean", "kill"):  # a killed worker's trial was retried and finished
        done = df[faults == fault]
        assert (done["status"] == "TERMINATED").all() and (done["epochs"] == EPOCHS).all(), fault
    assert len(list(markers.iterdir())) == int((faults == "kill").sum())  # each killed once


def test_search_survives_injected_failures(tmp_path, image_tree, monkeypatch):
    cfg = soak_config(tmp_path, image_tree)
    ensure_teacher(cfg)
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("CASD_SOAK_MARKERS", str(markers))  # Ray's workers inherit it
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        path = search_with(cfg, faulty_trial)
    finally:
        ray.shutdown()
    check_every_trial_accounted_for(pd.read_parquet(path), markers)


def test_search_with_failures_and_two_interrupts_resumes_to_every_trial(
    tmp_path, image_tree, monkeypatch
):
    """Issue #27's soak: the same 30 faulty trials, Ctrl-C twice mid-search (each time the
    search says it was interrupted and writes no table), resumed each time; in the end every
    trial is accounted for exactly once, as without the interrupts."""
    cfg = soak_config(tmp_path, image_tree)
    ensure_teacher(cfg)
    markers = tmp_path / "markers"
    markers.mkdir()
    monkeypatch.setenv("CASD_SOAK_MARKERS", str(markers))
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    exp = cfg.run_dir / "search"

    def ctrl_c_after(n: int) -> None:  # the driver's own Ctrl-C once n trials have finished
        def watch() -> None:
            while _ended(exp) < n:
                time.sleep(0.5)
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=watch, daemon=True).start()

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        for i, n in enumerate((8, 18)):
            ctrl_c_after(n)
            with pytest.raises(SearchInterrupted, match="search interrupted"):
                search_with(cfg, faulty_trial, resume=i > 0)
            assert not (cfg.run_dir / "trials.parquet").exists()
        path = search_with(cfg, faulty_trial, resume=True)
    finally:
        ray.shutdown()
    check_every_trial_accounted_for(pd.read_parquet(path), markers)


def _ended(exp: Path) -> int:
    """Trials Tune's saved state records as ended, failed ones included (most soak trials
    fail by design, so counting only finished ones may never reach the threshold)."""
    from ray.tune import ExperimentAnalysis

    try:
        return sum(t.status in ("TERMINATED", "ERROR") for t in ExperimentAnalysis(str(exp)).trials)
    except Exception:  # noqa: BLE001 - not written yet, or mid-write
        return 0
