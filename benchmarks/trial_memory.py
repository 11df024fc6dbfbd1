"""Per-trial memory with 1, 2 and 4 concurrent trials: data and teacher are not copied.

The search puts the data arrays and the teacher weights into the Ray object store once
(``tune.with_parameters``) as numpy arrays, which every trial on the node maps read-only
(zero-copy). So a trial's *private* memory (USS) must not grow by the dataset size, however
many trials run. As a control, the same data is passed as torch tensors, which Ray
deserialises into a private copy in every trial: there USS grows by the dataset size.

Each trial runs the real ``casd_ray.search.trial.distill_trial`` for one epoch on a ~60 MB
synthetic CIFAR-sized dataset and measures its own process (/proc/self/smaps_rollup) at
its first report: RSS (includes the shared object-store pages it touched), USS (private
pages only) and PSS.

A third mode adds the search's shared teacher-logit cache (``search.shared_logits``): a
``[epochs, images, classes]`` array in the object store like the data, here CIFAR-100-shaped
(100 classes, 8 epochs: 64 MB for 20k images in float32). Its values are random: this measures
how the cache reaches a trial, not distillation. A trial converts one epoch's slice to a
tensor at a time, so its USS may grow by about one slice (1/8 of the cache), not the cache.

    python benchmarks/trial_memory.py [--images 20000] [--smoke-test]
"""

from __future__ import annotations

import argparse
import os
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
from casd_ray.search.trial_plan import TrialPlan, trial_plan

MB = 2**20
CLASSES, EPOCHS = 100, 8  # CIFAR-100-shaped logit cache of an 8-epoch search
MODES = ("numpy", "torch", "logits")  # logits: numpy data plus the shared logit cache


def memory_mb() -> dict[str, float]:
    """RSS, PSS and USS (private clean + dirty) of this process, from /proc (Linux)."""
    kb: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        lines = f.read().splitlines()[1:]
    for line in lines:
        key, value = line.split(":", 1)
        kb[key] = int(value.split()[0])
    uss = kb["Private_Clean"] + kb["Private_Dirty"]
    return {"rss_mb": kb["Rss"] / 1024, "pss_mb": kb["Pss"] / 1024, "uss_mb": uss / 1024}


def synthetic(n: int, n_val: int, size: int = 32) -> DataSplits:
    rng = np.random.default_rng(0)

    def split(k: int) -> tuple[np.ndarray, np.ndarray]:
        x = rng.integers(0, 256, (k, 3, size, size), dtype=np.uint8)
        return x, rng.integers(0, 10, k).astype(np.int64)

    (xtr, ytr), (xv, yv), (xte, yte) = split(n), split(n_val), split(2)
    stats = (0.5, 0.5, 0.5), (0.29, 0.29, 0.29)
    classes = [str(i) for i in range(10)]
    return DataSplits("synthetic", classes, xtr, ytr, xv, yv, xte, yte, *stats, "flip_crop")


def memory_trial(
    config: dict, *, data: dict, teacher_state, teacher_spec_json, plan: TrialPlan, teacher_logits
) -> None:
    """distill_trial with a ``report`` that adds this process's memory figures."""
    if config["mode"] == "torch":  # control: tensors come out of the store as private copies
        data = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    genome = {k: v for k, v in config.items() if k != "mode"}

    def report(metrics: dict, *, checkpoint=None) -> None:
        metrics = {**metrics, **memory_mb(), "pid": os.getpid()}
        tune.report(metrics, checkpoint=checkpoint)

    distill_trial(
        genome,
        data=data,
        teacher_state=teacher_state,
        teacher_spec_json=teacher_spec_json,
        plan=plan,
        teacher_logits=teacher_logits,
        report=report,
    )


def run(
    mode: str, concurrent: int, data: dict, teacher_state, spec, cfg, storage: str, logits
) -> list:
    if mode == "torch":
        data = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}
    trainable = tune.with_resources(
        tune.with_parameters(
            memory_trial,
            data=data,
            teacher_state=teacher_state,
            teacher_spec_json=spec.to_json(),
            plan=trial_plan(cfg.space, cfg.distill, cfg.search, cfg.seed),
            teacher_logits=logits if mode == "logits" else None,
        ),
        {"cpu": 1},
    )
    genome = {"stage0": 0.5, "stage1": 0.5, "stage2": 0.5, "mode": mode}
    tuner = tune.Tuner(
        trainable,
        param_space=genome,
        tune_config=tune.TuneConfig(num_samples=concurrent, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(
            name=f"{mode}-{concurrent}",
            storage_path=storage,
            stop={"training_iteration": 1},  # measured at the first report
            verbose=0,
        ),
    )
    results = tuner.fit()
    errors = [r.error for r in results if r.error]
    if errors:
        raise RuntimeError(errors[0])
    return [r.metrics for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--smoke-test", action="store_true", help="tiny data, 1 and 2 trials")
    args = parser.parse_args()
    n = 1000 if args.smoke_test else args.images
    levels = (1, 2) if args.smoke_test else (1, 2, 4)

    packed = pack_data(synthetic(n, max(200, n // 20)))
    spec = spec_for("resnet8", 3, CLASSES, (32, 32), width=4)
    torch.manual_seed(0)
    teacher_state = pack_teacher(build_model(spec))
    cfg = ExperimentConfig.model_validate(
        {
            "model": {"arch": "resnet8", "width": 4},
            "search": {"max_epochs": EPOCHS, "batch_size": 256, "cpus_per_trial": 1},
        }
    )
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((EPOCHS, len(packed["y_train"]), CLASSES), dtype=np.float32)
    data_mb = sum(v.nbytes for v in packed.values() if isinstance(v, np.ndarray)) / MB
    teacher_mb = sum(v.nbytes for v in teacher_state.values()) / MB
    storage = f"/tmp/casd-trial-memory-{os.getpid()}"
    ray.init(address="local", num_cpus=max(levels), include_dashboard=False, logging_level="ERROR")
    rows = []
    try:
        for mode in MODES:
            for k in levels:
                t0 = time.perf_counter()
                for m in run(mode, k, packed, teacher_state, spec, cfg, storage, logits):
                    rows.append((mode, k, m))
                print(f"# {mode} x{k}: {time.perf_counter() - t0:.1f}s", flush=True)
    finally:
        ray.shutdown()

    logits_mb = logits.nbytes / MB
    print(
        f"\ndata in the object store: {data_mb:.1f} MB; teacher weights: {teacher_mb:.3f} MB; "
        f"logit cache (mode logits): {logits_mb:.1f} MB"
    )
    print("store   trials  RSS MB/trial  USS MB/trial  PSS MB/trial  USS MB all trials")
    uss_of = {}
    for mode in MODES:
        for k in levels:
            ms = [m for md, kk, m in rows if md == mode and kk == k]
            rss, uss, pss = (
                float(np.mean([m[c] for m in ms])) for c in ("rss_mb", "uss_mb", "pss_mb")
            )
            uss_of[mode, k] = uss
            total = sum(m["uss_mb"] for m in ms)
            print(f"{mode:6s}  {k:6d}  {rss:12.1f}  {uss:12.1f}  {pss:12.1f}  {total:17.1f}")
    spread = max(uss_of["numpy", k] for k in levels) - min(uss_of["numpy", k] for k in levels)
    extra = float(np.mean([uss_of["torch", k] - uss_of["numpy", k] for k in levels]))
    print(
        f"\nnumpy (the search's way): per-trial USS varies by {spread:.1f} MB from 1 to "
        f"{max(levels)} trials; torch tensors instead cost {extra:.1f} MB more per trial "
        f"(the data is {data_mb:.1f} MB): numpy data is "
        f"{'shared, not copied' if extra > 0.5 * data_mb and spread < 0.5 * data_mb else 'COPIED?'}"
    )
    cache = float(np.mean([uss_of["logits", k] - uss_of["numpy", k] for k in levels]))
    print(
        f"with the logit cache ({logits_mb:.1f} MB, one epoch's slice {logits_mb / EPOCHS:.1f} "
        f"MB) a trial's USS is {cache:+.1f} MB: the cache is "
        f"{'shared, not copied' if cache < 0.5 * logits_mb else 'COPIED?'}"
    )


if __name__ == "__main__":
    main()
