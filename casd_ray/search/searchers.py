"""Registry of Tune searchers: name -> builder(search_cfg, seed, space, points) -> Searcher.

Every builder returns a searcher WITHOUT its own space: the space reaches it from the
Tuner's ``param_space`` (``tune_search_space(space)``) through ``set_search_properties``,
the same path ``Tuner.restore`` takes. ``build_searcher`` adds a ``ConcurrencyLimiter``
(``search.max_concurrent``) to all of them: without it Tune asks for a batch of pending
trials before any result is back, which makes TPE, NSGA-II and evolution propose blind;
for random it simply enforces the configured concurrency.

How the search uses this (Ray 2.60)::

    searcher = build_searcher(cfg.search, cfg.seed, space, points)
    tune.Tuner(trainable, param_space=tune_search_space(space),
               tune_config=tune.TuneConfig(search_alg=searcher, scheduler=ASHAScheduler(
                   metric="objective", mode="max", ...), num_samples=...))   # no metric/mode

Multi-objective (``optuna-nsga2``): the metric LIST goes on the searcher only. Ray 2.60's
``OptunaSearch.set_search_properties`` does ``if metric: self._metric = metric`` and then
creates the study from the mode it was handed, so a scalar ``TuneConfig(metric="val_acc",
mode="max")`` silently turns the study single-objective (``tests/test_searchers.py`` checks
this on the installed Ray). Our Optuna searchers therefore refuse a metric/mode that differs
from their own (``ValueError``) instead of being overridden; TuneConfig gets no metric/mode
and ASHA gets its own scalar ``val_acc``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import optuna
from ray import tune
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from casd_ray.config import SearchConfig
from casd_ray.search.evolution import Bounds, RegularizedEvolution, validate_points

# Single-objective searchers rank by the fidelity a trial reached plus its score there
# (casd_ray.search.trial_plan.objective): a candidate trained longer outranks one stopped
# earlier, and within a rung the score decides; rung-0-only trials teach them too.
METRIC, MODE = "objective", "max"
MULTI_METRIC, MULTI_MODE = ["val_acc", "flops"], ["max", "min"]

Builder = Callable[[SearchConfig, int, Bounds, list[dict[str, float]]], Searcher]
SEARCHERS: dict[str, Builder] = {}
MULTI_OBJECTIVE: frozenset[str] = frozenset({"optuna-nsga2"})


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        SEARCHERS[name] = fn
        return fn

    return deco


def is_multi_objective(name: str) -> bool:
    return name in MULTI_OBJECTIVE


def objective(name: str) -> tuple[str | list[str], str | list[str]]:
    """(metric, mode) the named searcher optimises; lists for multi-objective ones."""
    return (list(MULTI_METRIC), list(MULTI_MODE)) if is_multi_objective(name) else (METRIC, MODE)


def tune_search_space(space: Bounds) -> dict[str, Any]:
    """``{gene: (low, high)}`` -> Tune ``param_space`` ``{gene: tune.uniform(low, high)}``."""
    return {name: tune.uniform(low, high) for name, (low, high) in space.items()}


class _OptunaSearch(OptunaSearch):
    """OptunaSearch that keeps the objective it was built with (see the module docstring):
    a different metric/mode from Tune raises instead of silently replacing it."""

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        for name, ours, theirs in (("metric", self._metric, metric), ("mode", self._mode, mode)):
            if ours is not None and theirs is not None and ours != theirs:
                raise ValueError(
                    f"this searcher optimises {name}={ours!r} but Tune passed {theirs!r}; "
                    "leave metric/mode out of TuneConfig (give the scheduler its own)"
                )
        return super().set_search_properties(metric, mode, config, **spec)


def _optuna(
    name: str, sampler: optuna.samplers.BaseSampler, points: list[dict[str, float]]
) -> Searcher:
    metric, mode = objective(name)
    # copies: OptunaSearch keeps the list and Tune may mutate trial configs
    return _OptunaSearch(
        metric=metric, mode=mode, sampler=sampler, points_to_evaluate=[dict(p) for p in points]
    )


@register("optuna-tpe")
def _tpe(s: SearchConfig, seed: int, space: Bounds, points: list[dict[str, float]]) -> Searcher:
    # Random start-up trials: Optuna's 10, but at most a third of a small budget so a quick
    # run still gets model-based proposals. Multivariate TPE (Optuna 5's default) models the
    # genes jointly, which matters under budget repair where only their ratios count.
    startup = max(2, min(10, s.num_samples // 3))
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return _optuna("optuna-tpe", sampler, points)


@register("optuna-nsga2")
def _nsga2(s: SearchConfig, seed: int, space: Bounds, points: list[dict[str, float]]) -> Searcher:
    # Optuna's default population of 50 exceeds typical num_samples (never leaving
    # generation 0); the config's population (shared with evolution) sizes a generation.
    sampler = _PicklableNSGAII(seed=seed, population_size=s.population)
    return _optuna("optuna-nsga2", sampler, points)


class _PicklableNSGAII(optuna.samplers.NSGAIISampler):
    """Optuna 5.1's genetic samplers hold a ``threading.Lock`` and define no pickling hooks,
    so Tune's searcher checkpoint (a pickle of the searcher) failed: "cannot pickle
    '_thread.lock' object". The lock guards nothing that must survive a save: a fresh one is
    made on restore."""

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_thread_lock", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._thread_lock = threading.Lock()


@register("random")
def _random(s: SearchConfig, seed: int, space: Bounds, points: list[dict[str, float]]) -> Searcher:
    # OptunaSearch + RandomSampler rather than BasicVariantGenerator: it is a Searcher (same
    # conformance suite, ConcurrencyLimiter, points_to_evaluate) and its pickled state holds
    # the sampler's RNG, so save/restore continues the identical sequence.
    return _optuna("random", optuna.samplers.RandomSampler(seed=seed), points)


@register("evolution")
def _evolution(
    s: SearchConfig, seed: int, space: Bounds, points: list[dict[str, float]]
) -> Searcher:
    return RegularizedEvolution(
        metric=METRIC,
        mode=MODE,
        population_size=s.population,
        sample_size=s.sample_size,
        mutation_genes=s.mutation_genes,
        points_to_evaluate=[dict(p) for p in points],
        seed=seed,
    )


class GenerationLimiter(ConcurrencyLimiter):
    """Proposals in generations, so that what the searcher has seen never depends on timing.

    At most ``max_concurrent`` trials run at once, and at most ``generation_size`` are
    proposed per generation; the searcher is told a generation's results (every reported
    epoch, then the final result) only once all of its trials have finished, in the order it
    proposed them. Each proposal is then a function of the seed and of earlier generations'
    results alone, whichever trial finished first. The price: at a generation's end, slots
    wait for its slowest trial. ``casd_ray.search.rungs`` makes ASHA's stops follow the same
    generations. State (for ``Tuner.restore``) is the base class's: this object's ``__dict__``.
    """

    def __init__(self, searcher: Searcher, max_concurrent: int, generation_size: int) -> None:
        super().__init__(searcher, max_concurrent=max_concurrent, batch=False)
        self.generation_size = generation_size
        self.proposed: list[str] = []  # this generation's trials, in proposal order
        self.reports: dict[str, list[dict]] = {}  # held back until the generation ends
        self.finished: dict[str, tuple[dict | None, bool]] = {}

    def suggest(self, trial_id: str) -> dict | None:
        running = len(self.proposed) - len(self.finished)
        if len(self.proposed) >= self.generation_size or running >= self.max_concurrent:
            return None
        suggestion = self.searcher.suggest(trial_id)
        if suggestion not in (None, Searcher.FINISHED):
            self.proposed.append(trial_id)
            self.reports[trial_id] = []
        return suggestion

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self.reports:
            self.reports[trial_id].append(result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id not in self.reports or trial_id in self.finished:
            return
        self.finished[trial_id] = (result, error)
        if len(self.finished) < self.generation_size:
            return
        for t in self.proposed:
            for report in self.reports[t]:
                self.searcher.on_trial_result(t, report)
            result, error = self.finished[t]
            self.searcher.on_trial_complete(t, result=result, error=error)
        self.proposed, self.reports, self.finished = [], {}, {}


def build_searcher(
    s: SearchConfig, seed: int, space: Bounds, points: list[dict[str, float]]
) -> ConcurrencyLimiter:
    """The searcher ``s.algorithm`` names (seeded), limited to ``s.max_concurrent``; with
    ``s.generation_size``, proposing in generations (:class:`GenerationLimiter`).

    ``space``: ``{gene: (low, high)}``; ``points``: genomes tried first (the uniform control
    first). Points are checked against the space here, before any cluster starts.
    """
    name = s.algorithm
    if name not in SEARCHERS:
        raise ValueError(f"search.algorithm: unknown searcher {name!r} (have {sorted(SEARCHERS)})")
    validate_points(space, points)
    searcher = SEARCHERS[name](s, seed, space, points)
    if s.generation_size:
        return GenerationLimiter(searcher, s.max_concurrent, s.generation_size)
    return ConcurrencyLimiter(searcher, max_concurrent=s.max_concurrent)
