"""The built-in ResNets' hand-written slicing vs the generic Torch-Pruning path, side by side.

Issue #10 asks for one mechanism for every model unless the generic one is measurably worse.
Both paths get the same teacher and the same random candidates: the hand-written one
(:mod:`casd_ray.widths.inherit`, ``WidthSpec``) and the generic one (:mod:`casd_ray.models.graph`,
the same network given as ``python:benchmarks/inheritance_paths.py:preact``). Printed per
depth: whether kept indices and student outputs are identical, and the time per student
(inherit) and per cost evaluation (what budget repair calls ~20 times per candidate).

    python benchmarks/inheritance_paths.py [--depths 20 56 164] [--repeats 5] [--smoke-test]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from casd_ray.models.family import build_model, flops, group_widths, spec_for
from casd_ray.models.resnet import PreActResNet, standard_spec
from casd_ray.models.resnet_family import wiring
from casd_ray.widths import space
from casd_ray.widths.inherit import inherit, kept_indices

HERE = Path(__file__).resolve()


def preact(num_classes: int = 10, depth: int = 20) -> nn.Module:
    block = "bottleneck" if (depth - 2) % 9 == 0 and depth >= 164 else "basic"
    return PreActResNet(standard_spec(depth, block, num_classes=num_classes))


def timed(fn, repeats: int) -> float:
    fn()  # warm caches (structure analysis, allocator)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def compare(depth: int, repeats: int) -> dict:
    block = "bottleneck" if depth >= 164 else "basic"
    hand = standard_spec(depth, block)
    gen = spec_for(f"python:{HERE}:preact", kwargs={"depth": depth})
    teacher = build_model(hand).eval()
    with torch.no_grad():
        for m in teacher.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.2, 1.5)
    wire = wiring(hand)
    to_hand = {g: next(h for h, w in wire.writers.items() if g in w) for g in group_widths(gen)}
    rng = np.random.default_rng(0)
    ratios = {h: float(rng.uniform(0.2, 1.0)) for h in group_widths(hand)}
    hand_student = space.widths_from_ratios(hand, ratios)
    hw = group_widths(hand_student)
    full = group_widths(gen)  # the bottleneck stem is a group here, kept full by the hand path
    gen_student = gen.model_copy(
        update={"widths": {g: hw.get(h, full[g]) for g, h in to_hand.items()}}
    )
    k_hand = kept_indices(teacher, hand, hand_student)
    k_gen = kept_indices(teacher, gen, gen_student)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        a = inherit(teacher, hand, hand_student).eval()(x)
        b = inherit(teacher, gen, gen_student).eval()(x)
    return {
        "depth": depth,
        "groups": len(to_hand),
        "same_kept": all(torch.equal(k_gen[g], k_hand[h]) for g, h in to_hand.items() if h in hw),
        "max_abs_diff": float((a - b).abs().max()),
        "same_flops": flops(gen_student) == flops(hand_student),
        "inherit_hand_s": timed(lambda: inherit(teacher, hand, hand_student), repeats),
        "inherit_gen_s": timed(lambda: inherit(teacher, gen, gen_student), repeats),
        "cost_hand_ms": 1e3 * timed(lambda: flops(hand_student), 20 * repeats),
        "cost_gen_ms": 1e3 * timed(lambda: flops(gen_student), 20 * repeats),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[20, 56, 164])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--smoke-test", action="store_true")
    args = ap.parse_args()
    depths, repeats = ([20], 1) if args.smoke_test else (args.depths, args.repeats)
    torch.set_num_threads(1)
    print(
        "| depth | groups | same kept | max abs diff | same FLOPs | inherit hand | inherit "
        "generic | ratio | cost hand | cost generic |"
    )
    print("|---:|---:|---|---:|---|---:|---:|---:|---:|---:|")
    for depth in depths:
        r = compare(depth, repeats)
        print(
            f"| {r['depth']} | {r['groups']} | {r['same_kept']} | {r['max_abs_diff']:.1e} | "
            f"{r['same_flops']} | {r['inherit_hand_s'] * 1e3:.1f} ms | "
            f"{r['inherit_gen_s'] * 1e3:.1f} ms | {r['inherit_gen_s'] / r['inherit_hand_s']:.1f}× "
            f"| {r['cost_hand_ms']:.3f} ms | {r['cost_gen_ms']:.3f} ms |"
        )


if __name__ == "__main__":
    main()
