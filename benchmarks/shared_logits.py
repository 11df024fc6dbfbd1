"""Shared teacher logits (``search.shared_logits``) vs the teacher in every trial, one run each.

The same search (same seed, searcher, scheduler and genomes) runs twice: with the teacher's
logits computed once for every search epoch and shared through the object store, and with
every trial running the teacher on each batch. Printed: teacher forward passes per search
(images through the teacher), mean trial seconds per epoch, search wall time, the largest
difference in any trial's val_acc (the same logits up to float reduction order, so the same
numbers), and what the cache would cost in memory at larger sizes.

    python benchmarks/shared_logits.py [CONFIG] [--smoke-test] [--set key=value ...]

The default config is ``experiments/quick.yaml`` (Fashion-MNIST, as ``make demo``) with a FIFO
random search, so both runs train exactly the same genomes for the same epochs.
"""

from __future__ import annotations

import time

import pandas as pd
import ray
from common import SMOKE, config_parser, prepare, search, start_ray
from ray.tune import ExperimentAnalysis

from casd_ray.search.storage import SEARCH_DIR


def epoch_seconds(run_dir) -> pd.Series:
    """Per trial: mean seconds per search epoch (training + validation), from Tune's results."""
    frames = ExperimentAnalysis(str(run_dir / SEARCH_DIR)).trial_dataframes.values()
    return pd.Series([df["epoch_seconds"].mean() for df in frames if len(df)])


def main() -> None:
    parser = config_parser(__doc__)
    args = parser.parse_args()
    overrides = [
        "search.algorithm=random",
        "search.scheduler=fifo",
        "search.num_samples=6",
        *args.overrides,
        *(SMOKE if args.smoke_test else []),
    ]
    cfg, data, teacher, out = prepare(args.config, overrides, "casd-logits-")
    start_ray(cfg)
    runs = {}
    try:
        for shared in (False, True):
            s = cfg.search.model_copy(update={"shared_logits": shared})
            run_dir = out / ("shared" if shared else "per-trial")
            t0 = time.time()
            path = search(cfg, data, teacher, s, run_dir, log=print)
            runs[shared] = (pd.read_parquet(path), time.time() - t0, epoch_seconds(run_dir))
    finally:
        ray.shutdown()
    (own, own_wall, own_s), (cached, cached_wall, cached_s) = runs[False], runs[True]
    n = min(len(data.y_train), cfg.search.train_subset or len(data.y_train))
    per_trial_passes = int(own["epochs"].sum()) * n
    shared_passes = cfg.search.max_epochs * n
    merged = own.merge(cached, on="genome", suffixes=("_own", "_shared"))
    diff = (merged["best_val_acc_own"] - merged["best_val_acc_shared"]).abs().max()
    print(f"trials: {len(own)} per-trial / {len(cached)} shared, {len(merged)} same genomes")
    print(
        f"teacher forward passes (images): per-trial {per_trial_passes:,}, "
        f"shared {shared_passes:,} = {shared_passes / per_trial_passes:.2f}x "
        f"({shared_passes / (cfg.search.max_epochs * n):.2f} x epochs x samples)"
    )
    print(
        f"trial seconds per epoch: per-trial {own_s.mean():.2f}, shared {cached_s.mean():.2f} "
        f"-> speed-up {own_s.mean() / cached_s.mean():.2f}x per trial"
    )
    print(
        f"search wall: per-trial {own_wall:.1f}s, shared {cached_wall:.1f}s (incl. computing "
        f"the logits) -> speed-up {own_wall / cached_wall:.2f}x per search"
    )
    print(f"largest |val_acc difference| over trials: {diff:.4f}")
    for what, epochs, images, classes in (
        ("this run", cfg.search.max_epochs, n, teacher.spec.num_classes),
        ("CIFAR-100, 45k images, 20 epochs", 20, 45_000, 100),
        ("ImageNet, 1.28M images, 20 epochs", 20, 1_281_167, 1000),
    ):
        gib = epochs * images * classes * 4 / 2**30
        print(f"cache size, {what}: {gib:.3f} GiB float32 ({gib / 2:.3f} GiB as float16)")


if __name__ == "__main__":
    main()
