"""Report: rebuilt from the run folder alone; JSON fields, tables, plots, partial runs."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from casd_ray.errors import ArtifactError
from casd_ray.report.build import build_report


@pytest.fixture
def run_copy(finetuned_run, tmp_path):
    """A copy of the shared run folder, so each test writes its own report files."""
    cfg, summary, _ = finetuned_run
    dst = tmp_path / "run"
    shutil.copytree(cfg.run_dir, dst)
    return dst, cfg, summary


def test_report_files_and_fields(run_copy):
    run_dir, cfg, summary = run_copy
    md = build_report(run_dir)
    assert md == run_dir / "report.md"
    report = json.loads((run_dir / "report.json").read_text())
    for name in ("teacher", "uniform", "winner"):
        m = report["models"][name]
        for key in ("test_acc", "val_acc", "flops", "params", "latency"):
            assert key in m, (name, key)
        assert set(m["latency"]["batch_ms"]) == {"1", "64"}
    assert report["models"]["winner"]["search"]["trial_id"] == "t1"
    assert report["models"]["uniform"]["search"]["trial_id"] == "t0"
    assert report["flops_reduction"] == pytest.approx(summary["flops_reduction"])
    assert "2 FLOPs per multiply-add" in report["flops_convention"]
    s = report["search"]
    assert (s["trials"], s["completed"], s["early_stopped"], s["failed"]) == (4, 3, 1, 0)
    assert s["wall_time_s"] == pytest.approx(5.0)  # first start 1000, last end 1005
    assert s["searcher"] == cfg.search.algorithm and s["scheduler"] == cfg.search.scheduler
    assert s["budget"] == {"metric": "flops", "target": 0.5}
    assert report["missing"] == []
    assert set(report["width_profile"]) == {"teacher", "uniform", "winner"}
    assert "Where the channels went" in (run_dir / "report.md").read_text()
    for png in ("pareto.png", "progress.png", "widths.png"):
        with Image.open(run_dir / png) as img:
            assert img.format == "PNG" and img.size[0] > 300


def test_markdown_has_tables_and_the_reproduce_command(run_copy):
    run_dir, _, _ = run_copy
    text = build_report(run_dir).read_text()
    assert "| model | test acc |" in text
    for name in ("| teacher |", "| uniform |", "| winner |", "| searcher |"):
        assert name in text
    assert f"casd-ray run {run_dir / 'config.yaml'}" in text
    assert "2 FLOPs per multiply-add" in text


def test_report_needs_only_the_run_folder(run_copy, tmp_path):
    run_dir, _, _ = run_copy
    moved = tmp_path / "elsewhere"
    shutil.move(run_dir, moved)  # no config path, data or teacher outside the folder
    build_report(moved)
    assert json.loads((moved / "report.json").read_text())["models"]["winner"]


def test_partial_run_reports_what_exists(run_copy):
    run_dir, _, _ = run_copy
    (run_dir / "finetune.json").unlink()
    (run_dir / "trials.parquet").unlink()
    build_report(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["models"]) == {"teacher"}
    assert len(report["missing"]) == 2
    assert not (run_dir / "pareto.png").exists() or (run_dir / "pareto.png").stat().st_size


def test_not_a_run_folder(tmp_path):
    with pytest.raises(ArtifactError, match="config.yaml"):
        build_report(tmp_path)


def test_corrupt_summary_is_an_error_not_a_lesser_report(run_copy):
    run_dir, _, _ = run_copy
    build_report(run_dir)
    before = (run_dir / "report.md").read_text()
    (run_dir / "finetune.json").write_text('{"models": {"teacher": ')  # torn write
    with pytest.raises(ArtifactError, match="finetune.json: not valid JSON"):
        build_report(run_dir)
    (run_dir / "finetune.json").write_text('{"models": {}}')  # foreign content
    with pytest.raises(ArtifactError, match="finetune.json: not a complete fine-tune summary"):
        build_report(run_dir)
    assert (run_dir / "report.md").read_text() == before  # the complete report is kept


def test_report_states_the_paired_noise_in_winner_minus_uniform(run_copy):
    """A user must be able to tell a real gain from split noise: the report gives the
    difference on each split beside its paired standard error (from each network's per-image
    results, which the fine-tune stores) and McNemar's test, as scipy computes them."""
    import numpy as np
    from scipy import stats

    from casd_ray.artifacts.correct import decode_correct

    run_dir, _, _ = run_copy
    text = build_report(run_dir).read_text()
    report = json.loads((run_dir / "report.json").read_text())
    sizes = report["data"]["sizes"]
    w, u = report["models"]["winner"], report["models"]["uniform"]
    for split in ("val", "test"):
        got = report["noise"][split]
        a, b = (decode_correct(m["correct"][split]) for m in (w, u))
        assert len(a) == len(b) == sizes[split] == got["images"]
        assert a.mean() == pytest.approx(w[f"{split}_acc"]) and got["paired"]
        assert got["winner_minus_uniform"] == pytest.approx(a.mean() - b.mean())
        se = stats.sem(a.astype(float) - b.astype(float))
        assert got["se_difference"] == pytest.approx(0.0 if np.isnan(se) else se)
        only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
        assert (got["only_first_right"], got["only_second_right"]) == (only_a, only_b)
        if only_a + only_b:
            assert got["mcnemar_p"] == pytest.approx(
                stats.binomtest(only_a, only_a + only_b).pvalue
            )
    assert "Winner − uniform:" in text and "Paired over the same" in text
    assert f"±{100 * report['noise']['val']['se_difference']:.2f}" in text


def test_a_run_without_per_image_results_reports_the_unpaired_bound(run_copy):
    """Run folders from before per-image results were kept: the binomial upper bound."""
    import math

    run_dir, _, _ = run_copy
    summary = json.loads((run_dir / "finetune.json").read_text())
    for part in ("winner", "uniform"):
        summary["models"][part].pop("correct")
    (run_dir / "finetune.json").write_text(json.dumps(summary))
    text = build_report(run_dir).read_text()
    report = json.loads((run_dir / "report.json").read_text())
    w, u, n = report["models"]["winner"], report["models"]["uniform"], report["data"]["sizes"]
    for split in ("val", "test"):
        p, q = w[f"{split}_acc"], u[f"{split}_acc"]
        got = report["noise"][split]
        assert "paired" not in got
        assert got["se_difference"] == pytest.approx(
            math.sqrt((p * (1 - p) + q * (1 - q)) / n[split])
        )
    assert "an upper bound" in text


def test_unreadable_per_image_results_name_the_file():
    import numpy as np

    from casd_ray.artifacts.correct import decode_correct, encode_correct

    flags = np.array([True, False, True] * 7)
    assert np.array_equal(decode_correct(encode_correct(flags)), flags)
    with pytest.raises(ArtifactError, match="finetune.json: per-image results unreadable"):
        decode_correct({"images": 99, "bits": encode_correct(flags)["bits"]}, "finetune.json")


@pytest.mark.parametrize("better", ["winner", "uniform"])
def test_report_names_the_network_to_deploy_by_final_validation(run_copy, better):
    """Winner and uniform get the identical fine-tune, so the one that validates higher
    after it is the one to deploy; the test split never decides."""
    run_dir, _, _ = run_copy
    summary = json.loads((run_dir / "finetune.json").read_text())
    other = "uniform" if better == "winner" else "winner"
    summary["models"][better]["val_acc"] = 0.80
    summary["models"][other]["val_acc"] = 0.79
    summary["models"][better]["test_acc"] = 0.70  # test disagrees: it must not matter
    summary["models"][other]["test_acc"] = 0.75
    (run_dir / "finetune.json").write_text(json.dumps(summary))
    text = build_report(run_dir).read_text()
    deploy = json.loads((run_dir / "report.json").read_text())["deploy"]
    assert deploy["part"] == better
    assert deploy["folder"] == str(run_dir / better)
    assert f"Deploy `{better}/`" in text


@pytest.mark.parametrize("text", ["[1, 2]", '{"name": "fashion_mnist", "mea'])
def test_a_damaged_data_json_is_one_line_not_dropped(run_copy, text):
    """D11: a list gave AttributeError; a truncated file was silently left out of report.json."""
    run_dir, _, _ = run_copy
    (run_dir / "teacher" / "data.json").write_text(text)
    with pytest.raises(ArtifactError, match=r"teacher/data.json: .*rerun"):
        build_report(run_dir)


def test_a_rerun_rewrites_a_damaged_data_json(run_copy):
    """D11: the data summary is derived from the data: a rerun rebuilds it, keeping the teacher."""
    from casd_ray.pipeline.run import execute

    run_dir, cfg, _ = run_copy
    good = json.loads((run_dir / "teacher" / "data.json").read_text())
    (run_dir / "teacher" / "data.json").write_text("[1, 2]")
    logs: list[str] = []
    cfg = cfg.model_copy(update={"output_dir": str(run_dir.parent), "name": run_dir.name})
    execute(cfg, ["teacher"], log=logs.append)
    assert json.loads((run_dir / "teacher" / "data.json").read_text()) == good
    assert any("reusing" in line for line in logs) and any("data.json" in x for x in logs)


def test_the_report_never_recommends_a_folder_that_does_not_load(run_copy):
    """D10: the report told the user to deploy a folder that load_compressed rejects."""
    run_dir, _, _ = run_copy
    build_report(run_dir)
    pick = json.loads((run_dir / "report.json").read_text())["deploy"]["part"]
    before = (run_dir / "report.md").read_text()
    (run_dir / pick / "model.pt").write_bytes(b"garbled")
    with pytest.raises(ArtifactError, match=rf"{pick}/model.pt: .*rerun"):
        build_report(run_dir)
    assert (run_dir / "report.md").read_text() == before  # the old report is left as it was


def test_the_report_says_how_to_feed_the_deployed_network(run_copy):
    """Also seen: neither README nor report said exports expect normalised inputs."""
    run_dir, _, _ = run_copy
    build_report(run_dir)
    report = json.loads((run_dir / "report.json").read_text())
    data = report["data"]
    pre = report["deploy"]["preprocessing"]
    assert (pre["mean"], pre["std"], pre["classes"]) == (data["mean"], data["std"], data["classes"])
    md = (run_dir / "report.md").read_text()
    assert "preprocessing.json" in md and f"{data['mean'][0]:.4f}" in md


def test_the_table_shows_measured_cost_beside_the_cost_model(run_copy):
    """FLOPs and parameters of the exported networks as measured (FlopCounterMode, numel),
    with the cost model's figures beside them (issue #28)."""
    run_dir, _, summary = run_copy
    text = build_report(run_dir).read_text()
    assert "| MFLOPs | params (k) | cost model: MFLOPs / params (k) |" in text
    winner = summary["models"]["winner"]
    measured = f"| {winner['flops_measured'] / 1e6:.2f} | {winner['params_measured'] / 1e3:.1f} |"
    assert measured in text


def test_a_latency_budget_is_reported_as_measured_with_a_plot(run_copy):
    run_dir, _, _ = run_copy
    summary = json.loads((run_dir / "finetune.json").read_text())
    measured = {n: {"median_ms": ms, "iqr_ms": 0.1, "runs": 50}
                for n, ms in (("teacher", 2.0), ("uniform", 0.9), ("winner", 1.2))}  # fmt: skip
    summary["budget_latency"] = {
        "runtime": "onnxruntime", "shape": [1, 1, 28, 28], "threads": 1, "target_ms": 1.0,
        "fitted_target_ms": 0.8, "tolerance": 0.03,
        "model_error": {"networks": 50, "mape_pct": 7.5, "worst_pct": 21.0, "searched_space": {
            "networks": 16, "calibration": 1.169,
            "before": {"mape_pct": 14.42, "bias_pct": -14.42, "worst_pct": 25.0},
            "after": {"mape_pct": 5.68, "bias_pct": 0.9, "worst_pct": 12.0},
            "held_out": {"networks": 8, "mape_pct": 6.1, "bias_pct": -2.5, "worst_pct": 14.0,
                         "within_budget": 6}}},
        "measured": measured, "winner_meets_budget": False,
    }  # fmt: skip
    (run_dir / "finetune.json").write_text(json.dumps(summary))
    text = build_report(run_dir).read_text()
    assert "## Latency budget" in text and "Target: **1.000 ms** (met within 3 %" in text
    assert "| winner |" in text and "**no**" in text  # 1.2 ms is over a 1.0 ms budget
    assert "MAPE 7.5 %" in text
    # where the search looks: the calibration and the error it removed
    assert "16 networks of the searched space" in text and "×1.169" in text
    assert "MAPE 14.42 % (bias −14.42 %) before" in text
    assert "on 8 fresh ones after, MAPE 6.1 % (bias −2.5 %), 6 within the budget" in text
    assert "(0.800 ms when the latency model was fitted)" in text  # judged beside the teacher
    report = json.loads((run_dir / "report.json").read_text())
    assert report["budget_latency"]["measured"]["uniform"]["median_ms"] == 0.9
    with Image.open(run_dir / "latency.png") as img:
        assert img.format == "PNG"
    # judged round by round: the verdict with its rounds as evidence (a report from before
    # judged by the medians alone, above)
    judged = {"within_budget": False, "rounds": 10, "rounds_within": 4}
    summary["budget_latency"]["measured"]["winner"].update(judged)
    (run_dir / "finetune.json").write_text(json.dumps(summary))
    assert "| **no** (4 of 10 rounds within) |" in build_report(run_dir).read_text()
    # a per-layer table predicted: said, with the features model's error on the same networks
    summary["budget_latency"]["model_error"].update(
        entries=166,
        predictor="table",
        features={"networks": 50, "mape_pct": 3.5, "worst_pct": 13.9},
    )
    (run_dir / "finetune.json").write_text(json.dumps(summary))
    text = build_report(run_dir).read_text()
    assert "a table of 166 convolutions timed alone): MAPE 7.5 %" in text
    assert "(the features model there: MAPE 3.5 %, worst 13.9 %)" in text
    # the search's better-validated trials that measured over the budget: why the winner
    # is not the search's best (on a real run five of them, the uniform control won)
    summary["budget_latency"]["finalists"] = [
        {"trial_id": "a1", "val_acc": 0.7708, "fraction_of_target": 1.125,
         "predicted_fraction": 0.984, "within_budget": False},
        {"trial_id": "b2", "val_acc": 0.7408, "fraction_of_target": 0.823,
         "predicted_fraction": 0.914, "within_budget": True},
    ]  # fmt: skip
    (run_dir / "finetune.json").write_text(json.dumps(summary))
    text = build_report(run_dir).read_text()
    assert "1 better-validated trial measured over the budget and was passed over" in text
    assert "a1 (val 77.08 %): 1.125 of the target, predicted 0.984" in text
    assert "the winner, b2 (val 74.08 %), measured 0.823: the latency model" in text
