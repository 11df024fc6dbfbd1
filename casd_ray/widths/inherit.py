"""Weight inheritance: a student of any widths cut from the teacher, channel by channel.

Per channel group the student keeps the teacher's most important channels (kept indices in
their original order); the family of the spec (:mod:`casd_ray.models.base`) cuts every
tensor that writes or reads the group. Importance criteria are ``l1`` (L1 norm of the
filters that write a group) and ``bn_gamma`` (|γ| of the BNs that read it). Keep-ratio 1.0
everywhere reproduces the teacher's outputs exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from casd_ray.models.base import check_criterion
from casd_ray.models.family import Spec, family_of


def channel_importance(teacher: nn.Module, spec: Spec, criterion: str = "l1") -> dict[str, Tensor]:
    """Group name -> one score per teacher channel (higher = keep first)."""
    check_criterion(criterion)
    return family_of(spec).importance(teacher, spec, criterion)


def kept_indices(
    teacher: nn.Module, teacher_spec: Spec, student_spec: Spec, criterion: str = "l1"
) -> dict[str, Tensor]:
    """Group -> sorted teacher channel indices the student keeps (the ``width`` best).

    Ties break towards the lower index (stable sort), so equal scores give a deterministic,
    prefix-like choice.
    """
    fam = family_of(teacher_spec)
    fam.check_student(teacher_spec, student_spec)
    scores = channel_importance(teacher, teacher_spec, criterion)
    names = fam.group_names(student_spec)
    widths = dict(zip(names, fam.width_vector(student_spec).astype(int).tolist(), strict=True))
    keep = {}
    for group, score in scores.items():
        order = torch.argsort(score, descending=True, stable=True)
        keep[group] = torch.sort(order[: widths[group]]).values
    return keep


def inherit(
    teacher: nn.Module, teacher_spec: Spec, student_spec: Spec, criterion: str = "l1"
) -> nn.Module:
    """Build ``student_spec`` with weights cut from ``teacher`` (most important channels).

    The student lives on the teacher's device and copies its train/eval mode; the teacher is
    left untouched.
    """
    keep = kept_indices(teacher, teacher_spec, student_spec, criterion)
    return family_of(teacher_spec).prune(teacher, teacher_spec, student_spec, keep)
