"""Seeded tensor batching and augmentation of in-memory uint8 arrays, on any device.

Batches are gathered and augmented (pad-crop, flip) as tensor ops on the trial's own device.
Batch order, crop offsets and flips come from a CPU generator seeded by (run seed, epoch), so
every trial on every device sees identical batches: candidates are compared on common random
numbers, and the teacher's view of an epoch is the same for all.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from casd_ray.data.seeds import seed_words

PAD = 4  # zero padding before the random crop (torchvision RandomCrop(padding=4), fill=0)


@runtime_checkable
class Streamed(Protocol):
    """A split too large for memory, read a window of rows at a time
    (:class:`casd_ray.stream.images.StreamedImages`). It stands where a uint8 array stands:
    the functions below take either, so every stage reads through one interface."""

    window: int
    device: str

    def __len__(self) -> int: ...

    def to(self, device) -> Streamed: ...

    def windows(
        self, size: int, seed: int | None = None, epoch: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]: ...


def _window_rows(x: Streamed, batch_size: int) -> int:
    """Windows a whole number of batches long: an epoch then has as many batches (and the
    same last short one) as an array of the same length."""
    return max(1, -(-x.window // batch_size)) * batch_size


def to_tensors(x: np.ndarray, y: np.ndarray, device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Arrays -> tensors on ``device``; on CPU they share memory with the numpy arrays.

    Images stay uint8 (the built-in datasets) or float32 (a user's in-memory data).

    Object-store arrays are read-only; torch warns about that, but batching only ever reads
    (gathers copy), so the warning is silenced rather than paying for a copy per trial.
    """
    if isinstance(x, Streamed):  # read window by window as the batches are drawn
        return x.to(device), torch.from_numpy(np.array(y, dtype=np.int64))  # (a copy: labels)
    x = np.ascontiguousarray(x, dtype=np.uint8 if x.dtype == np.uint8 else np.float32)
    y = np.ascontiguousarray(y, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    device = torch.device(device)
    if device.type != "cpu":
        xt, yt = xt.to(device), yt.to(device)
    return xt, yt


def _normalizer(mean: Sequence[float], std: Sequence[float], x: Tensor):
    """uint8 -> float32 ``(x/255 - mean)/std`` as one multiply-add per element; float images
    (a user's in-memory data, already on their model's scale) skip the /255."""
    device = x.device
    pixel = 255.0 if x.dtype == torch.uint8 else 1.0
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    scale, shift = 1.0 / (pixel * std_t), -mean_t / std_t
    return lambda xb: xb.float().mul_(scale).add_(shift)


def epoch_generator(seed: int, epoch: int, window: int | None = None) -> torch.Generator:
    """The CPU generator behind one epoch's order and augmentation (same on every device);
    a streamed epoch has one per window."""
    more = () if window is None else (int(window),)
    words = seed_words(seed, 0xBA7C4, int(epoch) & 0xFFFFFFFFFFFFFFFF, *more)  # own stream
    state = words.generate_state(1, np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state))


def train_batches(
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    augment: str,
    mean: Sequence[float],
    std: Sequence[float],
    window: int | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of shuffled, augmented, normalised batches on ``x.device``.

    ``augment``: "flip_crop" (zero-pad 4, random crop, horizontal flip), "crop" (no flip) or
    "none". Order, offsets and flips are drawn up front on a CPU generator seeded by
    (seed, epoch), so the epoch is identical on every device; crop and flip are one
    vectorised gather per batch. A last batch of fewer than 2 is dropped (BatchNorm needs 2).
    """
    if augment not in ("flip_crop", "crop", "none"):
        raise ValueError(f"augment: {augment!r}, expected 'flip_crop', 'crop' or 'none'")
    if isinstance(x, Streamed):  # shards in a seeded order, each window shuffled as below
        rows = _window_rows(x, batch_size)
        for k, (xw, yw) in enumerate(x.windows(rows, seed, epoch)):
            xt, yt = to_tensors(xw, yw, x.device)
            yield from train_batches(
                xt, yt, batch_size=batch_size, seed=seed, epoch=epoch, augment=augment,
                mean=mean, std=std, window=k,
            )  # fmt: skip
        return
    n, c, h, w = x.shape
    dev = x.device
    g = epoch_generator(seed, epoch, window)
    perm = torch.randperm(n, generator=g)
    offsets = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
    flips = torch.rand(n, generator=g) < 0.5
    if augment != "flip_crop":
        flips.zero_()
    perm, offsets, flips = perm.to(dev), offsets.to(dev), flips.to(dev)
    normalize = _normalizer(mean, std, x)
    rows0 = torch.arange(h, device=dev)
    cols0 = torch.arange(w, device=dev)
    for start in range(0, n, batch_size):
        idx = perm[start : start + batch_size]
        if len(idx) < 2:
            break
        xb = x[idx]
        if augment != "none":
            b = len(idx)
            off = offsets[start : start + b]
            flip = flips[start : start + b, None]
            padded = torch.nn.functional.pad(xb, (PAD, PAD, PAD, PAD))
            rows = off[:, :1] + rows0  # (B, H) rows of the padded image to keep
            cols = off[:, 1:] + torch.where(flip, cols0.flip(0), cols0)  # flip folded into cols
            # one gather over flattened padded planes (7x faster than 4-D advanced indexing)
            flat = rows.view(b, 1, h, 1) * (w + 2 * PAD) + cols.view(b, 1, 1, w)
            flat = flat.expand(b, c, h, w).reshape(b, c, h * w)
            xb = torch.gather(padded.view(b, c, -1), 2, flat).view(b, c, h, w)
        yield normalize(xb), y[idx]


def eval_batches(
    x: Tensor, y: Tensor, *, batch_size: int, mean: Sequence[float], std: Sequence[float]
) -> Iterator[tuple[Tensor, Tensor]]:
    """Every example exactly once, in order, normalised, no augmentation (last batch kept)."""
    if isinstance(x, Streamed):
        for xw, yw in x.windows(_window_rows(x, batch_size)):
            xt, yt = to_tensors(xw, yw, x.device)
            yield from eval_batches(xt, yt, batch_size=batch_size, mean=mean, std=std)
        return
    normalize = _normalizer(mean, std, x)
    for start in range(0, len(x), batch_size):
        yield normalize(x[start : start + batch_size]), y[start : start + batch_size]


@dataclass(frozen=True)
class Batching:
    """How a recipe draws its batches: size, seed, augmentation and normalisation.

    Every network trained with equal ``Batching`` sees identical batches in each epoch
    (common random numbers), which is what makes shared teacher logits and fair comparisons
    possible. Built from the data (:meth:`casd_ray.data.splits.DataSplits.batching`).
    """

    batch_size: int
    seed: int
    augment: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def epoch(self, x: Tensor, y: Tensor, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Epoch ``epoch``'s shuffled, augmented, normalised training batches."""
        return train_batches(
            x, y, batch_size=self.batch_size, seed=self.seed, epoch=epoch,
            augment=self.augment, mean=self.mean, std=self.std,
        )  # fmt: skip

    def evaluation(
        self, x: Tensor, y: Tensor, batch_size: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Every example once, in order, normalised (no augmentation)."""
        size = batch_size or self.batch_size
        return eval_batches(x, y, batch_size=size, mean=self.mean, std=self.std)

    def steps(self, n: int) -> int:
        """Batches :meth:`epoch` yields for ``n`` images (a last batch of < 2 is dropped)."""
        full, rest = divmod(n, self.batch_size)
        return full + (1 if rest >= 2 else 0)
