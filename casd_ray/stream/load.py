"""A packed shard folder (``data.dataset: shards``) as ``DataSplits``: streamed or in memory.

The choice is by size (``data.stream: auto`` streams a training split whose decoded arrays
exceed ``data.memory_limit_gb``) or forced. Either way selection never sees the test split,
and validation is carved from train with ``data.split_seed``: whole shards drawn in a seeded
order, cut at ``val_size`` rows, so carving reads ``val_size`` images, not the dataset (the
pack's shuffle already mixed every shard); ``train_subset`` likewise keeps whole shards.
Validation is always decoded into memory: every trial reads it every epoch. Normalisation
comes from the pack's pixel sums of the whole training split (a pass would cost an epoch).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from casd_ray.config import DataConfig
from casd_ray.data.load import load_dataset
from casd_ray.data.seeds import seed_words
from casd_ray.data.splits import DataSplits
from casd_ray.errors import DataError
from casd_ray.stream.images import StreamedImages, split_stream
from casd_ray.stream.shards import Manifest, read_manifest, shard_spans


def should_stream(cfg: DataConfig, m: Manifest) -> bool:
    """Stream the shards, or decode them into memory (``data.stream``; auto: by size)."""
    if cfg.stream != "auto":
        return cfg.stream == "stream"
    decoded = m.rows("train") * int(np.prod(m.shape))
    return decoded > cfg.memory_limit_gb * 2**30


def _rows_of(m: Manifest, split: str) -> list[np.ndarray]:
    return [np.arange(lo, hi) for lo, hi in shard_spans(m, split)]


def _masks(cfg: DataConfig, m: Manifest, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(validation mask, training mask) over the training split's rows."""
    n = m.rows("train")
    if cfg.val_size > n - 2:
        raise DataError(
            f"data.val_size: {cfg.val_size} leaves fewer than 2 training examples (the train "
            f"split of {m.root} has {n}); set data.val_size below {n - 1}"
        )
    split = seed if cfg.split_seed is None else cfg.split_seed
    rows = _rows_of(m, "train")
    order = np.random.default_rng(seed_words(split, 0x5E1)).permutation(len(rows))
    val_rows = np.concatenate([rows[i] for i in order])[: cfg.val_size]
    val = np.zeros(n, bool)
    val[val_rows] = True
    return val, ~val


def to_memory(s: StreamedImages) -> tuple[np.ndarray, np.ndarray]:
    """A stream decoded whole into arrays (file order)."""
    parts = list(s.windows(s.window))
    if not parts:
        c, h, w = s.image_shape
        return np.zeros((0, c, h, w), np.uint8), np.zeros(0, np.int64)
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def load_data(cfg: DataConfig, seed: int) -> DataSplits:
    """Any configured dataset: packed shards here, the others by :mod:`casd_ray.data.load`."""
    return load_shards(cfg, seed) if cfg.dataset == "shards" else load_dataset(cfg, seed)


def load_shards(cfg: DataConfig, seed: int) -> DataSplits:
    """``data.root``'s shards as DataSplits; train (and test) streamed or decoded to memory."""
    if not cfg.root:
        raise DataError("data.root: required for shards (a folder or s3:// URI from data pack)")
    m = read_manifest(cfg.root)
    settings = {"window": cfg.window, "decode": cfg.decode, "data_cpus": cfg.data_cpus}
    val_mask, train_mask = _masks(cfg, m, seed)
    # validation is read with the in-trial decoder: it is small, and read before any trial
    x_val, y_val = to_memory(split_stream(m, "train", val_mask, window=cfg.window))
    test_mask = None
    if cfg.test_subset is not None and cfg.test_subset < m.rows("test"):
        split = seed if cfg.split_seed is None else cfg.split_seed
        test_mask = np.zeros(m.rows("test"), bool)
        pick = np.random.default_rng(seed_words(split, 0x7E5)).permutation(len(test_mask))
        test_mask[pick[: cfg.test_subset]] = True
    train = split_stream(m, "train", train_mask, **settings)
    if cfg.train_subset is not None and cfg.train_subset < len(train):  # whole shards
        split = seed if cfg.split_seed is None else cfg.split_seed
        train = train.subset(cfg.train_subset, int(seed_words(split, 0x5B5).generate_state(1)[0]))
    test = split_stream(m, "test", test_mask, **settings)
    if should_stream(cfg, m):
        (x_train, y_train), (x_test, y_test) = (train, train.labels), (test, test.labels)
    else:
        memory = {**settings, "decode": "trial"}
        x_train, y_train = to_memory(replace(train, **memory))
        x_test, y_test = to_memory(split_stream(m, "test", test_mask, **memory))
    mean, std = m.stats("train")
    return DataSplits(
        name="shards", classes=m.classes, x_train=x_train, y_train=y_train, x_val=x_val,
        y_val=y_val, x_test=x_test, y_test=y_test, mean=mean, std=std, augment="flip_crop",
    )  # fmt: skip
