"""Do trained weights time differently from fresh ones? The same widths measured with random
initial weights and with weights cut from a trained teacher, side by side.

A latency model is fitted on freshly built networks, measured repair measures fresh networks,
and the report measures the fine-tuned ones: if trained weights were slower (denormal floats
on a CPU, say), a network repaired onto the budget could fail it after the fine-tune. Measures
the trained teacher and a fresh copy, and each width set fresh and inherited from the teacher
(most important channels by L1), in interleaved rounds on ONNX Runtime (the budget's default
runtime); prints each one's median, spread of rounds and ratio to either teacher. Run it idle.

    python benchmarks/latency_weights.py runs/<name>/teacher [--parts runs/<name>/winner ...]

Without ``--parts``: ResNet-20 widths of the seed-0 winner and uniform networks of the
whole-block latency run in docs/results.md, and uniform at 8/16/32.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from casd_ray.artifacts.network import load_network, read_spec
from casd_ray.models.family import build_model
from casd_ray.models.latency import Deployment, measure_together
from casd_ray.models.resnet import WidthSpec
from casd_ray.widths.inherit import inherit


def _resnet20(stages: tuple[int, int, int], inner: tuple[tuple[int, ...], ...]) -> WidthSpec:
    blocks = tuple(tuple((w,) for w in stage) for stage in inner)
    return WidthSpec(block="basic", stem=stages[0], stages=stages, blocks=blocks)


DEFAULT = {
    "winner 8/16/32, inner 8 8 8 / 16 8 8 / 32 24 24": _resnet20(
        (8, 16, 32), ((8, 8, 8), (16, 8, 8), (32, 24, 24))
    ),
    "uniform 8/8/24": _resnet20((8, 8, 24), ((8, 8, 8), (8, 8, 8), (24, 24, 24))),
    "uniform 8/16/32": _resnet20((8, 16, 32), ((8, 8, 8), (16, 16, 16), (32, 32, 32))),
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("teacher", type=Path, help="a trained teacher's export folder")
    ap.add_argument("--parts", nargs="*", type=Path, help="export folders whose widths to time")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    teacher = load_network(args.teacher)
    t_spec, t_model = teacher.spec, teacher.model.cpu().eval()
    specs = {p.name: read_spec(p / "widths.json") for p in args.parts} if args.parts else DEFAULT
    nets = {"teacher fresh": build_model(t_spec).eval(), "teacher trained": t_model}
    for name, spec in specs.items():
        nets[f"{name} fresh"] = build_model(spec).eval()
        nets[f"{name} inherited"] = inherit(t_model, t_spec, spec).eval()
    shape = (args.batch, t_spec.in_channels, *t_spec.image_size)
    dep = Deployment("onnxruntime", shape, args.threads)
    ms = measure_together(nets, dep, rounds=args.rounds)
    fresh, trained = ms["teacher fresh"]["median_ms"], ms["teacher trained"]["median_ms"]
    print(f"ONNX Runtime, input {shape}, {args.threads} thread(s), {args.rounds} rounds")
    print("| network | ms (median) | spread of rounds ms | / fresh teacher | / trained teacher |")
    print("|---|---:|---:|---:|---:|")
    for name, m in ms.items():
        med = m["median_ms"]
        print(f"| {name} | {med:.2f} | {m['rounds_spread_ms']:.2f} | {med / fresh:.3f} | "
              f"{med / trained:.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
