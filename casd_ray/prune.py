"""Weight inheritance: a student of any widths sliced from the teacher, channel by channel.

Per channel group the student keeps the teacher's most important channels (kept indices in
their original order), and every tensor that writes or reads the group — conv filters and
input channels, BN affine and running statistics, projection shortcuts, the classifier — is
sliced with the same indices. The slicing is explicit, one rule per tensor, with a shape
assert against the freshly built student, so any wiring mistake fails loudly instead of
training a silently scrambled network. Keep-ratio 1.0 everywhere reproduces the teacher.

Importance criteria (a registry of plain functions, extendable):
- ``l1``: L1 norm of the producing filters. A residual stream is written by several convs
  (stem or projection, and every block's last conv), so their norms are summed.
- ``bn_gamma``: |gamma| of the BNs that read the group (network slimming), summed likewise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from casd_ray.models import (
    GraphSpec,
    Spec,
    WidthSpec,
    build_model,
    channel_groups,
    group_widths,
    surgery,
)
from casd_ray.models.resnet import has_projection

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


# --------------------------------------------------------------------------- importance


def _l1(modules: dict[str, nn.Module], wire: Wiring, group: str) -> Tensor:
    return sum(modules[m].weight.detach().abs().sum(dim=(1, 2, 3)) for m in wire.writers[group])


def _bn_gamma(modules: dict[str, nn.Module], wire: Wiring, group: str) -> Tensor:
    return sum(modules[m].weight.detach().abs() for m in wire.readers[group])


IMPORTANCE: dict[str, Callable[[dict[str, nn.Module], Wiring, str], Tensor]] = {
    "l1": _l1,
    "bn_gamma": _bn_gamma,
}


def channel_importance(teacher: nn.Module, spec: Spec, criterion: str = "l1") -> dict[str, Tensor]:
    """Group name -> one score per teacher channel (higher = keep first)."""
    if criterion not in IMPORTANCE:
        raise ValueError(f"space.importance: {criterion!r} is not one of {sorted(IMPORTANCE)}")
    if isinstance(spec, GraphSpec):
        return surgery.importance(teacher, spec, criterion)
    wire = wiring(spec)
    modules = dict(teacher.named_modules())
    score = IMPORTANCE[criterion]
    return {g.name: score(modules, wire, g.name).float().cpu() for g in channel_groups(spec)}


def kept_indices(
    teacher: nn.Module, teacher_spec: Spec, student_spec: Spec, criterion: str = "l1"
) -> dict[str, Tensor]:
    """Group -> sorted teacher channel indices the student keeps (the ``width`` best).

    Ties break towards the lower index (stable sort), so equal scores give a deterministic,
    prefix-like choice.
    """
    if isinstance(teacher_spec, GraphSpec):
        return surgery.kept_indices(teacher, teacher_spec, student_spec, criterion)
    _check_compatible(teacher_spec, student_spec)
    importance = channel_importance(teacher, teacher_spec, criterion)
    widths = group_widths(student_spec)
    keep = {}
    for group, score in importance.items():
        order = torch.argsort(score, descending=True, stable=True)
        keep[group] = torch.sort(order[: widths[group]]).values
    keep[STEM] = torch.arange(student_spec.stem)
    return keep


def _check_compatible(teacher: WidthSpec, student: WidthSpec) -> None:
    same = ("block", "in_channels", "num_classes")
    for key in same:
        if getattr(teacher, key) != getattr(student, key):
            raise ValueError(f"student {key} {getattr(student, key)} != teacher's")
    if [len(b) for b in teacher.blocks] != [len(b) for b in student.blocks]:
        raise ValueError("student depth differs from the teacher's")
    if teacher.block == "bottleneck" and teacher.stem != student.stem:
        raise ValueError("bottleneck stem is not prunable: student stem must equal the teacher's")
    tw, sw = group_widths(teacher), group_widths(student)
    wider = [g for g in tw if sw[g] > tw[g]]
    if wider:
        raise ValueError(f"student wider than teacher in groups {wider[:3]}")


# --------------------------------------------------------------------------- inheritance


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


def inherit(
    teacher: nn.Module, teacher_spec: Spec, student_spec: Spec, criterion: str = "l1"
) -> nn.Module:
    """Build ``student_spec`` with weights sliced from ``teacher`` (most important channels).

    The student lives on the teacher's device and copies its train/eval mode. A source model
    is pruned by Torch-Pruning (:mod:`casd_ray.models.graph`); the built-in ResNets keep the
    explicit slicing below (same kept indices and outputs, measured faster: see README).
    """
    if isinstance(teacher_spec, GraphSpec):
        if criterion not in IMPORTANCE:
            raise ValueError(f"space.importance: {criterion!r} is not one of {sorted(IMPORTANCE)}")
        return surgery.inherit(teacher, teacher_spec, student_spec, criterion)
    keep = kept_indices(teacher, teacher_spec, student_spec, criterion)
    state = sliced_state(teacher, wiring(teacher_spec), keep)
    student = build_model(student_spec)
    target = student.state_dict()
    assert set(state) == set(target), f"state keys differ: {sorted(set(state) ^ set(target))[:3]}"
    for key, t in state.items():
        assert t.shape == target[key].shape, (
            f"{key}: sliced {tuple(t.shape)} != student {tuple(target[key].shape)}"
        )
    student.load_state_dict(state, strict=True)
    param = next(teacher.parameters())
    return student.to(device=param.device, dtype=param.dtype).train(teacher.training)


# --------------------------------------------------------------------------- adaptive BN


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, num_batches: int) -> None:
    """Re-estimate BN running statistics on a few batches (EagleEye's adaptive BN; also
    Precise BN before each search validation, ``search.precise_bn_batches``).

    Pruning changes the statistics every BN sees, so inherited running stats are stale and
    early accuracy says little about a candidate. Stats are reset and replaced by the exact
    average over ``num_batches`` train-mode forwards (momentum None = cumulative average).
    ``batches`` yields image tensors or ``(images, labels)`` pairs. Parameters, momenta and
    the train/eval mode of every module are restored afterwards.
    """
    if num_batches <= 0:
        return
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    seen = 0
    try:
        for batch in batches:
            if seen >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if seen == 0:  # reset only once a batch exists, never leave empty stats
                for m in bns:
                    m.reset_running_stats()
                    m.momentum = None
                model.train()
            model(x.to(device))
            seen += 1
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
