"""The proxy-fidelity audit: which trials, reuse of finished exports, rank correlations."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import rules_of
from scipy import stats

from casd_ray.artifacts.network import load_network
from casd_ray.artifacts.trials import read_trials
from casd_ray.data.load import load_dataset
from casd_ray.pipeline.plan import fingerprints
from casd_ray.pipeline.stages.audit import AUDIT_FILE, audited_trials, run_audit
from casd_ray.report.build import build_report


def test_audited_trials_are_the_top_eligible_and_the_control(finetuned_run):
    cfg, _, _ = finetuned_run
    trials = read_trials(cfg.run_dir / "trials.parquet")  # t3 was stopped early
    assert list(audited_trials(trials, 1)["trial_id"]) == ["t1", "t0"]  # best + control
    assert set(audited_trials(trials, 5)["trial_id"]) == {"t0", "t1", "t2"}


@pytest.fixture
def audited(finetuned_run, tmp_path):
    cfg, _, _ = finetuned_run
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    cfg = cfg.model_copy(update={"output_dir": str(tmp_path)})
    logs: list[str] = []
    result = run_audit(
        load_dataset(cfg.data, cfg.seed),
        load_network(cfg.run_dir / "teacher"),
        read_trials(cfg.run_dir / "trials.parquet"),
        top_k=3,
        finetune_cfg=cfg.finetune,
        distill_cfg=cfg.distill,
        rules=rules_of(cfg),
        seed=cfg.seed,
        run_dir=cfg.run_dir,
        settings=fingerprints(cfg)["finetune"],
        log=logs.append,
    )
    return cfg, result, logs


def test_audit_reuses_winner_and_control_and_correlates(audited):
    cfg, result, _ = audited
    rows = {r["trial_id"]: r for r in result["trials"]}
    assert set(rows) == {"t0", "t1", "t2"}
    assert not (cfg.run_dir / "audit" / "t1").exists()  # the winner's export was reused
    assert (cfg.run_dir / "audit" / "t2" / "metrics.json").is_file()  # the other was trained
    winner = json.loads((cfg.run_dir / "winner" / "metrics.json").read_text())
    assert rows["t1"]["final_val_acc"] == winner["val_acc"]
    x = [rows[t]["search_val_acc"] for t in sorted(rows)]
    y = [rows[t]["final_val_acc"] for t in sorted(rows)]
    if len(set(y)) > 1:
        assert result["kendall_tau"] == pytest.approx(stats.kendalltau(x, y)[0])
    # the same ranking on the test split, reported beside (never used to choose anything)
    assert rows["t1"]["final_test_acc"] == winner["test_acc"]
    z = [rows[t]["final_test_acc"] for t in sorted(rows)]
    if len(set(z)) > 1:
        assert result["kendall_tau_test"] == pytest.approx(stats.kendalltau(x, z)[0])
    assert json.loads((cfg.run_dir / AUDIT_FILE).read_text()) == result


def test_report_shows_the_audit(audited):
    cfg, _, _ = audited
    text = build_report(cfg.run_dir).read_text()
    assert "## How far to trust the search ranking" in text
    assert "Kendall τ" in text and "(uniform control)" in text
    assert "| final test acc |" in text and "on the test split" in text
    report = json.loads((cfg.run_dir / "report.json").read_text())
    assert report["audit"]["top_k"] == 3


def test_audit_off_says_how_to_run_it(finetuned_run, tmp_path):
    cfg, _, _ = finetuned_run
    shutil.copytree(cfg.run_dir, tmp_path / cfg.name)
    run_dir = tmp_path / cfg.name
    (run_dir / AUDIT_FILE).write_text(json.dumps({"top_k": 0, "trials": []}))
    assert "--set audit.top_k=5" in build_report(run_dir).read_text()


def test_report_deploys_an_audited_trial_that_validates_highest(audited):
    """The audit fine-tunes its trials with the final recipe, so they are candidates for
    deployment like winner and uniform: the one that validates highest is named."""
    cfg, result, _ = audited
    path = cfg.run_dir / AUDIT_FILE
    for final_val, expected in ((1.0, "audit/t2"), (0.0, None)):
        rows = [
            dict(r, final_val_acc=final_val) if r["trial_id"] == "t2" else r
            for r in result["trials"]
        ]
        path.write_text(json.dumps({**result, "trials": rows}))
        text = build_report(cfg.run_dir).read_text()
        deploy = json.loads((cfg.run_dir / "report.json").read_text())["deploy"]
        if expected:
            assert deploy["part"] == expected
            assert deploy["folder"] == str(cfg.run_dir / "audit" / "t2")
            assert (cfg.run_dir / "audit" / "t2" / "model.pt").is_file()
            assert "Deploy `audit/t2/`" in text
        else:
            assert deploy["part"] in ("winner", "uniform")
