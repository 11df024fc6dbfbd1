"""Search space: genes, widths from ratios, and budget repair landing on the target."""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import FrozenInstanceError

import pytest

from casd_ray import errors
from casd_ray.config import ExperimentConfig
from casd_ray.models.family import group_widths, spec_for, with_group_widths
from casd_ray.models.resnet import WidthSpec, channel_groups
from casd_ray.widths import space

R20 = spec_for("resnet20")
R164 = spec_for("resnet164")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (R20, {"stage": 3, "block": 12, "layer": 12}),
        (R164, {"stage": 3, "block": 57, "layer": 111}),
    ],
)
def test_gene_counts_and_every_group_set_exactly_once(spec, expected):
    all_groups = sorted(g.name for g in channel_groups(spec))
    for granularity, count in expected.items():
        genes = space.gene_groups(spec, granularity)
        assert len(genes) == count
        assert all("." not in name and name.isascii() for name in genes)
        assert sorted(g for groups in genes.values() for g in groups) == all_groups


def test_stage_gene_sets_stream_and_every_inner_conv_of_its_stage():
    genome = {"stage0": 0.25, "stage1": 0.5, "stage2": 1.0}
    student = space.widths_from_ratios(R20, space.ratios_from_genome(R20, "stage", genome))
    assert student.stages == (4, 16, 64)
    assert student.blocks == (((4,),) * 3, ((16,),) * 3, ((64,),) * 3)
    assert student.stem == 4  # basic: the stem writes stream 0


def test_block_gene_sets_inner_convs_of_one_block_only():
    genome = space.uniform_genome(R164, "block", 1.0)
    genome["stage1_block5"] = 0.5
    student = space.widths_from_ratios(R164, space.ratios_from_genome(R164, "block", genome))
    assert student.blocks[1][5] == (16, 16)
    assert student.blocks[1][4] == (32, 32) and student.stages == R164.stages
    assert student.stem == R164.stem  # the bottleneck stem is not a group


def test_genome_errors_name_the_gene():
    with pytest.raises(KeyError, match="stage2"):
        space.ratios_from_genome(R20, "stage", {"stage0": 1.0, "stage1": 1.0})
    with pytest.raises(ValueError, match="stage0"):
        space.ratios_from_genome(R20, "stage", {"stage0": 0.0, "stage1": 1.0, "stage2": 1.0})
    with pytest.raises(ValueError, match="granularity"):
        space.gene_names(R20, "channel")


def test_ratio_one_is_the_teacher_and_rounding_is_half_up_with_min_channels():
    assert space.widths_from_ratios(R164, {}) == R164
    ones = space.ratios_from_genome(R164, "layer", space.uniform_genome(R164, "layer"))
    assert space.widths_from_ratios(R164, ones) == R164
    # 16 * 0.53 = 8.48 -> 8 ; 32 * 0.53 = 16.96 -> 17 ; 64 * 0.53 = 33.92 -> 34
    half = space.widths_from_ratios(R20, dict.fromkeys(group_widths(R20), 0.53))
    assert half.stages == (8, 17, 34)
    tiny = space.widths_from_ratios(R20, dict.fromkeys(group_widths(R20), 1e-6), min_channels=3)
    assert set(group_widths(tiny).values()) == {3}


@pytest.mark.parametrize("divisible_by", [2, 4, 8])
def test_divisible_by_rounding(divisible_by):
    rng = random.Random(divisible_by)
    for _ in range(50):
        ratios = {g: rng.uniform(0.01, 1.0) for g in group_widths(R164)}
        student = space.widths_from_ratios(R164, ratios, min_channels=3, divisible_by=divisible_by)
        teacher = group_widths(R164)
        for group, width in group_widths(student).items():
            assert width % divisible_by == 0 or width == teacher[group]
            assert 3 <= width <= teacher[group]
            # nearest multiple: never more than half a step from ratio * width (unless clamped)
            exact = ratios[group] * teacher[group]
            lowest = math.ceil(3 / divisible_by) * divisible_by
            if lowest < width < teacher[group]:
                assert abs(width - exact) <= divisible_by / 2 + 1e-9


def _next_change(spec, ratios, scale, min_channels=1, divisible_by=1):
    """Smallest scale above ``scale`` where some width changes, found with the public
    ``widths_from_ratios`` only: candidate points are where ``s * r * w / d`` reaches the next
    half-integer or ``s * r`` reaches 1; each is confirmed by rebuilding the widths."""
    teacher = group_widths(spec)
    d = divisible_by

    def widths(s):
        return space.widths_from_ratios(
            spec,
            space.scaled_ratios(ratios, s),
            min_channels=min_channels,
            divisible_by=divisible_by,
        )

    here = widths(scale)
    s = scale
    while True:
        candidates = []
        for g, r in ratios.items():
            if s * r >= 1:
                continue
            k = math.floor(s * r * teacher[g] / d + 0.5)
            candidates += [(k + 0.5) * d / (r * teacher[g]), 1 / r]
        if not candidates:
            return None
        s = min(c for c in candidates if c > s) * (1 + 1e-9)
        if widths(s) != here:
            return s


def _check_landing(spec, granularity, rng, *, metric="flops", min_channels=1, divisible_by=1):
    genome = {n: rng.uniform(0.1, 1.0) for n in space.gene_names(spec, granularity)}
    target = rng.uniform(0.3, 0.8)
    student, scale = space.repair(
        spec,
        granularity,
        genome,
        target=target,
        metric=metric,
        min_channels=min_channels,
        divisible_by=divisible_by,
    )
    ratios = space.ratios_from_genome(spec, granularity, genome)
    rebuilt = space.widths_from_ratios(
        spec,
        space.scaled_ratios(ratios, scale),
        min_channels=min_channels,
        divisible_by=divisible_by,
    )
    assert rebuilt == student  # the returned scale explains the student
    assert space.cost_ratio(student, spec, metric) <= target
    nxt = _next_change(spec, ratios, scale, min_channels, divisible_by)
    assert nxt is not None
    bigger = space.widths_from_ratios(
        spec, space.scaled_ratios(ratios, nxt), min_channels=min_channels, divisible_by=divisible_by
    )
    assert space.cost_ratio(bigger, spec, metric) > target  # within one rounding step


@pytest.mark.parametrize("granularity", space.GRANULARITIES)
def test_repair_lands_on_target_resnet20(granularity):
    rng = random.Random(20)
    for _ in range(200):
        _check_landing(R20, granularity, rng)


@pytest.mark.parametrize("granularity", space.GRANULARITIES)
def test_repair_lands_on_target_resnet164(granularity):
    rng = random.Random(164)
    for _ in range(200):
        _check_landing(R164, granularity, rng)


def test_repair_lands_with_params_metric_and_divisible_by():
    rng = random.Random(7)
    for i in range(30):
        _check_landing(R164, space.GRANULARITIES[i % 3], rng, metric="params")
        _check_landing(R164, space.GRANULARITIES[i % 3], rng, min_channels=4, divisible_by=4)


def test_repair_is_fast_on_resnet164():
    rng = random.Random(1)
    names = space.gene_names(R164, "layer")
    times = []
    for _ in range(20):
        genome = {n: rng.uniform(0.1, 1.0) for n in names}
        start = time.perf_counter()
        space.repair(R164, "layer", genome, target=0.5)
        times.append(time.perf_counter() - start)
    # ~10 ms on an idle core; generous bound because other test suites share the CPUs
    assert statistics.median(times) < 0.1


def test_uniform_genome_is_the_uniform_control():
    genome = space.uniform_genome(R164, "block", 0.7)
    student, scale = space.repair(R164, "block", genome, target=0.5)
    ratios = {g: w / group_widths(R164)[g] for g, w in group_widths(student).items()}
    q = min(1.0, scale * 0.7)
    assert all(abs(r - q) <= 0.5 / group_widths(R164)[g] + 1e-9 for g, r in ratios.items())
    # any uniform value repairs to the same network
    assert space.repair(R164, "block", space.uniform_genome(R164, "block", 0.2), target=0.5)[0] == (
        student
    )


def test_target_one_keeps_the_teacher():
    student, _ = space.repair(R20, "stage", {"stage0": 0.1, "stage1": 1.0, "stage2": 0.5}, target=1)
    assert student == R20


def test_impossible_target_is_refused_with_one_line():
    low = space.smallest_ratio(R20, "flops")
    with pytest.raises(errors.BudgetError) as err:
        space.repair(R20, "layer", space.uniform_genome(R20, "layer"), target=low / 2)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("space.budget.target:")
    assert f"{low:.4f}" in msg and "min_channels=1" in msg
    with pytest.raises(errors.BudgetError, match=r"space\.budget\.target: 1\.5 must be in"):
        space.repair(R20, "layer", space.uniform_genome(R20, "layer"), target=1.5)
    # exactly the smallest reachable ratio is still fine
    student, _ = space.repair(R20, "layer", space.uniform_genome(R20, "layer"), target=low)
    assert set(group_widths(student).values()) == {1}


def _rules(algorithm: str = "optuna-tpe", **space_kw) -> space.SpaceRules:
    budget = space_kw.pop("budget", {})
    cfg = ExperimentConfig.model_validate(
        {"space": {**space_kw, "budget": budget}, "search": {"algorithm": algorithm}}
    )
    return space.rules_of(cfg.space, cfg.search.algorithm)


def test_rules_are_plain_values_with_repair_resolved():
    rules = _rules(granularity="block", min_channels=2, budget={"target": 0.4, "metric": "params"})
    assert rules.granularity == "block" and rules.min_channels == 2
    assert (rules.target, rules.metric) == (0.4, "params")
    assert rules.repair
    with pytest.raises(FrozenInstanceError):
        rules.repair = False  # type: ignore[misc]
    # repair is off when switched off, or for the multi-objective searcher (cost is an
    # objective there), whatever the other settings
    assert not _rules(repair=False).repair
    assert not _rules("optuna-nsga2").repair
    assert _rules("evolution").repair and _rules("random").repair


def test_candidate_spec_repairs_or_not_per_rules():
    genome = {"stage0": 0.5, "stage1": 0.8, "stage2": 0.6}
    repaired = space.candidate_spec(_rules(budget={"target": 0.3}), R20, genome)
    assert space.cost_ratio(repaired, R20, "flops") <= 0.3
    plain = space.candidate_spec(_rules(repair=False), R20, genome)
    assert plain.stages == (8, 26, 38)
    # NSGA-II: no repair even with space.repair on
    assert space.candidate_spec(_rules("optuna-nsga2", budget={"target": 0.3}), R20, genome) == (
        plain
    )
    params_rules = _rules(budget={"target": 0.4, "metric": "params"}, divisible_by=2)
    by_params = space.candidate_spec(params_rules, R20, genome)
    assert space.cost_ratio(by_params, R20, "params") <= 0.4
    assert all(w % 2 == 0 for w in group_widths(by_params).values())


@pytest.mark.parametrize("repair", [True, False])
def test_control_genome_lands_on_budget_either_way(repair):
    rules = _rules(repair=repair, granularity="block", budget={"target": 0.5})
    genome = space.control_genome(rules, R164)
    assert set(genome) == set(space.gene_names(R164, "block"))
    assert len(set(genome.values())) == 1
    student = space.candidate_spec(rules, R164, genome)
    expected, _ = space.repair(R164, "block", genome, target=0.5)
    assert student == expected


def test_search_bounds_are_the_genome_box():
    rules = _rules(granularity="block", min_ratio=0.2, max_ratio=0.9)
    bounds = space.search_bounds(rules, R164)
    assert list(bounds) == space.gene_names(R164, "block")
    assert set(bounds.values()) == {(0.2, 0.9)}


def test_check_budget():
    space.check_budget(_rules(budget={"target": 0.05}), R20)
    with pytest.raises(errors.BudgetError, match="space.budget.target: 0.001 is below"):
        space.check_budget(_rules(budget={"target": 0.001}), R20)
    # repair off: nothing in the space is cheaper than every gene at min_ratio
    with pytest.raises(errors.BudgetError, match="space.min_ratio=0.5"):
        space.check_budget(_rules(repair=False, min_ratio=0.5, budget={"target": 0.2}), R20)
    with pytest.raises(errors.BudgetError, match="space.min_ratio=0.5"):
        space.check_budget(_rules("optuna-nsga2", min_ratio=0.5, budget={"target": 0.2}), R20)
    with pytest.raises(errors.BudgetError, match="min_channels=8"):
        space.check_budget(_rules(min_channels=8, budget={"target": 0.1}), R20)


def test_fast_spec_builder_matches_with_group_widths():
    rng = random.Random(3)
    for spec in (R20, R164):
        ratios = {g: rng.uniform(0.05, 1.0) for g in group_widths(spec)}
        student = space.widths_from_ratios(spec, ratios)
        assert student == with_group_widths(spec, group_widths(student))
        assert WidthSpec.from_json(student.to_json()) == student  # validates
