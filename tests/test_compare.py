"""The method comparison end to end on tiny data: four arms per seed, one recipe, stats."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import yaml
from conftest import write_fake_fashion_mnist, write_run_config

from casd_ray.cli import main
from casd_ray.errors import BudgetError
from casd_ray.models.family import spec_for
from casd_ray.report.deploy import validated_pick
from casd_ray.study import latency_arms
from casd_ray.study.compare import ARMS, LATENCY_ARMS, _model_line, summarize
from casd_ray.widths import latency_model as lm
from casd_ray.widths import latency_repair, space
from casd_ray.widths.baselines import aligned_uniform


def test_compare_runs_every_arm_with_one_recipe(tmp_path, capsys):
    data = write_fake_fashion_mnist(tmp_path / "data", n=160, n_test=40)
    config = write_run_config(
        tmp_path / "c.yaml",
        tmp_path / "runs",
        data,
        name="cmp",
        # rung 0 then FIFO: both searches screen 6 candidates and distil exactly 3
        search={"num_samples": 6, "scheduler": "fifo", "screen": {"promote": 3, "steps": 2}},
    )
    assert main(["compare", str(config), "--seeds", "0", "1"]) == 0
    out = capsys.readouterr().out
    assert "| winner − | mean (points) | 95% CI |" in out
    result = json.loads((tmp_path / "runs" / "cmp-compare.json").read_text())
    assert (tmp_path / "runs" / "cmp-compare.md").is_file()
    for seed in ("0", "1"):
        arms = result["per_seed"][seed]
        assert set(arms) == {*ARMS, "picked", "search_cost", "random_cost"}
        same = [a for a in ARMS if a != "uniform_ce"]  # CE alone is the one recipe change
        settings = [
            {k: v for k, v in arms[a]["settings"].items() if k not in ("widths", "start")}
            for a in same
        ]
        assert all(s == settings[0] for s in settings)  # identical recipe, seed, teacher
        assert arms["torch_pruning"]["settings"]["start"] == "torch_pruning"  # its own weights
        assert arms["uniform_ce"]["settings"]["widths"] == arms["uniform"]["settings"]["widths"]
        for a in ARMS:
            assert 0 <= arms[a]["test_acc"] <= 1
            assert arms[a]["flops_ratio"] <= 0.5 + 1e-9
        assert arms["search_cost"]["multiple"] > 0
        # the random arm spends what the search spends: the same candidates and epochs
        search, rnd = arms["search_cost"], arms["random_cost"]
        assert (rnd["trials"], rnd["distilled"]) == (search["trials"], search["distilled"])
        assert rnd["trial_epochs"] == search["trial_epochs"]
    assert result["summary"]["winner_minus"]["uniform"]["ci95"] is not None
    for seed in ("0", "1"):  # the network a user deploys: the better of the two on validation
        arms = result["per_seed"][seed]
        picked = arms["picked"]
        assert picked["val_acc"] == max(arms["winner"]["val_acc"], arms["uniform"]["val_acc"])
        assert picked["test_acc"] == arms[picked["part"]]["test_acc"]
    assert "picked_minus" in result["summary"]
    # a second call reuses every run and arm
    assert main(["compare", str(config), "--seeds", "0", "1"]) == 0
    assert "compare: reusing" in capsys.readouterr().out


def test_compare_under_a_latency_budget_holds_every_arm_to_the_measured_budget(
    tmp_path, capsys, monkeypatch
):
    """Under a latency budget the arms are held to the same *measured* latency: the random
    search repairs with the seed run's own latency model, the FLOPs-budget search's winner
    and the global ranking are scaled onto the budget, and every arm is measured beside the
    teacher. (The smoke ResNet-8 of width 4 is mostly per-layer overhead: batch 32, 0.95.)"""
    data = write_fake_fashion_mnist(tmp_path / "data", n=160, n_test=40)
    latency = {"runtime": "torch", "batch_size": 32, "fit_networks": 4, "check_networks": 0,
               "min_run_time": 0.02}  # fmt: skip
    config = write_run_config(
        tmp_path / "c.yaml",
        tmp_path / "runs",
        data,
        name="lat",
        space={"granularity": "stage", "budget": {"metric": "latency", "target": 0.95,
                                                  "latency": latency}},
        search={"num_samples": 4, "scheduler": "fifo", "screen": {"promote": 2, "steps": 2},
                "controls": ["uniform"]},
    )  # fmt: skip
    assert main(["compare", str(config), "--seeds", "0"]) == 0
    runs = tmp_path / "runs"
    result = json.loads((runs / "lat-compare.json").read_text())
    arms = result["per_seed"]["0"]
    out = capsys.readouterr().out
    built = [a for a in LATENCY_ARMS if a in arms]
    # whole channel blocks may not reach the budget of this 4-channel network: then said so
    assert set(LATENCY_ARMS) - set(built) <= {"uniform_aligned"}
    assert ("uniform_aligned" in arms) != ("no uniform_aligned arm" in out)
    assert set(arms) == {*built, "picked", "search_cost", "random_cost", "latency_model"}
    same = [a for a in built if a != "uniform_ce"]
    settings = [{k: v for k, v in arms[a]["settings"].items() if k != "widths"} for a in same]
    assert all(s == settings[0] for s in settings)  # identical recipe, seed, teacher
    for a in built:
        # measured side by side with the teacher after the fine-tunes. Each arm met the
        # budget when it was repaired from its measurement (tests/test_latency.py checks that
        # loop); this smoke network takes about a millisecond, so a later measurement on a
        # shared CPU moves by tens of percent (1.32 seen in CI; identical widths measured
        # 0.68-0.95 in one run): recorded, not bounded, here
        assert arms[a]["latency_ratio"] > 0, (a, arms[a]["latency_ratio"])
        assert isinstance(arms[a]["within_budget"], bool)  # judged round by round
    ratios: dict[str, set] = {}  # uniform_ce always has uniform's widths
    for a in built:
        key = json.dumps(arms[a]["settings"]["widths"], sort_keys=True)
        ratios.setdefault(key, set()).add(arms[a]["latency_ratio"])
    assert all(len(r) == 1 for r in ratios.values()), ratios  # one network, one measurement
    model = (runs / "lat-s0" / "latency.json").read_text()
    assert (runs / "lat-s0-random" / "latency.json").read_text() == model  # one model
    # the FLOPs-budget search a user would run instead, at the uniform network's FLOPs
    flops = yaml.safe_load((runs / "lat-s0-flops" / "config.yaml").read_text())
    assert flops["space"]["budget"]["metric"] == "flops"
    assert flops["space"]["budget"]["target"] == pytest.approx(arms["uniform"]["flops_ratio"])
    md = (runs / "lat-compare.md").read_text()
    assert "latency ratio (measured)" in md
    # which latency model held the arms, and its error, beside the figures it decided
    assert arms["latency_model"]["predictor"] == "table"
    assert "- seed 0: table, not checked on random networks (check_networks: 0)" in md

    # run again (to add a seed, say): the arms whose widths measurements decided are kept,
    # not measured, repaired and fine-tuned again onto other widths (measurements move)
    def measured_again(*args, **kwargs):
        raise AssertionError("an arm's widths measured again")

    monkeypatch.setattr(latency_repair, "measure_beside_teacher", measured_again)
    monkeypatch.setattr(latency_arms, "measured_winner", measured_again)
    assert main(["compare", str(config), "--seeds", "0"]) == 0
    again = json.loads((runs / "lat-compare.json").read_text())["per_seed"]["0"]
    for a in built:
        assert again[a]["settings"]["widths"] == arms[a]["settings"]["widths"], a


def _aligned_model(block: int, teacher, target_ratio: float = 0.5) -> lm.LatencyModel:
    # a device whose convolutions off whole blocks cost extra (the unaligned-FLOPs feature)
    coef = (0.05, 20.0, 1.0, 0.1, 40.0 if block > 1 else 0.0)
    teacher_ms = float(lm.features(teacher, block) @ np.array(coef))
    return lm.LatencyModel(coef, teacher_ms, target_ratio * teacher_ms, "torch",
                           (8, 3, 32, 32), 1, block=block)  # fmt: skip


def test_the_aligned_uniform_arm_keeps_whole_blocks_within_the_measured_budget(monkeypatch):
    """uniform_aligned: the uniform network with every width a whole block of the latency
    model's channel block, held to the budget as measured (here the device is the model)."""
    teacher = spec_for("resnet8", width=16)

    def device(model):
        def measure_beside_teacher(t, student, dep, rounds=3):
            got = {"teacher": t, "student": student}
            return {k: {"median_ms": model.predict_ms(s), "iqr_ms": 0.0, "runs": 1,
                        "rounds_ms": [model.predict_ms(s)]} for k, s in got.items()}  # fmt: skip

        return measure_beside_teacher

    for block in (8, 1):
        model = _aligned_model(block, teacher)
        monkeypatch.setattr(latency_repair, "measure_beside_teacher", device(model))
        rules = space.SpaceRules(granularity="stage", target=0.5, metric="latency", latency=model)
        uniform = space.candidate_spec(rules, teacher, space.control_genome(rules, teacher))
        spec = aligned_uniform(rules, teacher, uniform)
        widths = space._layout(spec)[1]
        full = space._layout(teacher)[1]
        assert all(w % block == 0 or w == f for w, f in zip(widths, full, strict=True))
        assert model.ratio(spec) <= 0.5 * (1 + lm.TOLERANCE)
        if block == 1:  # no fast path found: the uniform network itself
            assert spec == uniform
        else:  # off the slow path, the same budget keeps more of the network
            assert space.cost(spec, "flops") > space.cost(uniform, "flops")
    # whole blocks of 8 cannot reach a target below the all-8-channel network
    model = _aligned_model(8, teacher, target_ratio=0.01)
    rules = space.SpaceRules(granularity="stage", target=0.01, metric="latency", latency=model)
    with pytest.raises(BudgetError):
        aligned_uniform(rules, teacher, teacher)  # the uniform network: not reached


def test_a_search_in_whole_blocks_keeps_its_uniform_network_as_the_aligned_one(monkeypatch):
    """Where the run already searched in whole blocks (``align_channels``), its uniform
    network is the aligned uniform one: a second measured repair of the same genome, on
    another measurement, could land on other widths and fine-tune a needless arm."""
    teacher = spec_for("resnet8", width=16)
    model = _aligned_model(8, teacher)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(latency_repair, "measure_beside_teacher", no_measuring)
    rules = space.SpaceRules(granularity="stage", target=0.5, metric="latency", latency=model,
                             divisible_by=8)  # fmt: skip
    uniform = space.candidate_spec(rules, teacher, space.control_genome(rules, teacher))
    assert aligned_uniform(rules, teacher, uniform) == uniform


def test_the_aligned_uniform_arm_falls_back_to_the_block_the_run_searched_in(monkeypatch):
    """A device slow off blocks of 16 where no network in blocks of 16 reaches the target:
    the run searched in blocks of 8 (the largest dividing block that reaches it). The
    aligned uniform arm takes the same fallback: the run's own uniform network, unmeasured,
    where the run searched in blocks of 8; widths in blocks of 8 where it searched every
    width. It used to try blocks of 16 only, fail, and leave the arm out."""
    teacher = spec_for("resnet8", width=16)
    model = _aligned_model(16, teacher)  # all-16 networks predicted >= 0.62, all-8 0.46
    assert space.smallest_ratio(teacher, "latency", divisible_by=16, ratio_fn=model.ratio) > 0.5

    def device(t, student, dep, rounds=3):
        got = {"teacher": t, "student": student}
        return {k: {"median_ms": model.predict_ms(s), "iqr_ms": 0.0, "runs": 1,
                    "rounds_ms": [model.predict_ms(s)]} for k, s in got.items()}  # fmt: skip

    monkeypatch.setattr(latency_repair, "measure_beside_teacher", device)
    for searched in (8, 1):
        rules = space.SpaceRules(granularity="stage", target=0.5, metric="latency",
                                 latency=model, divisible_by=searched)  # fmt: skip
        uniform = space.candidate_spec(rules, teacher, space.control_genome(rules, teacher))
        spec = aligned_uniform(rules, teacher, uniform)
        widths, full = space._layout(spec)[1], space._layout(teacher)[1]
        assert all(w % 8 == 0 or w == f for w, f in zip(widths, full, strict=True))
        assert model.ratio(spec) <= 0.5 * (1 + lm.TOLERANCE)
        if searched == 8:
            assert spec == uniform


def test_the_aligned_uniform_arm_skips_a_block_that_leaves_one_network(monkeypatch):
    """Seed 0 of the judged-once runs: the run searched in blocks of 8 because blocks of 16
    left one network at the target (every layer at 16), but the aligned uniform arm took
    blocks of 16 all the same and fine-tuned that network (73.87 % against uniform's 77.10).
    The arm skips such a block as the run's alignment does: here the run's own uniform
    network, unmeasured."""
    teacher = spec_for("resnet8", width=16)
    model = _aligned_model(16, teacher)
    low16 = space.smallest_ratio(teacher, "latency", divisible_by=16, ratio_fn=model.ratio)
    target = low16 * 1.01  # the all-16 network fits, nothing wider in blocks of 16 does
    model = replace(model, target_ms=target * model.teacher_ms)
    assert space.smallest_ratio(teacher, "latency", divisible_by=8, ratio_fn=model.ratio) < target

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(latency_repair, "measure_beside_teacher", no_measuring)
    rules = space.SpaceRules(granularity="stage", target=target, metric="latency",
                             latency=model, divisible_by=8)  # fmt: skip
    uniform = space.candidate_spec(rules, teacher, space.control_genome(rules, teacher))
    assert aligned_uniform(rules, teacher, uniform) == uniform


def test_summary_statistics():
    per_seed = {
        s: {a: {"test_acc": acc} for a, acc in zip(ARMS, accs, strict=True)}
        for s, accs in {
            0: (0.91, 0.90, 0.89, 0.88, 0.87, 0.86),
            1: (0.93, 0.90, 0.92, 0.90, 0.89, 0.88),
        }.items()
    }
    for s, part in ((0, "uniform"), (1, "winner")):
        per_seed[s]["picked"] = {**per_seed[s][part], "part": part}
    summary = summarize(per_seed)
    p = summary["picked_minus"]["uniform"]
    assert p["diffs"] == pytest.approx([0.0, 0.03])
    assert summary["arms"]["picked"]["mean"] == pytest.approx(0.915)
    assert summary["arms"]["winner"]["mean"] == pytest.approx(0.92)
    assert summary["arms"]["winner"]["std"] == pytest.approx(0.0141421, rel=1e-4)
    d = summary["winner_minus"]["uniform"]
    assert d["mean"] == pytest.approx(0.02)
    half = 12.7062 * 0.0141421 / 2**0.5  # t(0.975, 1 dof) * sd / sqrt(n)
    assert d["ci95"] == pytest.approx([0.02 - half, 0.02 + half], rel=1e-4)


def test_validated_pick_ties_go_to_fewer_flops_then_uniform():
    def pick(val: float, flops: float) -> str:
        w = {"val_acc": 0.8, "flops_ratio": 0.5}
        return validated_pick({"winner": w, "uniform": {"val_acc": val, "flops_ratio": flops}})

    assert pick(0.81, 0.5) == "uniform"
    assert pick(0.79, 0.4) == "winner"
    assert pick(0.8, 0.51) == "winner"
    assert pick(0.8, 0.49) == "uniform"
    assert pick(0.8, 0.5) == "uniform"


def test_the_latency_model_line_says_predictor_error_calibration_and_held_out():
    m = {"predictor": "table", "networks": 50, "mape_pct": 3.3, "worst_pct": 13.8,
         "features_mape_pct": 3.2, "calibration": 1.0612, "held_out_mape_pct": 1.9,
         "held_out_networks": 8, "held_out_within": 7}  # fmt: skip
    assert _model_line(m) == (
        "table, MAPE 3.3 % (worst 13.8 %) on 50 networks (the features model there 3.2 %); "
        "calibrated ×1.061, held out MAPE 1.9 %, 7 of 8 within the budget"
    )
