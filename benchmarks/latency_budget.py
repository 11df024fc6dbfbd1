"""Latency budgets, measured: how far a trial beside the measurement moves it, and how well
the fitted latency model predicts, with the uniform network repaired onto the target.

0. Alignment: two 3x3 convolutions per channel count (batch 64): milliseconds per GFLOP on
   and off whole SIMD channel blocks, the reason for the latency model's alignment feature.
1. Noise: the teacher's latency on the budget's runtime, measured in interleaved rounds on a
   quiet device and with a "trial" beside it (a process training the same network, one
   thread, as a search trial does); printed: the median of the rounds' medians and the
   spread of the rounds ((max - min) / median). This is why a latency budget is measured
   only while no trial runs (``casd-ray run`` fits the model before the search and measures
   the finals after it).
2. Model: per architecture and batch size, the latency model's MAPE and worst error on
   ``--check`` random networks; then, measured side by side in interleaved rounds: the
   teacher, the uniform network repaired onto ``--target`` times the teacher's latency *as
   measured* (``repair_measured``), the uniform network at ``--target`` of the teacher's
   FLOPs (what a FLOPs budget would give), the same with every width a whole channel block
   (``divisible_by``: the model's block, else 16) and the fastest network in the space. The
   model's error is printed with the alignment feature (its chosen block) and without it,
   on the same measured networks.

    python benchmarks/latency_budget.py [--runtime onnxruntime] [--archs resnet20
        torchvision:mobilenet_v2] [--batches 1 64] [--target 0.5] [--fit 24] [--check 50]
        [--rounds 6] [--smoke-test]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics

import torch

from casd_ray.config import LatencyConfig
from casd_ray.errors import BudgetError
from casd_ray.models.family import build_model, flops, spec_for
from casd_ray.models.latency import Deployment, measure, measure_together
from casd_ray.widths import space
from casd_ray.widths.latency_model import build_latency_model
from casd_ray.widths.latency_repair import repair_measured


def _trial(stop, threads: int) -> None:
    """A stand-in search trial: SGD steps on a ResNet-20 until told to stop."""
    torch.set_num_threads(threads)
    model = build_model(spec_for("resnet20"))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
    while not stop.is_set():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def noise(runtime: str, batch: int, rounds: int, min_run_time: float) -> None:
    model = build_model(spec_for("resnet20"))
    dep = Deployment(runtime, (batch, 3, 32, 32), 1, min_run_time)
    ctx = mp.get_context("spawn")
    got: dict[str, list[float]] = {"alone": [], "beside a trial": []}
    for _ in range(rounds):
        got["alone"].append(measure(model, dep).median_ms)
        stop = ctx.Event()
        proc = ctx.Process(target=_trial, args=(stop, 1))
        proc.start()
        try:
            measure(model, Deployment(runtime, dep.shape, 1, 0.05))  # the trial is running
            got["beside a trial"].append(measure(model, dep).median_ms)
        finally:
            stop.set()
            proc.join()
    print(f"\nnoise: ResNet-20 on {runtime}, batch {batch}, {rounds} interleaved rounds")
    print("| measured | median of medians (ms) | spread of rounds |")
    print("|---|---|---|")
    for name, ms in got.items():
        med = statistics.median(ms)
        print(f"| {name} | {med:.3f} | {(max(ms) - min(ms)) / med * 100:.1f} % |")


def alignment(runtime: str, batch: int, min_run_time: float, rounds: int = 2) -> None:
    """Two 3x3 convolutions (+ BN, ReLU) on 32x32 per channel count, in interleaved rounds:
    time per GFLOP on and off whole SIMD channel blocks (the latency model's alignment)."""
    channels = (8, 12, 15, 16, 17, 20, 24, 31, 32, 33, 48, 64)

    def pair(c: int) -> torch.nn.Module:
        conv = [torch.nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(2)]
        return torch.nn.Sequential(*(m for cv in conv for m in (cv, torch.nn.BatchNorm2d(c),
                                                                 torch.nn.ReLU())))  # fmt: skip

    got: dict[int, list[float]] = {c: [] for c in channels}
    for _ in range(rounds):
        for c in channels:
            dep = Deployment(runtime, (batch, c, 32, 32), 1, min_run_time)
            got[c].append(measure(pair(c), dep).median_ms)
    print(f"\nalignment: two 3x3 convolutions on 32x32, {runtime}, batch {batch}, 1 thread")
    print("| channels | ms | ms per GFLOP |")
    print("|---|---|---|")
    for c, ms in got.items():
        gflop = 2 * 2 * batch * c * c * 9 * 32 * 32 / 1e9
        print(f"| {c} | {statistics.median(ms):.2f} | {statistics.median(ms) / gflop:.1f} |")


def model_rows(args) -> None:
    print(f"\nlatency model on {args.runtime}, target {args.target} x the teacher's latency")
    print(
        "| arch | batch | MAPE % | worst % | block | without alignment: MAPE % | worst % "
        "| teacher ms | target ms | uniform under the latency budget: ms (FLOPs ratio) "
        "| uniform at the same FLOPs ratio as the target: ms | same, widths in whole blocks: "
        "ms (FLOPs ratio) | fastest network ms |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        teacher = spec_for(arch)
        for batch in args.batches:
            cfg = LatencyConfig(
                runtime=args.runtime, batch_size=batch, fit_networks=args.fit,
                check_networks=args.check, min_run_time=args.min_run_time,
            )  # fmt: skip
            model = build_latency_model(teacher, cfg, args.target, log=lambda _: None)
            uni = space.uniform_genome(teacher, "stage")
            by_latency, _ = repair_measured(teacher, "stage", uni, model)
            by_flops, _ = space.repair(teacher, "stage", uni, target=args.target)
            block = model.block if model.block > 1 else 16  # e.g. AVX-512's 16 floats
            try:
                in_blocks, _ = space.repair(
                    teacher, "stage", uni, target=args.target, divisible_by=block
                )
            except BudgetError:  # whole blocks cannot reach the target: the smallest ones
                in_blocks = space.widths_from_ratios(
                    teacher, dict.fromkeys(space.group_names(teacher), 1e-12), divisible_by=block
                )
            smallest = space.widths_from_ratios(
                teacher, dict.fromkeys(space.group_names(teacher), 1e-12)
            )
            specs = {"teacher": teacher, "latency": by_latency, "flops": by_flops,
                     "blocks": in_blocks, "smallest": smallest}  # fmt: skip
            # side by side, in interleaved rounds: a change in load falls on all alike
            ms = measure_together(
                {k: build_model(v) for k, v in specs.items()}, model.deployment(), rounds=3
            )
            t, e = ms["teacher"]["median_ms"], model.error
            e1 = e.get("without_alignment", {})
            print(
                f"| {arch} | {batch} | {e.get('mape_pct')} | {e.get('worst_pct')} | "
                f"{e.get('block')} | {e1.get('mape_pct')} | {e1.get('worst_pct')} | {t:.3f} | "
                f"{args.target * t:.3f} | {ms['latency']['median_ms']:.3f} "
                f"({flops(by_latency) / flops(teacher):.3f}) | {ms['flops']['median_ms']:.3f} | "
                f"{ms['blocks']['median_ms']:.3f} ({flops(in_blocks) / flops(teacher):.3f}) | "
                f"{ms['smallest']['median_ms']:.3f} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runtime", default="onnxruntime")
    parser.add_argument("--archs", nargs="+", default=["resnet20", "torchvision:mobilenet_v2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--fit", type=int, default=24)
    parser.add_argument("--check", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes")
    args = parser.parse_args()
    if args.smoke_test:
        args.archs, args.batches, args.fit, args.check = ["resnet20"], [1], 6, 6
        args.rounds, args.min_run_time = 2, 0.05
    noise(args.runtime, args.batches[0], args.rounds, args.min_run_time)
    alignment(args.runtime, 8 if args.smoke_test else 64, args.min_run_time)
    model_rows(args)


if __name__ == "__main__":
    main()
