"""Compress a torchvision model with the Python API, on a small image set.

    python examples/compress_torchvision.py [--data IMAGE_FOLDER] [--out runs] [--smoke-test]

``IMAGE_FOLDER`` holds ``train/<class>/*.png`` and ``test/<class>/*.png``; without ``--data`` a
small synthetic set (4 classes of stripes and checkerboards) is written to a temporary folder.
The network here is trained first (a few epochs of torchvision's ResNet-18, as a user would
have done), then handed to :func:`casd_ray.compress` with the data as torch datasets; the result
is saved as a deployable folder and loaded back. ``--smoke-test`` shrinks everything to
seconds (the tests run it that way).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

import casd_ray


def write_images(root: Path, per_class: int, size: int = 32) -> Path:
    """``root/{train,test}/c<k>/*.png``: four classes of textures that survive flips."""
    rng = np.random.default_rng(0)
    i, j = np.indices((size, size))
    patterns = [(i % 4 < 2) * 150, (j % 4 < 2) * 150, ((i + j) % 4 < 2) * 150, i * 0 + 75]
    for split, n in (("train", per_class), ("test", per_class // 3)):
        for c, pattern in enumerate(patterns):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                img = pattern[..., None] + rng.integers(0, 100, (size, size, 3))
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{k}.png")
    return root


def as_tensors(folder: Path) -> TensorDataset:
    """An image folder as a TensorDataset of float images in [0, 1] (the user's own loading)."""
    ds = torchvision.datasets.ImageFolder(str(folder), transform=torchvision.transforms.ToTensor())
    xs, ys = zip(*(ds[i] for i in range(len(ds))), strict=True)
    return TensorDataset(torch.stack(xs), torch.tensor(ys))


def train(model: nn.Module, data: TensorDataset, epochs: int) -> nn.Module:
    """The user's own training: plain SGD with cross-entropy."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x, y = data.tensors
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for start in range(0, len(y), 64):
            idx = perm[start : start + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1 if args.smoke_test else torch.get_num_threads())
    root = args.data or write_images(
        Path(tempfile.mkdtemp(prefix="casd-example-")), per_class=30 if args.smoke_test else 300
    )
    full = as_tensors(root / "train")
    n_val = len(full) // 5
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
    train_set = TensorDataset(*(t[perm[n_val:]] for t in full.tensors))
    val_set = TensorDataset(*(t[perm[:n_val]] for t in full.tensors))
    test_set = as_tensors(root / "test")

    classes = len(torchvision.datasets.ImageFolder(str(root / "train")).classes)
    model = train(torchvision.models.resnet18(num_classes=classes), train_set,
                  epochs=1 if args.smoke_test else 5)  # fmt: skip
    small = {
        "search": {"num_samples": 4, "max_epochs": 1, "batch_size": 32,
                   "screen": {"promote": 3, "steps": 2, "val_images": 20}},
        "finetune": {"epochs": 1, "batch_size": 32},
        "space": {"granularity": "block"},
        "audit": {"top_k": 0},
    }  # fmt: skip
    config = {"name": "torchvision-example", **(small if args.smoke_test else {})}
    result = casd_ray.compress(
        model, train_set, val_set, test=test_set, budget={"flops": 0.5}, config=config,
        output_dir=args.out, augment="flip_crop",
    )  # fmt: skip
    print(f"deploy: {result.choice}; report: {result.report_path}")
    saved = result.save(args.out / "torchvision-example-deploy", overwrite=True)
    again = casd_ray.load_compressed(saved, model=torchvision.models.resnet18(num_classes=classes))
    x = test_set.tensors[0][:4]
    with torch.no_grad():
        same = torch.allclose(again(x), result.model(x), atol=1e-5)
    print(f"saved to {saved}; reloaded network gives the same outputs: {same}")


if __name__ == "__main__":
    main()
