"""A user's own data as :class:`~casd_ray.data.splits.DataSplits`: torch datasets, loaders,
arrays or image folders, for the Python API (:func:`casd_ray.compress`).

Each split is read once into arrays that then travel to every trial through the object store,
like the built-in datasets. Images may be

- uint8 (``TensorDataset`` of raw pixels, image folders): normalised with the training
  split's per-channel statistics, as the built-in datasets are;
- float: used exactly as given (the user's own normalisation, the one their model was trained
  with), so mean 0 and std 1 are recorded.

Random augmentation belongs to casd-ray's seeded batches (``augment``), not to the dataset: a
dataset with random transforms would be read once, frozen in one random draw.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from casd_ray.data.imagefolder import read_split, visible_dir
from casd_ray.data.splits import DataSplits, channel_stats
from casd_ray.errors import DataError

AUGMENTS = ("flip_crop", "crop", "none")


def _arrays(source: Any, what: str) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """(images NCHW, int64 labels, class names if the source names them)."""
    if isinstance(source, str | Path):
        root = Path(source)
        if not root.is_dir():
            raise DataError(f"{what}: {root} is not a folder of class folders (<class>/*.png)")
        classes = sorted(p.name for p in root.iterdir() if visible_dir(p))
        if not classes:
            raise DataError(f"{what}: {root} has no class folders (<class>/*.png|jpg)")
        x, y = read_split(root, classes, image_size=None, hint="expected <class>/*.png|jpg")
        return x, y, classes
    if isinstance(source, tuple) and len(source) == 2:
        x, y = (np.asarray(v.numpy() if isinstance(v, torch.Tensor) else v) for v in source)
        return x, y.astype(np.int64), None
    if isinstance(source, DataLoader | Dataset):
        loader = source if isinstance(source, DataLoader) else DataLoader(source, batch_size=256)
        xs, ys = [], []
        try:
            for batch in loader:
                if not isinstance(batch, list | tuple) or len(batch) < 2:
                    raise DataError(f"{what}: each item must be (image, label)")
                xs.append(torch.as_tensor(batch[0]).cpu())
                ys.append(torch.as_tensor(batch[1]).cpu())
        except DataError:
            raise
        except Exception as err:  # noqa: BLE001 - a user's dataset can raise anything
            raise DataError(f"{what}: reading it failed ({type(err).__name__}: {err})") from None
        if not xs:
            raise DataError(f"{what}: the dataset is empty")
        x, y = torch.cat(xs).numpy(), torch.cat(ys).numpy()
        names = getattr(source if isinstance(source, Dataset) else loader.dataset, "classes", None)
        return x, y.astype(np.int64), list(map(str, names)) if names is not None else None
    raise DataError(
        f"{what}: expected a torch Dataset, a DataLoader, an (images, labels) pair or an image "
        f"folder path, got {type(source).__name__}"
    )


def _check(x: np.ndarray, y: np.ndarray, what: str) -> np.ndarray:
    if x.ndim != 4:
        raise DataError(f"{what}: images must be (N, C, H, W), got shape {tuple(x.shape)}")
    if len(x) != len(y) or y.ndim != 1:
        raise DataError(f"{what}: {len(x)} images but labels of shape {tuple(y.shape)}")
    if len(y) and y.min() < 0:
        raise DataError(f"{what}: negative label {int(y.min())}")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"{what}: images must be uint8 or float, got {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def from_user(
    train: Any,
    val: Any,
    test: Any = None,
    *,
    augment: str = "none",
    classes: list[str] | None = None,
) -> DataSplits:
    """DataSplits from the user's train/val (and optional test) data; see the module doc."""
    if augment not in AUGMENTS:
        raise DataError(f"augment: {augment!r} is not one of {AUGMENTS}")
    parts = {}
    names = classes
    for what, source in (("train", train), ("val", val), ("test", test)):
        if source is None:
            continue
        x, y, found = _arrays(source, what)
        parts[what] = (_check(x, y, what), y)
        names = names or found
    shapes = {what: x.shape[1:] for what, (x, _) in parts.items()}
    if len(set(shapes.values())) > 1:
        raise DataError(f"val/test: image shapes differ between splits: {shapes}")
    kinds = {what: x.dtype for what, (x, _) in parts.items()}
    if len(set(kinds.values())) > 1:
        raise DataError(f"val/test: image types differ between splits: {kinds}")
    top = max(int(y.max()) for _, y in parts.values() if len(y)) + 1
    names = list(names) if names else [str(i) for i in range(top)]
    if top > len(names):
        raise DataError(f"train: label {top - 1} but only {len(names)} class names")
    if len(names) < 2:
        raise DataError("train: a classifier needs at least 2 classes")
    x_train, y_train = parts["train"]
    if x_train.dtype == np.uint8:
        mean, std = channel_stats(x_train)
    else:
        channels = x_train.shape[1]
        mean, std = (0.0,) * channels, (1.0,) * channels
    x_test, y_test = parts.get("test", (x_train[:0], y_train[:0]))
    x_val, y_val = parts["val"]
    return DataSplits(
        name="memory",
        classes=names,
        x_train=x_train,
        y_train=y_train,
        x_val=x_val,
        y_val=y_val,
        x_test=x_test,
        y_test=y_test,
        mean=tuple(mean),
        std=tuple(std),
        augment=augment,
    )


def digest(data: DataSplits) -> str:
    """SHA-256 over every array and the metadata: the in-memory data's fingerprint."""
    h = hashlib.sha256()
    for name in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        arr = np.ascontiguousarray(getattr(data, name))
        h.update(f"{name}{arr.dtype}{arr.shape}".encode())
        h.update(arr.tobytes())
    h.update(repr((data.classes, data.mean, data.std, data.augment)).encode())
    return h.hexdigest()
