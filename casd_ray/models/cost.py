"""Measured cost of a model: FLOPs from real forwards and CPU latency.

The search budgets with the analytic counts in :mod:`casd_ray.models.family` (fast enough for
thousands of candidates); the report uses these measurements so that its numbers do not
depend on the analytic formula being right. FLOPs follow ``FlopCounterMode``: 2 per
multiply-add, conv and linear layers only (BN, ReLU, pooling and additions are not counted).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def measure_flops(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward of a single image of shape ``(C, H, W)`` (2 per multiply-add)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_shape, device=device)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def cpu_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 20,
    warmup: int = 3,
    threads: int = 1,
    max_seconds: float = 10.0,
) -> dict:
    """Median wall time of an eval forward on CPU per batch size, with a fixed thread count.

    The thread count is pinned (and restored afterwards) because latency with the default
    thread pool depends on whatever else the machine runs; one thread is the most repeatable
    figure and what a small edge device offers. The median of ``repeats`` runs discards the
    occasional scheduler hiccup; ``max_seconds`` caps each batch size for big models (at least
    3 timed runs are always taken).
    """
    net = copy.deepcopy(model).to("cpu").eval()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict = {"threads": threads, "runs": {}, "batch_ms": {}, "per_image_ms": {}}
    try:
        with torch.inference_mode():
            for bs in batch_sizes:
                x = torch.randn(bs, *input_shape)
                for _ in range(warmup):
                    net(x)
                times: list[float] = []
                start = time.perf_counter()
                while len(times) < repeats and (
                    len(times) < 3 or time.perf_counter() - start < max_seconds
                ):
                    t0 = time.perf_counter()
                    net(x)
                    times.append((time.perf_counter() - t0) * 1e3)
                median = statistics.median(times)
                out["runs"][str(bs)] = len(times)
                out["batch_ms"][str(bs)] = round(median, 4)
                out["per_image_ms"][str(bs)] = round(median / bs, 4)
    finally:
        torch.set_num_threads(old_threads)
    return out
