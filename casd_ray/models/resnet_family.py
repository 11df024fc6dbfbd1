"""The built-in pre-activation ResNets as a model family: channel groups, genes and slicing.

Weight inheritance is explicit slicing: every tensor that writes or reads a channel group —
conv filters and input channels, BN affine and running statistics, projection shortcuts, the
classifier — is cut with the group's kept indices, one rule per tensor, with a shape assert
against the freshly built student, so a wiring mistake fails loudly instead of training a
silently scrambled network. Keep-ratio 1.0 everywhere reproduces the teacher.

Importance criteria: ``l1`` sums the L1 norms of the filters that write a group (a residual
stream is written by the stem or projection and by every block's last conv); ``bn_gamma``
sums |γ| of the BNs that read it (Network Slimming).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from casd_ray.models import resnet
from casd_ray.models.base import GRANULARITIES, ModelFamily, check_criterion
from casd_ray.models.resnet import PreActResNet, WidthSpec, channel_groups, has_projection

# The bottleneck stem is no channel group: it stays full. It gets a pseudo-group name so the
# slicing rules treat it like any other set of (always fully kept) channels.
STEM = "stem"
FULL = None  # in-channels of the stem (image channels) and the fc bias are never sliced


@dataclass
class Wiring:
    """Which group every module writes (out) and reads (in), derived from the spec alone."""

    convs: dict[str, tuple[str | None, str | None]] = field(default_factory=dict)  # (out, in)
    bns: dict[str, str] = field(default_factory=dict)  # module -> group it normalises
    fc_in: str = ""
    writers: dict[str, list[str]] = field(default_factory=dict)  # group -> producing convs
    readers: dict[str, list[str]] = field(default_factory=dict)  # group -> reading BNs


def wiring(spec: WidthSpec) -> Wiring:
    """Module names in ``PreActResNet`` mapped to the channel groups they touch."""
    wire = Wiring()
    stem_out = "stage0" if spec.block == "basic" else STEM
    wire.convs["stem"] = (stem_out, FULL)
    current = stem_out  # the group flowing between blocks
    for s, blocks in enumerate(spec.blocks):
        stream = f"stage{s}"
        for b, inner in enumerate(blocks):
            prefix = f"stages.{s}.{b}"
            chain = [
                current,
                *(f"stage{s}.block{b}.conv{c + 1}" for c in range(len(inner))),
                stream,
            ]
            for i in range(1, len(chain)):
                wire.bns[f"{prefix}.bn{i}"] = chain[i - 1]
                wire.convs[f"{prefix}.conv{i}"] = (chain[i], chain[i - 1])
            if has_projection(spec.block, s, b):
                wire.convs[f"{prefix}.shortcut"] = (stream, current)
            current = stream
    wire.bns["bn"] = current
    wire.fc_in = current
    for name, (out, _) in wire.convs.items():
        wire.writers.setdefault(out, []).append(name)
    for name, group in wire.bns.items():
        wire.readers.setdefault(group, []).append(name)
    return wire


def _l1(modules: dict[str, nn.Module], wire: Wiring, group: str) -> Tensor:
    return sum(modules[m].weight.detach().abs().sum(dim=(1, 2, 3)) for m in wire.writers[group])


def _bn_gamma(modules: dict[str, nn.Module], wire: Wiring, group: str) -> Tensor:
    return sum(modules[m].weight.detach().abs() for m in wire.readers[group])


IMPORTANCE: dict[str, Callable[[dict[str, nn.Module], Wiring, str], Tensor]] = {
    "l1": _l1,
    "bn_gamma": _bn_gamma,
}


def _slice(t: Tensor, dim: int, idx: Tensor | None) -> Tensor:
    return t if idx is None else t.index_select(dim, idx.to(t.device))


def sliced_state(teacher: nn.Module, wire: Wiring, keep: dict[str, Tensor]) -> dict[str, Tensor]:
    """The teacher's state dict with every tensor cut to the kept channels."""

    def idx(group: str | None) -> Tensor | None:
        return None if group is None else keep[group]

    out = {}
    for key, t in teacher.state_dict().items():
        module, _, leaf = key.rpartition(".")
        if module in wire.convs:
            group_out, group_in = wire.convs[module]
            out[key] = _slice(_slice(t, 0, idx(group_out)), 1, idx(group_in))
        elif module in wire.bns:
            # weight, bias, running_mean, running_var are per channel; the counter is scalar
            out[key] = t if leaf == "num_batches_tracked" else _slice(t, 0, idx(wire.bns[module]))
        elif module == "fc":
            out[key] = _slice(t, 1, idx(wire.fc_in)) if leaf == "weight" else t
        else:
            raise KeyError(f"no slicing rule for teacher tensor {key!r}")
    return out


@lru_cache(maxsize=64)
def _layout(spec: WidthSpec) -> tuple[tuple[str, ...], np.ndarray]:
    """Group names in ``channel_groups`` order and the widths as floats (cached: budget
    repair rebuilds specs many times)."""
    groups = channel_groups(spec)
    widths = [
        spec.stages[g.stage] if g.kind == "stream" else spec.blocks[g.stage][g.block][g.conv]
        for g in groups
    ]
    w = np.array(widths, dtype=np.float64)
    w.setflags(write=False)
    return tuple(g.name for g in groups), w


class ResNetFamily(ModelFamily):
    """Pre-activation ResNets built from a :class:`WidthSpec`."""

    traced = False  # hand-written slicing and cost, checked exact by the tests

    def build(self, spec: WidthSpec) -> nn.Module:
        return PreActResNet(spec)

    def group_names(self, spec: WidthSpec) -> tuple[str, ...]:
        return _layout(spec)[0]

    def width_vector(self, spec: WidthSpec) -> np.ndarray:
        return _layout(spec)[1]

    def with_widths(self, spec: WidthSpec, widths: np.ndarray) -> WidthSpec:
        # position arithmetic rather than dict lookups: this is the hot path of repair
        flat = np.asarray(widths).tolist()
        n_streams = len(spec.stages)
        stages = tuple(int(v) for v in flat[:n_streams])
        it = iter(flat[n_streams:])
        blocks = tuple(
            tuple(tuple(int(next(it)) for _ in inner) for inner in stage) for stage in spec.blocks
        )
        stem = stages[0] if spec.block == "basic" else spec.stem
        return spec.model_copy(update={"stages": stages, "blocks": blocks, "stem": stem})

    def flops(self, spec: WidthSpec) -> int:
        return resnet.flops(spec)

    def params(self, spec: WidthSpec) -> int:
        return resnet.params(spec)

    def summary(self, spec: WidthSpec) -> dict:
        return resnet.spec_summary(spec)

    def genes(self, spec: WidthSpec, granularity: str) -> dict[str, list[str]]:
        """``stage``: each stage's stream and every inner conv of that stage share a gene;
        ``block``: one gene per stream plus one per block; ``layer``: one per group."""
        if granularity not in GRANULARITIES:
            raise ValueError(f"space.granularity: {granularity!r} is not one of {GRANULARITIES}")
        genes: dict[str, list[str]] = {}
        groups = channel_groups(spec)
        for g in groups:
            if g.kind == "stream":
                genes[g.name] = [g.name]
        for g in groups:
            if g.kind == "stream":
                continue
            if granularity == "stage":
                genes[f"stage{g.stage}"].append(g.name)
            elif granularity == "block":
                genes.setdefault(f"stage{g.stage}_block{g.block}", []).append(g.name)
            else:
                genes[g.name.replace(".", "_")] = [g.name]
        return genes

    def importance(self, model: nn.Module, spec: WidthSpec, criterion: str) -> dict[str, Tensor]:
        check_criterion(criterion)
        wire = wiring(spec)
        modules = dict(model.named_modules())
        score = IMPORTANCE[criterion]
        return {g.name: score(modules, wire, g.name).float().cpu() for g in channel_groups(spec)}

    def read_widths(self, model: nn.Module, spec: WidthSpec) -> WidthSpec:
        modules = dict(model.named_modules())
        wire = wiring(spec)
        widths = [modules[wire.writers[name][0]].out_channels for name in self.group_names(spec)]
        return self.with_widths(spec, np.array(widths, dtype=float))

    def check_student(self, teacher_spec: WidthSpec, student_spec: WidthSpec) -> None:
        for key in ("block", "in_channels", "num_classes"):
            if getattr(teacher_spec, key) != getattr(student_spec, key):
                raise ValueError(f"student {key} {getattr(student_spec, key)} != teacher's")
        if [len(b) for b in teacher_spec.blocks] != [len(b) for b in student_spec.blocks]:
            raise ValueError("student depth differs from the teacher's")
        if teacher_spec.block == "bottleneck" and teacher_spec.stem != student_spec.stem:
            raise ValueError(
                "bottleneck stem is not prunable: student stem must equal the teacher's"
            )
        super().check_student(teacher_spec, student_spec)

    def prune(
        self,
        teacher: nn.Module,
        teacher_spec: WidthSpec,
        student_spec: WidthSpec,
        keep: dict[str, Tensor],
    ) -> nn.Module:
        keep = {**keep, STEM: torch.arange(student_spec.stem)}
        state = sliced_state(teacher, wiring(teacher_spec), keep)
        student = PreActResNet(student_spec)
        target = student.state_dict()
        assert set(state) == set(target), (
            f"state keys differ: {sorted(set(state) ^ set(target))[:3]}"
        )
        for key, t in state.items():
            assert t.shape == target[key].shape, (
                f"{key}: sliced {tuple(t.shape)} != student {tuple(target[key].shape)}"
            )
        student.load_state_dict(state, strict=True)
        param = next(teacher.parameters())
        return student.to(device=param.device, dtype=param.dtype).train(teacher.training)


RESNET = ResNetFamily()
