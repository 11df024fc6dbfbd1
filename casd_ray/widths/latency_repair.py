"""Networks moved onto a latency budget *as measured*, not as predicted.

The latency model predicts; only a measurement judges. Every repair here measures the
network it proposes beside the teacher (interleaved rounds) and moves it again until it
lands within the budget (:func:`onto_measured_budget`): a genome rescaled onto the next
predicted ratio (:func:`repair_measured`), or a *trained* network cut by single channel
blocks (:func:`repair_trained`).

A trained network is moved by the smallest change of its widths. A candidate the search
trained and measured over the budget was repaired by rescaling its whole genome to a lower
predicted ratio. In whole channel blocks that moves many layers at once: on a real run
(ResNet-20, 0.5 of the teacher's ONNX Runtime latency, blocks of 8) a winner measured 2-4 %
over kept 0.251 of the FLOPs after the rescale, 0.319 when single blocks of single layers
were cut instead (model only, docs/method.md "Measured repair"). The network fine-tuned is
meant to be the one the search chose; a repair that reshapes it fine-tunes another. So here
one block of one group is cut at a time, the one that saves the most predicted latency per
FLOP lost (FLOPs as the stand-in for accuracy kept), and last the cut that meets the goal
losing the fewest FLOPs; then single blocks of the layers cut are added back, the most FLOPs
per predicted millisecond first, while the prediction stays within it (one block of a narrow
layer can be a large step, so the cut alone overshoots).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable

import numpy as np

from casd_ray.errors import BudgetError
from casd_ray.models.family import Spec, build_model, family_of, flops
from casd_ray.models.latency import Deployment, Latency, measure_together
from casd_ray.widths import space
from casd_ray.widths.latency_model import SLACK, TOLERANCE, LatencyModel


def measure_beside_teacher(
    teacher: Spec, student: Spec, dep: Deployment, rounds: int = 3
) -> dict[str, dict]:
    """Teacher and student measured in interleaved rounds (:func:`measure_together`): one
    timing moves by ~30 % between runs on a shared CPU, the median of rounds and the ratio
    of two networks measured side by side much less."""
    nets = {"teacher": build_model(teacher), "student": build_model(student)}
    return measure_together(nets, dep, rounds=rounds)


def fractions_of_target(
    rounds_ms: list[float], teacher_rounds_ms: list[float], model: LatencyModel
) -> list[float]:
    """Each round's latency over the target beside the teacher measured in that round."""
    pairs = zip(rounds_ms, teacher_rounds_ms, strict=True)
    return [ms / model.target_beside(t) for ms, t in pairs]


def onto_measured_budget(
    teacher: Spec,
    build: Callable[[float], Spec],
    model: LatencyModel,
    *,
    low: float = 0.0,
    tries: int = 6,
) -> tuple[Spec, Latency]:
    """``build(ratio)`` allocates a network onto a predicted latency ratio; it is measured
    beside the teacher and moved until it lands within [1 - :data:`SLACK`, 1 +
    :data:`TOLERANCE`] of the target, the median of its rounds' fractions of the target
    beside each round's teacher (:func:`fractions_of_target`): the next ratio scales by
    target / measured (a secant through the origin), kept inside the bracket of ratios
    already measured under and over the target, else bisected (never below ``low``).
    Returns the network and its measured latency (median of interleaved rounds); after
    ``tries`` the largest network measured within the target."""
    dep = model.deployment()
    ratio, under, over = model.target_ratio, low, math.inf
    best: tuple[float, Spec, Latency] | None = None  # (fraction of its target, network, latency)
    for _ in range(tries):
        student = build(ratio)
        ms = measure_beside_teacher(teacher, student, dep)
        target = model.target_beside(ms["teacher"]["median_ms"])
        got = ms["student"]
        lat = Latency(got["median_ms"], got["iqr_ms"], got["runs"])
        frac = statistics.median(
            fractions_of_target(got["rounds_ms"], ms["teacher"]["rounds_ms"], model)
        )
        if frac <= 1 + TOLERANCE:
            if best is None or frac > best[0]:
                best = (frac, student, lat)
            if frac >= 1 - SLACK:
                return student, lat
            under = max(under, ratio)
        else:
            over = min(over, ratio)
        step = ratio / frac
        if over < math.inf and not under < step < over:  # outside the bracket: bisect it
            step = (under + over) / 2
        ratio = min(step, 1.0)  # repair's targets are fractions of the teacher
    if best is not None:
        return best[1], best[2]
    raise BudgetError(
        f"space.budget.target: no network of this allocation measured within "
        f"{target:.3f} ms after {tries} tries (last {lat.median_ms:.3f} ms)"
    )


def repair_measured(
    teacher: Spec,
    granularity: str,
    genome: dict[str, float],
    model: LatencyModel,
    *,
    min_channels: int = 1,
    divisible_by: int = 1,
    tries: int = 6,
) -> tuple[Spec, Latency]:
    """The genome repaired onto the latency budget as measured (:func:`onto_measured_budget`
    with :func:`space.repair` and the model's prediction)."""
    kw = {"min_channels": min_channels, "divisible_by": divisible_by, "ratio_fn": model.ratio}

    def build(ratio: float) -> Spec:
        return space.repair(teacher, granularity, genome, target=ratio, metric="latency", **kw)[0]

    # never below the smallest network's prediction, which repair would refuse
    low = space.smallest_ratio(teacher, "latency", **kw)
    return onto_measured_budget(teacher, build, model, low=low, tries=tries)


def nearest_within(
    spec: Spec,
    teacher: Spec,
    goal: float,
    ratio_fn: space.RatioFn,
    *,
    min_channels: int = 1,
    divisible_by: int = 1,
) -> Spec:
    """``spec`` with single blocks of single groups cut until ``ratio_fn`` (a latency
    model's predicted ratio to the teacher) is at most ``goal``, then grown back by single
    blocks, never past its own widths, while it stays there (a network already within the
    goal grows towards the teacher's widths). Widths stay whole blocks of ``divisible_by`` (or the
    teacher's own width) and at least ``min_channels``; where no cut lowers the prediction
    further, the narrowest network reached is returned (the caller's measurement decides)."""
    fam = family_of(teacher)
    full = fam.width_vector(teacher).astype(np.int64)
    d = space.steps_of(teacher, divisible_by)
    lowest = np.minimum(-(-min_channels // d) * d, full)

    def at(widths: np.ndarray) -> Spec:
        return fam.with_widths(spec, widths.astype(float))

    def moves(widths: np.ndarray, down: bool) -> list[np.ndarray]:
        out = []
        for i, w in enumerate(widths):
            new = (
                max(lowest[i], (w - 1) // d[i] * d[i])
                if down
                else min(full[i], (w // d[i] + 1) * d[i])
            )
            if new != w:
                out.append(np.where(np.arange(len(widths)) == i, new, widths))
        return out

    widths = fam.width_vector(spec).astype(np.int64)
    ratio, cost = ratio_fn(at(widths)), flops(at(widths))
    # a network over the goal only gets back what was cut: what it keeps is its own
    # allocation, not another one (one far under it may grow anywhere)
    if ratio > goal:
        full = widths.copy()
    while ratio > goal:  # cut: the most latency saved per FLOP lost; the last cut, the
        best = None  # one that reaches the goal losing the fewest FLOPs
        for w in moves(widths, down=True):
            r, f = ratio_fn(at(w)), flops(at(w))
            score = (r <= goal, f if r <= goal else (ratio - r) / max(cost - f, 1))
            if r < ratio and (best is None or score > best[0]):
                best = (score, w, r, f)
        if best is None:
            return at(widths)
        _, widths, ratio, cost = best
    while True:  # grow back: the most FLOPs per predicted latency added, within the goal
        best = None
        for w in moves(widths, down=False):
            r, f = ratio_fn(at(w)), flops(at(w))
            score = (f - cost) / max(r - ratio, 1e-12)
            if r <= goal and (best is None or score > best[0]):
                best = (score, w, r, f)
        if best is None:
            return at(widths)
        _, widths, ratio, cost = best


def repair_trained(
    teacher: Spec,
    spec: Spec,
    genome: dict[str, float],
    granularity: str,
    model: LatencyModel,
    *,
    min_channels: int = 1,
    divisible_by: int = 1,
) -> tuple[Spec, Latency]:
    """A trained network (``spec``, searched as ``genome``) moved onto the latency budget as
    measured (:func:`onto_measured_budget`): each try, of the trained network cut by single
    blocks (:func:`nearest_within`) and its genome rescaled (:func:`space.repair`) onto the
    next predicted ratio, the one that keeps more FLOPs (greedy single cuts lose more in 1
    of 6 cases on real runs, by up to 0.011 of the teacher's FLOPs; ties go to the cut)."""
    kw = {"min_channels": min_channels, "divisible_by": divisible_by, "ratio_fn": model.ratio}

    def build(ratio: float) -> Spec:
        cut = nearest_within(spec, teacher, ratio, **kw)
        rescaled = space.repair(teacher, granularity, genome, target=ratio, metric="latency", **kw)
        return rescaled[0] if flops(rescaled[0]) > flops(cut) else cut

    low = space.smallest_ratio(teacher, "latency", **kw)
    return onto_measured_budget(teacher, build, model, low=low)
