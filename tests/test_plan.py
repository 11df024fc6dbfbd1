"""The reuse plan's file moves (casd_ray/pipeline/plan.py), without running a stage."""

from __future__ import annotations

import pytest

from casd_ray.pipeline.plan import set_aside_outputs


def test_fresh_moves_the_report_and_keeps_the_old_config(tmp_path):
    """D12: --fresh overwrote report.* and the plots, and previous/<time>/ had no config.yaml."""
    run = tmp_path / "r"
    (run / "search").mkdir(parents=True)
    names = ["report.md", "report.json", "pareto.png", "progress.png", "widths.png"]
    for name in [*names, "trials.parquet", "config.yaml"]:
        (run / name).write_text(name)
    set_aside_outputs(run, ["search", "finetune", "audit"], lambda _: None)
    (aside,) = (run / "previous").iterdir()
    assert {p.name for p in aside.iterdir()} == {*names, "search", "trials.parquet", "config.yaml"}
    assert (aside / "config.yaml").read_text() == "config.yaml"  # the settings they were made with
    assert (run / "config.yaml").exists()  # a copy: the run folder keeps its config
    assert not any((run / n).exists() for n in names)


def test_nothing_to_redo_moves_nothing(tmp_path):
    """D12: a plain rerun (no stage set aside) keeps the report where it is."""
    (tmp_path / "report.md").write_text("x")
    set_aside_outputs(tmp_path, [], lambda _: None)
    assert (tmp_path / "report.md").exists() and not (tmp_path / "previous").exists()


def test_the_reports_audit_advice_is_a_command_that_runs(tmp_path):
    """D9: the report advised `--set audit.top_k=5`, which the same run folder refused."""
    import re
    import shlex

    import pytest

    from casd_ray.cli import build_parser
    from casd_ray.config_file import load_config
    from casd_ray.errors import StageMismatch
    from casd_ray.pipeline.plan import TRAINED, fingerprints, mark_stage, plan
    from casd_ray.report.markdown import _audit_lines

    off = load_config(None, [f"output_dir={tmp_path}", "audit.top_k=0"])
    for stage, fp in fingerprints(off).items():
        mark_stage(off.run_dir, stage, fp, "done")
    text = " ".join(_audit_lines({"top_k": 0}, None))
    (advice,) = re.findall(r"`(casd-ray [^`]+)`", text)
    args = build_parser().parse_args(shlex.split(advice)[1:])
    assert args.fresh == "audit"
    cfg = load_config(None, [f"output_dir={tmp_path}", *args.set])
    with pytest.raises(StageMismatch):  # what the old advice ran into
        plan(cfg, list(TRAINED))
    p = plan(cfg, list(TRAINED), args.fresh)
    assert p.actions == {"teacher": "reuse", "search": "reuse", "finetune": "reuse", "audit": "new"}


def test_a_setting_added_later_reuses_old_folders_when_set_off():
    """A rung-0 search made before ``search.screen.observe`` existed has no such key in its
    fingerprint: the new default (0.37) changes the result and is refused as changed, while
    ``--set search.screen.observe=0`` (the old behaviour) must match the old fingerprint."""
    from casd_ray.config import ExperimentConfig
    from casd_ray.pipeline.plan import fingerprints

    raw = {"name": "r", "search": {"screen": {"promote": 3, "steps": 2}}}
    old = fingerprints(ExperimentConfig.model_validate(raw))["search"]
    del old["search"]["screen"]["observe"]  # as written before the setting existed
    new = fingerprints(ExperimentConfig.model_validate(raw))["search"]
    assert new != old
    raw["search"]["screen"]["observe"] = 0
    assert fingerprints(ExperimentConfig.model_validate(raw))["search"] == old


@pytest.mark.parametrize(
    "key, off",
    [("align_channels", False), ("calibrate_networks", 0), ("predictor", "features")],
)
def test_latency_settings_added_later_keep_old_folders_reusable(key, off):
    """``space.budget.latency.align_channels``, ``calibrate_networks`` and ``predictor``
    came after runs existed: under a FLOPs budget they change nothing and must not change the
    fingerprint; under a latency budget the new default (aligned widths, a calibrated model,
    a latency table) is refused as changed, and the old behaviour matches the old folder."""
    from casd_ray.config import ExperimentConfig
    from casd_ray.pipeline.plan import fingerprints

    for metric, changed in (("flops", False), ("latency", True)):
        raw = {"name": "r", "space": {"budget": {"metric": metric}}}
        old = fingerprints(ExperimentConfig.model_validate(raw))["search"]
        old["space"]["budget"]["latency"].pop(key, None)  # as written before
        new = fingerprints(ExperimentConfig.model_validate(raw))["search"]
        assert (new != old) is changed
        raw["space"]["budget"]["latency"] = {key: off}
        assert fingerprints(ExperimentConfig.model_validate(raw))["search"] == old
