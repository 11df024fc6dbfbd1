"""Image folders (``<root>/train/<class>/*``, ``<root>/test/<class>/*``) as uint8 arrays.

Without ``data.image_size`` every image must share one size and mode (CIFAR-style folders);
with it, images of any size are resized so the shorter side is ``image_size`` and
centre-cropped to a square (torchvision's eval transform), and converted to the first
image's mode. Training augmentation (pad-crop + flip) then runs on these arrays on the
trial's device (:mod:`casd_ray.data.batches`), and normalisation comes from the training split.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from casd_ray.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
MODE_CHANNELS = {"L": 1, "RGB": 3}


def fit(img, size: int, mode: str):
    """Shorter side to ``size`` (bilinear), centre crop ``size`` x ``size``, in ``mode``."""
    from PIL import Image

    img = img.convert(mode)
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_imagefolder(root: Path, image_size: int | None = None):
    """Train and test arrays with labels, and the class names (sorted folder names)."""
    hint = "expected <root>/train/<class>/*.png|jpg and <root>/test/<class>/*"
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise DataError(f"data.root {root}: no {split}/ folder found; {hint}")
    classes = sorted(p.name for p in (root / "train").iterdir() if visible_dir(p))
    if not classes:
        raise DataError(f"{root / 'train'}: no class folders found; {hint}")
    for p in (root / "test").iterdir():
        if visible_dir(p) and p.name not in classes:
            raise DataError(f"{p}: class {p.name!r} is not in {root / 'train'} (classes {classes})")

    x_train, y_train, ref = read_split(root / "train", classes, image_size, hint)
    x_test, y_test, _ = read_split(root / "test", classes, image_size, hint, ref)
    return (x_train, y_train), (x_test, y_test), classes


Ref = tuple[tuple[int, int], str, Path]  # (size, mode, first file): what every image must match


def read_split(
    folder: Path,
    classes: list[str],
    image_size: int | None,
    hint: str,
    ref: Ref | None = None,
) -> tuple[np.ndarray, np.ndarray, Ref]:
    """Images of ``folder/<class>/*`` (label = index in ``classes``) as uint8 NCHW, labels,
    and the reference size and mode (pass it on so another split must match)."""
    from PIL import Image, UnidentifiedImageError

    files: list[tuple[Path, int]] = []
    for label, cls in enumerate(classes):
        d = folder / cls
        if not d.is_dir():
            continue  # a test split may lack a class; train classes all exist by construction
        found = sorted(p for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DataError(f"{d}: empty class folder (no .png/.jpg/.jpeg images); {hint}")
        files += [(p, label) for p in found]
    if not files:
        raise DataError(f"{folder}: no images found; {hint}")
    x: np.ndarray | None = None
    for i, (path, _) in enumerate(files):
        try:
            with Image.open(path) as img:
                if ref is None:
                    mode = "RGB" if image_size and img.mode not in MODE_CHANNELS else img.mode
                    if mode not in MODE_CHANNELS:
                        raise DataError(
                            f"{path}: image mode {img.mode}, expected L or RGB; convert the "
                            "images (e.g. PIL .convert('RGB')) or set data.image_size"
                        )
                    size = (image_size, image_size) if image_size else img.size
                    ref = (size, mode, path)
                if image_size is not None:
                    img = fit(img, image_size, ref[1])
                if (img.size, img.mode) != ref[:2]:
                    raise DataError(
                        f"{path}: {img.mode} {img.size[0]}x{img.size[1]}, but {ref[2]} is "
                        f"{ref[1]} {ref[0][0]}x{ref[0][1]}; all images must share size and "
                        "mode, or set data.image_size to resize them"
                    )
                pixels = np.asarray(img)
        except (OSError, UnidentifiedImageError) as err:
            raise DataError(f"{path}: not a readable image ({err})") from None
        if x is None:
            w, h = ref[0]
            x = np.empty((len(files), MODE_CHANNELS[ref[1]], h, w), dtype=np.uint8)
        x[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return x, np.array([label for _, label in files], dtype=np.int64), ref


def visible_dir(p: Path) -> bool:
    return p.is_dir() and not p.name.startswith(".")
