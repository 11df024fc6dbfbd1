"""Candidates of a source model, built by pruning with Torch-Pruning.

A candidate is a copy of the full network (or of the teacher, to inherit its weights) pruned
one channel group at a time, keeping each group's most important channels in their original
order. Groups and their names come from :mod:`casd_ray.models.graph`.
"""

from __future__ import annotations

import copy

import torch
import torch_pruning as tp
from torch import Tensor, nn

from casd_ray.models.graph import (
    PRUNABLE,
    GraphSpec,
    dependency_graph,
    example_input,
    fresh_model,
    structure,
    width_vector,
)


def importance(model: nn.Module, spec: GraphSpec, criterion: str = "l1") -> dict[str, Tensor]:
    """Group -> one score per channel: ``l1`` sums the L1 norms of the filters that write the
    group (every coupled conv/linear), ``bn_gamma`` the |gamma| of its batch norms.
    ``model`` is a full-width instance of ``spec``'s architecture (the teacher).

    A layer's channel adds to the group channel it follows (a concat or a ghost module maps
    several onto one). A group pruned in units (``Structure.units``) scores a position by its
    sum over the blocks, repeated in every block, so the best positions win in each block.
    """
    s = structure(spec)
    out = {}
    for name, deps, width, unit in zip(s.names, s.deps, s.full.astype(int), s.units, strict=True):
        score = torch.zeros(width)
        for module_name, kind, idxs, roots in deps:
            m = model.get_submodule(module_name)
            if kind != "out":
                continue
            idx, root = torch.tensor(idxs), torch.tensor(roots)
            if criterion == "l1" and isinstance(m, PRUNABLE):
                w = m.weight.detach().float().cpu().abs()
                score.index_add_(0, root, w.reshape(w.shape[0], -1).sum(1)[idx])
            elif criterion == "bn_gamma" and isinstance(m, nn.modules.batchnorm._BatchNorm):
                score.index_add_(0, root, m.weight.detach().float().cpu().abs()[idx])
        out[name] = score.reshape(int(unit), -1).sum(0).repeat(int(unit))
    return out


def in_units(keep: Tensor, width: int, unit: int) -> list[int]:
    """The channels kept when ``keep`` is pruned in ``unit`` equal blocks: the positions kept
    in the most blocks (ties: the lower position), the same in every block. ``keep`` already
    in units comes back unchanged."""
    block = width // unit
    votes = torch.bincount(keep.long() % block, minlength=block)
    n = len(keep) // unit
    positions = torch.sort(torch.argsort(votes, descending=True, stable=True)[:n]).values
    return [int(p) + b * block for b in range(unit) for p in positions]


def prune_to(model: nn.Module, spec: GraphSpec, keep: dict[str, Tensor]) -> nn.Module:
    """Prune ``model`` (a full-width instance of ``spec``'s architecture) in place to the kept
    channel indices of each group (groups not in ``keep`` stay whole)."""
    param = next(model.parameters())
    was = model.training
    model.eval()
    graph = dependency_graph(model, example_input(spec, param.device).to(param.dtype))
    s = structure(spec)
    for name, width, unit in zip(s.names, s.full.astype(int), s.units, strict=True):
        if name not in keep:
            continue
        if len(keep[name]) % int(unit):
            raise ValueError(f"group {name}: {len(keep[name])} channels, not a multiple of {unit}")
        kept = set(in_units(keep[name], width, int(unit)))
        removed = [j for j in range(width) if j not in kept]
        if not removed:
            continue
        module = model.get_submodule(name)
        conv = isinstance(module, nn.Conv2d)
        fn = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
        group = graph.get_pruning_group(module, fn, idxs=removed)
        group.prune()
    return model.train(was)


def prune_copy(teacher: nn.Module, spec: GraphSpec, keep: dict[str, Tensor]) -> nn.Module:
    """A pruned copy of ``teacher`` keeping ``keep``'s channels (the teacher is untouched)."""
    return prune_to(copy.deepcopy(teacher), spec, keep)


def build(spec: GraphSpec) -> nn.Module:
    """A freshly initialised network of ``spec``'s widths (the first channels of each group)."""
    model = fresh_model(spec)
    s = structure(spec)
    pairs = zip(s.names, width_vector(spec), s.full, strict=True)
    keep = {n: torch.arange(int(w)) for n, w, f in pairs if w < f}
    return prune_to(model, spec, keep) if keep else model
