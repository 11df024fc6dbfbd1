"""Latency of a network measured on a deployment runtime: the number a latency budget limits.

FLOPs are a poor stand-in for speed (depthwise and narrow layers are memory-bound, and every
layer has a fixed per-call cost), so a latency budget is checked by running the network on
the runtime it will be deployed on, at the batch size it will serve. Timing is
``torch.utils.benchmark.Timer`` for every runtime (ONNX Runtime's ``session.run`` included):
it pins the thread count, synchronises CUDA, and ``adaptive_autorange`` times blocks of runs
until their interquartile range (kept as the spread) is within 5 % of the median. Each
measurement is cached per (runtime, input shape, threads, widths): timed once per process.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import statistics
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from casd_ray.errors import ConfigError

RUNTIMES = ("torch", "torchscript", "onnxruntime", "cuda")


@dataclass(frozen=True)
class Deployment:
    """What a latency is measured for: runtime, input ``(batch, C, H, W)`` and CPU threads."""

    runtime: str
    shape: tuple[int, ...]
    threads: int = 1
    min_run_time: float = 0.2

    def key(self) -> tuple:
        return (self.runtime, self.shape, self.threads)


@dataclass(frozen=True)
class Latency:
    """Milliseconds per batch: median of blocks of timed runs, and their interquartile range."""

    median_ms: float
    iqr_ms: float
    runs: int

    def as_dict(self) -> dict:
        return asdict(self)


def check_runtime(runtime: str) -> None:
    """Refuse a runtime that is unknown, not installed, or has no device here (one line)."""
    if runtime not in RUNTIMES:
        raise ConfigError(
            f"space.budget.latency.runtime: {runtime!r} is not one of {list(RUNTIMES)}"
        )
    if runtime == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
        raise ConfigError(
            "space.budget.latency.runtime: onnxruntime is not installed "
            "(pip install onnxruntime), or pick torch / torchscript"
        )
    if runtime == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "space.budget.latency.runtime: cuda needs a GPU and this machine has none; "
            "pick a CPU runtime (torch, torchscript, onnxruntime)"
        )


def _onnx_session(model: nn.Module, x: torch.Tensor, threads: int):
    import onnxruntime as ort  # optional dependency, checked by check_runtime

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, input_names=["images"], opset_version=17, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"images": x.numpy()}
    return lambda: sess.run(None, feed)


def forward_fn(model: nn.Module, dep: Deployment) -> Callable[[], object]:
    """A no-argument call that runs one batch of ``model`` on ``dep``'s runtime."""
    check_runtime(dep.runtime)
    device = "cuda" if dep.runtime == "cuda" else "cpu"
    net = model.to(device).eval()
    x = torch.randn(*dep.shape, device=device)
    if dep.runtime == "onnxruntime":
        return _onnx_session(net, x, dep.threads)
    if dep.runtime == "torchscript":
        with torch.no_grad():
            net = torch.jit.freeze(torch.jit.trace(net, (x,)))

    def run():
        with torch.inference_mode(), torch.autocast("cuda", enabled=dep.runtime == "cuda"):
            return net(x)

    return run


def measure(model: nn.Module, dep: Deployment) -> Latency:
    """The latency of one batch of ``model`` on ``dep`` (weights do not matter, only widths)."""
    run = forward_fn(model, dep)
    # importing torch.utils.benchmark logs "No CUDA runtime is found" on CPU-only machines,
    # a stray stderr line before a one-line error: silenced, and imported on first use
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    old = torch.get_num_threads()
    try:
        for _ in range(2):  # warm-up: oneDNN primitives and ORT kernels are made on first use
            run()
        timer = benchmark.Timer(stmt="run()", globals={"run": run}, num_threads=dep.threads)
        # blocks of runs until the spread is within 5 % of the median (or 10x the time)
        m = timer.adaptive_autorange(
            threshold=0.05, min_run_time=dep.min_run_time, max_run_time=10 * dep.min_run_time
        )
    finally:
        torch.set_num_threads(old)
    runs = m.number_per_run * len(m.raw_times)
    return Latency(round(m.median * 1e3, 5), round(m.iqr * 1e3, 5), int(runs))


_CACHE: dict[tuple, Latency] = {}


def measure_cached(key: Sequence, build: Callable[[], nn.Module], dep: Deployment) -> Latency:
    """:func:`measure` once per (deployment, ``key``): ``key`` names the widths (a spec's JSON)."""
    full = (*dep.key(), tuple(key) if not isinstance(key, str) else key)
    if full not in _CACHE:
        _CACHE[full] = measure(build(), dep)
    return _CACHE[full]


def measure_rounds(
    models: dict[str, nn.Module], dep: Deployment, rounds: int = 3
) -> dict[str, list[Latency]]:
    """Each network measured once per round, the rounds interleaved (every network of a round
    before the next round): a change in the machine's load falls on all of them alike."""
    got: dict[str, list[Latency]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            got[name].append(measure(model, dep))
    return got


def summarize_rounds(got: dict[str, list[Latency]]) -> dict:
    """Per network the median of its rounds' medians and of their IQRs, the spread of the
    rounds ((max - min) of the medians) and every round's median."""
    out = {}
    for name, lats in got.items():
        med = [x.median_ms for x in lats]
        out[name] = {
            "median_ms": round(statistics.median(med), 5),
            "iqr_ms": round(statistics.median(x.iqr_ms for x in lats), 5),
            "rounds_spread_ms": round(max(med) - min(med), 5),
            "runs": sum(x.runs for x in lats),
            "rounds_ms": med,
        }
    return out


def measure_together(models: dict[str, nn.Module], dep: Deployment, rounds: int = 3) -> dict:
    """Networks compared side by side: :func:`measure_rounds`, summarised
    (:func:`summarize_rounds`)."""
    return summarize_rounds(measure_rounds(models, dep, rounds))
