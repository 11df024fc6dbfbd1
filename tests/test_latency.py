"""Latency budgets: measurement on a runtime, the fitted latency model, repair that meets a
measured target, and the refusals. Timings here are noisy (shared CPUs), so the tests assert
behaviour with wide tolerances; measured figures live in benchmarks/latency_budget.py."""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from casd_ray import errors
from casd_ray.config import ExperimentConfig, LatencyConfig
from casd_ray.models import latency
from casd_ray.models.family import build_model, family_of, flops, spec_for
from casd_ray.pipeline import latency as pipeline_latency
from casd_ray.pipeline.stages import finetune
from casd_ray.search.trial_plan import candidate_facts, trial_plan
from casd_ray.widths import latency_model as lm
from casd_ray.widths import latency_repair, space

SMALL = spec_for("resnet8", width=8)
QUICK = {"min_run_time": 0.02, "batch_size": 8}  # batch 8: compute, not call overhead
# where a test measures a repaired network again: at QUICK's ~2 ms a rerun of the same pair
# moved their ratio by up to 25 % (CI once measured 0.98 after repair had accepted <= 0.875)
STEADY = {"min_run_time": 0.05, "batch_size": 16}
# where a test stands a fitted features model in for the device's (tests/test_latency_table.py
# has the per-layer table's own)
FEATURES = {"predictor": "features"}


def _dep(runtime: str = "torch", batch: int = 1) -> latency.Deployment:
    return latency.Deployment(runtime, (batch, 3, 32, 32), 1, 0.01)


def _fake_model(coef=(0.05, 20.0, 1.0, 0.1, 0.0), target_ratio: float = 0.5) -> lm.LatencyModel:
    teacher_ms = float(lm.features(SMALL) @ np.array(coef))
    return lm.LatencyModel(coef, teacher_ms, target_ratio * teacher_ms, "torch", (1, 3, 32, 32), 1)


def test_measure_gives_a_median_and_spread_and_is_cached():
    lat = lm.measure_spec(SMALL, _dep())
    assert lat.median_ms > 0 and lat.iqr_ms >= 0 and lat.runs >= 1
    assert lm.measure_spec(SMALL, _dep()) is lat  # cached per deployment and widths


def test_networks_compared_side_by_side_are_measured_in_rounds():
    nets = {"a": build_model(SMALL), "b": build_model(SMALL)}
    got = latency.measure_together(nets, _dep(), rounds=2)
    assert set(got) == {"a", "b"}
    for m in got.values():
        assert m["median_ms"] > 0 and m["rounds_spread_ms"] >= 0 and m["runs"] >= 2


def test_measured_latency_grows_with_width():
    narrow = space.widths_from_ratios(SMALL, dict.fromkeys(space.group_names(SMALL), 0.1))
    wide = spec_for("resnet8", width=32)
    dep = latency.Deployment("torch", (16, 3, 32, 32), 1, 0.05)
    # 16x the FLOPs of SMALL and ~1000x those of narrow: far above the noise of a shared CPU
    assert lm.measure_spec(narrow, dep).median_ms < lm.measure_spec(wide, dep).median_ms


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, still shipped
@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="no onnxruntime")
def test_onnxruntime_and_torchscript_run_the_network():
    model = build_model(SMALL)
    for runtime in ("onnxruntime", "torchscript"):
        out = latency.forward_fn(model, _dep(runtime))()
        out = out[0] if isinstance(out, list) else out
        assert tuple(np.asarray(out).shape) == (1, 10)


@pytest.mark.parametrize(
    ("runtime", "patch", "words"),
    [
        ("tflite", None, "'tflite' is not one of"),
        ("onnxruntime", "no_ort", "onnxruntime is not installed"),
        ("cuda", "no_gpu", "cuda needs a GPU"),
    ],
)
def test_bad_runtimes_are_refused_in_one_line(monkeypatch, runtime, patch, words):
    if patch == "no_ort":
        monkeypatch.setattr(latency.importlib.util, "find_spec", lambda name: None)
    if patch == "no_gpu":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(errors.ConfigError) as err:
        latency.check_runtime(runtime)
    assert str(err.value).startswith("space.budget.latency.runtime: ")
    assert words in str(err.value) and "\n" not in str(err.value)


def _mixed_specs(n: int) -> list:
    """Random widths, half of them in whole blocks of 8 channels (as the fit draws them)."""
    return [
        SMALL,
        *lm.random_specs(SMALL, n, seed=0),
        *lm.random_specs(SMALL, n, seed=2, divisible_by=8),
    ]


def test_fit_recovers_a_known_linear_latency():
    coef = (0.05, 20.0, 1.0, 0.1, 30.0)  # unaligned FLOPs cost 2.5x aligned ones
    specs = _mixed_specs(8)
    ms = [float(lm.features(s, 8) @ np.array(coef)) for s in specs]
    assert np.allclose(lm.fit(specs, ms, block=8), coef, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("block", [1, 8, 16])
def test_the_channel_block_is_chosen_from_measurements(block):
    """A device whose kernels slow down off whole blocks of ``block`` channels (1: a device
    without such a path): the out-of-sample choice finds that block."""
    coef = (0.05, 20.0, 1.0, 0.1, 30.0 if block > 1 else 0.0)
    specs = _mixed_specs(10)
    rng = np.random.default_rng(0)  # 2 % measurement noise
    ms = [float(lm.features(s, block) @ np.array(coef)) * rng.normal(1, 0.02) for s in specs]
    assert lm.choose_block(specs, ms) == block


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("seed", range(4))
def test_the_fit_tells_the_device_block_from_its_divisors(monkeypatch, block, seed):
    """A device slow off whole blocks of 8 is not taken for one slow off blocks of 4: the
    networks the model is fitted on include some in whole blocks of each size tried. (With
    aligned ones in blocks of 8 only, blocks of 4 and 8 looked alike and ties went to 4: a
    real run searched widths of 4 mod 8, and every network it kept measured 16-45 % over the
    prediction.)"""
    wide = spec_for("resnet8", width=16)
    coef = (0.05, 20.0, 1.0, 0.1, 30.0)
    rng = np.random.default_rng(seed)  # 2 % measurement noise

    def device(spec) -> float:
        return float(lm.features(spec, block) @ np.array(coef)) * rng.normal(1, 0.02)

    monkeypatch.setattr(lm, "measure_spec", lambda s, dep: latency.Latency(device(s), 0.0, 1))
    ends = {"t": {"median_ms": device(wide)}, "s": {"median_ms": 0.2 * device(wide)}}
    monkeypatch.setattr(lm, "measure_together", lambda nets, dep: ends)
    cfg = LatencyConfig(runtime="torch", check_networks=0, **QUICK)
    model = lm.build_latency_model(wide, cfg, 0.5, seed=seed, log=lambda _: None)
    assert model.block == block


def test_unaligned_flops_count_the_convolutions_off_whole_blocks():
    aligned = spec_for("resnet8", width=16)  # every width a multiple of 16
    assert lm.unaligned_flops(aligned, 16) == 0 and lm.unaligned_flops(aligned, 1) == 0
    odd = space._with_widths(aligned, [w - 1 for w in space._layout(aligned)[1]])
    assert 0 < lm.unaligned_flops(odd, 16) <= lm.features(odd)[1] * 1e9


def test_prediction_is_monotone_in_every_width():
    model = _fake_model()
    base = lm.random_specs(SMALL, 1, seed=3)[0]
    widths = space._layout(base)[1]
    for i in range(len(widths)):
        bigger = widths.copy()
        bigger[i] = min(bigger[i] + 1, space._layout(SMALL)[1][i])
        assert model.predict_ms(space._with_widths(base, bigger)) >= model.predict_ms(base)


def _roofline_ms(spec) -> float:
    """A device without noise: every layer costs a fixed call overhead plus the larger of its
    compute time and its memory time (roofline), summed over the layers."""
    net = build_model(spec).eval().to("meta")
    total = [0.0]

    def hook(m, inp, out):
        macs = out[0].numel() * (m.weight[0].numel() if hasattr(m, "weight") else 1)
        traffic = inp[0][0].numel() + out[0].numel()
        total[0] += 0.01 + max(macs / 2e6, traffic / 5e5)

    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d | torch.nn.Linear | torch.nn.BatchNorm2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        net(torch.zeros(1, 3, 32, 32, device="meta"))
    return total[0]


def test_latency_model_error_on_a_small_model_is_bounded(monkeypatch):
    """On a noiseless roofline device the fitted model's error stays within its bound."""
    monkeypatch.setattr(
        lm, "measure_spec", lambda spec, dep: latency.Latency(_roofline_ms(spec), 0.0, 1)
    )
    ends = {
        "t": SMALL,
        "s": space.widths_from_ratios(SMALL, dict.fromkeys(space.group_names(SMALL), 1e-12)),
    }
    monkeypatch.setattr(
        lm,
        "measure_together",
        lambda nets, dep: {k: {"median_ms": _roofline_ms(ends[k])} for k in nets},
    )
    cfg = LatencyConfig(runtime="torch", fit_networks=12, check_networks=30, **QUICK)
    model = lm.build_latency_model(SMALL, cfg, 0.6, log=lambda _: None)
    assert model.error["networks"] == 30
    assert model.error["mape_pct"] < 10 and model.error["worst_pct"] < 25
    assert model.target_ms == pytest.approx(0.6 * model.teacher_ms)


def test_one_slow_measurement_of_the_teacher_does_not_scale_every_ratio(monkeypatch):
    """Ratios are the model's prediction of a network over its prediction of the teacher.
    Over the measured teacher they inherit that one measurement's noise: on a real run the
    teacher measured 57.9 ms at fitting (41-43 ms before and after, the model's fit 45.0), and
    every network the search repaired onto 0.5 measured 0.68-0.80 of the teacher."""
    monkeypatch.setattr(
        lm, "measure_spec", lambda spec, dep: latency.Latency(_roofline_ms(spec), 0.0, 1)
    )
    ends = {
        "t": SMALL,
        "s": space.widths_from_ratios(SMALL, dict.fromkeys(space.group_names(SMALL), 1e-12)),
    }
    slow = {"t": 1.4, "s": 1.0}  # the teacher's rounds ran while the machine was slow
    monkeypatch.setattr(
        lm,
        "measure_together",
        lambda nets, dep: {k: {"median_ms": slow[k] * _roofline_ms(ends[k])} for k in nets},
    )
    cfg = LatencyConfig(runtime="torch", fit_networks=12, check_networks=0, **QUICK)
    model = lm.build_latency_model(SMALL, cfg, 0.6, log=lambda _: None)
    for spec in lm.random_specs(SMALL, 10, seed=5):
        true = _roofline_ms(spec) / _roofline_ms(SMALL)
        assert model.ratio(spec) == pytest.approx(true, rel=0.15), (model.ratio(spec), true)
    assert model.ratio(SMALL) == pytest.approx(1.0)
    assert model.target_ratio == pytest.approx(0.6)


def test_latency_model_on_measurements_is_built_and_sane():
    # a target well above the narrowest network's fixed cost (0.62x the teacher on a busy CI
    # machine): this test is about the fit, not about reaching a tight target
    cfg = LatencyConfig(runtime="torch", fit_networks=4, check_networks=4, **QUICK)
    model = lm.build_latency_model(SMALL, cfg, 0.9, log=lambda _: None)
    assert model.error["networks"] == 4 and np.isfinite(model.error["mape_pct"])
    assert all(c >= 0 for c in model.coef) and model.predict_ms(SMALL) > 0


def test_the_model_measures_with_the_configured_run_time_after_a_round_trip():
    """The finals are measured with the deployment the model carries: the configured
    ``min_run_time`` travels with it (also through ``latency.json``), not a default."""
    cfg = LatencyConfig(runtime="torch", fit_networks=4, check_networks=0, **QUICK)
    model = lm.build_latency_model(SMALL, cfg, 0.9, log=lambda _: None)
    again = lm.LatencyModel.from_dict(json.loads(json.dumps(model.as_dict())))
    assert again == model and again.deployment().min_run_time == QUICK["min_run_time"]
    old = {k: v for k, v in model.as_dict().items() if k != "min_run_time"}  # before the field
    assert lm.LatencyModel.from_dict(old).deployment().min_run_time == 0.2


def test_rules_repair_onto_the_predicted_budget():
    model = _fake_model(target_ratio=0.5)
    rules = space.SpaceRules(granularity="stage", target=0.5, metric="latency", latency=model)
    genome = {"stage0": 0.3, "stage1": 1.0, "stage2": 0.6}
    student = space.candidate_spec(rules, SMALL, genome)
    assert model.predict_ms(student) <= model.target_ms
    assert space.control_genome(rules, SMALL)
    space.check_budget(rules, SMALL)


def _one_round(ms: float) -> dict:
    """A measurement of one round, as :func:`latency.measure_together` summarises it."""
    return {"median_ms": ms, "iqr_ms": 0.0, "runs": 10, "rounds_ms": [ms]}


def _device_with_a_fixed_cost(model: lm.LatencyModel, extra: float):
    """Teacher and student "measured" on a device whose every network pays ``extra`` times
    the teacher's predicted latency on top of the prediction: a per-call cost the model
    misses, which weighs most on a narrow network (what under-prediction looks like)."""

    def measure_beside_teacher(teacher, student, dep, rounds=3):
        fixed = extra * model.predict_ms(teacher)
        got = {"teacher": teacher, "student": student}
        return {k: _one_round(model.predict_ms(s) + fixed) for k, s in got.items()}

    return measure_beside_teacher


def test_repair_measured_repairs_again_when_the_model_under_predicts(monkeypatch):
    model = _fake_model(target_ratio=0.5)
    calls = []
    device = _device_with_a_fixed_cost(model, 0.3)

    def measured(teacher, student, dep, rounds=3):
        calls.append(student)
        return device(teacher, student, dep, rounds)

    monkeypatch.setattr(latency_repair, "measure_beside_teacher", measured)
    genome = space.uniform_genome(SMALL, "stage")
    student, lat = latency_repair.repair_measured(SMALL, "stage", genome, model)
    assert len(calls) >= 2
    teacher_ms = device(SMALL, SMALL, None)["teacher"]["median_ms"]
    assert lat.median_ms <= 0.5 * teacher_ms * (1 + lm.TOLERANCE)


def test_a_network_measured_far_under_the_target_is_grown_back_towards_it(monkeypatch):
    """One slow measurement (a busy neighbour during the first rounds) must not leave the
    network at a fraction of the budget: seen on a real run, the winner of a 0.5x budget was
    cut to 0.093 of the FLOPs and measured 0.66 of the target. Measured repair brings a
    network measured far under the target back up, and never over it."""
    model = _fake_model(target_ratio=0.5)
    calls = []

    def measured(teacher, student, dep, rounds=3):  # the device is the model, except that
        calls.append(student)  # the first student measures 1.6x slower than it is
        slow = 1.6 if len(calls) == 1 else 1.0
        return {
            "teacher": _one_round(model.predict_ms(teacher)),
            "student": _one_round(slow * model.predict_ms(student)),
        }

    monkeypatch.setattr(latency_repair, "measure_beside_teacher", measured)
    genome = space.uniform_genome(SMALL, "stage")
    student, lat = latency_repair.repair_measured(SMALL, "stage", genome, model)
    target = model.target_ms
    assert (1 - lm.SLACK) * target <= lat.median_ms <= target * (1 + lm.TOLERANCE)
    assert lat.median_ms == model.predict_ms(student) and len(calls) >= 3


def test_budget_holds_after_repair_as_measured():
    cfg = LatencyConfig(runtime="torch", fit_networks=8, check_networks=0, **STEADY)
    model = lm.build_latency_model(SMALL, cfg, 0.85, log=lambda _: None)
    genome = {"stage0": 0.5, "stage1": 1.0, "stage2": 0.7}
    student, _ = latency_repair.repair_measured(SMALL, "stage", genome, model)
    assert student != SMALL
    # measured again beside the teacher: within the budget up to a rerun's movement
    ms = latency_repair.measure_beside_teacher(SMALL, student, model.deployment(), rounds=5)
    assert ms["student"]["median_ms"] <= 0.85 * ms["teacher"]["median_ms"] * 1.15


def test_a_relative_budget_is_judged_beside_the_teacher_measured_in_the_same_rounds():
    """A machine slower now than when the model was fitted (a busy neighbour, a throttled
    CPU) slows teacher and student alike. A budget given as a fraction of the teacher is
    checked against the teacher measured in the same interleaved rounds, so a model fitted
    on a machine twice as fast neither shrinks the network to half the budget nor fails."""
    cfg = LatencyConfig(runtime="torch", fit_networks=8, check_networks=0, **STEADY)
    fitted = lm.build_latency_model(SMALL, cfg, 0.85, log=lambda _: None)
    stale = replace(  # every figure as if measured on a machine twice as fast
        fitted,
        coef=tuple(c / 2 for c in fitted.coef),
        teacher_ms=fitted.teacher_ms / 2,
        target_ms=fitted.target_ms / 2,
    )
    genome = {"stage0": 0.5, "stage1": 1.0, "stage2": 0.7}
    student, _ = latency_repair.repair_measured(SMALL, "stage", genome, stale)
    nets = {"teacher": build_model(SMALL), "student": build_model(student)}
    ms = latency.measure_together(nets, stale.deployment(), rounds=5)
    ratio = ms["student"]["median_ms"] / ms["teacher"]["median_ms"]
    # below 0.85 of the teacher, not near 0.425 (the stale milliseconds). The lower bound
    # leaves room for the model's own error on this tiny network: measured repair only ever
    # lowers a network, and a model that over-predicts lands below 0.85 (0.55 was seen)
    assert 0.5 < ratio < 1.0, ratio


def test_a_target_below_the_fastest_network_is_refused():
    cfg = LatencyConfig(runtime="torch", target_ms=1e-6, fit_networks=4, **QUICK)
    with pytest.raises(errors.BudgetError) as err:
        lm.build_latency_model(SMALL, cfg, 0.5, log=lambda _: None)
    msg = str(err.value)
    assert msg.startswith("space.budget.target: ") and "fastest reachable" in msg
    assert "\n" not in msg


def test_finetune_measures_and_repairs_winner_and_uniform_onto_the_budget(monkeypatch):
    model = _fake_model(target_ratio=0.5)
    rules = space.SpaceRules(granularity="stage", target=0.5, metric="latency", latency=model)
    genome = {"stage0": 0.4, "stage1": 1.0, "stage2": 0.6}
    specs = {
        "winner": space.candidate_spec(rules, SMALL, genome),
        "uniform": space.candidate_spec(rules, SMALL, space.control_genome(rules, SMALL)),
    }

    device = _device_with_a_fixed_cost(model, 0.2)
    monkeypatch.setattr(latency_repair, "measure_beside_teacher", device)
    winner = pd.Series({"genome": json.dumps(genome)})
    logs: list[str] = []
    out = finetune._onto_measured_budget(specs, winner, rules, SMALL, logs.append)
    for name in ("winner", "uniform"):
        assert out[name] != specs[name]  # repaired again from the measurement
        ms = device(SMALL, out[name], None)
        limit = 0.5 * ms["teacher"]["median_ms"] * (1 + lm.TOLERANCE)
        assert ms["student"]["median_ms"] <= limit
    assert len(logs) == 2 and "repaired from its trained widths" in logs[0]
    assert "repaired from the measurement" in logs[1]


def test_a_winner_measured_within_the_budget_is_fine_tuned_as_searched(monkeypatch):
    """Judged once: on a real run the search's best trial measured 1.019 of the target
    (within), the fine-tune measured it again over 1.03, and measured repair cut it from
    0.348 to 0.232 of the FLOPs; it fine-tuned 2.1 points below uniform. A winner that
    :func:`measured_winner` measured within the budget (and not far under it) keeps the
    widths it was searched with; the uniform network is still measured and repaired."""
    model = _fake_model(target_ratio=0.5)
    rules = space.SpaceRules(granularity="stage", target=0.5, metric="latency", latency=model)
    genome = {"stage0": 0.4, "stage1": 1.0, "stage2": 0.6}
    specs = {
        "winner": space.candidate_spec(rules, SMALL, genome),
        "uniform": space.candidate_spec(rules, SMALL, space.control_genome(rules, SMALL)),
    }
    device = _device_with_a_fixed_cost(model, 0.2)
    monkeypatch.setattr(latency_repair, "measure_beside_teacher", device)
    for fraction, kept in ((1.02, True), (0.95, True), (0.8, False), (float("nan"), False)):
        winner = pd.Series({"genome": json.dumps(genome), "measured_fraction": fraction})
        out = finetune._onto_measured_budget(specs, winner, rules, SMALL, lambda _: None)
        assert (out["winner"] == specs["winner"]) is kept, fraction
        assert out["uniform"] != specs["uniform"]


def test_the_run_keeps_its_latency_model_and_reuses_it(tmp_path):
    # target 0.9: on a busy CI machine the narrowest network's fixed cost measured above 0.7
    cfg = ExperimentConfig(
        output_dir=str(tmp_path),
        space={"budget": {"metric": "latency", "target": 0.9, "latency": {
            "runtime": "torch", "fit_networks": 4, "check_networks": 0, **QUICK, **FEATURES}}},
    )  # fmt: skip
    rules = space.rules_of(cfg.space, cfg.search.algorithm)
    fitted = pipeline_latency.with_latency(cfg, rules, SMALL, lambda _: None)
    assert fitted.latency is not None and fitted.latency.teacher_ms > 0
    cfg.run_dir.mkdir(parents=True)
    pipeline_latency.save_latency(cfg, fitted)
    logs: list[str] = []
    again = pipeline_latency.with_latency(cfg, rules, SMALL, logs.append)
    assert again.latency == fitted.latency and "reusing" in logs[0]
    flops_rules = space.rules_of(ExperimentConfig().space, "optuna-tpe")
    assert pipeline_latency.with_latency(cfg, flops_rules, SMALL, print) is flops_rules


def test_a_latency_model_saved_before_the_table_is_reused_as_the_features_model(tmp_path):
    """``latency.json`` files from before ``predictor`` existed hold a features model: the
    setting ``features`` reuses them (as the search stage that used them is reused); the
    default, a table, fits anew."""
    budget = {"metric": "latency", "latency": {"predictor": "features"}}
    old = ExperimentConfig(output_dir=str(tmp_path), space={"budget": budget})
    rules = space.rules_of(old.space, old.search.algorithm)
    fitted = replace(rules, latency=_fake_model())
    old.run_dir.mkdir(parents=True)
    pipeline_latency.save_latency(old, fitted)
    saved = json.loads((old.run_dir / pipeline_latency.LATENCY_FILE).read_text())
    assert "predictor" not in saved["settings"]  # as written before the setting
    assert pipeline_latency.saved_latency(old, rules).latency == fitted.latency
    budget["latency"]["predictor"] = "table"
    new = ExperimentConfig(output_dir=str(tmp_path), space={"budget": budget})
    assert pipeline_latency.saved_latency(new, rules).latency is None


def test_a_device_with_a_channel_block_gets_candidates_in_whole_blocks(tmp_path, monkeypatch):
    """When the fitted model finds convolutions off whole blocks slower, every candidate's
    widths are whole blocks (with ``space.divisible_by``), in the run that fits the model and
    in a stage that reads it back; ``align_channels: false`` searches every width and says
    which ``space.divisible_by`` would keep them on the fast path."""
    monkeypatch.setattr(
        pipeline_latency, "build_latency_model", lambda *a, **k: replace(_fake_model(), block=4)
    )
    genome = {"stage0": 0.45, "stage1": 0.8, "stage2": 0.6}
    for divisible_by, align, step, hinted in ((1, True, 4, False), (2, True, 4, False),
                                              (1, False, 1, True)):  # fmt: skip
        cfg = ExperimentConfig(
            output_dir=str(tmp_path / f"{divisible_by}-{align}"),
            space={"divisible_by": divisible_by, "budget": {"metric": "latency", "latency": {
                "align_channels": align, "calibrate_networks": 0, **FEATURES}}},
        )  # fmt: skip
        rules = space.rules_of(cfg.space, cfg.search.algorithm)
        logs: list[str] = []
        fitted = pipeline_latency.with_latency(cfg, rules, SMALL, logs.append)
        cfg.run_dir.mkdir(parents=True)
        pipeline_latency.save_latency(cfg, fitted)
        for r in (fitted, pipeline_latency.saved_latency(cfg, rules)):
            assert r.divisible_by == step
            student = space.candidate_spec(r, SMALL, genome)
            widths = family_of(student).width_vector(student)
            assert all(w % step == 0 for w in widths)
        assert any("space.divisible_by: 4" in line for line in logs) is hinted
        assert any("every width a whole block" in line for line in logs) is not hinted
    # unaligned, the same genome keeps widths off whole blocks of 4
    widths = family_of(student).width_vector(student)
    assert any(w % 4 for w in widths)
    # blocks of 8 leave SMALL (8/16/32 channels) no network within half its latency, blocks
    # of 4 do: the largest block dividing the model's that reaches the target is searched
    for target, step in ((0.5, 4), (0.2, 1)):
        cfg = ExperimentConfig(
            output_dir=str(tmp_path / f"8-{target}"),
            space={"budget": {"metric": "latency", "target": target,
                              "latency": {"calibrate_networks": 0, **FEATURES}}},
        )  # fmt: skip
        logs = []
        rules = space.rules_of(cfg.space, cfg.search.algorithm)
        model = replace(_fake_model(target_ratio=target), block=8)
        monkeypatch.setattr(pipeline_latency, "build_latency_model", lambda *a, m=model, **k: m)
        assert pipeline_latency.with_latency(cfg, rules, SMALL, logs.append).divisible_by == step
        assert "no network in whole blocks of 8 reaches the target" in logs[0]
        assert ("every width is searched" in logs[-1]) is (step == 1)


def test_blocks_that_leave_one_network_at_the_target_are_not_searched(tmp_path, monkeypatch):
    """Seed 1 of the judged-once runs: blocks of 16 reached 0.5 of ResNet-20's latency only
    with every layer at 16 channels, so all 48 trials trained that one network (3 points
    under uniform in blocks of 8). A block whose uniform network at the target is already its
    narrowest network leaves nothing to search: the next smaller block is searched."""
    model = replace(_fake_model(target_ratio=0.5), block=8)
    low8 = space.smallest_ratio(SMALL, "latency", divisible_by=8, ratio_fn=model.ratio)
    target = low8 * 1.01  # the all-8 network fits, nothing wider in blocks of 8 does
    model = replace(model, target_ms=target * model.teacher_ms)
    monkeypatch.setattr(pipeline_latency, "build_latency_model", lambda *a, **k: model)
    cfg = ExperimentConfig(
        output_dir=str(tmp_path),
        space={"budget": {"metric": "latency", "target": target,
                          "latency": {"calibrate_networks": 0, **FEATURES}}},
    )  # fmt: skip
    rules = space.rules_of(cfg.space, cfg.search.algorithm)
    logs: list[str] = []
    fitted = pipeline_latency.with_latency(cfg, rules, SMALL, logs.append)
    assert fitted.divisible_by == 4, logs
    assert any("one network" in line for line in logs), logs


def test_a_trial_reports_its_predicted_latency_ratio_within_the_budget():
    cfg = ExperimentConfig(space={"budget": {"metric": "latency"}})
    rules = replace(space.rules_of(cfg.space, "optuna-tpe"), latency=_fake_model())
    plan = trial_plan(cfg.space, cfg.distill, cfg.search, seed=0, rules=rules)
    genome = {"stage0": 0.3, "stage1": 1.0, "stage2": 0.6}
    student, facts = candidate_facts(plan, SMALL, genome)
    assert facts["latency_ratio"] == pytest.approx(rules.ratio(student, SMALL))
    assert facts["latency_ratio"] <= rules.latency.target_ratio


def test_repair_measured_gives_up_in_one_line_when_nothing_meets_the_target(monkeypatch):
    model = _fake_model(target_ratio=0.5)

    def measured(teacher, student, dep, rounds=3):  # every student 1000x its teacher
        return {"teacher": _one_round(1.0), "student": _one_round(1e3)}

    monkeypatch.setattr(latency_repair, "measure_beside_teacher", measured)
    with pytest.raises(errors.BudgetError) as err:
        latency_repair.repair_measured(SMALL, "stage", space.uniform_genome(SMALL, "stage"), model)
    assert str(err.value).startswith("space.budget.target: ") and "\n" not in str(err.value)


def _scripted_device(monkeypatch, base: dict[str, float], slow_calls: set[int]):
    """``measure`` on a device where each network takes its ``base`` milliseconds, 1.5x on
    the calls (counted from 0, in the order they are made) in ``slow_calls``: a burst of load
    that falls between one round's teacher and its student."""
    calls: list[str] = []

    def measure(model, dep):
        name = model.name
        slow = 1.5 if len(calls) in slow_calls else 1.0
        calls.append(name)
        return latency.Latency(base[name] * slow, 0.0, 5)

    monkeypatch.setattr(latency, "measure", measure)
    return calls


def _named(name: str) -> torch.nn.Module:
    net = torch.nn.Identity()
    net.name = name
    return net


def test_a_burst_of_load_inside_rounds_does_not_decide_the_verdict(monkeypatch):
    """A network is judged round by round, against the target beside the teacher measured
    in the same round. Seen on a real run: the report measured the winner at 31.45 ms beside
    a 45.58 ms teacher (0.69 of it, "no", its rounds 9.3 ms apart) after measured repair had
    kept it within 0.5; the same widths measured 0.41 on an idle machine. Here the student
    takes 0.475 of the teacher, and a burst slows the second round's student and the next
    round's teacher: the medians of each network's rounds (30 ms over 40 ms) said "no"."""
    model = lm.LatencyModel((1.0, 0, 0, 0, 0), 40.0, 20.0, "torch", (1, 3, 8, 8), 1)
    nets = {"teacher": _named("teacher"), "winner": _named("winner")}
    base = {"teacher": 40.0, "winner": 19.0}
    # calls 0-5 are rounds 1-3 (teacher, winner); the burst hits calls 3, 4 and 5
    calls = _scripted_device(monkeypatch, base, slow_calls={3, 4, 5})
    got = pipeline_latency.judge_budget(nets, model, rounds=3)
    w = got["winner"]
    assert w["within_budget"] and w["fraction_of_target"] == pytest.approx(0.95)
    # the rounds disagreed (1.425 in one), so as many again were measured and pooled
    assert len(calls) == 12 and w["rounds"] == 6 and w["rounds_within"] == 5
    assert got["teacher"]["rounds_ms"][:3] == [40.0, 40.0, 60.0]
    assert w["teacher_ratio"] == pytest.approx(0.475)


def test_a_network_over_the_budget_in_every_round_fails_without_more_rounds(monkeypatch):
    model = lm.LatencyModel((1.0, 0, 0, 0, 0), 40.0, 20.0, "torch", (1, 3, 8, 8), 1)
    nets = {"teacher": _named("teacher"), "winner": _named("winner")}
    calls = _scripted_device(monkeypatch, {"teacher": 40.0, "winner": 24.0}, slow_calls=set())
    w = pipeline_latency.judge_budget(nets, model, rounds=3)["winner"]
    assert not w["within_budget"] and w["rounds_within"] == 0 and len(calls) == 6
    assert w["fraction_of_target"] == pytest.approx(1.2)


def test_the_winner_is_the_best_trial_within_the_budget_as_measured(monkeypatch):
    """The search ranks networks the model predicted within the budget; the best-scoring are
    disproportionately the ones it under-predicts (on a real run measured repair then cut
    the winner from 0.354 to 0.198 of the FLOPs, 4.5 points below uniform). The finalists
    are measured, best first, and the first within the budget wins; none: the best."""
    model = _fake_model(target_ratio=0.5)
    rules = space.SpaceRules(granularity="stage", target=0.5, metric="latency", latency=model)
    specs = [space.candidate_spec(rules, SMALL, {"stage0": a, "stage1": b, "stage2": c})
             for a, b, c in ((1.0, 0.5, 0.3), (0.3, 1.0, 0.5), (0.5, 0.3, 1.0))]  # fmt: skip
    assert len({s.model_dump_json() for s in specs}) == 3
    trials = pd.DataFrame({
        "trial_id": ["best", "second", "third"], "best_val_acc": [0.9, 0.8, 0.7],
        "flops": [1, 1, 1], "completed": True, "meets_budget": True, "status": "TERMINATED",
        "widths": [s.model_dump_json() for s in specs],
    })  # fmt: skip

    def params(net) -> int:
        return sum(p.numel() for p in net.parameters())

    def device(fraction: dict[str, float]):  # each trial's measured fraction of the target
        ms = {params(build_model(SMALL)): 40.0}
        for tid, spec in zip(trials["trial_id"], specs, strict=True):
            ms[params(build_model(spec))] = 20.0 * fraction[tid]
        measured: list[str] = []

        def measure_rounds(nets, dep, rounds=3):
            got = {k: [latency.Latency(ms[params(n)], 0.0, 5)] * rounds for k, n in nets.items()}
            measured.append(got["student"][0].median_ms)
            return got

        monkeypatch.setattr(pipeline_latency, "measure_rounds", measure_rounds)
        return measured

    logs: list[str] = []
    measured = device({"best": 1.3, "second": 0.97, "third": 0.8})
    row = pipeline_latency.measured_winner(trials, rules, SMALL, logs.append)
    assert row["trial_id"] == "second" and measured == [26.0, 19.4]  # third never measured
    assert row["measured_fraction"] == pytest.approx(0.97)  # the fine-tune keeps it as is
    assert any("trial best" in line and "1.300 of the latency target" in line for line in logs)
    assert "trial second" in logs[-1] and logs[-1].endswith("the winner")
    # kept for the report: which better-validated trials measured over and were passed over
    checked = row["finalists_measured"]
    assert [c["trial_id"] for c in checked] == ["best", "second"]
    assert [c["within_budget"] for c in checked] == [False, True]
    assert checked[0]["fraction_of_target"] == pytest.approx(1.3)
    assert checked[0]["predicted_fraction"] == pytest.approx(model.ratio(specs[0]) / 0.5, abs=1e-5)
    device({"best": 1.3, "second": 1.2, "third": 1.1})
    row = pipeline_latency.measured_winner(trials, rules, SMALL, logs.append)
    assert row["trial_id"] == "best" and math.isnan(row["measured_fraction"])  # to be cut
    assert "no finished trial measured within" in logs[-1]


def _calibration_device(monkeypatch, model, factor: float) -> list[int]:
    """A device on which every network but the teacher (SMALL) measures ``factor`` times the
    model's prediction; returns the sizes of the measured rounds' network sets."""
    monkeypatch.setattr(pipeline_latency, "build_latency_model", lambda *a, **k: model)
    built = pipeline_latency.build_model

    def build(spec):  # the device below reads the widths back from the network
        net = built(spec)
        net.spec = spec
        return net

    def device(spec) -> float:
        return model.predict_ms(spec) * (1.0 if spec == SMALL else factor)

    calls: list[int] = []

    def measure_rounds(nets, dep, rounds=3):
        calls.append(len(nets))
        return {k: [latency.Latency(device(n.spec), 0.0, 5)] * rounds for k, n in nets.items()}

    monkeypatch.setattr(pipeline_latency, "build_model", build)
    monkeypatch.setattr(pipeline_latency, "measure_rounds", measure_rounds)
    return calls


def _calibrated_config(tmp_path, target: float) -> ExperimentConfig:
    return ExperimentConfig(
        output_dir=str(tmp_path),
        space={"granularity": "stage", "budget": {
            "metric": "latency", "target": target,
            "latency": {"calibrate_networks": 8, **FEATURES}}},
    )  # fmt: skip


def test_the_model_is_calibrated_where_the_search_looks(tmp_path, monkeypatch):
    """On a real run the model's error on random networks was 7.9 %, yet it under-predicted
    every network the search kept by 16-45 %: the search looks at networks near the target
    in whole blocks, not at random ones. Networks drawn as the search draws them (random
    genomes repaired onto the target) are measured beside the teacher before the search,
    and the model's ratios scaled by the median measured over predicted ratio: the search's
    candidates then measure on the target. A reused model is not measured again."""
    model = _fake_model(target_ratio=0.6)
    calls = _calibration_device(monkeypatch, model, 1.25)  # 25 % slower than predicted
    cfg = _calibrated_config(tmp_path, 0.6)
    rules = space.rules_of(cfg.space, cfg.search.algorithm)
    logs: list[str] = []
    fitted = pipeline_latency.with_latency(cfg, rules, SMALL, logs.append)
    # the teacher beside 8 networks of the searched space, then beside 4 fresh ones drawn
    # with the calibrated model, the check of it
    assert calls == [9, 5]
    assert fitted.latency.calibration == pytest.approx(1.25)
    checked = fitted.latency.error["searched_space"]
    assert checked["networks"] == 8 and checked["before"]["bias_pct"] == pytest.approx(-20, abs=1)
    assert checked["after"]["mape_pct"] < 1 and any("calibrated" in line for line in logs)
    held_out = checked["held_out"]
    assert held_out["networks"] == 4 and held_out["mape_pct"] < 1
    assert held_out["within_budget"] == 4

    def measured_ratio(spec) -> float:
        return 1.25 * model.ratio(spec)

    rng = np.random.default_rng(0)
    uncalibrated = replace(rules, latency=model)
    over = 0
    for _ in range(6):
        genome = {g: float(rng.uniform(0.2, 1.0)) for g in space.gene_names(SMALL, "stage")}
        student = space.candidate_spec(fitted, SMALL, genome)
        assert measured_ratio(student) <= 0.6 * (1 + lm.TOLERANCE)
        naive = space.candidate_spec(uncalibrated, SMALL, genome)
        over += measured_ratio(naive) > 0.6 * (1 + lm.TOLERANCE)
    assert over >= 4  # without the calibration most would have been over the budget
    cfg.run_dir.mkdir(parents=True)
    pipeline_latency.save_latency(cfg, fitted)
    again = pipeline_latency.with_latency(cfg, rules, SMALL, logs.append)
    assert again.latency == fitted.latency and calls == [9, 5]


def test_a_resumed_run_searches_the_blocks_it_searched_before_calibration(tmp_path, monkeypatch):
    """Whole blocks are chosen with the fitted model, before it is calibrated. A resumed run
    reuses the saved step: decided again with the calibrated model (here 0.6x: blocks of 8,
    out of reach at fitting, would now reach the target) it would search another space
    than the trials already run."""
    model = replace(_fake_model(target_ratio=0.5), block=8)
    calls = _calibration_device(monkeypatch, model, 0.6)
    cfg = _calibrated_config(tmp_path, 0.5)
    rules = space.rules_of(cfg.space, cfg.search.algorithm)
    fitted = pipeline_latency.with_latency(cfg, rules, SMALL, lambda _: None)
    assert fitted.divisible_by == 4 and fitted.latency.calibration == pytest.approx(0.6)
    low_8 = space.smallest_ratio(SMALL, "latency", divisible_by=8, ratio_fn=fitted.latency.ratio)
    assert low_8 <= 0.5  # in reach with the calibrated model
    cfg.run_dir.mkdir(parents=True)
    pipeline_latency.save_latency(cfg, fitted)
    again = pipeline_latency.with_latency(cfg, rules, SMALL, lambda _: None)
    assert again.divisible_by == 4 and again.latency == fitted.latency and len(calls) == 2


@pytest.mark.parametrize("target", [0.5, 0.6, 0.7, 0.9])
def test_calibration_never_puts_the_target_out_of_reach(tmp_path, monkeypatch, target):
    """A device far slower than the model says (5x) would scale the ratios until not even
    the smallest network (measured within the target at fitting) is predicted within it:
    the scale stops just short, and the search and its held-out check still draw networks.
    (At the limit exactly, rounding put the smallest network over and repair refused.)"""
    model = _fake_model(target_ratio=target)
    _calibration_device(monkeypatch, model, 5.0)
    cfg = _calibrated_config(tmp_path, target)
    rules = space.rules_of(cfg.space, cfg.search.algorithm)
    fitted = pipeline_latency.with_latency(cfg, rules, SMALL, lambda _: None)
    low = space.smallest_ratio(SMALL, "latency", ratio_fn=fitted.latency.ratio)
    assert low <= target and low == pytest.approx(target)
    space.candidate_spec(fitted, SMALL, {"stage0": 1.0, "stage1": 1.0, "stage2": 1.0})


ALIGNED = spec_for("resnet8", width=16)


def _aligned_model(target_ratio: float = 0.5) -> lm.LatencyModel:
    """A latency model with a channel block of 4 (convolutions off whole blocks cost more)."""
    coef = (0.05, 20.0, 1.0, 0.1, 5.0)
    teacher_ms = float(lm.features(ALIGNED, 4) @ np.array(coef))
    shape = (1, 3, 32, 32)
    return lm.LatencyModel(coef, teacher_ms, target_ratio * teacher_ms, "torch", shape, 4)


def test_a_trained_network_over_the_goal_loses_the_least_it_can():
    """A trained network measured a few % over the budget: rescaling its genome in whole
    blocks moved several layers at once (a real run: 0.348 -> 0.232 of the FLOPs for a
    winner 3 % over); cutting single blocks keeps more of it, never over the goal, never
    wider than it was, and no block cut could be added back within the goal."""
    model = _aligned_model()
    rules = space.SpaceRules(
        granularity="layer", target=0.5, metric="latency", latency=model, divisible_by=4
    )
    rng = np.random.default_rng(0)
    genes = space.gene_names(ALIGNED, "layer")
    kept = []
    for _ in range(5):
        genome = {g: float(rng.uniform(0.2, 1.0)) for g in genes}
        spec = space.candidate_spec(rules, ALIGNED, genome)
        for over in (1.02, 1.05, 1.1):
            goal = model.ratio(spec) / over
            kw = {"divisible_by": 4, "ratio_fn": model.ratio}
            rescaled = space.repair(ALIGNED, "layer", genome, target=goal, metric="latency", **kw)
            cut = latency_repair.nearest_within(spec, ALIGNED, goal, **kw)
            assert model.ratio(cut) <= goal
            widths = family_of(cut).width_vector(cut)
            assert all(w % 4 == 0 for w in widths)
            trained = family_of(spec).width_vector(spec)
            assert all(widths <= trained)  # only cut: its own allocation, not another
            for i in range(len(widths)):  # grown back as far as the goal allows
                if widths[i] < trained[i]:
                    wider = widths.copy()
                    wider[i] += 4
                    assert model.ratio(family_of(cut).with_widths(cut, wider)) > goal
            kept.append(flops(cut) - flops(rescaled[0]))
    # greedy single cuts can lose a little more than the rescale (repair_trained keeps the
    # better of the two); on average they keep more
    assert np.mean(kept) > 0 and sum(k > 0 for k in kept) > sum(k < 0 for k in kept)


def test_a_winner_over_the_budget_is_cut_by_single_blocks_not_rescaled(monkeypatch):
    """Finetune's measured repair of a winner the search's measurement did not find within
    the budget starts from the network it trained (:func:`latency_repair.repair_trained`)."""
    model = _aligned_model()
    rules = space.SpaceRules(
        granularity="layer", target=0.5, metric="latency", latency=model, divisible_by=4
    )
    genes = space.gene_names(ALIGNED, "layer")
    ratios = np.random.default_rng(1).uniform(0.2, 1.0, len(genes)).tolist()
    genome = dict(zip(genes, ratios, strict=True))
    specs = {
        "winner": space.candidate_spec(rules, ALIGNED, genome),
        "uniform": space.candidate_spec(rules, ALIGNED, space.control_genome(rules, ALIGNED)),
    }
    device = _device_with_a_fixed_cost(model, 0.1)  # 7 % over at half the teacher
    monkeypatch.setattr(latency_repair, "measure_beside_teacher", device)
    winner = pd.Series({"genome": json.dumps(genome), "measured_fraction": float("nan")})
    out = finetune._onto_measured_budget(specs, winner, rules, ALIGNED, lambda _: None)
    rescaled, _ = latency_repair.repair_measured(ALIGNED, "layer", genome, model, divisible_by=4)
    ms = device(ALIGNED, out["winner"], None)
    assert ms["student"]["median_ms"] <= 0.5 * ms["teacher"]["median_ms"] * (1 + lm.TOLERANCE)
    assert out["winner"] != specs["winner"]
    assert flops(out["winner"]) > flops(rescaled)
