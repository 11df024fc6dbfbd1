"""Reliability of a finished run folder: changed configs, refused commands, foreign or
corrupt files. Each test is one defect of issue #8, run through the real command line
(``casd_ray.cli.main``) on a copy of one finished tiny run.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import write_fake_fashion_mnist, write_run_config

from casd_ray.artifacts.trials import COLUMNS, read_trials
from casd_ray.cli import main


def cli(*args: str) -> int:
    return main(list(args))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (teacher, 4 trials, fine-tune, report) and its config file."""
    base = tmp_path_factory.mktemp("reliability")
    data = write_fake_fashion_mnist(base / "data", n=160, n_test=40)
    config = write_run_config(base / "c.yaml", base / "runs", data)
    assert cli("run", str(config)) == 0
    return config, base / "runs" / "r"


@pytest.fixture
def run_copy(finished, tmp_path):
    """A private copy of the finished run, and a config that points at it."""
    config, run = finished
    dst = tmp_path / "runs"
    shutil.copytree(run, dst / "r")
    text = config.read_text().replace(str(run.parent), str(dst))
    (tmp_path / "c.yaml").write_text(text)
    return tmp_path / "c.yaml", dst / "r"


def _snapshot(run: Path) -> dict[str, int]:
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "override, key",
    [
        ("space.budget.target=0.3", "space.budget.target: 0.5 -> 0.3"),
        ("search.num_samples=6", "search.num_samples: 4 -> 6"),
        ("teacher.epochs=2", "teacher.epochs: 1 -> 2"),
        ("finetune.lr=0.01", "finetune.lr: 0.05 -> 0.01"),
    ],
)
def test_changed_settings_are_refused_and_nothing_is_written(run_copy, capsys, override, key):
    config, run = run_copy
    before = _snapshot(run)
    assert cli("run", str(config), "--set", override) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and "--fresh" in err and "\n" not in err
    assert _snapshot(run) == before  # config.yaml included: a refused command writes nothing


def test_volatile_settings_do_not_count(run_copy, capsys):
    config, run = run_copy
    assert cli("run", str(config), "--set", "search.max_concurrent=1") == 0
    out = capsys.readouterr().out
    assert "search: reusing" in out and "finetune: reusing" in out
    assert "max_concurrent: 1" in (run / "config.yaml").read_text()


def test_fresh_redoes_the_stage_and_keeps_the_old_one(run_copy, capsys):
    config, run = run_copy
    old = read_trials(run / "trials.parquet")
    assert cli("run", str(config), "--set", "space.budget.target=0.4", "--fresh", "search") == 0
    out = capsys.readouterr().out
    assert "teacher: reusing" in out and "stage 2/5 search: running" in out
    new = read_trials(run / "trials.parquet")
    assert (new["flops_ratio"] <= 0.4 + 1e-9).all() and not (old["flops_ratio"] <= 0.4).all()
    report = json.loads((run / "report.json").read_text())
    assert report["models"]["winner"]["flops_ratio"] <= 0.4 + 1e-9
    (aside,) = (run / "previous").iterdir()  # the old search, fine-tune moved, not deleted
    moved = {p.name for p in aside.iterdir()}
    stages = {
        "search",
        "search_driver.json",
        "trials.parquet",
        "winner",
        "uniform",
        "finetune.json",
        "audit.json",
        "config.yaml",  # D12: the settings they were made with, and the report made from them
        "report.md",
        "report.json",
        "pareto.png",
        "progress.png",
        "widths.png",
    }
    assert stages <= moved <= stages | {"audit"}
    assert "target: 0.5" in (aside / "config.yaml").read_text()  # the old budget


def test_refused_fresh_run_leaves_no_folder(tmp_path, finished, capsys):
    config, _ = finished
    text = config.read_text().replace("name: r", "name: tight")
    (tmp_path / "c.yaml").write_text(text)
    assert cli("run", str(tmp_path / "c.yaml"), "--set", "space.budget.target=0.0001") == 2
    assert "space.budget.target" in capsys.readouterr().err
    assert not (Path(config.parent) / "runs" / "tight").exists()


def test_crafted_tune_state_is_refused_before_it_is_loaded(run_copy, tmp_path, capsys):
    config, run = run_copy
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (run / "search" / "tuner.pkl").write_bytes(pickle.dumps(Payload()))
    stages = json.loads((run / "stages.json").read_text())
    stages["search"]["status"] = "running"  # make the rerun resume the search
    (run / "stages.json").write_text(json.dumps(stages))
    assert cli("run", str(config)) == 2
    err = capsys.readouterr().err
    assert "tuner.pkl: not signed by this user's casd-ray key" in err
    assert "--trust-run-folder" in err
    assert not marker.exists()


def test_torn_trials_table_is_rebuilt_from_the_search(run_copy, capsys):
    config, run = run_copy
    good = read_trials(run / "trials.parquet")
    (run / "trials.parquet").write_bytes((run / "trials.parquet").read_bytes()[:100])
    assert cli("run", str(config)) == 0
    assert "rebuilding it" in capsys.readouterr().out
    again = read_trials(run / "trials.parquet")
    pd.testing.assert_frame_equal(again[COLUMNS], good[COLUMNS])


def test_corrupt_summary_reruns_only_the_summary(run_copy, capsys):
    config, run = run_copy
    weights = (run / "winner" / "model.pt").stat().st_mtime_ns
    (run / "finetune.json").write_text("{ torn")
    assert cli("run", str(config)) == 0
    out = capsys.readouterr().out
    assert "finetune: reusing" in out  # the parts are reused, the summary is rebuilt
    assert (run / "winner" / "model.pt").stat().st_mtime_ns == weights
    assert json.loads((run / "report.json").read_text())["models"]["winner"]["test_acc"] >= 0


@pytest.mark.parametrize(
    "name, damage, needle",
    [
        ("teacher/model.pt", b"garbage", "teacher/model.pt: not a readable state dict"),
        ("teacher/widths.json", b"{", "teacher/widths.json: not valid JSON"),
        ("teacher/widths.json", b'{"block": "x"}', "teacher/widths.json: not a valid width spec"),
        ("stages.json", b"[]", "stages.json: expected a JSON dict"),
    ],
)
def test_corrupt_stage_files_are_one_line(run_copy, capsys, name, damage, needle):
    config, run = run_copy
    (run / name).write_bytes(damage)
    before = _snapshot(run)
    assert cli("run", str(config), "--fresh", "finetune") == 2  # a stage that reads them
    assert _snapshot(run) == before
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err and "Traceback" not in err


def test_teacher_weights_of_another_architecture(run_copy, tmp_path, capsys):
    config, run = run_copy
    import torch

    from casd_ray.models.family import build_model, spec_for

    other = build_model(spec_for("resnet20", in_channels=1, image_size=(28, 28), width=4))
    torch.save(other.state_dict(), run / "teacher" / "model.pt")
    assert cli("run", str(config), "--fresh", "finetune") == 2
    assert "does not fit the architecture in widths.json" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    text = config.read_text().replace("name: r", "name: ckpt")
    (tmp_path / "c2.yaml").write_text(text)
    assert cli("run", str(tmp_path / "c2.yaml"), "--set", f"teacher.checkpoint={bad}") == 2
    err = capsys.readouterr().err
    assert err.startswith("casd-ray: error: teacher.checkpoint:") and "\n" not in err.strip()
    assert not (run.parent / "ckpt").exists()


def test_report_command_never_replaces_a_complete_report(run_copy, capsys):
    _, run = run_copy
    before = (run / "report.md").read_text()
    (run / "finetune.json").write_text("{ torn")
    assert cli("report", str(run)) == 2
    assert "finetune.json: not valid JSON" in capsys.readouterr().err
    assert (run / "report.md").read_text() == before


def test_output_dir_that_is_a_file(run_copy, tmp_path, capsys):
    config, _ = run_copy
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli("teacher", str(config), "--set", f"output_dir={blocker}") == 2
    assert "output_dir:" in capsys.readouterr().err
    assert cli("teacher", str(config), "--set", f"output_dir={blocker}/sub") == 2
    assert "is not writable" in capsys.readouterr().err or blocker.is_file()


def test_single_stage_needs_the_stage_before(tmp_path, finished, capsys):
    config, _ = finished
    (tmp_path / "c.yaml").write_text(config.read_text().replace("name: r", "name: lonely"))
    assert cli("search", str(tmp_path / "c.yaml")) == 2
    assert "needs a finished teacher" in capsys.readouterr().err


def test_unexpected_errors_are_one_line_without_debug(run_copy, capsys):
    config, run = run_copy
    (run / "winner" / "metrics.json").unlink()  # forces the fine-tune; then break the data
    shutil.rmtree(run / "teacher")
    (run / "teacher").write_text("a file where a folder belongs")
    code = cli("run", str(config))
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and "\n" not in err and "Traceback" not in err


def test_fresh_teacher_recovers_from_a_torn_record(run_copy, capsys):
    config, run = run_copy
    (run / "stages.json").write_text("{ torn")
    assert cli("run", str(config)) == 2
    assert "stages.json: not valid JSON" in capsys.readouterr().err
    assert cli("run", str(config), "--fresh", "teacher") == 0
    (aside,) = (run / "previous").iterdir()
    assert (aside / "stages.json").read_text() == "{ torn"  # kept, not deleted
    assert json.loads((run / "stages.json").read_text())["finetune"]["status"] == "done"


def test_failed_trials_are_recorded_and_the_search_ends(tmp_path, capsys):
    """D1: a failed trial crashed the whole search, and every rerun (the results table read
    Ray's trial error file after Ray had shut down). Failures are data: each trial is
    recorded with its reason, the search ends, and the next stage says what to do."""
    data = write_fake_fashion_mnist(tmp_path / "data", n=160, n_test=40)
    config = write_run_config(tmp_path / "c.yaml", tmp_path / "runs", data, search={"lr": 1e6})
    for _ in range(2):  # the rerun reuses the finished search and ends the same way
        assert cli("run", str(config)) == 2
        err = capsys.readouterr().err.strip()
        assert "Traceback" not in err  # a failure is one line of the progress log, not a dump
        assert "no completed trial" in err.splitlines()[-1]
        trials = read_trials(tmp_path / "runs" / "r" / "trials.parquet")
        # every candidate that trained failed; those rung 0 only observed (the first
        # search.screen.observe of them) were screened with the screen's own recipe and stopped
        failed = trials["status"] == "ERROR"
        assert len(trials) == 4 and failed.sum() >= 2
        assert trials.loc[failed, "error"].str.contains("non-finite loss").all()
        # (a screened candidate may have begun its first epoch when the search ended)
        assert not trials.loc[~failed, "completed"].any()
