"""Load a configured dataset as :class:`~casd_ray.data.splits.DataSplits`.

The one place that decides where data lives (``data.root`` or the dataset's default), which
reader parses it, whether a download is allowed (only here), and how validation is carved
from the training split (seeded by ``data.split_seed``, default the run seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from casd_ray.config import DataConfig
from casd_ray.data import download, readers
from casd_ray.data.imagefolder import load_imagefolder
from casd_ray.data.seeds import seed_words
from casd_ray.data.splits import DataSplits, channel_stats
from casd_ray.errors import DataError


def default_root(dataset: str) -> Path | None:
    """Where a dataset lives when ``data.root`` is not set (None: it must be set)."""
    if dataset == "fashion_mnist":
        if readers.FASHION_MNIST_SYSTEM_ROOT.is_dir():
            return readers.FASHION_MNIST_SYSTEM_ROOT
        return Path("data/fashion-mnist")
    if dataset in ("cifar10", "cifar100"):
        return Path("data")
    return None


def load_dataset(cfg: DataConfig, seed: int) -> DataSplits:
    """Load ``cfg.dataset``, carve validation from train with ``data.split_seed`` (default:
    the run ``seed``), apply subsets."""
    if cfg.dataset == "memory":
        raise DataError(
            "data.dataset: memory is data handed to casd_ray.compress in a Python session; "
            "from a config use cifar10, cifar100, fashion_mnist or imagefolder"
        )
    root = Path(cfg.root).expanduser() if cfg.root else default_root(cfg.dataset)
    if root is None:
        raise DataError(
            f"data.root: required for {cfg.dataset} (a folder with train/<class>/ and "
            "test/<class>/ image folders)"
        )
    if cfg.dataset == "fashion_mnist":
        if cfg.download and readers.fashion_mnist_missing(root):
            download.download_fashion_mnist(root)
        (xtr, ytr), (xte, yte), classes = readers.load_fashion_mnist(root)
        augment = "crop"  # flipping clothes is harmless, but the usual recipe is crop only
    elif cfg.dataset in ("cifar10", "cifar100"):
        if cfg.download and readers.cifar_missing(root, cfg.dataset):
            download.download_cifar(root, cfg.dataset)
        (xtr, ytr), (xte, yte), classes = readers.load_cifar(root, cfg.dataset)
        augment = "flip_crop"
    else:
        (xtr, ytr), (xte, yte), classes = load_imagefolder(root, cfg.image_size)
        augment = "flip_crop"

    if len(classes) < 2:  # accuracy would be 100 % whatever the network (D3)
        where = root / "train" if cfg.dataset == "imagefolder" else root
        raise DataError(
            f"{where}: {len(classes)} class ({', '.join(classes)}); a classifier needs at "
            "least 2 classes (one folder per class)"
        )
    n = len(ytr)
    if cfg.val_size > n - 2:
        raise DataError(
            f"data.val_size: {cfg.val_size} leaves fewer than 2 training examples (the train "
            f"split of {root} has {n}); set data.val_size below {n - 1}"
        )
    # Validation is carved from train only; the test split never takes part in selection.
    split = seed if cfg.split_seed is None else cfg.split_seed
    perm = np.random.default_rng(seed_words(split, 0x5E1)).permutation(n)
    val_idx = np.sort(perm[: cfg.val_size])
    train_idx = perm[cfg.val_size :]
    if cfg.train_subset is not None:  # at most N: a larger value just means all of it
        train_idx = train_idx[: cfg.train_subset]
    train_idx = np.sort(train_idx)
    if len(np.unique(ytr[train_idx])) < 2:
        where = "data.train_subset" if cfg.train_subset is not None else f"data.root {root}"
        raise DataError(
            f"{where}: the {len(train_idx)} training images hold one class; a classifier "
            "needs at least 2 (use more training images)"
        )
    if cfg.test_subset is not None and cfg.test_subset < len(yte):
        test_perm = np.random.default_rng(seed_words(split, 0x7E5)).permutation(len(yte))
        test_idx = np.sort(test_perm[: cfg.test_subset])
        xte, yte = xte[test_idx], yte[test_idx]

    x_train = xtr[train_idx]
    mean, std = channel_stats(x_train)
    return DataSplits(
        name=cfg.dataset,
        classes=classes,
        x_train=x_train,
        y_train=ytr[train_idx],
        x_val=xtr[val_idx],
        y_val=ytr[val_idx],
        # writable copies: idx arrays are views into the decompressed bytes (read-only)
        x_test=np.require(xte, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"]),
        y_test=np.require(yte, np.int64, ["C_CONTIGUOUS", "WRITEABLE"]),
        mean=mean,
        std=std,
        augment=augment,
    )
