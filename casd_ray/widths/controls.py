"""The free allocations a search starts from: what a user gets without searching.

``uniform`` (every group at one keep-ratio), ``global`` (Network Slimming's global channel
ranking, :func:`~casd_ray.widths.baselines.global_ranking_spec`) and ``torch_pruning``
(Torch-Pruning's global pruning, :func:`~casd_ray.widths.baselines.torch_pruning_allocation`)
are tried first by every searcher (``points_to_evaluate``: TPE and evolution learn from them)
and never stopped early, so a search can only add to them, and the report says by how much.

A control runs as a trial like any other; its genome is the allocation's keep-ratios (clipped
into the genome's bounds, so every searcher accepts it), and the trial trains the allocation's
exact widths, recognised by that genome.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from casd_ray.models.family import Spec, family_of
from casd_ray.widths import space
from casd_ray.widths.baselines import global_ranking_spec, torch_pruning_allocation
from casd_ray.widths.space import SpaceRules


def genome_of(rules: SpaceRules, teacher_spec: Spec, spec: Spec) -> dict[str, float]:
    """Keep-ratios of ``spec``'s widths per gene (mean over a gene's groups), in bounds."""
    fam = family_of(teacher_spec)
    names = fam.group_names(teacher_spec)
    ratio = dict(zip(names, fam.width_vector(spec) / fam.width_vector(teacher_spec), strict=True))
    return {
        gene: float(np.clip(np.mean([ratio[g] for g in groups]), rules.min_ratio, rules.max_ratio))
        for gene, groups in space.gene_groups(teacher_spec, rules.granularity).items()
    }


def control_specs(
    teacher: nn.Module,
    teacher_spec: Spec,
    rules: SpaceRules,
    names: list[str],
    log: Callable[[str], None] = print,
) -> dict[str, Spec]:
    """Name -> the control's spec at the budget, in ``names`` order (``uniform`` first).

    A control that cannot be made for this model (Torch-Pruning cannot prune every
    architecture) is left out with one log line; the search goes on without it.
    """
    out: dict[str, Spec] = {}
    for name in names:
        if rules.metric == "latency" and name != "uniform":
            log(f"search: control {name} left out (it allocates by FLOPs; the budget is latency)")
            continue
        try:
            if name == "uniform":
                genome = space.control_genome(rules, teacher_spec)
                out[name] = space.candidate_spec(rules, teacher_spec, genome)
            elif name == "global":
                out[name] = global_ranking_spec(
                    teacher, teacher_spec, target=rules.target, metric=rules.metric,
                    criterion=rules.importance, min_channels=rules.min_channels,
                    divisible_by=rules.divisible_by,
                )  # fmt: skip
            elif name == "torch_pruning":
                out[name] = torch_pruning_allocation(
                    teacher, teacher_spec, target=rules.target, metric=rules.metric
                )[0]
            else:
                raise ValueError(f"search.controls: unknown control {name!r}")
        except Exception as err:  # noqa: BLE001 - a control is an aid, never a reason to fail
            if name == "uniform":
                raise
            log(f"search: control {name} left out ({type(err).__name__}: {err})")
    return out


def control_points(
    rules: SpaceRules, teacher_spec: Spec, specs: dict[str, Spec]
) -> list[tuple[str, dict[str, float], Spec]]:
    """(name, genome, exact spec) of every control; uniform's genome is the repair scale's
    (:func:`~casd_ray.widths.space.control_genome`), so it repairs to itself."""
    out = []
    for name, spec in specs.items():
        if name == "uniform":
            genome = space.control_genome(rules, teacher_spec)
        else:
            genome = genome_of(rules, teacher_spec, spec)
        if any(np.allclose(list(genome.values()), list(g.values())) for _, g, _ in out):
            continue  # two controls with one genome: the first one names it
        out.append((name, genome, spec))
    return out
