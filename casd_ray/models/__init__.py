"""Model families: a registry of named architectures, each rebuilt from a width spec."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from casd_ray.models.resnet import (
    ChannelGroup,
    PreActResNet,
    WidthSpec,
    channel_groups,
    flops,
    group_widths,
    params,
    spec_summary,
    standard_spec,
    with_group_widths,
)

__all__ = [
    "ARCHS",
    "ChannelGroup",
    "PreActResNet",
    "WidthSpec",
    "build_model",
    "channel_groups",
    "flops",
    "group_widths",
    "params",
    "register_arch",
    "spec_for",
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


def spec_for(
    arch: str,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: tuple[int, int] = (32, 32),
    width: int = 16,
) -> WidthSpec:
    """The standard width spec of a registered architecture for the given data shape."""
    if arch not in ARCHS:
        raise ValueError(f"model.arch: unknown architecture {arch!r}; known: {sorted(ARCHS)}")
    return ARCHS[arch](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width
    )


def build_model(spec: WidthSpec) -> nn.Module:
    """Build the network described by ``spec`` (freshly initialised)."""
    return PreActResNet(spec)
