"""Rung 0 through Ray Tune vs the same scoring in a bare loop: candidates per second.

Rung 0 scores a candidate in seconds (inherit, a few distillation steps, adaptive BN, a KD
score on a validation subset; ``casd_ray.search.screening``), so Tune's per-trial cost (start
or reuse an actor, fetch the arguments, report, stop the trial, schedule the next) matters
more than for a distillation epoch. Both arms run the real ``distill_trial`` on the same
candidates, plan, data, shared teacher logits and thread count, one candidate at a time:

- bare: called in this process; its ``report`` stops it after the rung-0 report;
- tune: one Tune search of the same candidates (``reuse_actors=True``, one slot), each trial
  stopped after its first report (rung 0), as the scheduler stops unpromoted candidates.

Printed: candidates per second in each arm, their ratio and Tune's share of the wall time
(the issue's bar: at most 10 %). Bare runs before and after the Tune run (the machine's speed
drifts); the faster is the baseline. Data are synthetic CIFAR-sized images: the score's value
does not matter here, only its cost.

    python benchmarks/rung0_throughput.py [--candidates 40] [--steps 100] [--smoke-test]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import numpy as np
import ray
import torch
from ray import tune
from trial_overhead import synthetic

from casd_ray.config import ExperimentConfig
from casd_ray.data.batches import to_tensors
from casd_ray.models.family import build_model, spec_for
from casd_ray.search.packing import batching_of, pack_data, pack_teacher
from casd_ray.search.trial import distill_trial
from casd_ray.search.trial_plan import pack_logits, trial_plan
from casd_ray.widths import space


class _Rung0Done(Exception):
    """Raised by the bare arm's report after rung 0 (where the scheduler would stop it)."""


def val_logits(packed: dict, teacher: torch.nn.Module, n: int, seed: int) -> np.ndarray:
    """The teacher's logits on rung 0's validation subset, as the search computes them."""
    batching = batching_of(packed, 1024, seed)
    x, y = to_tensors(packed["x_val"][:n], packed["y_val"][:n], "cpu")
    with torch.no_grad():
        return torch.cat(
            [teacher.eval()(xb).float() for xb, _ in batching.evaluation(x, y)]
        ).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=40)
    parser.add_argument("--steps", type=int, default=100, help="rung-0 distillation steps")
    parser.add_argument("--images", type=int, default=10000, help="search proxy images")
    parser.add_argument("--val-images", type=int, default=2000)
    parser.add_argument("--target", type=float, default=0.3, help="FLOPs budget")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes")
    args = parser.parse_args()
    if args.smoke_test:
        args.candidates, args.steps, args.images, args.val_images = 4, 4, 512, 256

    cfg = ExperimentConfig.model_validate(
        {
            "model": {"arch": "resnet20", "width": 16},
            "space": {"budget": {"target": args.target}},
            "search": {
                "max_epochs": 1,
                "batch_size": 128,
                "cpus_per_trial": 1,
                "screen": {
                    "promote": 1,
                    "steps": args.steps,
                    "score": "kd",
                    "val_images": args.val_images,
                    "bn_batches": 20,
                },  # fmt: skip
            },
        }
    )
    plan = trial_plan(cfg.space, cfg.distill, cfg.search, cfg.seed)
    data = pack_data(synthetic(args.images, args.val_images))
    spec = spec_for("resnet20", 3, 10, (32, 32), width=16)
    torch.manual_seed(0)
    teacher = build_model(spec)
    torch.set_num_threads(1)
    kwargs = dict(
        data=data,
        teacher_state=pack_teacher(teacher),
        teacher_spec_json=spec.to_json(),
        plan=plan,
        teacher_logits=pack_logits(data, teacher, plan),
        val_logits=val_logits(data, teacher, args.val_images, cfg.seed),
    )
    rules = space.rules_of(cfg.space, "random")
    bounds = space.search_bounds(rules, spec)
    rng = np.random.default_rng(0)
    genomes = [
        {g: float(rng.uniform(lo, hi)) for g, (lo, hi) in bounds.items()}
        for _ in range(args.candidates)
    ]

    def report(metrics: dict, checkpoint: object = None) -> None:
        raise _Rung0Done

    def run_bare() -> float:
        t0 = time.perf_counter()
        for g in genomes:
            with contextlib.suppress(_Rung0Done):
                distill_trial(g, **kwargs, report=report)
        return time.perf_counter() - t0

    bare_before = run_bare()
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    init_s = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory(prefix="casd-rung0-") as storage:
            t0 = time.perf_counter()
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(distill_trial, **kwargs), {"cpu": 1}),
                param_space={g: tune.uniform(lo, hi) for g, (lo, hi) in bounds.items()},
                tune_config=tune.TuneConfig(
                    num_samples=len(genomes),  # all of them the points below
                    search_alg=tune.search.BasicVariantGenerator(points_to_evaluate=genomes),
                    max_concurrent_trials=1,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name="rung0",
                    storage_path=storage,
                    verbose=0,
                    stop={"training_iteration": 1},
                ),  # fmt: skip
            )
            results = tuner.fit()
            tune_s = time.perf_counter() - t0
            errors = [r.error for r in results if r.error]
            if errors or len(results) != len(genomes):
                raise RuntimeError(f"{len(results)} trials, errors: {errors[:1]}")
    finally:
        ray.shutdown()
    bare_after = run_bare()
    bare_s = min(bare_before, bare_after)

    n = len(genomes)
    print(
        f"resnet20 width 16, FLOPs {args.target}, {n} candidates, rung 0 = {args.steps} KD "
        f"steps + 20 BN batches + KD score on {args.val_images} images, 1 thread, pid "
        f"{os.getpid()}"
    )
    print(
        f"bare  {bare_s:8.2f} s  {n / bare_s:6.3f} candidates/s  (before {bare_before:.2f}, "
        f"after {bare_after:.2f})"
    )
    print(f"tune  {tune_s:8.2f} s  {n / tune_s:6.3f} candidates/s")
    print(f"bare / tune throughput ratio {bare_s / tune_s:.3f}; Tune's share of the wall time "
          f"{1 - bare_s / tune_s:.1%}; ray.init {init_s:.1f} s once per search")  # fmt: skip


if __name__ == "__main__":
    main()
