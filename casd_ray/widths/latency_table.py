"""A per-layer latency table: every convolution timed alone on the deployment, summed.

The fitted model of :mod:`casd_ray.widths.latency_model` predicts from whole-network
features (FLOPs, activations, parameters, FLOPs off whole channel blocks). On one run its
error was 5.5 % on random networks, but the networks the search preferred (a narrow residual
stream, wide inner convolutions in the last stage) measured 8-17 % over it: a feature sum
cannot see which shapes a runtime's kernels are slow on. A table can (HALP, OFA): each
convolution of the network, with its BatchNorm and ReLU as the runtime fuses them, is timed
alone at the deployment's batch for a grid of (in, out) widths at its position; a network's
prediction is the sum of its convolutions' entries (bilinear between grid points), scaled and
offset by a fit on whole networks measured on the same deployment (what the table leaves out:
additions, pooling, the classifier, layout conversions between layers).

Plain values only (tuples, floats), so a Ray trial receives it inside its rules.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import torch
from scipy.optimize import nnls
from torch import nn

from casd_ray.models.family import Spec, build_model, spec_from_json
from casd_ray.models.latency import Deployment, measure_cached

# one convolution as the table keys it:
# (in, out, kernel h, kernel w, stride h, stride w, pad h, pad w, dilation h, dilation w,
#  groups, input h, input w)
Key = tuple[int, ...]
# grid points per width of one position at most: a wide layer's grid steps in several blocks
MAX_POINTS = 9


@lru_cache(maxsize=4096)
def conv_layers(spec_json: str) -> tuple[tuple[str, Key], ...]:
    """Every convolution of a spec in execution order: its module name and table key (a
    forward on the meta device)."""
    spec = spec_from_json(spec_json)
    model = build_model(spec).eval().to("meta")
    out: list[tuple[str, Key]] = []

    def hook(name: str) -> Callable:
        def record(m: nn.Conv2d, inputs: tuple, _out: torch.Tensor) -> None:
            h, w = inputs[0].shape[-2:]
            out.append((name, (m.in_channels, m.out_channels, *m.kernel_size, *m.stride,
                               *m.padding, *m.dilation, m.groups, int(h), int(w))))  # fmt: skip

        return record

    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook(name))
    with torch.no_grad():
        model(torch.zeros(1, spec.in_channels, *spec.image_size, device="meta"))
    return tuple(out)


def _widths(n: int, step: int, low: int) -> tuple[int, ...]:
    """Grid of one width up to the teacher's ``n``: ``low``, whole blocks of ``step`` (of
    several blocks when there would be more than :data:`MAX_POINTS`), and ``n``."""
    blocks = list(range(step, n, step))
    if len(blocks) > MAX_POINTS - 2:
        stride = math.ceil(len(blocks) / (MAX_POINTS - 2))
        blocks = blocks[stride - 1 :: stride]
    return tuple(sorted({min(low, n), *(b for b in blocks if b > low), n}))


def _depthwise(key: Key) -> bool:
    """One width: in = out = groups (each channel convolved alone)."""
    return key[10] == key[0] == key[1] and key[10] > 1


def _with_widths(key: Key, cin: int, cout: int) -> Key:
    return (cin, cout, *key[2:10], cin if _depthwise(key) else key[10], *key[11:])


def _layer(key: Key) -> nn.Module:
    cin, cout, kh, kw, sh, sw, ph, pw, dh, dw, groups = key[:11]
    conv = nn.Conv2d(cin, cout, (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(cout), nn.ReLU())


def _between(grid: tuple[int, ...], v: int) -> tuple[int, int, float]:
    """The two grid points around ``v`` and ``v``'s weight on the second (outside the grid:
    the nearest two, extrapolated)."""
    if len(grid) == 1:
        return grid[0], grid[0], 0.0
    i = min(max(bisect.bisect_left(grid, v), 1), len(grid) - 1)
    a, b = grid[i - 1], grid[i]
    return a, b, (v - a) / (b - a)


@dataclass(frozen=True)
class LatencyTable:
    """Milliseconds of every convolution position's grid of widths, and the fit to whole
    networks: ``coef`` weighs (1, the table's sum in ms)."""

    # position name -> (teacher's key, in-width grid, out-width grid)
    positions: tuple[tuple[str, Key, tuple[int, ...], tuple[int, ...]], ...]
    entries: tuple[tuple[Key, float], ...]
    coef: tuple[float, ...] = (0.0, 1.0)
    error: dict = field(default_factory=dict, compare=False)

    def layer_ms(self, name: str, key: Key) -> float:
        """One convolution's milliseconds, bilinear between its position's grid points."""
        ms, grids = self._ms, self._grids
        if name not in grids:
            raise KeyError(f"no convolution {name!r} in the latency table")
        teacher_key, g_in, g_out = grids[name]
        i0, i1, wi = _between(g_in, key[0])
        if _depthwise(teacher_key):
            low, high = (ms[_with_widths(teacher_key, c, c)] for c in (i0, i1))
            return (1 - wi) * low + wi * high
        o0, o1, wo = _between(g_out, key[1])
        corner = {(a, b): ms[_with_widths(teacher_key, a, b)] for a in (i0, i1) for b in (o0, o1)}
        return (
            (1 - wi) * (1 - wo) * corner[i0, o0] + (1 - wi) * wo * corner[i0, o1]
            + wi * (1 - wo) * corner[i1, o0] + wi * wo * corner[i1, o1]
        )  # fmt: skip

    @cached_property
    def _ms(self) -> dict[Key, float]:
        return dict(self.entries)

    @cached_property
    def _grids(self) -> dict[str, tuple]:
        return {n: (k, a, b) for n, k, a, b in self.positions}

    def layers_ms(self, spec: Spec) -> float:
        """The table's sum over ``spec``'s convolutions (before the whole-network fit)."""
        return sum(self.layer_ms(n, k) for n, k in conv_layers(spec.model_dump_json()))

    def predict_ms(self, spec: Spec) -> float:
        return self.coef[0] + self.coef[1] * self.layers_ms(spec)

    def as_dict(self) -> dict:
        return {
            "positions": [[n, list(k), list(a), list(b)] for n, k, a, b in self.positions],
            "entries": [[list(k), ms] for k, ms in self.entries],
            "coef": list(self.coef),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTable:
        positions = tuple((n, tuple(k), tuple(a), tuple(b)) for n, k, a, b in d["positions"])
        entries = tuple((tuple(k), float(ms)) for k, ms in d["entries"])
        return cls(positions, entries, tuple(d["coef"]), d.get("error", {}))


def table_positions(
    teacher: Spec, step: int, min_channels: int
) -> tuple[tuple[str, Key, tuple[int, ...], tuple[int, ...]], ...]:
    """Each convolution position of ``teacher`` with the grid of widths it is timed at; the
    first convolution's input (the image) keeps its channels."""
    out = []
    for i, (name, key) in enumerate(conv_layers(teacher.model_dump_json())):
        fixed_in = i == 0 and key[0] == teacher.in_channels
        g_in = (key[0],) if fixed_in else _widths(key[0], step, min_channels)
        out.append((name, key, g_in, _widths(key[1], step, min_channels)))
    return tuple(out)


def table_keys(positions: tuple) -> list[Key]:
    """Every distinct convolution the table times (positions of one shape share entries)."""
    keys: dict[Key, None] = {}
    for _name, key, g_in, g_out in positions:
        pairs = [(c, c) for c in g_in] if _depthwise(key) else [(a, b) for a in g_in for b in g_out]
        for a, b in pairs:
            keys[_with_widths(key, a, b)] = None
    return list(keys)


def measure_table(teacher: Spec, dep: Deployment, *, step: int, min_channels: int) -> LatencyTable:
    """Time every entry on ``dep`` (its batch, runtime and threads; the input shape is each
    convolution's own). Unfitted: ``coef`` (0, 1) until :func:`fit_table`."""
    positions = table_positions(teacher, step, min_channels)
    entries = []
    for key in table_keys(positions):
        layer_dep = Deployment(dep.runtime, (dep.shape[0], key[0], *key[11:13]), dep.threads,
                               dep.min_run_time)  # fmt: skip
        entries.append((key, measure_cached(("layer", *key), lambda k=key: _layer(k), layer_dep)
                        .median_ms))  # fmt: skip
    return LatencyTable(positions, tuple(entries))


def fit_table(table: LatencyTable, specs: list[Spec], ms: list[float]) -> LatencyTable:
    """``table`` with an intercept and a scale (non-negative) minimising the squared relative
    error against whole networks measured on the same deployment."""
    x = np.array([[1.0, table.layers_ms(s)] for s in specs])
    y = np.asarray(ms, dtype=float)
    coef, _ = nnls(x / y[:, None], np.ones_like(y))
    return LatencyTable(table.positions, table.entries, tuple(float(c) for c in coef),
                        table.error)  # fmt: skip
