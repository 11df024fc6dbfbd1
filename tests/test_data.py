"""Data loading in the real on-disk formats, split hygiene, and seeded tensor batching."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from casd_ray.config import DataConfig
from casd_ray.data.batches import PAD, eval_batches, to_tensors, train_batches
from casd_ray.data.download import main
from casd_ray.data.load import load_dataset
from casd_ray.data.readers import FASHION_MNIST_SYSTEM_ROOT
from casd_ray.data.splits import channel_stats
from casd_ray.errors import DataError

# ---------------------------------------------------------------- writers of the real formats


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """An idx file as Fashion-MNIST ships it: big-endian magic + dims, uint8 payload, gzip'd."""
    magic = 0x0800 + array.ndim if magic is None else magic
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def make_fashion(root: Path, n_train: int = 40, n_test: int = 12) -> Path:
    """Tiny Fashion-MNIST; image i carries its id in pixel [0, 0] so splits can be traced."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def make_cifar10(root: Path, per_batch: int = 8) -> Path:
    """CIFAR-10 python version: bytes keys, as ``pickle.load(f, encoding='bytes')`` sees them."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        labels = [(b + i) % 10 for i in range(per_batch)]
        data = np.repeat(np.array(labels, dtype=np.uint8)[:, None] * 20, 3072, axis=1)
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def make_cifar100(root: Path, n: int = 30) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name in ("train", "test"):
        fine = [int(v) for v in rng.integers(0, 100, n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        d = {b"data": data, b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine]}
        (folder / name).write_bytes(pickle.dumps(d, protocol=4))
    meta = {
        b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    return root


def make_imagefolder(root: Path, mode: str = "RGB", size=(10, 8), per_class: int = 5) -> Path:
    """Classes written out of order, so sorting is tested; image colour encodes the class."""
    for split in ("train", "test"):
        for cls in ["cat", "ant", "bee"]:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                value = 40 * ["ant", "bee", "cat"].index(cls) + i
                color = value if mode == "L" else (value, 0, 255 - value)
                Image.new(mode, size, color).save(d / f"{i}.png")
    return root


def one_line_error(cfg: DataConfig, *needles: str) -> str:
    with pytest.raises(DataError) as err:
        load_dataset(cfg, seed=0)
    msg = str(err.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ---------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_idx_loads(tmp_path):
    root = make_fashion(tmp_path / "fm")
    d = load_dataset(DataConfig(root=str(root), val_size=10), seed=0)
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_val.shape == (10, 1, 28, 28)
    assert d.x_test.shape == (12, 1, 28, 28)
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)):
        assert x.dtype == np.uint8 and x.flags.c_contiguous and x.flags.writeable
        assert y.dtype == np.int64 and y.flags.writeable
        assert (y == x[:, 0, 0, 0] % 10).all()  # labels stay with their images
    assert d.augment == "crop" and d.num_classes == 10 and d.classes[9] == "Ankle boot"
    assert d.in_channels == 1 and d.image_size == (28, 28)
    mean = d.x_train.astype(np.float64).mean() / 255
    std = d.x_train.astype(np.float64).std() / 255
    assert d.mean == pytest.approx((mean,)) and d.std == pytest.approx((std,))
    desc = json.loads(json.dumps(d.describe()))
    assert desc["sizes"] == {"train": 30, "val": 10, "test": 12} and desc["shape"] == [1, 28, 28]


def test_fashion_mnist_missing_root(tmp_path):
    one_line_error(
        DataConfig(root=str(tmp_path / "nowhere")),
        str(tmp_path / "nowhere"),
        "train-images-idx3-ubyte.gz",
        "data.download: true",
    )


@pytest.mark.parametrize("damage", ["truncated", "magic", "gzip", "count"])
def test_fashion_mnist_malformed_idx(tmp_path, damage):
    root = make_fashion(tmp_path / "fm")
    images = root / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(images.read_bytes())
    if damage == "truncated":
        images.write_bytes(gzip.compress(raw[:-100]))
        needle = "expected"
    elif damage == "magic":
        images.write_bytes(gzip.compress(struct.pack(">I", 2049) + raw[4:]))
        needle = "magic"
    elif damage == "gzip":
        images.write_bytes(images.read_bytes()[:50])
        needle = "gzip"
    else:
        write_idx(root / "train-labels-idx1-ubyte.gz", np.zeros(7, np.uint8))
        images, needle = root / "train-labels-idx1-ubyte.gz", "labels"
    one_line_error(DataConfig(root=str(root), val_size=5), str(images), needle)


def test_download_cli_verifies_existing_files_without_network(tmp_path, capsys):
    root = make_fashion(tmp_path / "fm")
    assert main(["--download-fashion-mnist", str(root)]) == 0
    assert str(root) in capsys.readouterr().out
    write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8), magic=7)
    assert main(["--download-fashion-mnist", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("casd-ray: error:") and "magic" in err and "\n" not in err


@pytest.mark.skipif(
    not FASHION_MNIST_SYSTEM_ROOT.is_dir(),
    reason="Debian's dataset-fashion-mnist is not installed (no /usr/share/datasets/fashion-mnist)",
)
def test_real_fashion_mnist():
    d = load_dataset(DataConfig(dataset="fashion_mnist", val_size=5000), seed=0)
    assert d.x_train.shape == (55000, 1, 28, 28) and d.x_val.shape == (5000, 1, 28, 28)
    assert d.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(np.concatenate([d.y_train, d.y_val])).tolist() == [6000] * 10
    assert np.bincount(d.y_test).tolist() == [1000] * 10
    assert 0.27 < d.mean[0] < 0.30 and 0.34 < d.std[0] < 0.37  # the published statistics


# ---------------------------------------------------------------- CIFAR


def test_cifar10_batches_load(tmp_path):
    root = make_cifar10(tmp_path)
    d = load_dataset(DataConfig(dataset="cifar10", root=str(root), val_size=8), seed=3)
    assert d.x_train.shape == (32, 3, 32, 32) and d.x_val.shape == (8, 3, 32, 32)
    assert d.x_test.shape == (8, 3, 32, 32)
    assert d.classes == [f"class{i}" for i in range(10)] and d.augment == "flip_crop"
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)):
        assert (x == (y * 20).astype(np.uint8)[:, None, None, None]).all()
    assert np.sort(np.concatenate([d.y_train, d.y_val])).tolist() == sorted(
        (b + i) % 10 for b in range(5) for i in range(8)
    )


def test_cifar100_fine_labels(tmp_path):
    root = make_cifar100(tmp_path)
    d = load_dataset(DataConfig(dataset="cifar100", root=str(root), val_size=5), seed=0)
    assert d.num_classes == 100 and d.classes[42] == "fine42"
    assert d.x_train.shape == (25, 3, 32, 32) and d.x_test.shape == (30, 3, 32, 32)
    test = pickle.loads((root / "cifar-100-python" / "test").read_bytes())
    assert (d.y_test == np.array(test[b"fine_labels"])).all()
    assert (d.x_test == test[b"data"].reshape(-1, 3, 32, 32)).all()


def test_cifar_missing_folder(tmp_path):
    one_line_error(
        DataConfig(dataset="cifar10", root=str(tmp_path)),
        f"data.root {tmp_path}: no cifar-10-batches-py/ found",
        "data.download: true",
    )
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    one_line_error(DataConfig(dataset="cifar10", root=str(tmp_path)), "data_batch_3")


def test_cifar_wrong_keys_and_shapes(tmp_path):
    root = make_cifar100(tmp_path)
    train = root / "cifar-100-python" / "train"
    train.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}))
    one_line_error(DataConfig(dataset="cifar100", root=str(root), val_size=1), str(train), "fine")
    bad = {b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]}
    train.write_bytes(pickle.dumps(bad))
    one_line_error(DataConfig(dataset="cifar100", root=str(root), val_size=1), "(N, 3072)")


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_cifar_pickle_refuses_code(tmp_path):
    root = make_cifar10(tmp_path)
    meta = root / "cifar-10-batches-py" / "batches.meta"
    meta.write_bytes(pickle.dumps({b"label_names": _Payload()}))
    one_line_error(DataConfig(dataset="cifar10", root=str(root)), str(meta), "refusing")


# ---------------------------------------------------------------- ImageFolder


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_imagefolder_loads(tmp_path, mode, channels):
    root = make_imagefolder(tmp_path / "imgs", mode=mode)
    d = load_dataset(DataConfig(dataset="imagefolder", root=str(root), val_size=3), seed=0)
    assert d.classes == ["ant", "bee", "cat"]
    assert d.x_train.shape == (12, channels, 8, 10) and d.x_test.shape == (15, channels, 8, 10)
    assert d.image_size == (8, 10) and d.in_channels == channels
    assert (d.x_test[:, 0, 0, 0] // 40 == d.y_test).all()  # colour encodes the class
    assert (d.x_train[:, 0, 0, 0] // 40 == d.y_train).all()


def test_imagefolder_errors(tmp_path):
    one_line_error(DataConfig(dataset="imagefolder"), "data.root: required")
    one_line_error(DataConfig(dataset="imagefolder", root=str(tmp_path)), "no train/ folder")

    root = make_imagefolder(tmp_path / "a")
    odd = root / "test" / "bee" / "odd.png"
    Image.new("RGB", (12, 8)).save(odd)
    one_line_error(DataConfig(dataset="imagefolder", root=str(root), val_size=2), str(odd), "12x8")

    root = make_imagefolder(tmp_path / "b")
    (root / "train" / "dog").mkdir()
    one_line_error(
        DataConfig(dataset="imagefolder", root=str(root), val_size=2),
        str(root / "train" / "dog"),
        "empty class folder",
    )

    root = make_imagefolder(tmp_path / "c")
    (root / "train" / "ant" / "0.png").write_bytes(b"not a png")
    one_line_error(DataConfig(dataset="imagefolder", root=str(root), val_size=2), "0.png")


# ---------------------------------------------------------------- splits


def test_val_size_too_big(tmp_path):
    root = make_fashion(tmp_path / "fm")
    one_line_error(DataConfig(root=str(root), val_size=40), "data.val_size: 40", "has 40")


def test_splits_disjoint_seeded_and_subsets(tmp_path):
    root = make_fashion(tmp_path / "fm", n_train=60, n_test=30)

    def ids(seed, **kw):
        d = load_dataset(DataConfig(root=str(root), val_size=10, **kw), seed=seed)
        return [set(x[:, 0, 0, 0].tolist()) for x in (d.x_train, d.x_val, d.x_test)]

    train, val, test = ids(0)
    assert not train & val and train | val == set(range(60)) and len(val) == 10
    assert ids(0) == [train, val, test]
    assert ids(1)[1] != val

    sub_train, sub_val, sub_test = ids(0, train_subset=7, test_subset=5)
    assert sub_val == val  # carving val happens before the subset, so val never moves
    assert len(sub_train) == 7 and sub_train <= train
    assert len(sub_test) == 5 and sub_test <= test
    assert ids(0, train_subset=1000)[0] == train  # at most N


def test_channel_stats_exact_and_constant_channel():
    x = np.zeros((4, 2, 3, 3), np.uint8)
    x[:, 0] = np.arange(4, dtype=np.uint8)[:, None, None] * 50
    mean, std = channel_stats(x)
    ref = x[:, 0].astype(np.float64) / 255
    assert mean[0] == pytest.approx(ref.mean()) and std[0] == pytest.approx(ref.std())
    assert mean[1] == 0.0 and std[1] == 1.0


# ---------------------------------------------------------------- batching


def test_to_tensors_zero_copy_read_only():
    x = np.arange(2 * 1 * 4 * 4, dtype=np.uint8).reshape(2, 1, 4, 4)
    y = np.array([0, 1], dtype=np.int64)
    x.setflags(write=False)
    y.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        xt, yt = to_tensors(x, y, "cpu")
    assert xt.data_ptr() == x.ctypes.data and yt.data_ptr() == y.ctypes.data
    assert xt.dtype == torch.uint8 and yt.dtype == torch.int64


def _candidates(image: torch.Tensor, flip: bool) -> torch.Tensor:
    """Every pad-crop (and flipped pad-crop) of one uint8 image: the reference, as a loop."""
    c, h, w = image.shape
    padded = F.pad(image, (PAD, PAD, PAD, PAD))
    views = [
        padded[:, i : i + h, j : j + w] for i in range(2 * PAD + 1) for j in range(2 * PAD + 1)
    ]
    if flip:
        views += [v.flip(-1) for v in views]
    return torch.stack(views)


@pytest.mark.parametrize("augment", ["flip_crop", "crop"])
def test_train_batches_augment_matches_reference(augment):
    n, mean, std = 50, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    x = torch.randint(0, 256, (n, 3, 12, 10), dtype=torch.uint8)
    y = torch.arange(n)  # unique labels identify each output's source image
    batches = list(
        train_batches(x, y, batch_size=16, seed=5, epoch=2, augment=augment, mean=mean, std=std)
    )
    assert [len(b[1]) for b in batches] == [16, 16, 16, 2]  # a last batch of 2 is kept
    flipped = 0
    shift = torch.tensor(mean).view(3, 1, 1)
    scale = torch.tensor(std).view(3, 1, 1)
    for xb, yb in batches:
        assert xb.dtype == torch.float32 and xb.shape[1:] == (3, 12, 10) and xb.is_contiguous()
        raw = torch.round((xb * scale + shift) * 255).to(torch.uint8)
        for img, label in zip(raw, yb.tolist(), strict=True):
            cands = _candidates(x[label], flip=augment == "flip_crop")
            hit = (cands == img).flatten(1).all(1).nonzero()
            assert len(hit) > 0
            flipped += int(hit[0].item() >= (2 * PAD + 1) ** 2)
    seen = torch.cat([b[1] for b in batches])
    assert len(set(seen.tolist())) == len(seen)  # no example twice within an epoch
    assert (flipped > 5) if augment == "flip_crop" else flipped == 0


def test_train_batches_reproducible_per_seed_and_epoch():
    x = torch.randint(0, 256, (37, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 10, (37,))

    def epoch(seed, ep, augment="flip_crop"):
        kw = dict(batch_size=8, seed=seed, epoch=ep, augment=augment, mean=(0.5,), std=(0.5,))
        return list(train_batches(x, y, **kw))

    a, b = epoch(0, 1), epoch(0, 1)
    assert len(a) == 5 and [len(t[1]) for t in a] == [8, 8, 8, 8, 5]
    assert all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True)
    )
    assert not torch.equal(a[0][0], epoch(0, 2)[0][0])
    assert not torch.equal(a[0][0], epoch(1, 1)[0][0])
    # order depends on (seed, epoch) only, not on the augmentation
    assert all(torch.equal(p[1], q[1]) for p, q in zip(a, epoch(0, 1, "none"), strict=True))
    # a last batch of 1 would break BatchNorm: dropped
    x9, y9 = x[:9], y[:9]
    sizes = [len(t[1]) for t in train_batches(x9, y9, batch_size=4, seed=0, epoch=0,
                                              augment="crop", mean=(0.5,), std=(0.5,))]  # fmt: skip
    assert sizes == [4, 4]
    with pytest.raises(ValueError, match="augment"):
        epoch(0, 0, "mixup")


def test_eval_batches_cover_everything_once_in_order():
    x = torch.randint(0, 256, (23, 3, 4, 4), dtype=torch.uint8)
    y = torch.arange(23)
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.6, 0.7)
    out = list(eval_batches(x, y, batch_size=10, mean=mean, std=std))
    assert [len(b[1]) for b in out] == [10, 10, 3]
    assert torch.equal(torch.cat([b[1] for b in out]), y)
    ref = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    assert torch.allclose(torch.cat([b[0] for b in out]), ref, atol=1e-5)


@pytest.mark.cuda
def test_train_batches_same_on_cuda_as_cpu():
    x = torch.randint(0, 256, (64, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    kw = dict(batch_size=16, seed=3, epoch=4, augment="flip_crop", mean=(0.5,) * 3, std=(0.2,) * 3)
    xc, yc = to_tensors(x.numpy(), y.numpy(), "cuda")
    for (a, la), (b, lb) in zip(
        train_batches(x, y, **kw), train_batches(xc, yc, **kw), strict=True
    ):
        assert b.device.type == "cuda" and torch.equal(la, lb.cpu())
        assert torch.allclose(a, b.cpu(), atol=1e-5)


def test_split_seed_pins_the_validation_split_across_run_seeds(tmp_path):
    """``data.split_seed``: runs with other seeds keep one train/val split (a teacher shared
    by several seeds never trained on their validation images); without it each seed has its
    own split."""
    root = make_fashion(tmp_path / "fm", n_train=40, n_test=12)
    pinned = [
        load_dataset(DataConfig(root=str(root), val_size=10, split_seed=7), seed=s) for s in (0, 1)
    ]
    assert np.array_equal(pinned[0].y_val, pinned[1].y_val)
    assert np.array_equal(pinned[0].x_val, pinned[1].x_val)
    own = [load_dataset(DataConfig(root=str(root), val_size=10), seed=s) for s in (0, 1)]
    assert not np.array_equal(own[0].x_val, own[1].x_val)
    same_as_seed_7 = load_dataset(DataConfig(root=str(root), val_size=10), seed=7)
    assert np.array_equal(same_as_seed_7.x_val, pinned[0].x_val)


def test_one_class_is_refused(tmp_path):
    """D3: a one-class image folder was accepted; the report showed 100 %, ±0.00."""
    root = make_imagefolder(tmp_path / "a")
    for split in ("train", "test"):
        for cls in ("ant", "bee"):
            shutil.rmtree(root / split / cls)
    one_line_error(
        DataConfig(dataset="imagefolder", root=str(root), val_size=2),
        str(root / "train"),
        "1 class",
        "at least 2",
    )


def test_a_train_subset_of_one_class_is_refused(tmp_path):
    """D3: a training split that holds a single class teaches nothing to compare."""
    root = make_imagefolder(tmp_path / "a", per_class=5)
    cfg = DataConfig(dataset="imagefolder", root=str(root), val_size=2, train_subset=1)
    one_line_error(cfg, "data.train_subset: ", "one class")
