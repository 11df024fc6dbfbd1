"""No-search baselines at the same budget: what the search has to beat.

``global_ranking_spec`` is Network Slimming's allocation (Liu et al. 2017) generalised to any
importance criterion: every channel of every group is ranked on one global scale and the
least important ones are removed until the candidate fits the budget. No candidate is
trained to choose it, so it costs nothing beyond the final fine-tune; the uniform network
(every group at one keep-ratio, :func:`casd_ray.widths.space.control_genome`) is the other,
and under a latency budget :func:`aligned_uniform`, the same in whole blocks of the device.

BN γ is comparable across layers as it is (every γ scales a normalised activation); L1 norms
of filters grow with fan-in, so for ``l1`` each group's scores are divided by their mean
first (the usual per-layer normalisation of global magnitude pruning).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from casd_ray.errors import BudgetError
from casd_ray.models.family import Spec, family_of, group_widths, with_group_widths
from casd_ray.widths import space
from casd_ray.widths.bisection import last_true
from casd_ray.widths.channel_blocks import block_steps, no_block_to_take
from casd_ray.widths.inherit import channel_importance
from casd_ray.widths.latency_repair import repair_measured


def global_order(
    teacher: nn.Module, spec: Spec, criterion: str = "bn_gamma"
) -> tuple[list[str], np.ndarray]:
    """Group names and, for every channel from least to most important, its group index."""
    scores = channel_importance(teacher, spec, criterion)
    names = list(scores)
    flat, owner = [], []
    for i, name in enumerate(names):
        s = scores[name].double()
        if criterion == "l1":
            s = s / s.mean().clamp_min(1e-12)
        flat.append(s)
        owner.append(torch.full((len(s),), i))
    order = torch.argsort(torch.cat(flat), stable=True)
    return names, torch.cat(owner)[order].numpy()


def global_ranking_spec(
    teacher: nn.Module,
    spec: Spec,
    *,
    target: float,
    metric: str = "flops",
    criterion: str = "bn_gamma",
    min_channels: int = 1,
    divisible_by: int = 1,
    ratio_fn: space.RatioFn | None = None,
) -> Spec:
    """Remove the globally least important channels until ``cost <= target`` of the teacher's
    (``ratio_fn``: a cost ratio of its own instead, a latency model's prediction).

    Returns the widest such candidate: removing one channel fewer (before rounding) would
    break the budget. Widths keep at least ``min_channels`` (rounded up to ``divisible_by``)
    and round down to multiples of ``divisible_by`` unless a group is kept whole; which
    channels survive is decided later by :func:`casd_ray.widths.inherit.inherit` with the same
    criterion, so they are exactly the globally top-ranked ones within each group.
    """
    kw = {"min_channels": min_channels, "divisible_by": divisible_by}
    if ratio_fn is None:
        rules = space.SpaceRules(granularity="layer", target=target, metric=metric, **kw)
        space.check_budget(rules, spec)
    elif target < space.smallest_ratio(spec, metric, ratio_fn=ratio_fn, **kw):
        raise BudgetError(
            f"space.budget.target: {target:g} is below the smallest reachable {metric} ratio"
        )
    names, owner = global_order(teacher, spec, criterion)
    full = np.array([group_widths(spec)[n] for n in names], dtype=np.int64)
    d = space.steps_of(spec, divisible_by)
    lowest = np.minimum(-(-min_channels // d) * d, full)
    if ratio_fn is None:
        teacher_cost = space.cost(spec, metric)

        def ratio_fn(student: Spec) -> float:
            return space.cost(student, metric) / teacher_cost

    def candidate(k: int) -> Spec:
        removed = np.bincount(owner[:k], minlength=len(names))
        widths = full - removed
        widths = np.where(widths < full, widths // d * d, full)
        widths = np.maximum(widths, lowest)
        return with_group_widths(spec, dict(zip(names, widths.tolist(), strict=True)))

    def fits(k: int) -> bool:
        return ratio_fn(candidate(k)) <= target

    if fits(0):
        return candidate(0)
    # the smallest k that fits: cost falls as k grows, and removing everything removable fits
    # (check_budget above)
    return candidate(last_true(lambda k: not fits(k), 0, len(owner)) + 1)


def torch_pruning_allocation(
    teacher: nn.Module,
    spec: Spec,
    *,
    target: float,
    metric: str = "flops",
    steps: int = 400,
) -> tuple[Spec, dict[str, torch.Tensor]]:
    """What a user gets from Torch-Pruning alone: its global pruning, progressively, until the
    network fits the budget; returns the pruned spec and Torch-Pruning's pruned weights.

    Torch-Pruning's own CIFAR recipe (``reproduce/main.py``): ``GroupMagnitudeImportance(p=2)``
    over DepGraph's groups, ``global_pruning=True``, ``pruning_ratio=1.0`` in ``steps`` small
    steps, stopping once the target is met; the classifier is never pruned. Each step's cost
    is our analytic count of the widths read off the pruned modules (the same count every
    candidate is budgeted with). ``space.min_channels`` is ours, not Torch-Pruning's: its
    network is taken as it prunes it (at least one channel per group).
    """
    import copy

    import torch_pruning as tp

    model = copy.deepcopy(teacher).cpu().eval()
    fam = family_of(spec)
    example = torch.zeros(1, spec.in_channels, *spec.image_size)
    classifiers = [
        m for m in model.modules()
        if (isinstance(m, nn.Linear) and m.out_features == spec.num_classes)
        or (isinstance(m, nn.Conv2d) and m.out_channels == spec.num_classes)
    ]  # fmt: skip
    with torch.enable_grad():
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
            global_pruning=True, pruning_ratio=1.0, iterative_steps=steps,
            ignored_layers=classifiers,
        )  # fmt: skip
        teacher_cost = space.cost(spec, metric)
        for _ in range(steps):
            pruner.step()
            pruned = fam.read_widths(model, spec)
            if space.cost(pruned, metric) / teacher_cost <= target:
                break
    return pruned, {k: v.detach().clone() for k, v in model.state_dict().items()}


def aligned_uniform(rules: space.SpaceRules, teacher: Spec, uniform: Spec) -> Spec:
    """The uniform genome repaired onto the latency budget as measured, every width a whole
    block of the latency model's channel block (and of ``space.divisible_by``): the fast path
    of the device's convolutions, which a user who knows the hardware takes by rounding
    (Torch-Pruning's ``round_to``). The block is the one the run's own alignment takes
    (:func:`block_steps`: the largest that reaches the target leaving more than one
    network). A run that searched in that block already has it: ``uniform``, its own uniform
    network (a second measured repair of the same genome could land elsewhere). Raises
    :class:`BudgetError` where no such block reaches the target as measured."""
    if no_block_to_take(rules):
        return uniform
    genome = space.control_genome(rules, teacher)
    usable = [step for step, why_not in block_steps(rules, teacher) if why_not is None]
    if not usable:
        raise BudgetError(
            f"space.budget.target: no uniform network in whole blocks of {rules.latency.block} "
            "channels (or a block dividing it) reaches the target"
        )
    for i, step in enumerate(usable):
        if step == rules.divisible_by:
            return uniform
        try:
            return repair_measured(
                teacher, rules.granularity, genome, rules.latency,
                min_channels=rules.min_channels, divisible_by=step,
            )[0]  # fmt: skip
        except BudgetError:
            if i == len(usable) - 1:
                raise
    return uniform
