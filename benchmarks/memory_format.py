"""Training speed of one CPU step in three memory formats, A beside B in interleaved rounds.

``prepare_model`` trains in channels_last but keeps strided 1x1 convolutions whose input
channels are not a multiple of 16 in NCHW (oneDNN's weight-gradient kernel for them writes
past its buffer in channels_last: uxlfoundation/oneDNN#6035). Printed: training images per
second of a pruned ResNet-20 (stage widths 11/22/45, the uniform network at half the FLOPs:
both downsampling shortcuts fall back) as ``prepare_model`` builds it, with every layer in
channels_last (unsafe in general; safe at these widths on an AVX2 CPU, where only 2-7
channels crash), and all in NCHW; the ratios say what the fallback costs.

    python benchmarks/memory_format.py [--steps 30] [--rounds 3] [--threads 2] [--widths 11 22 45]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from casd_ray.distill import prepare_model
from casd_ray.models import WidthSpec, build_model

WIDTHS = [11, 22, 45]  # stage widths of ResNet-20 at 0.5 FLOPs, uniform


def images_per_s(model: torch.nn.Module, fmt: torch.memory_format, steps: int) -> float:
    """SGD steps on random 128-image batches; the first 3 are warm-up."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, 3, 32, 32).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (128,))
    for i in range(steps + 3):
        if i == 3:
            t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * 128 / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--widths", type=int, nargs=3, default=WIDTHS, help="stage widths")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    w = args.widths
    spec = WidthSpec(  # ResNet-20: 3 stages of 3 basic blocks, every conv at its stage's width
        block="basic", stem=w[0], stages=w, blocks=[[[c]] * 3 for c in w]
    )
    torch.manual_seed(0)
    base = build_model(spec)
    cl, nchw = torch.channels_last, torch.contiguous_format
    arms = {  # name: (model, format of the input batch)
        "prepare_model (fallback)": (prepare_model(copy.deepcopy(base), "cpu"), cl),
        "all channels_last": (copy.deepcopy(base).to(memory_format=cl), cl),
        "all NCHW": (copy.deepcopy(base), nchw),
    }
    speed = dict.fromkeys(arms, 0.0)
    for _ in range(args.rounds):  # interleaved, best of rounds: the machine's speed drifts
        for name, (model, fmt) in arms.items():
            ips = images_per_s(model.train(), fmt, args.steps)
            speed[name] = max(speed[name], ips)
    for name, ips in speed.items():
        print(f"{name:26s} {ips:7.1f} img/s")
    fallback = speed["prepare_model (fallback)"]
    print(
        f"fallback / all channels_last: {fallback / speed['all channels_last']:.3f}; "
        f"fallback / all NCHW: {fallback / speed['all NCHW']:.3f}"
    )


if __name__ == "__main__":
    main()
