"""Pre-activation ResNets for small images, built from an explicit width spec.

Every conv's output width comes from a :class:`WidthSpec`, so any candidate of the search
(and any pruned student) is an ordinary network that can be rebuilt from its JSON spec
alone. The spec *is* the search result (AutoDL/TAS, timm's ``_pruned`` widths).

Architecture (He et al., "Identity Mappings in Deep Residual Networks"):
stem conv3x3 -> 3 stages of blocks (strides 1, 2, 2) -> BN-ReLU -> global avg pool -> fc.
A block pre-activates its input (BN-ReLU); the first block of a stage carries a 1x1
projection shortcut on that pre-activated input whenever the stride or width changes
(every stage but the first of a basic-block net). The projection is structural: it stays
even if pruning happens to make input and output widths equal, so weights always line up.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import nn

BlockType = Literal["basic", "bottleneck"]
STAGE_STRIDES = (1, 2, 2)
CONVS_PER_BLOCK = {"basic": 2, "bottleneck": 3}


class WidthSpec(BaseModel):
    """Widths of every conv of a pre-activation ResNet: JSON-serialisable, enough to rebuild.

    ``stages[s]`` is the residual-stream width of stage ``s`` (projection output and every
    block output of the stage). ``blocks[s][b]`` lists the widths of the convs inside block
    ``b`` that do not write the stream: ``[conv1]`` for basic, ``[conv1, conv2]`` for bottleneck.
    For basic-block nets the stem writes stage 0's stream, so ``stem == stages[0]``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    block: BlockType
    in_channels: int = 3
    num_classes: int = 10
    image_size: tuple[int, int] = (32, 32)
    stem: int
    stages: tuple[int, ...]
    blocks: tuple[tuple[tuple[int, ...], ...], ...]

    @model_validator(mode="after")
    def _check(self) -> WidthSpec:
        inner = CONVS_PER_BLOCK[self.block] - 1
        if len(self.stages) != len(STAGE_STRIDES) or len(self.blocks) != len(STAGE_STRIDES):
            raise ValueError(f"stages/blocks: expected {len(STAGE_STRIDES)} stages")
        for s, stage in enumerate(self.blocks):
            if not stage:
                raise ValueError(f"blocks[{s}]: a stage needs at least one block")
            for b, widths in enumerate(stage):
                if len(widths) != inner:
                    raise ValueError(f"blocks[{s}][{b}]: expected {inner} widths for {self.block}")
        every = [self.stem, *self.stages, *(w for st in self.blocks for blk in st for w in blk)]
        if min(every) < 1 or self.in_channels < 1 or self.num_classes < 1:
            raise ValueError("widths: every width must be >= 1")
        if self.block == "basic" and self.stem != self.stages[0]:
            raise ValueError("stem: must equal stages[0] for basic blocks (identity shortcut)")
        return self

    @property
    def depth(self) -> int:
        """Conv + fc layers on the longest path: 6n+2 (basic) or 9n+2 (bottleneck)."""
        return 2 + CONVS_PER_BLOCK[self.block] * sum(len(st) for st in self.blocks)

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)

    @classmethod
    def from_json(cls, text: str) -> WidthSpec:
        return cls.model_validate_json(text)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> WidthSpec:
        return cls.from_json(Path(path).read_text())


def has_projection(block: BlockType, stage: int, index: int) -> bool:
    """Whether block ``index`` of ``stage`` has a 1x1 projection shortcut (structural rule)."""
    return index == 0 and (stage > 0 or block == "bottleneck")


def standard_spec(
    depth: int,
    block: BlockType = "basic",
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: tuple[int, int] = (32, 32),
    width: int = 16,
) -> WidthSpec:
    """The standard CIFAR widths: stages width*(1, 2, 4), times 4 on the stream for bottleneck."""
    per = 6 if block == "basic" else 9
    if depth < per + 2 or (depth - 2) % per:
        raise ValueError(f"depth: {depth} is not {per}n+2 for {block} blocks")
    n = (depth - 2) // per
    planes = [width, 2 * width, 4 * width]
    if block == "basic":
        stages = tuple(planes)
        blocks = tuple(tuple((p,) for _ in range(n)) for p in planes)
        stem = planes[0]
    else:
        stages = tuple(4 * p for p in planes)
        blocks = tuple(tuple((p, p) for _ in range(n)) for p in planes)
        stem = width
    return WidthSpec(
        block=block,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=tuple(image_size),
        stem=stem,
        stages=stages,
        blocks=blocks,
    )


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c)


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class PreActBlock(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1-3x3-1x1) pre-activation block."""

    def __init__(
        self, cin: int, inner: tuple[int, ...], cout: int, stride: int, projection: bool
    ) -> None:
        super().__init__()
        widths = [cin, *inner, cout]
        kernels = [3, 3] if len(inner) == 1 else [1, 3, 1]
        strides = [stride, 1] if len(inner) == 1 else [1, stride, 1]
        for i, (k, st) in enumerate(zip(kernels, strides, strict=True), start=1):
            self.add_module(f"bn{i}", _bn(widths[i - 1]))
            self.add_module(f"conv{i}", _conv(widths[i - 1], widths[i], k, st))
        self.n_convs = len(kernels)
        self.shortcut = _conv(cin, cout, 1, stride) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        for i in range(2, self.n_convs + 1):
            out = getattr(self, f"conv{i}")(torch.relu(getattr(self, f"bn{i}")(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """A pre-activation ResNet whose every width comes from ``spec``."""

    def __init__(self, spec: WidthSpec) -> None:
        super().__init__()
        self.spec = spec
        self.stem = _conv(spec.in_channels, spec.stem, 3)
        cin = spec.stem
        stages = []
        for s, (cout, blocks) in enumerate(zip(spec.stages, spec.blocks, strict=True)):
            stage = []
            for b, inner in enumerate(blocks):
                stride = STAGE_STRIDES[s] if b == 0 else 1
                proj = has_projection(spec.block, s, b)
                stage.append(PreActBlock(cin, inner, cout, stride, proj))
                cin = cout
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.bn = _bn(cin)
        self.fc = nn.Linear(cin, spec.num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem(x))
        out = torch.relu(self.bn(out))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


# --------------------------------------------------------------------------- channel groups


@dataclass(frozen=True)
class ChannelGroup:
    """Channels that must be kept or removed together.

    ``kind == "stream"``: the residual stream of ``stage`` (tied by identity shortcuts).
    ``kind == "conv"``: output of conv ``conv`` (0-based inner index) of ``block`` in ``stage``.
    """

    name: str
    kind: Literal["stream", "conv"]
    stage: int
    block: int | None = None
    conv: int | None = None


def channel_groups(spec: WidthSpec) -> list[ChannelGroup]:
    """All prunable groups: one stream per stage, then every inner conv in order.

    The bottleneck stem (16 channels feeding a projection) is not a group; it stays as built.
    ResNet-164 has 3 + 54*2 = 111 groups; ResNet-20 has 3 + 9 = 12.
    """
    groups = [ChannelGroup(f"stage{s}", "stream", s) for s in range(len(spec.stages))]
    for s, blocks in enumerate(spec.blocks):
        for b, inner in enumerate(blocks):
            for c in range(len(inner)):
                name = f"stage{s}.block{b}.conv{c + 1}"
                groups.append(ChannelGroup(name, "conv", s, b, c))
    return groups


def group_widths(spec: WidthSpec) -> dict[str, int]:
    """Width of every channel group, keyed by group name."""
    out = {}
    for g in channel_groups(spec):
        out[g.name] = (
            spec.stages[g.stage] if g.kind == "stream" else spec.blocks[g.stage][g.block][g.conv]
        )
    return out


def with_group_widths(spec: WidthSpec, widths: dict[str, int]) -> WidthSpec:
    """A copy of ``spec`` with the named groups set to new widths (others unchanged)."""
    known = group_widths(spec)
    unknown = set(widths) - set(known)
    if unknown:
        raise KeyError(f"unknown channel groups: {sorted(unknown)[:3]}")
    merged = {**known, **widths}
    stages = tuple(merged[f"stage{s}"] for s in range(len(spec.stages)))
    blocks = tuple(
        tuple(
            tuple(merged[f"stage{s}.block{b}.conv{c + 1}"] for c in range(len(inner)))
            for b, inner in enumerate(blk)
        )
        for s, blk in enumerate(spec.blocks)
    )
    stem = stages[0] if spec.block == "basic" else spec.stem
    return spec.model_copy(update={"stages": stages, "blocks": blocks, "stem": stem})


# --------------------------------------------------------------------------- analytic cost


def _layers(spec: WidthSpec):
    """Yield (cin, cout, kernel, out_h, out_w) of every conv, in forward order."""
    h, w = spec.image_size
    yield spec.in_channels, spec.stem, 3, h, w
    cin = spec.stem
    for s, (cout, blocks) in enumerate(zip(spec.stages, spec.blocks, strict=True)):
        for b, inner in enumerate(blocks):
            stride = STAGE_STRIDES[s] if b == 0 else 1
            oh, ow = (h - 1) // stride + 1, (w - 1) // stride + 1
            widths = [cin, *inner, cout]
            kernels = [3, 3] if len(inner) == 1 else [1, 3, 1]
            strided = 0 if len(inner) == 1 else 1
            for i, k in enumerate(kernels):
                hh, ww = (oh, ow) if i >= strided else (h, w)
                yield widths[i], widths[i + 1], k, hh, ww
            if has_projection(spec.block, s, b):
                yield cin, cout, 1, oh, ow
            h, w, cin = oh, ow, cout


def flops(spec: WidthSpec) -> int:
    """FLOPs of one image, in FlopCounterMode's convention (2 per multiply-add; conv + fc only).

    Analytic so that budget repair can evaluate thousands of candidates; tests check it equals
    ``torch.utils.flop_counter.FlopCounterMode`` on real forwards.
    """
    total = sum(2 * ci * co * k * k * h * w for ci, co, k, h, w in _layers(spec))
    return total + 2 * spec.stages[-1] * spec.num_classes


def params(spec: WidthSpec) -> int:
    """Trainable parameters: conv weights, BN affine (2 per channel), fc weight and bias."""
    convs = sum(ci * co * k * k for ci, co, k, _, _ in _layers(spec))
    bns = 0
    cin = spec.stem
    for cout, blocks in zip(spec.stages, spec.blocks, strict=True):
        for inner in blocks:
            bns += 2 * (cin + sum(inner))
            cin = cout
    bns += 2 * cin
    return convs + bns + cin * spec.num_classes + spec.num_classes


def spec_summary(spec: WidthSpec) -> dict:
    """Compact description for tables: stream widths and per-stage mean inner width."""
    return {
        "depth": spec.depth,
        "stages": list(spec.stages),
        "inner_mean": [
            round(sum(sum(i) for i in blk) / sum(len(i) for i in blk), 2) for blk in spec.blocks
        ],
    }
