"""Datasets as in-memory uint8 arrays (batching and augmentation: :mod:`casd_ray.batches`).

Why arrays and not a DataLoader: every Ray trial gets the same arrays from the object store
(zero-copy on a node), and batches are gathered and augmented as tensor ops on the trial's
own device.

Selection never looks at the test split: validation is carved from the training set with the
run seed. Every problem with a data root is a one-line :class:`DataError` that names the path,
what was expected there and how to get it.

Formats (read directly, so nothing but numpy/PIL is needed at load time):

- ``cifar10``: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
- ``cifar100``: ``<root>/cifar-100-python/{train,test,meta}`` (fine labels)
- ``fashion_mnist``: the four idx ``.gz`` files in ``<root>`` (Debian's
  ``dataset-fashion-mnist`` or ``python -m casd_ray.download --download-fashion-mnist DIR``)
- ``imagefolder``: ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` (PNG/JPEG;
  classes sorted by name; :mod:`casd_ray.imagefolder`)
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from casd_ray.config import DataConfig

FASHION_MNIST_SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MODE_CHANNELS = {"L": 1, "RGB": 3}


class DataError(Exception):
    """A data problem, as one line: the path, what was expected there, and how to get it."""


@dataclass
class DataSplits:
    """Train/val/test as uint8 NCHW arrays with int64 labels, plus normalisation statistics."""

    name: str
    classes: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary, written next to a teacher so a run records what it trained on."""
        return {
            "name": self.name,
            "sizes": {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)},
            "shape": [self.in_channels, *self.image_size],
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "mean": [float(m) for m in self.mean],
            "std": [float(s) for s in self.std],
            "augment": self.augment,
        }


# ---------------------------------------------------------------------------- loading


def default_root(dataset: str) -> Path | None:
    """Where a dataset lives when ``data.root`` is not set (None: it must be set)."""
    if dataset == "fashion_mnist":
        if FASHION_MNIST_SYSTEM_ROOT.is_dir():
            return FASHION_MNIST_SYSTEM_ROOT
        return Path("data/fashion-mnist")
    if dataset in ("cifar10", "cifar100"):
        return Path("data")
    return None


def load_dataset(cfg: DataConfig, seed: int) -> DataSplits:
    """Load ``cfg.dataset``, carve validation from train with ``data.split_seed`` (default:
    the run ``seed``), apply subsets."""
    root = Path(cfg.root).expanduser() if cfg.root else default_root(cfg.dataset)
    if root is None:
        raise DataError(
            f"data.root: required for {cfg.dataset} (a folder with train/<class>/ and "
            "test/<class>/ image folders)"
        )
    if cfg.dataset == "fashion_mnist":
        (xtr, ytr), (xte, yte), classes = load_fashion_mnist(root, cfg.download)
        augment = "crop"  # flipping clothes is harmless, but the usual recipe is crop only
    elif cfg.dataset in ("cifar10", "cifar100"):
        (xtr, ytr), (xte, yte), classes = _load_cifar(root, cfg.dataset, cfg.download)
        augment = "flip_crop"
    else:
        from casd_ray.imagefolder import load_imagefolder

        (xtr, ytr), (xte, yte), classes = load_imagefolder(root, cfg.image_size)
        augment = "flip_crop"

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


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale, exact, from integer sums.

    Integer sums (uint64 accumulators, no overflow below ~10^14 pixels) avoid a float copy of
    the whole training set (1.1 GB for CIFAR in float64) and are ~10x faster.
    """
    count = x.shape[0] * x.shape[2] * x.shape[3]
    sums = x.sum(axis=(0, 2, 3), dtype=np.uint64).astype(np.float64)
    squares = np.einsum("nchw,nchw->c", x, x, dtype=np.uint64).astype(np.float64)
    mean = sums / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    std[std == 0] = 255.0  # a constant channel: leave it centred, never divide by zero
    return tuple(float(m) for m in mean / 255.0), tuple(float(v) for v in std / 255.0)


def seed_words(seed: int, *more: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, *more])


# --- Fashion-MNIST (idx files)


def _read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """Parse one gzip'd idx file (big-endian header: magic, counts, then uint8 payload)."""
    hint = (
        "run `python -m casd_ray.download --download-fashion-mnist DIR` or set data.download: true"
    )
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: not a readable gzip'd idx file ({err}); {hint}") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header ({len(raw)} bytes); {hint}")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(
            f"{path}: bad idx magic number {got:#010x}, expected {magic:#010x} ({what})"
        )
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(
            f"{path}: idx size {len(raw)} bytes, expected {expected} for shape {dims} "
            f"(truncated or corrupt); {hint}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(root: Path, download: bool):
    missing = [f for pair in FASHION_MNIST_FILES.values() for f in pair if not (root / f).is_file()]
    if missing and download:
        from casd_ray.download import download_fashion_mnist

        download_fashion_mnist(root)
    elif missing:
        raise DataError(
            f"data.root {root}: no {missing[0]} found (expected the four Fashion-MNIST idx .gz "
            "files); set data.download: true, install Debian's dataset-fashion-mnist, or run "
            f"`python -m casd_ray.download --download-fashion-mnist {root}`"
        )
    splits = []
    for images_name, labels_name in FASHION_MNIST_FILES.values():
        images = _read_idx(root / images_name, 0x00000803, "images, idx3 ubyte")
        labels = _read_idx(root / labels_name, 0x00000801, "labels, idx1 ubyte")
        if len(images) != len(labels):
            raise DataError(
                f"{root / labels_name}: {len(labels)} labels but {images_name} has "
                f"{len(images)} images; re-download the Fashion-MNIST files"
            )
        _check_labels(labels, 10, root / labels_name)
        splits.append((images[:, None], labels.astype(np.int64)))
    return splits[0], splits[1], list(FASHION_MNIST_CLASSES)


# --- CIFAR (torchvision's python pickles)

CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": ("batches.meta", "label_names"),
        "labels": "labels",
        "human": "CIFAR-10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": ("meta", "fine_label_names"),
        "labels": "fine_labels",
        "human": "CIFAR-100",
    },
}

# The CIFAR pickles hold only dicts, lists, strings and numpy arrays: refuse anything else,
# so a stray file in a data root cannot run code on load.
_SAFE_GLOBALS = {
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module.replace("numpy.core.", "numpy._core."), name)


def _read_pickle(path: Path, hint: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            obj = _NumpyOnlyUnpickler(f, encoding="latin1").load()  # latin1: py2 numpy pickles
    except Exception as err:
        raise DataError(f"{path}: not a CIFAR python pickle ({err}); {hint}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}; {hint}")
    # py2 pickles decode to str keys under latin1; py3 pickles written with bytes keys stay bytes.
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _load_cifar(root: Path, dataset: str, download: bool):
    spec = CIFAR[dataset]
    folder = root / spec["folder"]
    names = [*spec["train"], *spec["test"], spec["meta"][0]]
    if not all((folder / n).is_file() for n in names) and download:
        from casd_ray.download import download_cifar

        download_cifar(root, dataset)
    hint = f"set data.download: true or copy the {spec['human']} python version to {folder}"
    if not folder.is_dir():
        raise DataError(f"data.root {root}: no {spec['folder']}/ found; {hint}")
    for n in names:
        if not (folder / n).is_file():
            raise DataError(f"data.root {root}: no {spec['folder']}/{n} found; {hint}")

    meta_name, meta_key = spec["meta"]
    meta = _read_pickle(folder / meta_name, hint)
    if meta_key not in meta:
        raise DataError(f"{folder / meta_name}: no {meta_key!r} key (has {sorted(meta)}); {hint}")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[meta_key]]

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for n in files:
            path = folder / n
            d = _read_pickle(path, hint)
            for key in ("data", spec["labels"]):
                if key not in d:
                    raise DataError(f"{path}: no {key!r} key (has {sorted(d)}); {hint}")
            data = np.asarray(d["data"])
            labels = np.asarray(d[spec["labels"]], dtype=np.int64)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DataError(
                    f"{path}: 'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072); {hint}"
                )
            if len(labels) != len(data):
                raise DataError(f"{path}: {len(labels)} labels for {len(data)} images; {hint}")
            _check_labels(labels, len(classes), path)
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
        return np.concatenate(xs), np.concatenate(ys)

    return read(spec["train"]), read(spec["test"]), classes


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(
            f"{path}: labels range {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}"
        )
