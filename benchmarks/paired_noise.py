"""Paired vs unpaired standard error of the accuracy difference of two finished networks.

Two networks pruned from one teacher mostly err on the same images, so the standard error of
their accuracy difference on one split is far below the binomial bound the report used before
it kept per-image results. This evaluates any two exported networks (a run's ``winner/`` and
``uniform/``, or a ``compare`` arm such as ``arms/global``) on the first run's validation and
test images and prints, per split: both accuracies, the difference, its paired standard error
beside the unpaired bound, and McNemar's exact test on the images only one got right. Run
folders from before per-image results were stored get the paired figures this way.

    python benchmarks/paired_noise.py runs/c10obs03-s1 [runs/c10cmp03-s1/arms/global]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from casd_ray.api import load_compressed
from casd_ray.config_file import load_config
from casd_ray.report.stats import binomial_se, paired_difference
from casd_ray.stream.load import load_data
from casd_ray.train.loop import evaluate_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder: its config gives the data")
    parser.add_argument("other", type=Path, nargs="?", help="default: RUN/uniform")
    parser.add_argument("--first", default="winner", help="the part of RUN to compare")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.run / "config.yaml")
    data = load_data(cfg.data, cfg.seed)
    folders = {"first": args.run / args.first, "second": args.other or args.run / "uniform"}
    scores = {
        k: evaluate_splits(
            load_compressed(f), data, torch.device("cpu"), batch_size=500, per_image=True
        )  # fmt: skip
        for k, f in folders.items()
    }
    print(f"{folders['first']} - {folders['second']}")
    for split in ("val", "test"):
        a, b = scores["first"][f"{split}_correct"], scores["second"][f"{split}_correct"]
        pair = paired_difference(a, b)
        print(
            f"  {split:4s} {len(a):6d} images: {100 * a.mean():.2f} - {100 * b.mean():.2f} = "
            f"{100 * pair['difference']:+.2f} points, paired SE {100 * pair['se_paired']:.2f} "
            f"(unpaired bound {100 * binomial_se(len(a), a.mean(), b.mean()):.2f}); only first "
            f"right {pair['only_first_right']}, only second {pair['only_second_right']}, "
            f"McNemar p {pair['mcnemar_p']:.2g}"
        )


if __name__ == "__main__":
    main()
