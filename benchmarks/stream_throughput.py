"""CIFAR-10 training throughput streamed from shards vs in memory, and decode cost per image.

One run packs the CIFAR-10 JPEG image folder (``/work/shared/data/cifar10-jpeg.tar.gz``, see
its README) into Parquet shards, then trains the same network for one epoch on the same
``train_subset`` images, alternating the arms in rounds (each round starting one arm later)
so the machine's load hits them alike:

- memory: the shards decoded once into uint8 arrays (today's path);
- stream/trial: shards read with pyarrow and decoded in the training process, window by window;
- stream/ray_data: shards read and decoded by Ray Data tasks (``data.data_cpus`` of them);
- stream/webdataset: the same images packed as WebDataset tars, read in the trial.

Printed: images/s of each arm, its ratio to memory within each round and the median of those
(the goal is >= 0.9), the pack time, and the read and decode cost per image of both shard
formats (PIL, one process).

    python benchmarks/stream_throughput.py [--images 10000] [--rounds 4] [--smoke-test]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import ray
import torch

from casd_ray.config import DataConfig, ModelConfig
from casd_ray.data.batches import to_tensors
from casd_ray.models.family import build_model
from casd_ray.pipeline.stages.teacher import teacher_spec
from casd_ray.stream.decode import decode_one, decode_table
from casd_ray.stream.load import load_data
from casd_ray.stream.pack import pack
from casd_ray.stream.shards import filesystem, open_shard, read_manifest, shard_path
from casd_ray.train.loop import train_one_epoch
from casd_ray.train.recipe import make_optimizer

ARCHIVE = Path("/work/shared/data/cifar10-jpeg.tar.gz")


def decode_cost(root: str) -> tuple[float, float]:
    """(read, read + decode) microseconds per image, over the first training shard."""
    m = read_manifest(root)
    fs, _ = filesystem(root)
    path = shard_path(root, m.shards("train")[0]["file"])
    t0 = time.perf_counter()
    table = open_shard(fs, path)
    t1 = time.perf_counter()
    decode_table(table, None, m.shape, m.image_size, path)
    t2 = time.perf_counter()
    n = table.num_rows
    return (t1 - t0) / n * 1e6, (t2 - t0) / n * 1e6


def imagenet_like_decode_ms(repeats: int = 50) -> tuple[float, int]:
    """(ms per image, JPEG bytes) to decode a 500x375 JPEG (ImageNet's typical size) and fit
    it to 224 (shorter side, centre crop): the per-image cost an ImageNet stream pays."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)  # smooth: a photo-like size
    img = Image.fromarray(small).resize((500, 375), Image.BICUBIC)
    noisy = np.clip(np.asarray(img, np.int16) + rng.integers(-20, 21, (375, 500, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(noisy.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    t0 = time.perf_counter()
    for _ in range(repeats):
        decode_one(data, "RGB", (224, 224), 224, "bench")
    return (time.perf_counter() - t0) / repeats * 1e3, len(data)


def epoch_rate(data, model0, batch_size: int) -> float:
    """Training images per second of one epoch of ``model0`` (a fresh copy) on ``data``."""
    model = copy.deepcopy(model0)
    opt = make_optimizer(model, lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = to_tensors(data.x_train, data.y_train, "cpu")
    out = train_one_epoch(model, x, y, optimizer=opt, scheduler=None,
                          batching=data.batching(batch_size, 0), epoch=0)  # fmt: skip
    return out["images_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archive", type=Path, default=ARCHIVE)
    parser.add_argument("--images", type=int, default=10000, help="training images per epoch")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke-test", action="store_true", help="1,000 images, one round")
    args = parser.parse_args()
    if args.smoke_test:
        args.images, args.rounds, args.width = 1000, 1, 8
    if not args.archive.is_file():
        raise SystemExit(f"{args.archive}: not here (see /work/shared/data/README.md)")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="stream-bench-") as tmp:
        src, dst = Path(tmp) / "cifar10", Path(tmp) / "shards"
        t0 = time.perf_counter()
        with tarfile.open(args.archive) as tar:
            tar.extractall(src, filter="data")
        roots = [p for p in src.rglob("train") if p.is_dir()]
        t1 = time.perf_counter()
        print(f"extract {t1 - t0:.1f}s")
        tars = Path(tmp) / "tars"
        for fmt, folder in (("parquet", dst), ("webdataset", tars)):
            t1 = time.perf_counter()
            out = pack(roots[0].parent, folder, shard_rows=2048, shard_format=fmt,
                       log=lambda _: None)  # fmt: skip
            pack_s = time.perf_counter() - t1
            n = sum(sum(c.values()) for c in out["counts"].values())
            read_us, decode_us = decode_cost(str(folder))
            print(f"{fmt}: pack {n} images {pack_s:.1f}s ({pack_s / n * 1e6:.0f} us/image, "
                  f"decode-checked); per image read {read_us:.1f} us, read + decode "
                  f"{decode_us:.1f} us (one process)")  # fmt: skip
        ms, size = imagenet_like_decode_ms()
        print(f"ImageNet-like 500x375 JPEG ({size / 1024:.0f} KiB) -> 224: {ms:.2f} ms/image")

        base = {"dataset": "shards", "root": str(dst), "val_size": 1000,
                "train_subset": args.images, "window": args.window}  # fmt: skip
        arms = {
            "memory": load_data(DataConfig(**base, stream="memory"), 0),
            "stream/trial": load_data(DataConfig(**base, stream="stream"), 0),
            "stream/ray_data": load_data(DataConfig(**base, stream="stream", decode="ray_data"), 0),
            "stream/webdataset": load_data(
                DataConfig(**{**base, "root": str(tars)}, stream="stream"), 0
            ),
        }
        spec = teacher_spec(ModelConfig(arch=args.arch, width=args.width), arms["memory"])
        torch.manual_seed(0)
        model = build_model(spec)
        ray.init(address="local", num_cpus=args.threads, include_dashboard=False,
                 logging_level="ERROR")  # fmt: skip
        try:
            epoch_rate(arms["memory"], model, args.batch_size)  # warm-up, untimed: the first
            # epoch of a process pays one-off costs that would land on whichever arm ran first
            rates: dict[str, list[float]] = {k: [] for k in arms}
            names = list(arms)
            for r in range(args.rounds):
                # Each round starts one arm later, so no arm always runs first or last (a
                # machine that warms or drifts within a round would favour one position).
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    data = arms[name]
                    rates[name].append(epoch_rate(data, model, args.batch_size))
                    print(f"round {r + 1} {name}: {rates[name][-1]:.0f} img/s")
        finally:
            ray.shutdown()
    # Ratios within a round (the arms ran back to back, under like load), then their median:
    # a best round per arm can pair a quiet moment with a busy one on a shared machine.
    print(f"\n{args.arch} width {args.width}, {args.images} images, batch {args.batch_size}, "
          f"{args.threads} threads, window {args.window}:")  # fmt: skip
    for name, rs in rates.items():
        ratios = [r / m for r, m in zip(rs, rates["memory"], strict=True)]
        shown = " ".join(f"{r:.2f}" for r in ratios)
        print(
            f"  {name:18s} best {max(rs):7.0f} img/s  ratio to memory per round {shown}, "
            f"median {statistics.median(ratios):.2f}"
        )


if __name__ == "__main__":
    main()
