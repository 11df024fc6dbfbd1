"""Specs of any model family, and the functions the rest of casd-ray calls on them.

A *spec* is everything needed to rebuild a network: a :class:`WidthSpec` for the built-in
ResNets or a :class:`GraphSpec` for ``torchvision:``, ``timm:`` and ``python:`` models. Each
kind has one :class:`~casd_ray.models.base.ModelFamily`; :func:`family_of` is the only place
that looks at a spec's type, so search, pruning, fine-tune and export never ask.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from torch import nn

from casd_ray.models import graph
from casd_ray.models.base import ModelFamily
from casd_ray.models.graph import GraphSpec
from casd_ray.models.graph_family import GRAPH
from casd_ray.models.names import BUILTIN, absolute_source, is_external
from casd_ray.models.resnet import WidthSpec, standard_spec
from casd_ray.models.resnet_family import RESNET

Spec = WidthSpec | GraphSpec
FAMILIES: dict[type, ModelFamily] = {WidthSpec: RESNET, GraphSpec: GRAPH}


def family_of(spec: Spec) -> ModelFamily:
    """The family that knows ``spec``'s groups, cost and pruning."""
    try:
        return FAMILIES[type(spec)]
    except KeyError:
        raise TypeError(f"not a width spec: {type(spec).__name__}") from None


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
    if arch not in BUILTIN:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; known: {sorted(BUILTIN)}")
    depth, block = BUILTIN[arch]
    return standard_spec(
        depth,
        block,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        width=width,
    )


def spec_from_json(text: str | dict) -> Spec:
    """A spec from ``widths.json`` text (or its parsed dict): a source model names ``arch``."""
    raw = json.loads(text) if isinstance(text, str) else text
    if isinstance(raw, dict) and "arch" in raw:
        return GraphSpec.model_validate(raw)
    return WidthSpec.model_validate(raw)


def build_model(spec: Spec) -> nn.Module:
    """Build the network described by ``spec`` (freshly initialised)."""
    return family_of(spec).build(spec)


def group_widths(spec: Spec) -> dict[str, int]:
    """Width of every channel group, keyed by group name."""
    fam = family_of(spec)
    return dict(
        zip(fam.group_names(spec), fam.width_vector(spec).astype(int).tolist(), strict=True)
    )


def with_group_widths(spec: Spec, widths: dict[str, int]) -> Spec:
    """A copy of ``spec`` with the named groups set to new widths (others unchanged)."""
    fam = family_of(spec)
    names = fam.group_names(spec)
    unknown = set(widths) - set(names)
    if unknown:
        raise KeyError(f"unknown channel groups: {sorted(unknown)[:3]}")
    current = fam.width_vector(spec)
    vec = np.array([widths.get(n, w) for n, w in zip(names, current, strict=True)], dtype=float)
    return fam.with_widths(spec, vec)


def flops(spec: Spec) -> int:
    """FLOPs of one image (FlopCounterMode's convention: 2 per multiply-add, conv + linear)."""
    return family_of(spec).flops(spec)


def params(spec: Spec) -> int:
    """Trainable parameters."""
    return family_of(spec).params(spec)


def spec_summary(spec: Spec) -> dict:
    """Compact description for tables."""
    return family_of(spec).summary(spec)


def with_ignore(spec: Spec, ignore: Sequence[str]) -> Spec:
    """The full-width ``spec`` whose groups leave ``space.ignore``'s modules full."""
    return family_of(spec).with_ignore(spec, ignore)
