"""Regularized (aging) evolution (Real et al. 2019, "Regularized Evolution for Image
Classifier Architecture Search") as a Ray Tune ``Searcher``.

Why aging: the population is a FIFO of the most recent ``population_size`` results, so a
genome that scored well once by luck (noisy short distillation runs) is eventually dropped
instead of seeding children forever; only genomes that keep being re-discovered survive.

The cycle, asynchronous as in the paper (no generations, so it fits Tune's trial stream):
  1. ``points_to_evaluate`` first (the uniform-width control),
  2. then ``population_size`` uniformly random genomes (the warm-up),
  3. then each child = mutate(best of ``sample_size`` members drawn without replacement).
     Mutation moves ``mutation_genes`` distinct genes by a gaussian step of
     ``mutation_sigma * (high - low)``, clipped to ``[low, high]`` (clipping, not resampling,
     so a keep-ratio of exactly ``high`` -- "keep every channel" -- stays reachable).
If the population is still empty after the warm-up (every trial so far failed or is still
running), suggestions stay random rather than block.

Trials that error (``error=True``), that never reported the metric, or whose score is not
finite are dropped: they say nothing about the genome's quality.

Trials stopped early by ASHA reach ``on_trial_complete`` exactly like finished ones, with
their last (partial) score. They JOIN the population with that partial score. Justification:
ASHA stopped them because they ranked in the bottom 1/reduction_factor of their rung, and a
partial accuracy is below what the same run would reach at ``max_epochs`` -- so they lose
tournaments against finished trials, which is the signal we want. Excluding them would
starve the population (with reduction factor 2 most trials are stopped early) and keep the
search random for most of the budget, while aging still removes them in time. Winners are
taken elsewhere only from trials that ran all epochs, so the bias never reaches the result.

State (population, pending points, in-flight genomes, RNG state) is pickled by ``save`` and
loaded by ``restore``, so ``Tuner.restore`` continues the identical sequence.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np
from ray.tune.search import Searcher
from ray.tune.search.sample import Float, Uniform

Bounds = dict[str, tuple[float, float]]

_STATE_VERSION = 2  # 2: JSON (1 was a pickle)


def space_from_tune_config(config: Mapping[str, Any]) -> Bounds:
    """``{gene: tune.uniform(lo, hi)}`` -> ``{gene: (lo, hi)}``; constants are ignored
    (Tune merges them into every trial's config itself)."""
    space: Bounds = {}
    for name, value in config.items():
        if isinstance(value, Float) and isinstance(value.get_sampler(), Uniform):
            space[name] = (float(value.lower), float(value.upper))
        elif isinstance(value, Mapping) or hasattr(value, "sample"):
            raise ValueError(
                f"{name}: RegularizedEvolution supports flat tune.uniform genes only "
                f"(got {type(value).__name__})"
            )
    return space


def validate_points(space: Bounds, points: list[dict[str, float]]) -> None:
    """Each point must set every gene, within its bounds: a bad control genome should fail
    before the cluster starts, not inside a trial."""
    for i, point in enumerate(points):
        if set(point) != set(space):
            missing = sorted(set(space) - set(point))
            extra = sorted(set(point) - set(space))
            raise ValueError(
                f"points_to_evaluate[{i}]: genes must match the space "
                f"(missing {missing}, unknown {extra})"
            )
        for name, (low, high) in space.items():
            if not low <= point[name] <= high:
                raise ValueError(
                    f"points_to_evaluate[{i}].{name}: {point[name]} outside [{low}, {high}]"
                )


class RegularizedEvolution(Searcher):
    """Aging evolution over a box of float genes (keep-ratios).

    Args:
        space: ``{gene: (low, high)}``; or None and Tune passes its ``param_space`` through
            ``set_search_properties``.
        metric, mode: objective, a single metric (e.g. ``"val_acc"``, ``"max"``).
        population_size: P, the number of most recent results kept (and random warm-up size).
        sample_size: S, tournament size; larger S = greedier selection.
        mutation_genes: genes perturbed per child (capped at the number of genes).
        mutation_sigma: gaussian step as a fraction of each gene's range.
        points_to_evaluate: genomes suggested first, in order.
        seed: seeds the numpy Generator; the whole suggestion sequence is a function of it
            and of the results fed back.
    """

    def __init__(
        self,
        space: Bounds | None = None,
        metric: str | None = None,
        mode: str | None = None,
        *,
        population_size: int = 8,
        sample_size: int = 3,
        mutation_genes: int = 2,
        mutation_sigma: float = 0.2,
        points_to_evaluate: list[dict[str, float]] | None = None,
        seed: int | None = None,
    ) -> None:
        if isinstance(metric, list) or isinstance(mode, list):
            raise ValueError("RegularizedEvolution is single-objective: metric must be a str")
        super().__init__(metric=metric, mode=mode)
        if population_size < 1 or sample_size < 1 or mutation_genes < 1:
            raise ValueError("population_size, sample_size and mutation_genes must be >= 1")
        if mutation_sigma <= 0:
            raise ValueError("mutation_sigma must be > 0")
        self.population_size = population_size
        self.sample_size = sample_size
        self.mutation_genes = mutation_genes
        self.mutation_sigma = mutation_sigma
        self._space: Bounds = {k: (float(lo), float(hi)) for k, (lo, hi) in (space or {}).items()}
        self._points: deque[dict[str, float]] = deque(
            {k: float(v) for k, v in p.items()} for p in (points_to_evaluate or [])
        )
        if self._space:
            validate_points(self._space, list(self._points))
        self._rng = np.random.default_rng(seed)
        self._live: dict[str, dict[str, float]] = {}  # trial_id -> genome, in flight
        # (genome, score, trial_id), oldest first; maxlen makes the append the aging step
        self._population: deque[tuple[dict[str, float], float, str]] = deque(maxlen=population_size)
        self._num_random = 0

    # ---- Tune plumbing -------------------------------------------------------------
    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        """Take the space from Tune's ``param_space``. Returns False when a space was given
        at construction (Tune then refuses a second one, like every Ray searcher). A metric
        or mode different from the one given at construction is an error, not an override."""
        for name, ours, theirs in (("metric", self._metric, metric), ("mode", self._mode, mode)):
            if ours is not None and theirs is not None and ours != theirs:
                raise ValueError(
                    f"RegularizedEvolution was built with {name}={ours!r}; Tune passed "
                    f"{theirs!r}. Leave metric/mode out of TuneConfig."
                )
        if self._space:
            return False
        space = space_from_tune_config(config)
        if not space:
            return False
        validate_points(space, list(self._points))
        self._space = space
        self._metric = self._metric or metric
        self._mode = self._mode or mode
        return True

    def suggest(self, trial_id: str) -> dict[str, float] | None:
        if not self._space:
            raise RuntimeError("RegularizedEvolution: no search space (set_search_properties)")
        if self._metric is None or self._mode not in ("min", "max"):
            raise RuntimeError("RegularizedEvolution: metric and mode ('min'|'max') are needed")
        if self._points:
            genome = self._points.popleft()
        elif self._num_random < self.population_size or not self._population:
            genome = self._random_genome()
            self._num_random += 1
        else:
            genome = self._mutate(self._tournament())
        self._live[trial_id] = genome
        return dict(genome)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        genome = self._live.pop(trial_id, None)
        if genome is None:
            return
        score = None if (error or not result) else result.get(self._metric)
        self._add(genome, score, trial_id)

    def add_evaluated_point(
        self,
        parameters: dict,
        value: float,
        error: bool = False,
        pruned: bool = False,
        intermediate_values: list[float] | None = None,
    ) -> None:
        """Warm-start from results obtained elsewhere; pruned points join like ASHA stops."""
        self._add({k: float(parameters[k]) for k in self._space}, None if error else value, "")

    # ---- evolution -----------------------------------------------------------------
    def _add(self, genome: dict[str, float], score: Any, trial_id: str) -> None:
        if score is None:
            return
        try:
            score = float(score)
        except (TypeError, ValueError):
            return
        if math.isfinite(score):
            self._population.append((genome, score, trial_id))

    def _random_genome(self) -> dict[str, float]:
        return {k: float(self._rng.uniform(lo, hi)) for k, (lo, hi) in self._space.items()}

    def _tournament(self) -> dict[str, float]:
        size = min(self.sample_size, len(self._population))
        picks = self._rng.choice(len(self._population), size=size, replace=False)
        sign = 1.0 if self._mode == "max" else -1.0
        # max() keeps the first of equal scores: ties go to the earlier draw, deterministically
        best = max(picks, key=lambda i: sign * self._population[int(i)][1])
        return self._population[int(best)][0]

    def _mutate(self, parent: dict[str, float]) -> dict[str, float]:
        names = list(self._space)
        k = min(self.mutation_genes, len(names))
        child = dict(parent)
        for i in self._rng.choice(len(names), size=k, replace=False):
            name = names[int(i)]
            low, high = self._space[name]
            step = self._rng.normal(0.0, self.mutation_sigma * (high - low))
            child[name] = float(np.clip(parent[name] + step, low, high))
        return child

    @property
    def population(self) -> list[tuple[dict[str, float], float]]:
        """Current members, oldest first, as (genome, score)."""
        return [(dict(g), s) for g, s, _ in self._population]

    # ---- persistence ---------------------------------------------------------------
    def get_state(self) -> dict:
        return {
            "version": _STATE_VERSION,
            "metric": self._metric,
            "mode": self._mode,
            "space": dict(self._space),
            "population_size": self.population_size,
            "sample_size": self.sample_size,
            "mutation_genes": self.mutation_genes,
            "mutation_sigma": self.mutation_sigma,
            "points": list(self._points),
            "live": dict(self._live),
            "population": list(self._population),
            "num_random": self._num_random,
            "rng": self._rng.bit_generator.state,
        }

    def set_state(self, state: dict) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported RegularizedEvolution state {state.get('version')!r}")
        self._metric, self._mode = state["metric"], state["mode"]
        self._space = dict(state["space"])
        self.population_size = state["population_size"]
        self.sample_size = state["sample_size"]
        self.mutation_genes = state["mutation_genes"]
        self.mutation_sigma = state["mutation_sigma"]
        self._points = deque(state["points"])
        self._live = dict(state["live"])
        self._population = deque(state["population"], maxlen=self.population_size)
        self._num_random = state["num_random"]
        self._rng = np.random.default_rng()
        self._rng.bit_generator.state = state["rng"]

    def save(self, checkpoint_path: str) -> None:
        # JSON, not pickle: a searcher state found in a run folder must never run code.
        with open(checkpoint_path, "w") as f:
            json.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        try:
            with open(checkpoint_path) as f:
                state = json.load(f)
        except (UnicodeDecodeError, ValueError):
            raise ValueError(
                f"{checkpoint_path}: not a JSON evolution state (an older casd-ray's pickle?); "
                "redo the search with --fresh search"
            ) from None
        state["population"] = [tuple(m) for m in state["population"]]
        self.set_state(state)
