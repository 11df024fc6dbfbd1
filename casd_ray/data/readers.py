"""Readers of the public datasets' own file formats, into uint8 arrays (numpy and gzip only).

- ``fashion_mnist``: the four idx ``.gz`` files in ``<root>`` (Debian's
  ``dataset-fashion-mnist`` or ``python -m casd_ray.data.download --download-fashion-mnist
  DIR``)
- ``cifar10``: ``<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}``
- ``cifar100``: ``<root>/cifar-100-python/{train,test,meta}`` (fine labels)

Every problem is one :class:`~casd_ray.errors.DataError` line naming the file and how to get it.
Downloads are :mod:`casd_ray.data.download`'s, called only by :mod:`casd_ray.data.load`.
"""

from __future__ import annotations

import gzip
import pickle
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from casd_ray.errors import DataError

FASHION_MNIST_SYSTEM_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


# --- Fashion-MNIST (idx files)


def _read_idx(path: Path, magic: int, what: str) -> np.ndarray:
    """Parse one gzip'd idx file (big-endian header: magic, counts, then uint8 payload)."""
    hint = (
        "run `python -m casd_ray.data.download --download-fashion-mnist DIR` or set "
        "data.download: true"
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


def fashion_mnist_missing(root: Path) -> list[str]:
    """The Fashion-MNIST files not (yet) in ``root``."""
    return [f for pair in FASHION_MNIST_FILES.values() for f in pair if not (root / f).is_file()]


def load_fashion_mnist(root: Path):
    """Train and test arrays with labels, and the class names (raises DataError)."""
    missing = fashion_mnist_missing(root)
    if missing:
        raise DataError(
            f"data.root {root}: no {missing[0]} found (expected the four Fashion-MNIST idx .gz "
            "files); set data.download: true, install Debian's dataset-fashion-mnist, or run "
            f"`python -m casd_ray.data.download --download-fashion-mnist {root}`"
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


def cifar_missing(root: Path, dataset: str) -> bool:
    """Whether any file of the CIFAR python version is missing under ``root``."""
    spec = CIFAR[dataset]
    names = [*spec["train"], *spec["test"], spec["meta"][0]]
    return not all((root / spec["folder"] / n).is_file() for n in names)


def load_cifar(root: Path, dataset: str):
    """Train and test arrays with labels, and the class names (raises DataError)."""
    spec = CIFAR[dataset]
    folder = root / spec["folder"]
    names = [*spec["train"], *spec["test"], spec["meta"][0]]
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
