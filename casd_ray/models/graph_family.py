"""Any CNN (``torchvision:``, ``timm:``, ``python:``) as a model family.

Channel groups come from Torch-Pruning's DependencyGraph (:mod:`casd_ray.models.graph`),
candidates are built and weights inherited by pruning with Torch-Pruning
(:mod:`casd_ray.models.surgery`), and cost comes from the traced linear cost model.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch import Tensor, nn

from casd_ray.models import graph, surgery
from casd_ray.models.base import GRANULARITIES, ModelFamily, check_criterion
from casd_ray.models.graph import GraphSpec

# ``stage`` splits the groups into at least this many genes where the module paths allow:
# a model whose top level is ``features`` and ``classifier`` would otherwise get 2 genes, one
# of them the whole network, and the search would be the uniform network again
MIN_STAGE_GENES = 3


def prefix_genes(names: Sequence[str], granularity: str) -> dict[str, list[str]]:
    """Genes by module-path prefix: ``stage`` is the first prefix depth that splits the
    groups into at least :data:`MIN_STAGE_GENES` (``layer1``, ``features.3``), ``block`` the
    next depth that splits them further (``layer1.0``), ``layer`` one gene per group."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"space.granularity: {granularity!r} is not one of {GRANULARITIES}")
    parts = [n.split(".") for n in names]
    counts = [len({".".join(p[:d]) for p in parts}) for d in range(1, max(map(len, parts)) + 1)]
    levels = [d + 1 for d in range(len(counts)) if counts[d] > (counts[d - 1] if d else 1)]
    enough = [i for i, d in enumerate(levels) if counts[d - 1] >= MIN_STAGE_GENES]
    stage = enough[0] if enough else len(levels) - 1
    want = {"stage": stage, "block": stage + 1}.get(granularity)
    genes: dict[str, list[str]] = {}
    for name, p in zip(names, parts, strict=True):
        depth = levels[want] if want is not None and 0 <= want < len(levels) else len(p)
        genes.setdefault(".".join(p[:depth]).replace(".", "_"), []).append(name)
    return genes


class GraphFamily(ModelFamily):
    """A user's model, described by a :class:`GraphSpec`."""

    def build(self, spec: GraphSpec) -> nn.Module:
        return surgery.build(spec)

    def group_names(self, spec: GraphSpec) -> tuple[str, ...]:
        return graph.structure(spec).names

    def width_vector(self, spec: GraphSpec) -> np.ndarray:
        return graph.width_vector(spec)

    def with_widths(self, spec: GraphSpec, widths: np.ndarray) -> GraphSpec:
        names = graph.structure(spec).names
        flat = np.asarray(widths).tolist()
        return spec.model_copy(update={"widths": dict(zip(names, map(int, flat), strict=True))})

    def layer_channels(self, spec: GraphSpec) -> dict[str, tuple[int, int]]:
        return graph.layer_channels(spec)

    def units(self, spec: GraphSpec) -> np.ndarray:
        return graph.structure(spec).units.astype(np.int64)

    def flops(self, spec: GraphSpec) -> int:
        return graph.flops(spec)

    def params(self, spec: GraphSpec) -> int:
        return graph.params(spec)

    def summary(self, spec: GraphSpec) -> dict:
        s = graph.structure(spec)
        kept = graph.width_vector(spec)
        return {
            "arch": spec.arch,
            "groups": len(s.names),
            "kept_channels": round(float(kept.sum() / max(s.full.sum(), 1)), 4),
        }

    def genes(self, spec: GraphSpec, granularity: str) -> dict[str, list[str]]:
        return prefix_genes(graph.structure(spec).names, granularity)

    def importance(self, model: nn.Module, spec: GraphSpec, criterion: str) -> dict[str, Tensor]:
        check_criterion(criterion)
        return surgery.importance(model, spec, criterion)

    def prune(
        self,
        teacher: nn.Module,
        teacher_spec: GraphSpec,
        student_spec: GraphSpec,
        keep: dict[str, Tensor],
    ) -> nn.Module:
        return surgery.prune_copy(teacher, teacher_spec, keep)

    def read_widths(self, model: nn.Module, spec: GraphSpec) -> GraphSpec:
        widths = []
        for name in self.group_names(spec):  # a group is named by the first layer writing it
            m = model.get_submodule(name)
            widths.append(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
        return self.with_widths(spec, np.array(widths, dtype=float))

    def with_ignore(self, spec: GraphSpec, ignore: Sequence[str]) -> GraphSpec:
        # ``ignore`` belongs to the search, not to the teacher's files: the same teacher
        # serves searches with different ``space.ignore``
        if tuple(ignore) == spec.ignore:
            return spec
        return graph.full_spec(spec.model_copy(update={"ignore": tuple(ignore), "widths": {}}))


GRAPH = GraphFamily()
