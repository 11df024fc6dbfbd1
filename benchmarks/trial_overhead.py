"""Ray's overhead on a search trial: the same distillation epochs bare vs inside Tune.

Both runs call the real ``casd_ray.search.trial.distill_trial`` with the same genome, data,
teacher, epochs and thread count. "bare" calls it in this process with a ``report`` that
only records; "ray" runs it as a one-trial Tune search (object store, actor, per-epoch
checkpoint persisted to Tune's storage). Printed: the per-epoch compute time ratio (what a
trial's training loses inside a Ray worker) and the end-to-end ratio (plus actor start,
result and checkpoint handling; ``ray.init`` itself is timed separately, once per search).

    python benchmarks/trial_overhead.py [--images 4000] [--epochs 3] [--smoke-test]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import ray
import torch
from ray import tune

from casd_ray.config import ExperimentConfig
from casd_ray.data.splits import DataSplits
from casd_ray.models.family import build_model, spec_for
from casd_ray.search.packing import pack_data, pack_teacher
from casd_ray.search.trial import distill_trial
from casd_ray.search.trial_plan import trial_plan


def synthetic(n: int, n_val: int) -> DataSplits:
    rng = np.random.default_rng(0)

    def split(k: int) -> tuple[np.ndarray, np.ndarray]:
        return rng.integers(0, 256, (k, 3, 32, 32), dtype=np.uint8), rng.integers(0, 10, k)

    (xtr, ytr), (xv, yv), (xte, yte) = split(n), split(n_val), split(2)
    stats = (0.5, 0.5, 0.5), (0.29, 0.29, 0.29)
    return DataSplits(
        "synthetic", [str(i) for i in range(10)], xtr, ytr, xv, yv, xte, yte, *stats, "flip_crop"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, 1 epoch")
    args = parser.parse_args()
    if args.smoke_test:
        args.images, args.epochs = 256, 1

    data = pack_data(synthetic(args.images, max(200, args.images // 10)))
    spec = spec_for(args.arch, 3, 10, (32, 32), width=args.width)
    torch.manual_seed(0)
    teacher_state = pack_teacher(build_model(spec))
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"arch": args.arch, "width": args.width},
            "search": {
                "max_epochs": args.epochs,
                "batch_size": 128,
                "cpus_per_trial": args.threads,
            },
        }
    )
    genome = {"stage0": 0.7, "stage1": 0.5, "stage2": 0.6}
    kwargs = dict(
        data=data,
        teacher_state=teacher_state,
        teacher_spec_json=spec.to_json(),
        plan=trial_plan(cfg.space, cfg.distill, cfg.search, cfg.seed),
    )

    def run_bare() -> tuple[list[dict], float]:
        out: list[dict] = []
        t0 = time.perf_counter()
        distill_trial(genome, **kwargs, report=lambda m, checkpoint=None: out.append(m))
        return out, time.perf_counter() - t0

    # bare runs before and after the Ray run: on a shared machine the load drifts, and the
    # faster of the two is the fair baseline
    bare_before, total_before = run_bare()

    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=args.threads, include_dashboard=False, logging_level="ERROR")
    init_s = time.perf_counter() - t0
    try:
        with tempfile.TemporaryDirectory(prefix="casd-overhead-") as storage:
            t0 = time.perf_counter()
            tuner = tune.Tuner(
                tune.with_resources(
                    tune.with_parameters(distill_trial, **kwargs), {"cpu": args.threads}
                ),
                param_space=genome,
                tune_config=tune.TuneConfig(num_samples=1),
                run_config=tune.RunConfig(name="overhead", storage_path=storage, verbose=0),
            )
            result = tuner.fit()[0]
            ray_total = time.perf_counter() - t0
            if result.error:
                raise RuntimeError(result.error)
            in_ray = result.metrics_dataframe
    finally:
        ray.shutdown()

    bare_after, total_after = run_bare()
    bare = bare_before
    bare_total = min(total_before, total_after)
    bare_epochs = [
        min(a["epoch_seconds"], b["epoch_seconds"])
        for a, b in zip(bare_before, bare_after, strict=True)
    ]
    # Tune adds a final "done" row repeating the last report: one row per epoch
    in_ray = in_ray.dropna(subset=["epoch"]).drop_duplicates(subset="epoch", keep="first")
    ray_epochs = list(in_ray["epoch_seconds"])
    print(
        f"{args.arch} width {args.width}, {args.images} images 32x32, {args.epochs} epochs, "
        f"{args.threads} thread(s), pid {os.getpid()}"
    )
    print("(bare = the faster of a run before and a run after the Ray run)")
    print("                 bare      ray    ratio")
    for i, (b, r) in enumerate(zip(bare_epochs, ray_epochs, strict=True), start=1):
        print(f"epoch {i} s    {b:8.2f} {r:8.2f} {r / b:8.3f}")
    b, r = sum(bare_epochs), sum(ray_epochs)
    print(f"epochs sum s  {b:8.2f} {r:8.2f} {r / b:8.3f}")
    print(f"end to end s  {bare_total:8.2f} {ray_total:8.2f} {ray_total / bare_total:8.3f}")
    print(f"ray.init s             {init_s:8.2f}  (once per search)")
    print(f"final val_acc {bare[-1]['val_acc']:8.4f} {float(in_ray['val_acc'].iloc[-1]):8.4f}")


if __name__ == "__main__":
    main()
