"""The search space: genes, genome -> keep-ratios -> widths, and repair onto a cost budget.

A *genome* holds one keep-ratio per searched gene. The granularity decides which channel
groups a gene sets (see :func:`gene_groups`): ``stage`` (3 genes: each stage's stream and
every inner conv of that stage), ``block`` (one gene per stream plus one per block for its
inner convs) or ``layer`` (one gene per channel group).

With repair on, a genome only gives the *shape* of a candidate: one global scale is found so
that the candidate lands on the budget. Every candidate then costs the same (within one
channel-rounding step), so the search compares allocations, not sizes, and the uniform
genome at the budget is a fair control. Repair evaluates the analytic cost model
(:func:`casd_ray.models.family.flops`), never a forward pass, so it takes milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from casd_ray.config import SpaceConfig
from casd_ray.errors import BudgetError, SourceError
from casd_ray.models.base import GRANULARITIES
from casd_ray.models.family import Spec, family_of, flops, params
from casd_ray.widths.bisection import last_true

METRICS = {"flops": flops, "params": params}
RatioFn = Callable[[Spec], float]
# Scaled ratios are clipped to (0, 1]; this floor keeps a ratio positive without ever
# rounding to a channel (every group then sits at its minimum width).
_TINY_RATIO = 1e-12


# --------------------------------------------------------------------------- genes


def gene_groups(spec: Spec, granularity: str) -> dict[str, list[str]]:
    """Gene name -> names of the channel groups it sets (every group exactly once).

    Gene names use underscores (``stage1_block3``), never dots, so they are plain keys for
    Ray Tune's config and Optuna's parameter names.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"space.granularity: {granularity!r} is not one of {GRANULARITIES}")
    return family_of(spec).genes(spec, granularity)


def gene_names(spec: Spec, granularity: str) -> list[str]:
    """The searched genes, in network order (streams first)."""
    return list(gene_groups(spec, granularity))


def uniform_genome(spec: Spec, granularity: str, value: float = 1.0) -> dict[str, float]:
    """Every gene at ``value``: repaired, it is the uniform-width network at the budget."""
    return dict.fromkeys(gene_names(spec, granularity), float(value))


def ratios_from_genome(spec: Spec, granularity: str, genome: dict[str, float]) -> dict[str, float]:
    """Group name -> keep-ratio. Keys of ``genome`` that are not genes are ignored, so a
    whole Tune trial config can be passed; a missing gene is an error."""
    out = {}
    for gene, groups in gene_groups(spec, granularity).items():
        if gene not in genome:
            raise KeyError(f"genome: missing gene {gene!r} for granularity {granularity!r}")
        value = float(genome[gene])
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"genome: gene {gene!r} must be a positive ratio, got {value}")
        for group in groups:
            out[group] = value
    return out


# --------------------------------------------------------------------------- widths


def steps_of(spec: Spec, divisible_by: int) -> np.ndarray:
    """Per group, the multiple its width rounds to: ``divisible_by`` and the group's own unit
    (a grouped conv's groups, a split's blocks), whichever both divide."""
    return np.lcm(int(divisible_by), family_of(spec).units(spec))


def _round_widths(
    teacher: np.ndarray, ratios: np.ndarray, min_channels: int, divisible_by: np.ndarray | int
) -> np.ndarray:
    """Vectorised rounding shared by :func:`widths_from_ratios` and :func:`repair`.

    A ratio >= 1 keeps the whole group (even if its width is not a multiple of
    ``divisible_by``), so ratio 1.0 always reproduces the teacher. Otherwise round half up
    to a multiple of ``divisible_by`` (one per group), then clamp to [lowest, teacher width]
    where lowest is ``min_channels`` rounded up to a multiple of ``divisible_by``.
    """
    d = divisible_by
    lowest = -(-min_channels // d) * d
    n = np.floor(ratios * teacher / d + 0.5) * d
    n = np.minimum(np.maximum(n, lowest), teacher)
    return np.where(ratios >= 1.0, teacher, n).astype(np.int64)


def widths_from_ratios(
    spec: Spec, ratios: dict[str, float], *, min_channels: int = 1, divisible_by: int = 1
) -> Spec:
    """Student spec from keep-ratios per group (missing groups keep ratio 1.0).

    Widths round half up to a multiple of ``divisible_by`` and are at least ``min_channels``
    (never more than the teacher's width).
    """
    if min_channels < 1 or divisible_by < 1:
        raise ValueError("min_channels and divisible_by must be >= 1")
    names, w = _layout(spec)
    unknown = set(ratios) - set(names)
    if unknown:
        raise KeyError(f"ratios: unknown channel groups {sorted(unknown)[:3]}")
    q = np.array([float(ratios.get(n, 1.0)) for n in names])
    if not np.all(np.isfinite(q)) or np.any(q <= 0):
        raise ValueError("ratios: every keep-ratio must be a positive finite number")
    return _with_widths(spec, _round_widths(w, q, min_channels, steps_of(spec, divisible_by)))


def _layout(spec: Spec) -> tuple[tuple[str, ...], np.ndarray]:
    """Group names in the family's order and the spec's widths as floats."""
    fam = family_of(spec)
    return fam.group_names(spec), fam.width_vector(spec)


def _with_widths(spec: Spec, widths: np.ndarray) -> Spec:
    return family_of(spec).with_widths(spec, widths)


# --------------------------------------------------------------------------- cost


def cost(spec: Spec, metric: str) -> int:
    """FLOPs or parameter count of ``spec`` (analytic)."""
    if metric not in METRICS:
        raise ValueError(f"space.budget.metric: {metric!r} is not one of {sorted(METRICS)}")
    return METRICS[metric](spec)


def cost_ratio(student: Spec, teacher: Spec, metric: str) -> float:
    """Student cost over teacher cost (the budget is expressed in this ratio)."""
    return cost(student, metric) / cost(teacher, metric)


def smallest_ratio(
    spec: Spec,
    metric: str = "flops",
    *,
    min_channels: int = 1,
    divisible_by: int = 1,
    ratio_fn: RatioFn | None = None,
) -> float:
    """Cost ratio with every group at its minimum width: no candidate can cost less."""
    low = widths_from_ratios(
        spec,
        dict.fromkeys(group_names(spec), _TINY_RATIO),
        min_channels=min_channels,
        divisible_by=divisible_by,
    )
    return ratio_fn(low) if ratio_fn else cost_ratio(low, spec, metric)


def group_names(spec: Spec) -> list[str]:
    return list(_layout(spec)[0])


def _check_target(
    spec: Spec,
    target: float,
    metric: str,
    min_channels: int,
    divisible_by: int,
    ratio_fn: RatioFn | None = None,
) -> None:
    if not (0 < target <= 1):
        raise BudgetError(
            f"space.budget.target: {target} must be in (0, 1] (a fraction of the teacher's "
            f"{metric}; 1.0 keeps the whole teacher)"
        )
    low = smallest_ratio(
        spec, metric, min_channels=min_channels, divisible_by=divisible_by, ratio_fn=ratio_fn
    )
    if target < low:
        raise BudgetError(
            f"space.budget.target: {target:g} is below the smallest reachable {metric} ratio "
            f"{low:.4f} (every channel group at min_channels={min_channels}, "
            f"divisible_by={divisible_by}); raise the target or lower space.min_channels"
        )


# --------------------------------------------------------------------------- repair


def repair(
    spec: Spec,
    granularity: str,
    genome: dict[str, float],
    *,
    target: float,
    metric: str = "flops",
    min_channels: int = 1,
    divisible_by: int = 1,
    ratio_fn: RatioFn | None = None,
) -> tuple[Spec, float]:
    """Scale the genome by one global factor so the student lands on the budget.

    ``ratio_fn`` (student -> cost over the teacher's) replaces the analytic ratio of
    ``metric``: a latency budget passes its fitted model's prediction, which must grow with
    every width, as the analytic costs do.

    Returns ``(student, scale)`` where the student's ratios are ``clip(scale * genome, 0, 1]``.
    Guarantee: ``cost_ratio(student) <= target`` and the next larger scale at which any
    width changes gives a cost ratio above ``target`` — the candidate is within one rounding
    step of the budget. The cost is a step function of the scale that only changes where
    some group's rounded width changes, so we binary-search over exactly those breakpoints
    (a few thousand for ResNet-164, ~13 cost evaluations) instead of bisecting a float.
    """
    _check_target(spec, target, metric, min_channels, divisible_by, ratio_fn)
    ratios = ratios_from_genome(spec, granularity, genome)
    names, w = _layout(spec)
    r = np.array([ratios[n] for n in names])
    d = steps_of(spec, divisible_by)
    # Width of group g changes where scale * r_g * w_g / d crosses j + 0.5, and at
    # scale * r_g = 1 (the group snaps to its full width).
    points = [1.0 / r]
    for rg, wg, dg in zip(r, w, d, strict=True):
        j = np.arange(math.ceil(wg / dg) + 1)
        points.append((j + 0.5) * dg / (wg * rg))
    breaks = np.unique(np.concatenate(points))
    breaks = breaks[breaks <= 1.0 / r.min()]
    # Evaluate just past each breakpoint so floating-point rounding cannot place the change
    # after the point we test; below the first breakpoint every group is at its minimum.
    scales = np.concatenate([[breaks[0] / 2], breaks * (1 + 1e-9)])
    if ratio_fn is None:
        teacher_cost = cost(spec, metric)

        def ratio_fn(student: Spec) -> float:
            return cost(student, metric) / teacher_cost

    def student_at(scale: float) -> Spec:
        q = np.clip(scale * r, _TINY_RATIO, 1.0)
        return _with_widths(spec, _round_widths(w, q, min_channels, d))

    def fits(i: int) -> bool:
        # the same comparison as cost_ratio(student) <= target, so callers agree exactly
        return ratio_fn(student_at(float(scales[i]))) <= target

    # Largest index whose cost fits; index 0 (all minimal) fits after _check_target.
    scale = float(scales[last_true(fits, 0, len(scales) - 1)])
    return student_at(scale), scale


def scaled_ratios(ratios: dict[str, float], scale: float) -> dict[str, float]:
    """The ratios :func:`repair` builds at ``scale``: ``scale * r`` clipped to (0, 1]."""
    return {g: min(1.0, max(_TINY_RATIO, scale * v)) for g, v in ratios.items()}


# --------------------------------------------------------------------------- rules


class CostModel(Protocol):
    """A predicted cost (:class:`casd_ray.widths.latency_model.LatencyModel`): plain values
    a trial can carry, a target and a ratio to the teacher."""

    @property
    def target_ratio(self) -> float: ...

    def ratio(self, spec: Spec) -> float: ...


@dataclass(frozen=True)
class SpaceRules:
    """Plain values that turn a genome into a candidate: what a Ray trial receives.

    ``repair`` is already resolved (off for multi-objective searchers), so a trial needs no
    config and no searcher name to build its candidate.
    """

    granularity: str
    target: float
    metric: str = "flops"
    min_channels: int = 1
    divisible_by: int = 1
    min_ratio: float = 0.1
    max_ratio: float = 1.0
    repair: bool = True
    importance: str = "l1"
    latency: CostModel | None = None

    def budget(self) -> tuple[float, RatioFn | None]:
        """``(target, ratio_fn)`` for :func:`repair`: a latency budget's target and ratio
        are its fitted model's (a prediction over its prediction of the teacher)."""
        if self.metric == "latency":
            if self.latency is None:
                raise ValueError("space.budget.metric latency: the rules carry no latency model")
            return self.latency.target_ratio, self.latency.ratio
        return self.target, None

    def ratio(self, student: Spec, teacher: Spec) -> float:
        """The student's cost ratio on the budget's metric (predicted, for latency)."""
        _, fn = self.budget()
        return fn(student) if fn else cost_ratio(student, teacher, self.metric)


def rules_of(space: SpaceConfig, algorithm: str, latency: CostModel | None = None) -> SpaceRules:
    """The rules of ``space`` for a search run by ``algorithm``.

    Repair applies unless switched off or the search is multi-objective: NSGA-II keeps
    the cost as its second objective, and repair would pin every candidate to one cost.
    """
    return SpaceRules(
        granularity=space.granularity,
        target=space.budget.target,
        metric=space.budget.metric,
        min_channels=space.min_channels,
        divisible_by=space.divisible_by,
        min_ratio=space.min_ratio,
        max_ratio=space.max_ratio,
        repair=space.repair and algorithm != "optuna-nsga2",
        importance=space.importance,
        latency=latency,
    )


def candidate_spec(rules: SpaceRules, teacher_spec: Spec, genome: dict) -> Spec:
    """The student a trial trains: repaired onto the budget, or the plain genome widths
    when repair is off."""
    if rules.repair:
        target, ratio_fn = rules.budget()
        student, _ = repair(
            teacher_spec,
            rules.granularity,
            genome,
            target=target,
            metric=rules.metric,
            min_channels=rules.min_channels,
            divisible_by=rules.divisible_by,
            ratio_fn=ratio_fn,
        )
        return student
    ratios = ratios_from_genome(teacher_spec, rules.granularity, genome)
    return widths_from_ratios(
        teacher_spec, ratios, min_channels=rules.min_channels, divisible_by=rules.divisible_by
    )


def control_genome(rules: SpaceRules, teacher_spec: Spec) -> dict[str, float]:
    """The uniform genome whose candidate sits on the budget, whether repair is on or off.

    Its value is the repair scale of the all-ones genome, clipped into the genome bounds, so
    it is a valid point for Tune's ``points_to_evaluate`` (with repair on, any uniform value
    repairs to the same uniform-width network).
    """
    target, ratio_fn = rules.budget()
    _, scale = repair(
        teacher_spec,
        rules.granularity,
        uniform_genome(teacher_spec, rules.granularity, 1.0),
        target=target,
        metric=rules.metric,
        min_channels=rules.min_channels,
        divisible_by=rules.divisible_by,
        ratio_fn=ratio_fn,
    )
    value = min(max(scale, rules.min_ratio), rules.max_ratio)
    return uniform_genome(teacher_spec, rules.granularity, value)


def search_bounds(rules: SpaceRules, teacher_spec: Spec) -> dict[str, tuple[float, float]]:
    """``{gene: (min_ratio, max_ratio)}``: the searchers' space."""
    lo, hi = rules.min_ratio, rules.max_ratio
    return {n: (lo, hi) for n in gene_names(teacher_spec, rules.granularity)}


def check_budget(rules: SpaceRules, teacher_spec: Spec) -> None:
    """Refuse an unreachable budget before any trial starts (raises :class:`BudgetError`).

    With repair off, no candidate in the space can be cheaper than every gene at
    ``space.min_ratio``, so a target below that is refused too.
    """
    if not group_names(teacher_spec):  # no genes: nothing to search, every width is fixed
        arch = getattr(teacher_spec, "arch", "the model")
        raise SourceError(
            f"model.arch: {arch} has no channel group that can be pruned (every conv/linear "
            "layer feeds the output or sits under space.ignore); shorten space.ignore or "
            "compress another model"
        )
    metric, (target, ratio_fn) = rules.metric, rules.budget()
    _check_target(teacher_spec, target, metric, rules.min_channels, rules.divisible_by, ratio_fn)
    if not rules.repair:
        low = widths_from_ratios(
            teacher_spec,
            dict.fromkeys(group_names(teacher_spec), rules.min_ratio),
            min_channels=rules.min_channels,
            divisible_by=rules.divisible_by,
        )
        low_ratio = rules.ratio(low, teacher_spec)
        if target < low_ratio:
            raise BudgetError(
                f"space.budget.target: {target:g} is below the smallest reachable {metric} "
                f"ratio {low_ratio:.4f} (every gene at space.min_ratio={rules.min_ratio:g}, "
                "space.repair off); raise the target or lower space.min_ratio"
            )
