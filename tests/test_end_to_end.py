"""`casd-ray run` through the real command line on tiny data; every output file is checked.

Runs in a subprocess exactly as a user would (own Ray instance, own process), then reruns to
check that finished stages are reused, and rebuilds the report with `casd-ray report`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import smoke_overrides
from PIL import Image

from casd_ray import load_compressed
from casd_ray.artifacts.network import load_torchscript
from casd_ray.artifacts.trials import COLUMNS
from casd_ray.config_file import load_config

CONFIG = Path(__file__).parent.parent / "experiments" / "fashion_mnist_resnet56.yaml"


def cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "casd_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    overrides = smoke_overrides(CONFIG, base)
    sets = [a for item in overrides for a in ("--set", item)]
    first = cli("run", str(CONFIG), *sets)
    cfg = load_config(CONFIG, overrides)
    return cfg, sets, first


def test_every_output_file(finished_run):
    cfg, _, first = finished_run
    run = cfg.run_dir
    assert "stage 5/5 report" in first.stdout
    assert load_config(run / "config.yaml") == cfg  # the resolved config reproduces the run
    trials = pd.read_parquet(run / "trials.parquet")
    assert list(trials.columns) == COLUMNS and len(trials) == cfg.search.num_samples
    assert trials["is_control"].sum() == 1
    for name in ("teacher", "winner", "uniform"):
        for f in ("model.pt", "widths.json", "metrics.json"):
            assert (run / name / f).is_file(), (name, f)
    for png in ("pareto.png", "progress.png"):
        with Image.open(run / png) as img:
            assert img.format == "PNG" and img.size[0] > 0 and img.size[1] > 0
    report = json.loads((run / "report.json").read_text())
    for name in ("teacher", "uniform", "winner"):
        m = report["models"][name]
        assert {"test_acc", "val_acc", "flops", "params", "latency"} <= set(m)
        assert m["flops"] == m["flops_measured"]
    assert report["models"]["winner"]["flops_ratio"] <= cfg.space.budget.target
    assert 0 < report["flops_reduction"] < 1
    for key in ("trials", "completed", "early_stopped", "failed", "wall_time_s", "searcher"):
        assert key in report["search"]
    assert report["search"]["failed"] == 0
    md = (run / "report.md").read_text()
    assert f"casd-ray run {run / 'config.yaml'}" in md and "| winner |" in md


def test_exports_reload_and_reproduce_outputs(finished_run):
    cfg, _, _ = finished_run
    x = torch.randn(6, 1, 28, 28)
    for name in ("winner", "uniform"):
        folder = cfg.run_dir / name
        model = load_compressed(folder)
        again = load_compressed(folder / "model.pt")
        with torch.no_grad():
            out = model(x)
            assert out.shape == (6, 10)
            assert torch.equal(out, again(x))
            torch.testing.assert_close(load_torchscript(folder)(x), out, rtol=0, atol=1e-6)


def test_rerun_reuses_finished_stages_and_report_rebuilds(finished_run):
    cfg, sets, _ = finished_run
    run = cfg.run_dir
    stamp = (run / "winner" / "model.pt").stat().st_mtime_ns
    (run / "report.md").unlink()
    second = cli("run", str(CONFIG), *sets)
    assert "stage 1/5 teacher: reusing" in second.stdout
    assert "stage 3/5 finetune: reusing" in second.stdout
    assert (run / "winner" / "model.pt").stat().st_mtime_ns == stamp
    assert (run / "report.md").is_file()
    (run / "pareto.png").unlink()
    cli("report", str(run))
    assert (run / "pareto.png").stat().st_size > 0


@pytest.mark.slow
def test_a_latency_budget_end_to_end(tmp_path):
    """A run under a measured latency budget: the model kept, trials repaired onto it, the
    finals measured and reported. The smoke ResNet-8 of width 4 is mostly per-layer overhead
    (its narrowest network measures ~0.8 of it at batch 8), hence batch 32 and target 0.95."""
    latency = {
        "space.budget.metric": "latency", "space.budget.target": 0.95,
        "space.budget.latency.runtime": "torch", "space.budget.latency.batch_size": 32,
        "space.budget.latency.fit_networks": 4, "space.budget.latency.check_networks": 4,
        "space.budget.latency.min_run_time": 0.02, "search.controls": "[uniform]",
    }  # fmt: skip
    overrides = smoke_overrides(CONFIG, tmp_path) + [f"{k}={v}" for k, v in latency.items()]
    cli("run", str(CONFIG), *[a for item in overrides for a in ("--set", item)])
    run = load_config(CONFIG, overrides).run_dir
    kept = json.loads((run / "latency.json").read_text())
    assert kept["model"]["runtime"] == "torch" and kept["model"]["error"]["networks"] == 4
    trials = pd.read_parquet(run / "trials.parquet")
    assert trials["meets_budget"].all()  # repaired onto the predicted budget
    lat = json.loads((run / "report.json").read_text())["budget_latency"]
    assert set(lat["measured"]) == {"teacher", "uniform", "winner"}
    winner = lat["measured"]["winner"]  # judged round by round, the rounds kept as evidence
    assert lat["winner_meets_budget"] == winner["within_budget"]
    assert 0 <= winner["rounds_within"] <= winner["rounds"] == len(winner["rounds_ms"])
    assert "## Latency budget" in (run / "report.md").read_text()
    assert (run / "latency.png").is_file()
