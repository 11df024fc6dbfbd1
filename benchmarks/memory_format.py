"""Training speed of one CPU step per memory format, A beside B in interleaved rounds.

``prepare_model`` trains in channels_last only when every convolution writes a multiple of 8
channels (and then keeps strided 1x1 convolutions with input channels off a multiple of 16 in
NCHW: oneDNN's weight-gradient kernel for them writes past its buffer in channels_last,
uxlfoundation/oneDNN#6035); otherwise it stays in NCHW. Printed per ResNet-20 width set
(stage widths; every conv of a stage at that width): training images per second as
``prepare_model`` builds it, all in channels_last (unsafe in general; safe at widths >= 8 on
an AVX2 CPU, where only 2-7 channels crash) and all in NCHW, and the rule's speed as a share
of the faster of the two. 11/22/45 is the uniform network at half the FLOPs.

    python benchmarks/memory_format.py [--steps 30] [--rounds 2] [--threads 2]
        [--widths 16/32/64 16/24/48 11/22/45 12/24/44]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from casd_ray.models.family import build_model
from casd_ray.models.resnet import WidthSpec
from casd_ray.train.devices import channels_last_pays, prepare_model

WIDTHS = ["16/32/64", "16/24/48", "11/22/45", "12/24/44"]


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


def measure(widths: list[int], steps: int, rounds: int) -> tuple[dict[str, float], str]:
    """Best images/s of each arm over interleaved rounds (the machine's speed drifts), and
    the format ``prepare_model`` chose."""
    spec = WidthSpec(  # ResNet-20: 3 stages of 3 basic blocks, every conv at its stage's width
        block="basic", stem=widths[0], stages=widths, blocks=[[[c]] * 3 for c in widths]
    )
    torch.manual_seed(0)
    base = build_model(spec)
    cl, nchw = torch.channels_last, torch.contiguous_format
    chosen = cl if channels_last_pays(base) else nchw  # the rule prepare_model applies
    arms = {  # name: (model, format of the input batch)
        "prepare_model": (prepare_model(copy.deepcopy(base), "cpu"), chosen),
        "channels_last": (copy.deepcopy(base).to(memory_format=cl), cl),
        "NCHW": (copy.deepcopy(base), nchw),
    }
    speed = dict.fromkeys(arms, 0.0)
    for _ in range(rounds):
        for name, (model, fmt) in arms.items():
            speed[name] = max(speed[name], images_per_s(model.train(), fmt, steps))
    return speed, "CL" if chosen == cl else "NCHW"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--widths", nargs="+", default=WIDTHS, help="stage widths, a/b/c")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{'widths':10s} {'rule':>6s} {'rule':>7s} {'CL':>7s} {'NCHW':>7s}  NCHW/CL  rule/best")
    for text in args.widths:
        widths = [int(w) for w in text.split("/")]
        speed, chosen = measure(widths, args.steps, args.rounds)
        rule, cl, nchw = speed["prepare_model"], speed["channels_last"], speed["NCHW"]
        print(
            f"{text:10s} {chosen:>6s} {rule:7.1f} {cl:7.1f} "
            f"{nchw:7.1f}  {nchw / cl:7.2f}  {rule / max(cl, nchw):9.2f}",
            flush=True,
        )
    print("(images/s of training steps, batch 128, 3x32x32; rule: what prepare_model chose)")


if __name__ == "__main__":
    main()
