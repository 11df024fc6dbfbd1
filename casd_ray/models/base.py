"""The model-family interface: what the search, pruning, cost model and export need of a model.

Two families implement it: the built-in pre-activation ResNets
(:mod:`casd_ray.models.resnet_family`: hand-written channel groups, analytic cost, explicit
weight slicing) and any other CNN (:mod:`casd_ray.models.graph_family`: groups from
Torch-Pruning's DependencyGraph, a traced cost model, pruning by Torch-Pruning). Everything
outside ``models/`` reaches a spec's family through :func:`casd_ray.models.family.family_of`
and never asks which kind of spec it holds.

A *spec* is a frozen pydantic model that rebuilds a network of given widths; its channel
groups have names and a fixed order, and widths travel as vectors in that order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel
from torch import Tensor, nn

from casd_ray.errors import SourceError

CRITERIA = ("l1", "bn_gamma")  # channel-importance criteria every family implements
GRANULARITIES = ("stage", "block", "layer")


def check_criterion(criterion: str) -> None:
    if criterion not in CRITERIA:
        raise ValueError(f"space.importance: {criterion!r} is not one of {sorted(CRITERIA)}")


class ModelFamily(ABC):
    """One kind of architecture: its channel groups, cost, genes and weight inheritance."""

    @abstractmethod
    def build(self, spec: BaseModel) -> nn.Module:
        """A freshly initialised network of ``spec``'s widths."""

    @abstractmethod
    def group_names(self, spec: BaseModel) -> tuple[str, ...]:
        """The channel groups, in the family's fixed order."""

    @abstractmethod
    def width_vector(self, spec: BaseModel) -> np.ndarray:
        """Width of every group (float array in :meth:`group_names` order)."""

    @abstractmethod
    def with_widths(self, spec: BaseModel, widths: np.ndarray) -> BaseModel:
        """A copy of ``spec`` with every group's width from ``widths`` (same order)."""

    @abstractmethod
    def flops(self, spec: BaseModel) -> int:
        """FLOPs of one image (FlopCounterMode's convention: 2 per multiply-add, conv+linear)."""

    @abstractmethod
    def params(self, spec: BaseModel) -> int:
        """Trainable parameters."""

    @abstractmethod
    def summary(self, spec: BaseModel) -> dict:
        """Compact description for tables."""

    @abstractmethod
    def genes(self, spec: BaseModel, granularity: str) -> dict[str, list[str]]:
        """Gene name -> the channel groups it sets, at ``granularity`` (every group once)."""

    @abstractmethod
    def importance(self, model: nn.Module, spec: BaseModel, criterion: str) -> dict[str, Tensor]:
        """Group -> one score per channel of ``model`` (a full-width instance of ``spec``)."""

    @abstractmethod
    def prune(
        self,
        teacher: nn.Module,
        teacher_spec: BaseModel,
        student_spec: BaseModel,
        keep: dict[str, Tensor],
    ) -> nn.Module:
        """``student_spec`` built from ``teacher`` keeping the channel indices ``keep`` of each
        group (sorted); the teacher is left untouched."""

    @abstractmethod
    def read_widths(self, model: nn.Module, spec: BaseModel) -> BaseModel:
        """The spec of ``model``, a network of ``spec``'s architecture pruned by any tool
        (e.g. Torch-Pruning): every group's width read off the module that writes it."""

    #: False where pruning is hand-written and tested exact, so no pre-flight check is needed
    traced = True

    def layer_channels(self, spec: BaseModel) -> dict[str, tuple[int, int]]:
        """Layer -> (output, input) channels the cost model counts: what a pre-flight check
        compares with a built candidate to name the layer it gets wrong."""
        return {}

    def units(self, spec: BaseModel) -> np.ndarray:
        """Per group, the step its width moves in (1: any width); a grouped conv's groups or
        a split's blocks must keep equal sizes."""
        return np.ones(len(self.group_names(spec)), dtype=np.int64)

    def check_student(self, teacher_spec: BaseModel, student_spec: BaseModel) -> None:
        """Raise ValueError when ``student_spec`` cannot be cut from ``teacher_spec``."""
        wider = [
            n
            for n, t, s in zip(
                self.group_names(teacher_spec),
                self.width_vector(teacher_spec),
                self.width_vector(student_spec),
                strict=True,
            )
            if s > t
        ]
        if wider:
            raise ValueError(f"student wider than teacher in groups {wider[:3]}")

    def with_ignore(self, spec: BaseModel, ignore: Sequence[str]) -> BaseModel:
        """The full-width ``spec`` whose groups leave ``space.ignore``'s modules full."""
        if ignore:
            raise SourceError("space.ignore: only for source models (torchvision:, timm:, python:)")
        return spec
