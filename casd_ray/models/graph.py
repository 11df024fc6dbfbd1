"""Any CNN as a width spec: channel groups from Torch-Pruning's DependencyGraph.

A :class:`GraphSpec` is the search's view of a user's model (``torchvision:``, ``timm:``,
``python:``): the source to rebuild it and the kept width of every channel group. A channel
group is what Torch-Pruning's DependencyGraph couples (residual adds, concats, depthwise
convs, squeeze-excite); its name is the readable path of the first conv or linear layer
(in module order) that writes it, e.g. ``layer1.0.conv1``.

Three things are derived once per architecture from one traced forward and cached
(:func:`structure`): the groups, which layers' input and output channels each group sets,
and every layer's spatial positions. FLOPs and parameters of any candidate are then a few
vector operations (:func:`flops`, :func:`params`) — budget repair evaluates hundreds of
candidates without building one; tests check the counts against ``FlopCounterMode`` and
``numel`` of the built candidate.

A group touched by a grouped conv, or read only in blocks (a split, a ghost module's
concat), moves in *units* that keep every block the same size (:func:`_unit`), so
``groups`` stays valid and the linear cost model exact; tests and the pre-flight check
(:mod:`casd_ray.widths.preflight`) compare it with the built candidates.

Layers whose output is the network's output (the classifier) and the modules in ``ignore``
(by module-path prefix, their inputs included) are never pruned. Building candidates:
:mod:`casd_ray.models.surgery`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from casd_ray.errors import SourceError
from casd_ray.models.names import check_ignore
from casd_ray.models.source import build_external

PRUNABLE = (nn.Conv2d, nn.Linear)


class GraphSpec(BaseModel):
    """A user's architecture and the width of every channel group: enough to rebuild it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    arch: str
    kwargs: dict[str, Any] = Field(default_factory=dict)
    in_channels: int = 3
    num_classes: int = 10
    image_size: tuple[int, int] = (32, 32)
    ignore: tuple[str, ...] = ()
    widths: dict[str, int] = Field(default_factory=dict)  # group -> kept channels

    def source_key(self) -> str:
        """Everything that decides the full architecture (not the widths): the cache key."""
        return json.dumps(self.model_dump(exclude={"widths"}), sort_keys=True)

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)


def fresh_model(spec: GraphSpec) -> nn.Module:
    """The full (unpruned) architecture, randomly initialised."""
    return build_external(spec.arch, spec.kwargs, spec.in_channels, spec.num_classes)


def example_input(spec: GraphSpec, device: torch.device | str = "cpu") -> Tensor:
    return torch.zeros(1, spec.in_channels, *spec.image_size, device=device)


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Structure:
    """Groups and the linear cost model of one architecture (see the module docstring).

    Row ``m`` of ``out_share``/``in_share`` says how many channels of module ``m``'s output
    (input) one channel of each group is; a candidate's channel counts are the full counts
    minus ``share @ removed``.
    """

    names: tuple[str, ...]
    modules: tuple[str, ...]  # the rows of the cost model: every layer with parameters
    # per group: (module, "out"|"in", that module's channels, the group channel each one
    # follows), as Torch-Pruning couples them in the full network; any full-width copy
    # shares them
    deps: tuple[tuple[tuple[str, str, tuple[int, ...], tuple[int, ...]], ...], ...]
    full: np.ndarray  # full width per group
    units: np.ndarray  # per group: widths are multiples of it (see _unit)
    out_full: np.ndarray
    in_full: np.ndarray
    out_share: np.ndarray  # [modules, groups]
    in_share: np.ndarray
    flop_coef: np.ndarray  # FLOPs = sum coef * out * in_per_group (2 * positions * kernel area)
    depthwise: np.ndarray  # bool: in per group stays 1
    conv_groups: np.ndarray  # a grouped conv keeps its groups: in per group = in / groups
    param_terms: tuple[tuple[int, str, int], ...]  # (module row, kind, numel per unit)


def _trace(model: nn.Module, spec: GraphSpec, x: Tensor) -> tuple[set[str], dict[str, int]]:
    """One hooked forward: the conv/linear layers whose output is the network's output (the
    classifier: pruning it would change the classes; the last executed layer counts too) and
    every layer's output positions (spatial size, summed if a layer is reused). A model that
    fails on the data's shape, or does not output one row of ``num_classes``, is one line."""
    outputs: dict[str, Tensor] = {}
    positions: dict[str, int] = {}
    order: list[str] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, PRUNABLE):

            def hook(m, _i, out, name=name):
                outputs[name] = out
                order.append(name)
                channels = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
                positions[name] = positions.get(name, 0) + out.numel() // channels

            hooks.append(m.register_forward_hook(hook))
    shape = "x".join(map(str, x.shape[1:]))
    try:
        with torch.no_grad():
            y = model(x)
    except Exception as err:  # noqa: BLE001 - a model can raise anything on a wrong shape
        detail = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        hint = (
            f"; the model takes {first.in_channels}-channel images: set data.channels: "
            f"{first.in_channels}"
            if first is not None
            and first.in_channels in (1, 3)
            and first.in_channels != spec.in_channels
            else ""
        )
        raise SourceError(
            f"model.arch: {spec.arch} fails on the data's {shape} images "
            f"({type(err).__name__}: {detail}){hint}"
        ) from None
    finally:
        for h in hooks:
            h.remove()
    if not isinstance(y, Tensor) or tuple(y.shape) != (1, spec.num_classes):
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise SourceError(
            f"model.kwargs: {spec.arch} outputs {got} for one image; the data has "
            f"{spec.num_classes} classes, so (1, {spec.num_classes}) is needed"
        )
    fixed = {n for n, o in outputs.items() if o.data_ptr() == y.data_ptr()}
    return fixed | set(order[-1:]), positions


def dependency_graph(model: nn.Module, x: Tensor) -> tp.DependencyGraph:
    """Torch-Pruning traces with autograd: callers may be inside ``torch.no_grad()``."""
    with torch.enable_grad():
        return tp.DependencyGraph().build_dependency(model, example_inputs=x)


def _ignored(name: str, ignore: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in ignore)


def _traced_groups(
    model: nn.Module, spec: GraphSpec, x: Tensor, outputs: set[str]
) -> list[tuple[str, list]]:
    """(name, [(module, "out"|"in", module channels, group channels)]) per prunable group.

    Each group is re-read from the layer that names it, so a group's channels are that
    layer's output channels and every coupled channel carries the group channel it follows
    (Torch-Pruning's root index): concats, splits and ghost modules map channels unevenly.
    A group touching an ignored module, on its input or output side, stays full; one that
    reaches the network's output too.
    """
    names = {m: n for n, m in model.named_modules()}
    order = {n: i for i, n in enumerate(names.values())}
    ignored = {n for n in order if _ignored(n, spec.ignore)}
    graph = dependency_graph(model, x)
    ignored_layers = [
        m for m, n in names.items() if n in outputs | ignored and isinstance(m, PRUNABLE)
    ]
    # a bare parameter (ConvNeXt's layer scale) is costed as part of the module that owns it
    owners = dict(names) | {
        p: n for n, m in model.named_modules() for p in m.parameters(recurse=False)
    }
    out = []
    for group in graph.get_all_groups(ignored_layers=ignored_layers, root_module_types=PRUNABLE):
        deps = _deps(group, owners)
        writers = [
            d for d in deps if d[1] == "out" and isinstance(model.get_submodule(d[0]), PRUNABLE)
        ]
        if not writers or any((d[1] == "out" and d[0] in outputs) or d[0] in ignored for d in deps):
            continue  # a group that reaches the output or an ignored module stays full
        name = min(writers, key=lambda d: order[d[0]])[0]
        root = model.get_submodule(name)
        conv = isinstance(root, nn.Conv2d)
        fn = tp.prune_conv_out_channels if conv else tp.prune_linear_out_channels
        width = root.out_channels if conv else root.out_features
        deps = _deps(graph.get_pruning_group(root, fn, idxs=list(range(width))), owners)
        if all(_fits(model.get_submodule(d[0]), d[1], d[2]) for d in deps):
            out.append((name, deps))  # else Torch-Pruning mis-traced it (torch.chunk + cat)
    return sorted(out, key=lambda g: order[g[0]])


def _deps(group, names: dict) -> list[tuple[str, str, tuple[int, ...], tuple[int, ...]]]:
    """(module, kind, module channels, group channels) per coupled layer, merged per layer."""
    pairs: dict[tuple[str, str], set[tuple[int, int]]] = {}
    for item in group:
        dep, idxs = item
        module = dep.target.module
        if module not in names or dep.handler is None:
            continue
        kind = "out" if "out_channels" in dep.handler.__name__ else "in"
        roots = getattr(item, "root_idxs", None) or [getattr(i, "root_idx", i) for i in idxs]
        got = pairs.setdefault((names[module], kind), set())
        got |= {(int(i), int(r)) for i, r in zip(idxs, roots, strict=True)}
    out = []
    for (module, kind), got in pairs.items():
        ordered = sorted(got, key=lambda p: (p[1], p[0]))
        out.append((module, kind, tuple(i for i, _ in ordered), tuple(r for _, r in ordered)))
    return out


def _unit(model: nn.Module, deps: list, width: int) -> int:
    """Channels a group is pruned by: the same position in each of ``unit`` equal blocks.

    A grouped conv (not depthwise) of ``g`` groups needs every one of its groups to lose the
    same positions (``g`` divides the unit); a layer that reads or writes only some blocks
    of the group (a split, a concat) needs each block to lose the same number of channels,
    or the cost would depend on which channels go. ``width`` means the group cannot shrink.
    """
    unit = 1
    for module, _kind, _idxs, _roots in deps:
        m = model.get_submodule(module)
        if isinstance(m, nn.Conv2d) and m.groups > 1 and not _depthwise(m):
            unit = math.lcm(unit, m.groups)
    counts = np.zeros((len(deps), width), dtype=np.int64)
    for row, (_m, _k, _i, roots) in enumerate(deps):
        np.add.at(counts[row], np.asarray(roots, dtype=np.int64) % width, 1)
    for u in range(unit, width + 1):
        if width % u == 0 and u % unit == 0:
            blocks = counts.reshape(len(counts), u, width // u)
            if np.all(blocks == blocks[:, :, :1]):
                return u
    return width


def _fits(m: nn.Module, kind: str, idxs: tuple[int, ...]) -> bool:
    """Whether a coupled layer has the channels Torch-Pruning says it does."""
    if isinstance(m, nn.Conv2d):
        size = m.out_channels if kind == "out" else m.in_channels
    elif isinstance(m, nn.Linear):
        size = m.out_features if kind == "out" else m.in_features
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        size = m.num_features
    else:
        return True
    return len(set(idxs)) <= size and max(idxs, default=0) < size


def _depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


@lru_cache(maxsize=16)
def _structure(key: str) -> Structure:
    spec = GraphSpec.model_validate_json(key)
    model = fresh_model(spec).eval()
    check_ignore([n for n, _ in model.named_modules() if n], spec.arch, spec.ignore)
    x = example_input(spec)
    outputs, positions = _trace(model, spec, x)
    try:
        groups = _traced_groups(model, spec, x, outputs)
    except Exception as err:  # noqa: BLE001 - tracing failures come in many types
        raise SourceError(
            f"model.arch: Torch-Pruning cannot trace {spec.arch} ({type(err).__name__}: {err})"
        ) from None
    modules = [n for n, m in model.named_modules() if any(True for _ in m.parameters(False))]
    modules += [n for n in positions if n not in modules]
    row = {n: i for i, n in enumerate(modules)}
    full = np.array(
        [len(next(d for d in deps if d[0] == n and d[1] == "out")[2]) for n, deps in groups],
        dtype=np.float64,
    )
    out_share = np.zeros((len(modules), len(groups)))
    in_share = np.zeros((len(modules), len(groups)))
    for g, (_, deps) in enumerate(groups):
        for module, kind, idxs, _roots in deps:
            if module in row:
                share = out_share if kind == "out" else in_share
                share[row[module], g] = len(idxs) / full[g]
    out_full, in_full, coef, dw, ipg, terms = [], [], [], [], [], []
    for i, n in enumerate(modules):
        m = model.get_submodule(n)
        if isinstance(m, nn.Conv2d):
            o, c, groups_ = m.out_channels, m.in_channels, m.groups
            area = int(np.prod(m.kernel_size))
        elif isinstance(m, nn.Linear):
            o, c, groups_, area = m.out_features, m.in_features, 1, 1
        else:
            first = next(m.parameters(False))
            o, c, groups_, area = first.shape[0] if first.dim() else 1, 0, 1, 1
        depthwise = _depthwise(m)
        out_full.append(o)
        in_full.append(c)
        coef.append(2 * positions.get(n, 0) * area)
        dw.append(depthwise)
        ipg.append(groups_)
        for pname, p in m.named_parameters(recurse=False):
            if isinstance(m, PRUNABLE) and pname == "weight":
                terms.append((i, "weight", area))
            elif p.dim() and p.shape[0] == o:
                terms.append((i, "out", p.numel() // o))
            else:
                terms.append((i, "fixed", p.numel()))
    return Structure(
        names=tuple(n for n, _ in groups),
        modules=tuple(modules),
        deps=tuple(tuple(deps) for _, deps in groups),
        full=full,
        units=np.array(
            [_unit(model, deps, int(w)) for (_, deps), w in zip(groups, full, strict=True)]
        ),
        out_full=np.array(out_full, dtype=np.float64),
        in_full=np.array(in_full, dtype=np.float64),
        out_share=out_share,
        in_share=in_share,
        flop_coef=np.array(coef, dtype=np.float64),
        depthwise=np.array(dw),
        conv_groups=np.array(ipg, dtype=np.float64),
        param_terms=tuple(terms),
    )


def structure(spec: GraphSpec) -> Structure:
    """The cached groups and cost model of ``spec``'s architecture."""
    return _structure(spec.source_key())


def full_spec(spec: GraphSpec) -> GraphSpec:
    """``spec`` with every group at its full width (the teacher)."""
    s = structure(spec)
    return spec.model_copy(
        update={"widths": dict(zip(s.names, s.full.astype(int).tolist(), strict=True))}
    )


def width_vector(spec: GraphSpec) -> np.ndarray:
    s = structure(spec)
    return np.array(
        [spec.widths.get(n, int(f)) for n, f in zip(s.names, s.full, strict=True)], dtype=float
    )


# --------------------------------------------------------------------------- cost


def _counts(s: Structure, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    removed = s.full - widths
    out = s.out_full - s.out_share @ removed
    inp = s.in_full - s.in_share @ removed
    per_group = np.where(s.depthwise, 1.0, inp / s.conv_groups)
    return out, inp, per_group


def flops_of(s: Structure, widths: np.ndarray) -> int:
    """FLOPs in FlopCounterMode's convention (2 per multiply-add; conv and linear layers)."""
    out, _, per_group = _counts(s, widths)
    return int(round(float(np.sum(s.flop_coef * out * per_group))))


def params_of(s: Structure, widths: np.ndarray) -> int:
    out, _, per_group = _counts(s, widths)
    total = 0.0
    for row, kind, unit in s.param_terms:
        if kind == "weight":
            total += out[row] * per_group[row] * unit
        elif kind == "out":
            total += out[row] * unit
        else:
            total += unit
    return int(round(total))


def layer_channels(spec: GraphSpec) -> dict[str, tuple[int, int]]:
    """Conv/linear layer -> (output, input) channels the cost model counts for ``spec``."""
    s = structure(spec)
    out, inp, _ = _counts(s, width_vector(spec))
    inp = np.where(s.depthwise, out, inp)  # a depthwise conv's input follows its output
    return {n: (int(round(o)), int(round(i))) for n, o, i in zip(s.modules, out, inp, strict=True)}


def flops(spec: GraphSpec) -> int:
    return flops_of(structure(spec), width_vector(spec))


def params(spec: GraphSpec) -> int:
    return params_of(structure(spec), width_vector(spec))
