"""No-search baselines at the same budget: what the search has to beat.

``global_ranking_spec`` is Network Slimming's allocation (Liu et al. 2017) generalised to any
importance criterion: every channel of every group is ranked on one global scale and the
least important ones are removed until the candidate fits the budget. No candidate is
trained to choose it, so it costs nothing beyond the final fine-tune; the uniform network
(every group at one keep-ratio, :func:`casd_ray.space.control_genome`) is the other.

BN γ is comparable across layers as it is (every γ scales a normalised activation); L1 norms
of filters grow with fan-in, so for ``l1`` each group's scores are divided by their mean
first (the usual per-layer normalisation of global magnitude pruning).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from casd_ray import space
from casd_ray.models import Spec, group_widths, with_group_widths
from casd_ray.prune import channel_importance


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
) -> Spec:
    """Remove the globally least important channels until ``cost <= target`` of the teacher's.

    Returns the widest such candidate: removing one channel fewer (before rounding) would
    break the budget. Widths keep at least ``min_channels`` (rounded up to ``divisible_by``)
    and round down to multiples of ``divisible_by`` unless a group is kept whole; which
    channels survive is decided later by :func:`casd_ray.prune.inherit` with the same
    criterion, so they are exactly the globally top-ranked ones within each group.
    """
    space.check_budget(
        space.SpaceRules(
            granularity="layer",
            target=target,
            metric=metric,
            min_channels=min_channels,
            divisible_by=divisible_by,
        ),
        spec,
    )
    names, owner = global_order(teacher, spec, criterion)
    full = np.array([group_widths(spec)[n] for n in names], dtype=np.int64)
    d = divisible_by
    lowest = np.minimum(-(-min_channels // d) * d, full)
    teacher_cost = space.cost(spec, metric)

    def candidate(k: int) -> Spec:
        removed = np.bincount(owner[:k], minlength=len(names))
        widths = full - removed
        widths = np.where(widths < full, widths // d * d, full)
        widths = np.maximum(widths, lowest)
        return with_group_widths(spec, dict(zip(names, widths.tolist(), strict=True)))

    def fits(k: int) -> bool:
        return space.cost(candidate(k), metric) / teacher_cost <= target

    lo, hi = 0, len(owner)  # smallest k that fits: cost falls as k grows
    if fits(lo):
        return candidate(lo)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return candidate(hi)
