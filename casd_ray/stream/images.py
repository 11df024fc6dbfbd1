"""A split read from shards a window at a time: what every trial trains on when streaming.

:class:`StreamedImages` is small, plain and picklable (shard names, a keep-mask, labels), so
it travels to trials in place of the arrays; each trial reads the shards itself. It stands
where a uint8 array stands (``len``, ``shape``, ``dtype``) and satisfies
:class:`casd_ray.data.batches.Streamed`, so the training loop, the teacher and the fine-tune
read it through the same ``Batching`` as arrays.

Common random numbers: an epoch reads the shards in an order drawn from (seed, epoch), and
windows are cut at fixed row counts, so every trial of a seed gets the same windows; the
batches inside a window are shuffled and augmented by ``data.batches`` with a generator of
(seed, epoch, window). Decoding in the trial or in Ray Data gives the same windows.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from casd_ray.data.seeds import seed_words
from casd_ray.errors import DataError
from casd_ray.stream.decode import decode_table, prefetched, rebatch
from casd_ray.stream.raydata import ray_chunks
from casd_ray.stream.shards import (
    MANIFEST,
    Manifest,
    filesystem,
    open_shard,
    shard_path,
    shard_spans,
    split_labels,
)

DECODERS = ("trial", "ray_data")


@dataclass(frozen=True)
class StreamedImages:
    """The rows of one split's shards that ``keep`` selects, as a stream."""

    root: str
    files: tuple[str, ...]
    image_shape: tuple[int, int, int]
    labels: np.ndarray = field(repr=False)  # labels of the kept rows, in row order
    keep: np.ndarray = field(repr=False)  # bool per row of the split: the rows it reads
    spans: tuple[tuple[int, int], ...] = ()  # each file's rows (packing numbers them in order)
    image_size: int | None = None
    window: int = 4096
    decode: str = "trial"
    data_cpus: float = 1.0
    device: str = "cpu"

    dtype = np.dtype(np.uint8)
    ndim = 4

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self.image_shape)

    def to(self, device) -> StreamedImages:
        """The same stream, its windows to be moved to ``device`` by the batcher."""
        return replace(self, device=str(device))

    def subset(self, n: int, seed: int) -> StreamedImages:
        """``n`` of the kept rows, from whole shards drawn with ``seed`` (``train_subset``):
        an epoch then reads only those shards, not every shard for a tenth of its rows (the
        pack's shuffle makes whole shards a random sample)."""
        keep, picked, count = np.zeros_like(self.keep), [], 0
        for i in np.random.default_rng(seed).permutation(len(self.files)):
            lo, hi = self.spans[i]
            rows = np.flatnonzero(self.keep[lo:hi])[: n - count] + lo
            keep[rows], count = True, count + len(rows)
            picked.append(int(i))
            if count >= n:
                break
        picked.sort()
        at = np.searchsorted(np.flatnonzero(self.keep), np.flatnonzero(keep))
        return replace(self, files=tuple(self.files[i] for i in picked),
                       spans=tuple(self.spans[i] for i in picked), keep=keep,
                       labels=self.labels[at])  # fmt: skip

    def shard_order(self, seed: int | None, epoch: int | None) -> list[int]:
        """Shards in file order (evaluation) or in the order drawn from (seed, epoch)."""
        if seed is None:
            return list(range(len(self.files)))
        rng = np.random.default_rng(seed_words(seed, 0x5D0, int(epoch or 0)))
        return [int(i) for i in rng.permutation(len(self.files))]

    def windows(
        self, size: int, seed: int | None = None, epoch: int | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(uint8 NCHW images, int64 labels) of ``size`` rows each (the last may be short)."""
        order = self.shard_order(seed, epoch)
        if self.decode == "ray_data":
            return rebatch(ray_chunks(self, order, size), size)
        return rebatch(prefetched(self._decoded(order)), size)

    def _decoded(self, order: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Each shard's kept rows, read with pyarrow and decoded in this process."""
        fs, _ = filesystem(self.root)
        for i in order:
            path = shard_path(self.root, self.files[i])
            table = open_shard(fs, path)
            lo, hi = self.spans[i] if self.spans else (0, table.num_rows)
            if table.num_rows != hi - lo:  # a tar cut between samples still reads
                raise DataError(f"{path}: {table.num_rows} rows, {MANIFEST} says {hi - lo} "
                                "(a truncated or changed shard; casd-ray data verify)")  # fmt: skip
            yield decode_table(table, self.keep, self.image_shape, self.image_size, path)


def split_stream(m: Manifest, split: str, keep: np.ndarray | None, **settings) -> StreamedImages:
    """The stream of ``split`` of a packed folder, with the labels of the rows it keeps."""
    labels = split_labels(m, split)
    keep = np.ones(len(labels), bool) if keep is None else np.asarray(keep, bool)
    return StreamedImages(
        root=m.root, files=tuple(s["file"] for s in m.shards(split)), image_shape=m.shape,
        labels=labels[keep], keep=keep, spans=tuple(shard_spans(m, split)),
        image_size=m.image_size, **settings,
    )  # fmt: skip
