"""Model families: the built-in pre-activation ResNets and any user model, as width specs.

A *spec* is everything needed to rebuild a network: a :class:`WidthSpec` for the built-in
ResNets (hand-written channel groups, analytic cost) or a :class:`GraphSpec` for
``torchvision:``, ``timm:`` and ``python:`` models (groups from Torch-Pruning's
DependencyGraph, cost from one traced forward). The functions here take either, so the
search, pruning, fine-tune and export never ask which kind they hold.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from casd_ray.models import graph, resnet, surgery
from casd_ray.models.graph import GraphSpec
from casd_ray.models.resnet import ChannelGroup, PreActResNet, WidthSpec, standard_spec
from casd_ray.models.source import SourceError, absolute_source, check_arch, is_external

Spec = WidthSpec | GraphSpec

__all__ = [
    "ARCHS",
    "ChannelGroup",
    "GraphSpec",
    "PreActResNet",
    "SourceError",
    "Spec",
    "WidthSpec",
    "build_model",
    "channel_groups",
    "check_arch_name",
    "flops",
    "group_widths",
    "params",
    "register_arch",
    "spec_for",
    "spec_from_json",
    "spec_summary",
    "standard_spec",
    "with_group_widths",
]

ARCHS: dict[str, Callable[..., WidthSpec]] = {}


def register_arch(name: str, depth: int, block: str) -> None:
    """Register a standard-width pre-activation ResNet under ``name``."""
    ARCHS[name] = lambda **kw: standard_spec(depth, block, **kw)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_arch(f"resnet{_depth}", _depth, "basic")
for _depth in (164, 1001):
    register_arch(f"resnet{_depth}", _depth, "bottleneck")


def check_arch_name(arch: str) -> None:
    """Refuse an unknown built-in name or a malformed source (raises ValueError)."""
    if ":" in arch:
        check_arch(arch)
    elif arch not in ARCHS:
        raise ValueError(
            f"unknown architecture; known: {', '.join(sorted(ARCHS))}, "
            "or torchvision:<name>, timm:<name>, python:<module or file.py>:<callable>"
        )


def spec_for(
    arch: str,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: tuple[int, int] = (32, 32),
    width: int = 16,
    kwargs: dict[str, Any] | None = None,
    ignore: Sequence[str] = (),
) -> Spec:
    """The full-width spec of an architecture for the given data shape.

    A source model is built once here: a factory that fails, or a model whose output does
    not have ``num_classes`` columns, is refused now with one line naming the config key.
    """
    if is_external(arch):
        spec = GraphSpec(
            arch=absolute_source(arch),
            kwargs=dict(kwargs or {}),
            in_channels=in_channels,
            num_classes=num_classes,
            image_size=tuple(image_size),
            ignore=tuple(ignore),
        )
        return graph.full_spec(spec)
    if arch not in ARCHS:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    return ARCHS[arch](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width
    )


def spec_from_json(text: str | dict) -> Spec:
    """A spec from ``widths.json`` text (or its parsed dict): a source model names ``arch``."""
    raw = json.loads(text) if isinstance(text, str) else text
    if isinstance(raw, dict) and "arch" in raw:
        return GraphSpec.model_validate(raw)
    return WidthSpec.model_validate(raw)


def build_model(spec: Spec) -> nn.Module:
    """Build the network described by ``spec`` (freshly initialised)."""
    return surgery.build(spec) if isinstance(spec, GraphSpec) else PreActResNet(spec)


def channel_groups(spec: WidthSpec) -> list[ChannelGroup]:
    """A built-in ResNet's channel groups (a source model's: ``graph.structure(spec).names``)."""
    return resnet.channel_groups(spec)


def group_widths(spec: Spec) -> dict[str, int]:
    """Width of every channel group, keyed by group name."""
    if isinstance(spec, GraphSpec):
        names = graph.structure(spec).names
        return dict(zip(names, graph.width_vector(spec).astype(int).tolist(), strict=True))
    return resnet.group_widths(spec)


def with_group_widths(spec: Spec, widths: dict[str, int]) -> Spec:
    """A copy of ``spec`` with the named groups set to new widths (others unchanged)."""
    if isinstance(spec, GraphSpec):
        known = group_widths(spec)
        unknown = set(widths) - set(known)
        if unknown:
            raise KeyError(f"unknown channel groups: {sorted(unknown)[:3]}")
        merged = {k: int(v) for k, v in {**known, **widths}.items()}
        return spec.model_copy(update={"widths": merged})
    return resnet.with_group_widths(spec, widths)


def flops(spec: Spec) -> int:
    """FLOPs of one image (FlopCounterMode's convention: 2 per multiply-add, conv + linear)."""
    return graph.flops(spec) if isinstance(spec, GraphSpec) else resnet.flops(spec)


def params(spec: Spec) -> int:
    """Trainable parameters."""
    return graph.params(spec) if isinstance(spec, GraphSpec) else resnet.params(spec)


def spec_summary(spec: Spec) -> dict:
    """Compact description for tables."""
    if isinstance(spec, GraphSpec):
        s = graph.structure(spec)
        kept = graph.width_vector(spec)
        return {
            "arch": spec.arch,
            "groups": len(s.names),
            "kept_channels": round(float(kept.sum() / max(s.full.sum(), 1)), 4),
        }
    return resnet.spec_summary(spec)


def with_ignore(spec: Spec, ignore: Sequence[str]) -> Spec:
    """The full-width ``spec`` whose groups leave ``space.ignore``'s modules full.

    ``ignore`` belongs to the search, not to the teacher's files: the same teacher serves
    searches with different ``space.ignore``.
    """
    if isinstance(spec, GraphSpec):
        if tuple(ignore) == spec.ignore:
            return spec
        return graph.full_spec(spec.model_copy(update={"ignore": tuple(ignore), "widths": {}}))
    if ignore:
        raise SourceError("space.ignore: only for source models (torchvision:, timm:, python:)")
    return spec
