"""A latency budget: the teacher measured, a fitted latency model for repair, and its error.

Repair evaluates a candidate's cost a dozen times per genome, so it cannot time each one.
A fitted model predicts instead: milliseconds per batch as a non-negative combination of the
candidate's FLOPs, its activation elements (every module's output: the memory traffic that
makes narrow and depthwise layers slow) and its parameters, plus a fixed per-network cost
(the per-layer call overhead that dominates a small network at batch 1), and the FLOPs of
convolutions whose channels are not whole SIMD blocks (CPU kernels take a slower path for
them: a network with half the FLOPs can be slower than its teacher). The coefficients
are fitted on ``fit_networks`` random-width networks *measured* on the deployment; relative
error is what is minimised, so small and large networks count alike; the block (or none)
is the one that predicts best out of sample. Without alignment every feature grows with
every width and no coefficient is negative, so the prediction is monotone in the widths;
with it the prediction drops where a width reaches a whole block, as the device's latency
does, and repair's bisection still returns a network within the budget (possibly not the
largest one). Its error (MAPE and worst case) is measured on
``check_networks`` further random networks and reported. Networks are only ever *judged* by
measurement: :func:`casd_ray.widths.latency_repair.repair_measured` repairs again from the
measured latency whenever the model under-predicted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import lru_cache

import numpy as np
import torch
from scipy.optimize import nnls

from casd_ray.config import LatencyConfig
from casd_ray.errors import BudgetError
from casd_ray.models.family import Spec, build_model, flops, params, spec_from_json
from casd_ray.models.latency import (
    Deployment,
    Latency,
    check_runtime,
    measure_cached,
    measure_together,
)
from casd_ray.widths import space
from casd_ray.widths.latency_table import LatencyTable, fit_table, measure_table

# A measured latency may exceed the target by this fraction and still meet the budget:
# the median of a measurement moves by about this much between runs on a quiet CPU.
TOLERANCE = 0.03
# A network measured more than this fraction under the target is grown back towards it: a
# budget left unused is accuracy given away, and arms compared "at equal latency" must be.
SLACK = 0.10
FEATURES = ("one", "gflops", "mactivations", "mparams", "unaligned_gflops")
# Channel blocks tried for the unaligned-FLOPs feature (1: none). CPU kernels (ONNX Runtime's
# NCHWc layout, oneDNN) work on channel blocks of the SIMD width, 8 floats with AVX2 and 16
# with AVX-512; a convolution whose channels are not whole blocks takes a slower path: on an
# AVX-512 CPU 3x3 convolutions of 17 channels took 2.5x the time of ones of 16 (ONNX Runtime,
# batch 64, docs/performance.md "Latency budgets"). The block is chosen from measurements.
BLOCKS = (1, 4, 8, 16)
# grid step of a latency table where the space is not searched in whole blocks (AVX2's SIMD
# width in floats; other widths are interpolated between whole blocks)
TABLE_STEP = 8


@lru_cache(maxsize=4096)
def _layer_facts(spec_json: str) -> tuple[int, tuple[tuple[int, int, int], ...]]:
    """Output elements of every leaf module for one image, and every convolution's
    ``(in_channels, out_channels, flops)`` (a forward on the meta device)."""
    spec = spec_from_json(spec_json)
    model = build_model(spec).eval().to("meta")
    total = 0
    convs: list[tuple[int, int, int]] = []

    def hook(m, _i, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out[0].numel()
            if isinstance(m, torch.nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1]
                fl = 2 * out[0].numel() * (m.in_channels // m.groups) * k
                convs.append((m.in_channels, m.out_channels, fl))

    for m in model.modules():
        if not list(m.children()):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(1, spec.in_channels, *spec.image_size, device="meta"))
    return total, tuple(convs)


def _unaligned(convs: tuple[tuple[int, int, int], ...], block: int) -> int:
    """FLOPs of the convolutions whose channels are not whole blocks of ``block`` (an input
    of at most 4 channels, an image's, counts as aligned: kernels special-case it)."""
    if block <= 1:
        return 0
    return sum(fl for cin, cout, fl in convs if cout % block or (cin % block and cin > 4))


def unaligned_flops(spec: Spec, block: int) -> int:
    """:func:`_unaligned` of ``spec``'s convolutions."""
    return _unaligned(_layer_facts(spec.model_dump_json())[1], block)


def features(spec: Spec, block: int = 1) -> np.ndarray:
    """The model's inputs for ``spec`` (per image; the batch size is in the coefficients)."""
    act, convs = _layer_facts(spec.model_dump_json())
    return np.array([
        1.0, flops(spec) / 1e9, act / 1e6, params(spec) / 1e6, _unaligned(convs, block) / 1e9,
    ])  # fmt: skip


@dataclass(frozen=True)
class LatencyModel:
    """Milliseconds per batch on one deployment, predicted from a spec; plain values only, so
    a Ray trial receives it as part of its rules."""

    coef: tuple[float, ...]
    # the teacher as the model predicts it (as measured: error["teacher_measured_ms"])
    teacher_ms: float
    target_ms: float  # in the model's milliseconds
    runtime: str
    shape: tuple[int, ...]
    threads: int
    relative: bool = True  # the target is a fraction of the teacher, not fixed milliseconds
    block: int = 1  # channel block of the unaligned-FLOPs feature (1: no such feature)
    min_run_time: float = 0.2  # seconds each timing runs for (the deployment's, as configured)
    # measured over predicted ratio where the search looks (:func:`calibrated`; 1: not yet)
    calibration: float = 1.0
    error: dict = field(default_factory=dict, compare=False)
    # per-layer table that predicts instead of the features (:func:`with_table`); None: features
    table: LatencyTable | None = None

    def predict_ms(self, spec: Spec) -> float:
        if self.table is not None:
            return self.table.predict_ms(spec)
        return float(features(spec, self.block) @ np.array(self.coef))

    def ratio(self, spec: Spec) -> float:
        """Predicted latency over the teacher's predicted latency, calibrated."""
        return self.calibration * self.predict_ms(spec) / self.teacher_ms

    @property
    def target_ratio(self) -> float:
        return self.target_ms / self.teacher_ms

    def target_beside(self, teacher_ms: float) -> float:
        """The target in milliseconds for measurements taken beside a teacher measured at
        ``teacher_ms`` in the same rounds: a fraction of the teacher moves with the
        machine's speed (load, clock) as the student does; fixed milliseconds do not."""
        return self.target_ratio * teacher_ms if self.relative else self.target_ms

    def deployment(self) -> Deployment:
        return Deployment(self.runtime, self.shape, self.threads, self.min_run_time)

    def as_dict(self) -> dict:
        table = self.table.as_dict() if self.table is not None else None
        return {**self.__dict__, "coef": list(self.coef), "shape": list(self.shape),
                "table": table}  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict) -> LatencyModel:
        table = LatencyTable.from_dict(d["table"]) if d.get("table") else None
        return cls(**{**d, "coef": tuple(d["coef"]), "shape": tuple(d["shape"]), "table": table})


def measure_spec(spec: Spec, dep: Deployment) -> Latency:
    """Measured latency of a freshly built ``spec`` (cached per deployment and widths)."""
    return measure_cached(spec.model_dump_json(), lambda: build_model(spec), dep)


def random_specs(
    teacher: Spec, n: int, seed: int, *, min_channels: int = 1, divisible_by: int = 1
) -> list[Spec]:
    """``n`` networks spread over all sizes: a global scale, jittered per channel group."""
    rng = np.random.default_rng(seed)
    names = space.group_names(teacher)
    out = []
    for _ in range(n):
        scale = rng.uniform(0.1, 1.0)
        ratios = {g: float(np.clip(scale * rng.uniform(0.5, 1.5), 1e-3, 1.0)) for g in names}
        out.append(
            space.widths_from_ratios(
                teacher, ratios, min_channels=min_channels, divisible_by=divisible_by
            )
        )
    return out


def fit(specs: list[Spec], ms: list[float], block: int = 1) -> tuple[float, ...]:
    """Non-negative coefficients minimising the squared *relative* error of the prediction."""
    x = np.stack([features(s, block) for s in specs])
    y = np.asarray(ms, dtype=float)
    coef, _ = nnls(x / y[:, None], np.ones_like(y))
    return tuple(float(c) for c in coef)


def choose_block(specs: list[Spec], ms: list[float]) -> int:
    """The channel block (of :data:`BLOCKS`) whose model predicts the measurements best out
    of sample (leave-one-out mean relative error): a model with the feature always fits its
    own points at least as well, so the in-sample error cannot choose."""
    y = np.asarray(ms, dtype=float)

    def loo_error(block: int) -> float:
        x = np.stack([features(s, block) for s in specs]) / y[:, None]
        errs = []
        for i in range(len(y)):
            keep = np.arange(len(y)) != i
            coef, _ = nnls(x[keep], np.ones(keep.sum()))
            errs.append(abs(float(x[i] @ coef) - 1.0))
        return float(np.mean(errs))

    scores = {b: loo_error(b) for b in BLOCKS}
    return min(BLOCKS, key=lambda b: (round(scores[b], 4), b))


def model_error(model: LatencyModel, specs: list[Spec], ms: list[float]) -> dict:
    """MAPE and worst-case relative error (in %) of ``model`` against measured latencies."""
    if not specs:
        return {"networks": 0}
    pred = np.array([model.predict_ms(s) for s in specs])
    rel = (pred - np.asarray(ms)) / np.asarray(ms)
    return {
        "networks": len(specs),
        "mape_pct": round(float(np.mean(np.abs(rel))) * 100, 2),
        "worst_pct": round(float(np.max(np.abs(rel))) * 100, 2),
        "under_predicted": int(np.sum(rel < 0)),
    }


def relative_error(predicted: np.ndarray, measured: np.ndarray) -> dict:
    """MAPE, mean signed error (negative: under-predicted) and worst case, in %."""
    rel = (np.asarray(predicted) - measured) / measured
    return {"mape_pct": round(float(np.mean(np.abs(rel))) * 100, 2),
            "bias_pct": round(float(np.mean(rel)) * 100, 2),
            "worst_pct": round(float(np.max(np.abs(rel))) * 100, 2)}  # fmt: skip


def calibrated(
    model: LatencyModel, specs: list[Spec], measured: list[float], most: float = math.inf
) -> LatencyModel:
    """``model`` with its ratios scaled by the median of ``measured`` (ratios to the teacher
    measured in the same rounds) over its predicted ones for ``specs``, networks drawn as the
    search draws them. The fit's error on random networks says little there: on one run
    (MAPE 7.9 %) every network the search kept measured 16-45 % over its prediction. The
    error before and after is kept as ``error["searched_space"]``. The scale is at most
    ``most``."""
    raw = replace(model, calibration=1.0)
    pred, got = np.array([raw.ratio(s) for s in specs]), np.asarray(measured, dtype=float)
    scale = min(float(np.median(got / pred)), most)
    before, after = relative_error(pred, got), relative_error(scale * pred, got)
    checked = {"networks": len(specs), "calibration": round(scale, 4), "before": before,
               "after": after}  # fmt: skip
    return replace(model, calibration=scale, error={**model.error, "searched_space": checked})


def build_latency_model(
    teacher: Spec,
    cfg: LatencyConfig,
    target: float,
    *,
    min_channels: int = 1,
    divisible_by: int = 1,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> LatencyModel:
    """Measure the teacher, fit the model, measure its error, and refuse an unreachable target.

    The target is ``cfg.target_ms`` or ``target`` times the teacher's measured latency. It is
    refused (one line) below the *measured* latency of the smallest network in the space.
    """
    check_runtime(cfg.runtime)
    shape = (cfg.batch_size, teacher.in_channels, *teacher.image_size)
    dep = Deployment(cfg.runtime, shape, cfg.threads, cfg.min_run_time)
    smallest = space.widths_from_ratios(
        teacher,
        dict.fromkeys(space.group_names(teacher), 1e-12),
        min_channels=min_channels,
        divisible_by=divisible_by,
    )
    # the two figures the target is judged by, measured side by side in interleaved rounds
    ends = measure_together({"t": build_model(teacher), "s": build_model(smallest)}, dep)
    teacher_ms, low_ms = ends["t"]["median_ms"], ends["s"]["median_ms"]
    target_ms = cfg.target_ms if cfg.target_ms is not None else target * teacher_ms
    if target_ms < low_ms * (1 - TOLERANCE):
        raise BudgetError(
            f"space.budget.target: {target_ms:.3f} ms is below the fastest reachable network "
            f"({low_ms:.3f} ms measured on {cfg.runtime}, batch {cfg.batch_size}, every group at "
            f"min_channels={min_channels}; the teacher takes {teacher_ms:.3f} ms): a narrow "
            "network still pays every layer's fixed cost; raise the target"
        )
    log(f"latency: teacher {teacher_ms:.3f} ms, target {target_ms:.3f} ms on {cfg.runtime} {shape}")
    kw = {"min_channels": min_channels, "divisible_by": divisible_by}
    # half the fitted networks in whole blocks, a share for each block tried, so the fit
    # sees aligned layers as well as the unaligned ones random widths give and can tell a
    # device slow off blocks of 8 from one slow off blocks of 4 (aligned in 8s only, the two
    # looked alike, ties went to 4 and a run searched widths of 4 mod 8 on an AVX-512 CPU)
    n_aligned = cfg.fit_networks // 2
    fit_specs = random_specs(teacher, cfg.fit_networks - n_aligned, seed, **kw)
    for i, b in enumerate(BLOCKS[1:]):
        n = len(range(i, n_aligned, len(BLOCKS) - 1))
        fit_specs += random_specs(teacher, n, seed + 2 + i, min_channels=min_channels,
                                  divisible_by=math.lcm(divisible_by, b))  # fmt: skip
    fit_ms = [teacher_ms, low_ms, *(measure_spec(s, dep).median_ms for s in fit_specs)]
    fit_specs = [teacher, smallest, *fit_specs]
    block = choose_block(fit_specs, fit_ms)

    def model_with(b: int) -> LatencyModel:
        coef = fit(fit_specs, fit_ms, b)
        # the teacher as the fit predicts it: ratios are a prediction over a prediction, so
        # one slow measurement of the teacher (seen: 57.9 ms, 41-43 ms before and after, the
        # fit 45.0) does not scale every ratio the search repairs with
        ref = float(features(teacher, b) @ np.array(coef))
        goal = cfg.target_ms if cfg.target_ms is not None else target * ref
        return LatencyModel(coef, ref, goal, cfg.runtime, shape, cfg.threads,
                            relative=cfg.target_ms is None, block=b,
                            min_run_time=cfg.min_run_time)  # fmt: skip

    models = {b: model_with(b) for b in {1, block}}
    check = random_specs(teacher, cfg.check_networks, seed + 1, **kw)
    check_ms = [measure_spec(s, dep).median_ms for s in check]
    error = model_error(models[block], check, check_ms)
    if check:
        error["block"] = block
        error["without_alignment"] = model_error(models[1], check, check_ms)
        log(f"latency model: MAPE {error['mape_pct']}%, worst {error['worst_pct']}% "
            f"on {error['networks']} measured networks (channel block {block}; without the "
            f"alignment feature MAPE {error['without_alignment']['mape_pct']}%)")  # fmt: skip
    error["teacher_measured_ms"] = teacher_ms
    return LatencyModel(**{**models[block].__dict__, "error": error})


def with_table(
    model: LatencyModel,
    teacher: Spec,
    cfg: LatencyConfig,
    target: float,
    *,
    min_channels: int = 1,
    divisible_by: int = 1,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> LatencyModel:
    """``model`` predicting with a per-layer latency table (:mod:`latency_table`) timed on its
    deployment in the widths' step the search uses (``divisible_by``, else
    :data:`TABLE_STEP`), fitted on ``fit_networks`` random networks of that step and judged
    on ``check_networks`` more, beside the features model on the same networks (kept as
    ``error["features"]``): on three runs' searched networks, each calibrated as a run is,
    the features model's ratios were off by 2.0-2.5 % (worst 8.4-9.8 %), the table's by
    1.0-1.3 % (worst 2.2-5.5 %; docs/results.md "A per-layer latency table")."""
    dep = model.deployment()
    step = divisible_by if divisible_by > 1 else TABLE_STEP
    low = divisible_by * math.ceil(min_channels / divisible_by)
    kw = {"min_channels": min_channels, "divisible_by": divisible_by}
    table = measure_table(teacher, dep, step=step, min_channels=low)
    specs = [teacher, *random_specs(teacher, cfg.fit_networks, seed + 7, **kw)]
    table = fit_table(table, specs, [measure_spec(s, dep).median_ms for s in specs])
    ref = table.predict_ms(teacher)
    goal = cfg.target_ms if cfg.target_ms is not None else target * ref
    out = replace(model, table=table, teacher_ms=ref, target_ms=goal)
    check = random_specs(teacher, cfg.check_networks, seed + 8, **kw)
    check_ms = [measure_spec(s, dep).median_ms for s in check]
    error = {**model_error(out, check, check_ms), "predictor": "table",
             "entries": len(table.entries), "step": step, "block": model.error.get("block"),
             "teacher_measured_ms": model.error.get("teacher_measured_ms"),
             "features": model_error(model, check, check_ms)}  # fmt: skip
    if check:
        f = error["features"]
        where = f"in whole blocks of {divisible_by}" if divisible_by > 1 else "of any width"
        log(f"latency table: {len(table.entries)} convolutions timed; MAPE "
            f"{error['mape_pct']}%, worst {error['worst_pct']}% on {len(check)} measured "
            f"networks {where} (the features model there: MAPE {f['mape_pct']}%, worst "
            f"{f['worst_pct']}%)")  # fmt: skip
    return replace(out, error=error)
