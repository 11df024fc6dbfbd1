"""Conformance suite every registered searcher passes, plus evolution specifics.

The Searcher API is driven by hand (set_search_properties / suggest / on_trial_result /
on_trial_complete), the way Tune drives it, so no Ray cluster is needed.
"""

from __future__ import annotations

import json
import math
import random
import typing

import optuna
import pytest
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from casd_ray.config import SearchConfig
from casd_ray.search.evolution import RegularizedEvolution
from casd_ray.search.searchers import (
    MULTI_METRIC,
    MULTI_MODE,
    SEARCHERS,
    build_searcher,
    is_multi_objective,
    objective,
    tune_search_space,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

# Unequal bounds so a searcher mixing up genes or bounds is caught.
SPACE = {"stage0": (0.1, 1.0), "stage1": (0.25, 0.75), "stage2": (0.5, 1.0), "stage3": (0.1, 0.4)}
CONTROL = {name: high for name, (_, high) in SPACE.items()}
POINTS = [CONTROL, {name: (low + high) / 2 for name, (low, high) in SPACE.items()}]
NAMES = sorted(SEARCHERS)


def make(name: str, seed: int = 0, **search: typing.Any) -> ConcurrencyLimiter:
    """A searcher as the search module builds it, with its space passed the way Tune does
    (param_space through set_search_properties, TuneConfig without metric/mode)."""
    settings = {"algorithm": name, "num_samples": 16, "population": 4, "sample_size": 2}
    searcher = build_searcher(SearchConfig(**{**settings, **search}), seed, SPACE, POINTS)
    assert searcher.set_search_properties(None, None, tune_search_space(SPACE))
    return searcher


def score(genome: dict[str, float]) -> dict[str, float]:
    """A smooth objective with its optimum inside the box, plus a cost to minimise."""
    acc = 1.0 - sum((v - 0.6) ** 2 for v in genome.values())
    return {
        "val_acc": acc,
        "objective": 1 + acc,
        "flops": 1e6 * sum(genome.values()),
        "training_iteration": 1,
    }


def drive(searcher, ids: range) -> list[dict[str, float]]:
    """Suggest, report and complete one trial per id, sequentially."""
    out = []
    for i in ids:
        trial_id = f"t{i}"
        genome = searcher.suggest(trial_id)
        assert isinstance(genome, dict)
        result = score(genome)
        searcher.on_trial_result(trial_id, result)
        searcher.on_trial_complete(trial_id, result)
        out.append(genome)
    return out


def test_registry_covers_config_choices():
    choices = typing.get_args(SearchConfig.model_fields["algorithm"].annotation)
    assert set(SEARCHERS) == set(choices)
    assert [n for n in NAMES if is_multi_objective(n)] == ["optuna-nsga2"]
    assert objective("optuna-nsga2") == (MULTI_METRIC, MULTI_MODE)
    assert objective("evolution") == ("objective", "max")
    for name, builder in SEARCHERS.items():  # builder(search_cfg, seed, space, points)
        searcher = builder(SearchConfig(algorithm=name), 0, SPACE, POINTS)
        assert isinstance(searcher, Searcher) and not isinstance(searcher, ConcurrencyLimiter)


@pytest.mark.parametrize("name", NAMES)
def test_suggests_valid_genomes(name):
    for genome in drive(make(name), range(20)):
        assert set(genome) == set(SPACE)
        for gene, (low, high) in SPACE.items():
            assert isinstance(genome[gene], float)
            assert low <= genome[gene] <= high, (gene, genome[gene])


@pytest.mark.parametrize("name", NAMES)
def test_points_to_evaluate_come_first(name):
    first, second = drive(make(name), range(2))
    assert first == CONTROL
    assert second == POINTS[1]


@pytest.mark.parametrize("name", NAMES)
def test_reproducible_with_seed(name):
    # 16 suggestions: past TPE's start-up (5), NSGA-II's first generation (4) and
    # evolution's warm-up (2 points + 4 random), so >= 10 are model-based for evolution.
    a = drive(make(name, seed=3), range(16))
    b = drive(make(name, seed=3), range(16))
    c = drive(make(name, seed=4), range(16))
    assert a == b
    assert a[:2] == c[:2] == POINTS  # the control is seed-independent
    assert all(x != y for x, y in zip(a[2:], c[2:], strict=True))


@pytest.mark.parametrize("generation", [None, 2])
@pytest.mark.parametrize("name", NAMES)
def test_save_restore_continues_identically(name, generation, tmp_path):
    original = make(name, seed=7, generation_size=generation)
    drive(original, range(7))
    in_flight = original.suggest("t7")  # a running trial at checkpoint time
    path = str(tmp_path / "searcher.state")
    original.save(path)
    if name == "evolution":  # JSON, not pickle: a state file in a run folder never runs code
        state = json.loads((tmp_path / "searcher.state").read_text())
        assert len(state["population"]) == 4 and state["live"]["t7"] == in_flight
        # with generations, t6's result waits in the limiter until t7 finishes
        assert set(state["live"]) == ({"t6", "t7"} if generation else {"t7"})

    # Tune's restore: a fresh searcher, set_search_properties from param_space, the base
    # searcher's saved state, and the wrappers' state (SearchGenerator.save_to_dir does that).
    # the seed must come from the checkpoint, not the new object
    restored = make(name, seed=99, generation_size=generation)
    restored.restore(path)
    restored.set_state(original.get_state())

    for searcher in (original, restored):
        searcher.on_trial_complete("t7", score(in_flight))
    assert drive(restored, range(8, 20)) == drive(original, range(8, 20))


@pytest.mark.parametrize("name", NAMES)
def test_failed_and_unreported_trials_do_not_break_the_search(name):
    searcher = make(name)
    drive(searcher, range(3))
    searcher.suggest("err")
    searcher.on_trial_complete("err", None, error=True)
    searcher.suggest("nothing")  # e.g. removed while pending: completed without a result
    searcher.on_trial_complete("nothing")
    searcher.on_trial_complete("never-suggested", score(CONTROL))
    assert len(drive(searcher, range(3, 12))) == 9


@pytest.mark.parametrize("name", NAMES)
def test_concurrency_limit_from_config(name):
    searcher = make(name, max_concurrent=2)
    assert searcher.suggest("a") is not None and searcher.suggest("b") is not None
    assert searcher.suggest("c") is None  # Tune asks again once a trial completes
    searcher.on_trial_complete("a", score(CONTROL))
    assert searcher.suggest("c") is not None


def test_nsga2_study_stays_multi_objective():
    searcher = make("optuna-nsga2")
    assert len(searcher.searcher._ot_study.directions) == 2
    # A scalar metric from TuneConfig would override the list; ours refuses it loudly.
    with pytest.raises(ValueError, match="metric"):
        build_searcher(
            SearchConfig(algorithm="optuna-nsga2"), 0, SPACE, POINTS
        ).set_search_properties("val_acc", "max", tune_search_space(SPACE))


def test_stock_optuna_search_turns_single_objective_with_tune_metric():
    """Why the guard exists: documents Ray 2.60's behaviour (remove the guard if this fails)."""
    stock = OptunaSearch(
        metric=MULTI_METRIC, mode=MULTI_MODE, sampler=optuna.samplers.NSGAIISampler()
    )
    stock.set_search_properties("val_acc", "max", tune_search_space(SPACE))
    assert stock.metric == "val_acc"
    assert len(stock._ot_study.directions) == 1


def test_bad_points_fail_early():
    cfg = SearchConfig(algorithm="evolution")
    with pytest.raises(ValueError, match="missing"):
        build_searcher(cfg, 0, SPACE, [{"stage0": 1.0}])
    with pytest.raises(ValueError, match="stage3"):
        build_searcher(cfg, 0, SPACE, [{**CONTROL, "stage3": 0.9}])


# ---- evolution -------------------------------------------------------------------------


def evolution(**kw: typing.Any) -> RegularizedEvolution:
    args = {"mode": "max", "population_size": 4, "sample_size": 4, "mutation_genes": 2, "seed": 0}
    return RegularizedEvolution(SPACE, metric="val_acc", **{**args, **kw})


def changed(a: dict[str, float], b: dict[str, float]) -> int:
    return sum(a[k] != b[k] for k in SPACE)


def stage0_score(genome: dict[str, float]) -> dict[str, float]:
    """High stage0 keep-ratio scores high: one region of the space is clearly better."""
    return {"val_acc": genome["stage0"]}


@pytest.mark.parametrize("mode", ["max", "min"])
def test_evolution_children_mutate_the_best_when_tournament_sees_all(mode):
    # sample_size == population_size: the tournament always holds the best member, so every
    # child must be that member with at most mutation_genes genes moved.
    searcher = evolution(mode=mode)
    for i in range(4):  # random warm-up
        searcher.on_trial_complete(f"w{i}", stage0_score(searcher.suggest(f"w{i}")))
    pick = max if mode == "max" else min
    moved = 0
    for i in range(30):
        top = pick(s for _, s in searcher.population)
        best = [g for g, s in searcher.population if s == top]  # ties: children of a parent
        child = searcher.suggest(f"c{i}")  # that kept stage0 score the same
        assert min(changed(child, g) for g in best) <= 2
        moved += min(changed(child, g) for g in best)
        searcher.on_trial_complete(f"c{i}", stage0_score(child))
    assert moved > 30  # children really differ from their parent


def test_evolution_selects_good_parents_and_improves():
    searcher = evolution(population_size=6, sample_size=3, seed=1)
    for i in range(6):
        searcher.on_trial_complete(f"w{i}", stage0_score(searcher.suggest(f"w{i}")))
    warmup_mean = sum(s for _, s in searcher.population) / 6
    for i in range(40):
        members = [g for g, _ in searcher.population]
        child = searcher.suggest(f"c{i}")
        assert min(changed(child, m) for m in members) <= 2  # a mutation of some member
        searcher.on_trial_complete(f"c{i}", stage0_score(child))
    final_mean = sum(s for _, s in searcher.population) / 6
    assert final_mean > warmup_mean + 0.1


def test_evolution_population_ages_and_filters_results():
    searcher = evolution(population_size=3)
    ids = [f"t{i}" for i in range(6)]
    genomes = {i: searcher.suggest(i) for i in ids}
    searcher.on_trial_complete("t0", None, error=True)  # failed: dropped
    searcher.on_trial_complete("t1", {"val_loss": 1.0})  # never reported val_acc: dropped
    searcher.on_trial_complete("t2", {"val_acc": math.nan})  # non-finite: dropped
    for n, i in enumerate(ids[3:]):
        searcher.on_trial_complete(i, {"val_acc": 0.1 * n, "epoch": 1})  # ASHA-stopped: joins
    assert [g for g, _ in searcher.population] == [genomes[i] for i in ids[3:]]
    for n in range(2):  # aging: the oldest leave first
        searcher.on_trial_complete(f"x{n}", None)  # unknown id: ignored
        searcher.suggest(f"n{n}")
        searcher.on_trial_complete(f"n{n}", {"val_acc": 0.9})
    assert [s for _, s in searcher.population] == [0.2, 0.9, 0.9]


def test_evolution_refuses_a_different_metric():
    with pytest.raises(ValueError, match="metric"):
        RegularizedEvolution(metric="val_acc", mode="max").set_search_properties(
            "val_loss", "min", tune_search_space(SPACE)
        )
    with pytest.raises(ValueError, match="single-objective"):
        RegularizedEvolution(metric=MULTI_METRIC, mode=MULTI_MODE)


def test_evolution_warm_start_from_evaluated_points():
    searcher = evolution()
    searcher.add_evaluated_point(CONTROL, 0.5)
    searcher.add_evaluated_point(POINTS[1], 0.9, error=True)  # failed elsewhere: dropped
    searcher.add_evaluated_point(POINTS[1], 0.4, pruned=True)  # stopped early: joins
    assert searcher.population == [(CONTROL, 0.5), (POINTS[1], 0.4)]
    # a space given at construction is kept: Tune's param_space is refused, as Ray's do
    assert not searcher.set_search_properties(None, None, tune_search_space(SPACE))


def run_generations(name: str, order_seed: int, total: int = 12) -> list[dict[str, float]]:
    """Generations of 3 trials, 2 at a time; running trials finish in a seeded random order."""
    searcher = make(name, generation_size=3, max_concurrent=2)
    rng, running, proposed = random.Random(order_seed), {}, []
    while len(proposed) < total or running:
        genome = searcher.suggest(f"t{len(proposed)}") if len(proposed) < total else None
        if genome is not None:
            running[f"t{len(proposed)}"] = genome
            proposed.append(genome)
            assert len(running) <= 2
            continue
        assert running, "the limiter proposed nothing while no trial was running"
        done = rng.choice(sorted(running))
        result = score(running.pop(done))
        searcher.on_trial_result(done, result)
        searcher.on_trial_complete(done, result)
    return proposed


@pytest.mark.parametrize("name", NAMES)
def test_generations_make_proposals_independent_of_finishing_order(name):
    runs = [run_generations(name, order_seed) for order_seed in range(3)]
    assert len(runs[0]) == 12
    assert runs[0] == runs[1] == runs[2]
    assert runs[0][0] == CONTROL  # the control is still the first trial


def test_generation_limiter_holds_results_until_the_generation_ends():
    searcher = make("evolution", generation_size=2, max_concurrent=2)
    inner = searcher.searcher
    a, b = searcher.suggest("a"), searcher.suggest("b")
    assert searcher.suggest("c") is None  # generation full
    searcher.on_trial_result("b", score(b))
    searcher.on_trial_complete("b", score(b))
    assert inner.population == [] and searcher.suggest("c") is None
    searcher.on_trial_complete("a", score(a))
    assert [g for g, _ in inner.population] == [a, b]  # told in proposal order
    assert searcher.suggest("c") is not None
