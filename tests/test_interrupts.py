"""Interrupted runs: the driver killed (SIGKILL), stopped with Ctrl-C (SIGINT) or SIGTERM in
each stage, then the same command again. Every run is a real `casd-ray run` subprocess with
its own Ray instance, in its own process group (we kill exactly what we started).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_fake_fashion_mnist, write_run_config

from casd_ray.artifacts.trials import read_trials

NUM_SAMPLES = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("interrupts")
    data = write_fake_fashion_mnist(base / "data", n=1500, n_test=100)
    config = write_run_config(
        base / "c.yaml",
        base / "runs",
        data,
        name="ref",
        data={"val_size": 100},
        teacher={"epochs": 6, "batch_size": 64},
        search={
            "num_samples": NUM_SAMPLES,
            "max_epochs": 3,
            "batch_size": 64,
            "max_concurrent": 1,
            "scheduler": "fifo",
            "train_subset": 600,
        },
        finetune={"epochs": 6, "batch_size": 64},
        audit={"top_k": 0},
    )
    reference = _run(config, "name=ref")
    assert reference.returncode == 0, reference.stderr[-2000:]
    return config, base / "runs"


def _cmd(config: Path, name: str) -> list[str]:
    return [sys.executable, "-m", "casd_ray.cli", "run", str(config), "--set", name]


def _run(config: Path, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(config, name), capture_output=True, text=True, timeout=600)


def _start(config: Path, name: str, log: Path, sigint_ignored: bool = False) -> subprocess.Popen:
    """The driver, as from a terminal; ``sigint_ignored``: as a shell script's background job
    (``cmd &``), which inherits SIGINT ignored. Set either way, since pytest itself may run
    as such a job."""
    disposition = signal.SIG_IGN if sigint_ignored else signal.SIG_DFL
    return subprocess.Popen(
        _cmd(config, name),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, disposition),
    )


def _wait_for(proc: subprocess.Popen, log: Path, needle: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if needle in log.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"{needle!r} never appeared:\n{log.read_text()[-2000:]}")


def _signal(proc: subprocess.Popen, log: Path, needle: str, sig: int) -> int:
    """Send ``sig`` to the driver once ``needle`` is in its log; its exit code. Whatever
    is left of its process group afterwards is killed (we started it)."""
    try:
        _wait_for(proc, log, needle)
        os.kill(proc.pid, sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _report(run: Path) -> dict:
    return json.loads((run / "report.json").read_text())


def _shape(obj):
    """Keys of nested dicts (values dropped): 'the same report fields'."""
    if isinstance(obj, dict):
        return {k: _shape(v) for k, v in obj.items() if k not in ("run_dir", "reproduce")}
    return None


@pytest.mark.parametrize(
    "stage, needle",
    [
        ("teacher", "teacher epoch 2/6"),
        ("search", "finished: val_acc"),
        ("finetune", "winner epoch 2/6"),
    ],
)
def test_sigkill_in_a_stage_then_the_same_command(setup, tmp_path, stage, needle):
    config, runs = setup
    name = f"name=kill-{stage}"
    log = tmp_path / "driver.log"
    proc = _start(config, name, log)
    try:
        _wait_for(proc, log, needle)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    run = runs / f"kill-{stage}"
    assert not (run / "report.json").exists(), "the run finished before the kill"

    again = _run(config, name)
    assert again.returncode == 0, again.stderr[-2000:]
    if stage != "teacher":
        assert "teacher: reusing" in again.stdout
    if stage == "finetune":
        assert "search: reusing" in again.stdout and "winner: resuming" in again.stdout
    trials = read_trials(run / "trials.parquet")
    assert len(trials) == NUM_SAMPLES and trials["trial_id"].is_unique
    assert (trials["status"] == "TERMINATED").all() and trials["completed"].all()
    ref, got = _report(runs / "ref"), _report(run)
    assert _shape(got) == _shape(ref)
    # a resumed teacher or fine-tune continues exactly where it stopped (same seed, batches)
    assert got["models"]["teacher"]["test_acc"] == ref["models"]["teacher"]["test_acc"]
    if stage != "search":  # FIFO, one trial at a time: the same trials, the same winner
        for part in ("winner", "uniform"):
            assert got["models"][part]["test_acc"] == ref["models"][part]["test_acc"]


def test_ctrl_c_during_search_exits_130_and_is_never_fine_tuned(setup, tmp_path):
    config, runs = setup
    log = tmp_path / "driver.log"
    proc = _start(config, "name=sigint", log)
    # the driver only, as a terminal's Ctrl-C reaches it
    code = _signal(proc, log, "finished: val_acc", signal.SIGINT)
    text = log.read_text()
    run = runs / "sigint"
    assert code == 130, text[-2000:]
    assert "search interrupted" in text and "resume with: casd-ray run" in text
    assert not (run / "trials.parquet").exists() and not (run / "winner").exists()
    assert not (run / "report.json").exists()
    assert json.loads((run / "stages.json").read_text())["search"]["status"] == "running"

    again = _run(config, "name=sigint")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "search: resuming" in again.stdout
    trials = read_trials(run / "trials.parquet")
    assert len(trials) == NUM_SAMPLES and trials["trial_id"].is_unique
    assert (run / "report.json").is_file()


def test_one_ctrl_c_in_the_finetune_after_a_search_stops_the_run(setup, tmp_path):
    # Ray Tune's SIGINT handler must not outlive the search: it would swallow the first Ctrl-C
    config, runs = setup
    log = tmp_path / "driver.log"
    proc = _start(config, "name=sigint-ft", log)
    code = _signal(proc, log, "winner epoch 1/6", signal.SIGINT)
    text = log.read_text()
    assert code == 130, text[-2000:]
    assert "resume with: casd-ray run" in text and "Traceback" not in text
    assert "Stop signal received" not in text
    assert not (runs / "sigint-ft" / "report.json").exists()


@pytest.mark.parametrize(
    "name, needle, sigint_ignored, kept",
    [
        ("sigterm", "teacher epoch 1/6", False, "teacher/last.pt"),
        # ray.init replaced the handler (sys.exit) and its shutdown left SIGTERM fatal
        ("sigterm-search", "finished: val_acc", False, "search"),
        # ... and a script's background job (SIGINT ignored) swallowed SIGTERM
        ("sigterm-bg-ft", "winner epoch 1/6", True, "winner/last.pt"),
    ],
)
def test_sigterm_exits_143_with_the_resume_command(
    setup, tmp_path, name, needle, sigint_ignored, kept
):
    config, runs = setup
    log = tmp_path / "driver.log"
    proc = _start(config, f"name={name}", log, sigint_ignored)
    code = _signal(proc, log, needle, signal.SIGTERM)
    text = log.read_text()
    assert code == 143, text[-2000:]
    assert "resume with: casd-ray run" in text and "Traceback" not in text
    assert (runs / name / kept).exists()  # the finished epochs are kept


@pytest.mark.parametrize(
    "name, needle, finished",
    [
        # before any trial has finished (all four still to come or running)
        ("late0", "search: optuna-tpe", 0),
        # trial 2 of 4 finished: two still to start (the case the old count got right)
        ("late2", "| 2/4 done", 2),
        # trial 3 of 4 finished: the last trial is starting or running, none is waiting
        ("late3", "| 3/4 done", 3),
    ],
)
def test_ctrl_c_anywhere_in_the_search_is_an_interrupt_and_counts_right(
    setup, tmp_path, name, needle, finished
):
    """D2: with no trial left waiting to start, the trials running at the interrupt were
    counted as finished: the search was recorded as done, fine-tuned and exited 0. Every
    interrupt must exit 130, say how many trials really finished, write no trials table,
    and the same command must resume to exactly NUM_SAMPLES trials."""
    config, runs = setup
    log = tmp_path / "driver.log"
    proc = _start(config, f"name={name}", log)
    code = _signal(proc, log, needle, signal.SIGINT)
    text = log.read_text()
    run = runs / name
    assert code == 130, text[-2000:]
    line = next(ln for ln in text.splitlines() if "search interrupted" in ln)
    done = int(line.split("search interrupted: ")[1].split(" of ")[0])
    assert finished <= done <= finished + 1, line  # the running trial may finish first
    assert not (run / "trials.parquet").exists() and not (run / "winner").exists()

    again = _run(config, f"name={name}")
    assert again.returncode == 0, again.stderr[-2000:]
    trials = read_trials(run / "trials.parquet")
    assert len(trials) == NUM_SAMPLES and trials["trial_id"].is_unique
    assert trials["completed"].all()
