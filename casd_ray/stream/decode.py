"""Encoded image bytes (PNG, JPEG, as stored in a shard) -> uint8 NCHW arrays.

Shards keep the source files' own bytes (no re-encoding: packing is a copy, and no quality is
lost); decoding is the per-image cost a stream pays each epoch, in the trial or in Ray Data's
workers. With ``image_size`` images are fitted as the in-memory image folders are (shorter
side to ``image_size``, centre crop), so both paths see the same pixels.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import numpy as np

from casd_ray.data.imagefolder import MODE_CHANNELS, fit
from casd_ray.errors import DataError


def decode_one(data: bytes, mode: str, size: tuple[int, int], image_size: int | None, where: str):
    """One image as uint8 CHW in ``mode`` and ``size`` (w, h); DataError naming ``where``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img = fit(img, image_size, mode) if image_size else img.convert(mode)
            pixels = np.asarray(img)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise DataError(f"{where}: not a readable image ({err})") from None
    if (pixels.shape[1], pixels.shape[0]) != tuple(size):
        raise DataError(
            f"{where}: {pixels.shape[1]}x{pixels.shape[0]}, but the shards hold "
            f"{size[0]}x{size[1]} images (pack with --image-size to resize them)"
        )
    return pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)


def decode_many(
    images: Sequence[bytes], shape: Sequence[int], image_size: int | None, where: str
) -> np.ndarray:
    """``images`` as one uint8 array of ``(len(images), *shape)``."""
    c, h, w = (int(v) for v in shape)
    mode = next(m for m, ch in MODE_CHANNELS.items() if ch == c)
    out = np.empty((len(images), c, h, w), dtype=np.uint8)
    for i, data in enumerate(images):
        out[i] = decode_one(data, mode, (w, h), image_size, f"{where} row {i}")
    return out


def decode_table(table, keep, shape, image_size, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A shard table's kept rows as (uint8 NCHW, int64 labels); used by both decoders."""
    rows = table.column("row").to_numpy()
    mask = np.ones(len(rows), bool) if keep is None else keep[rows]
    labels = table.column("label").to_numpy()[mask].astype(np.int64)
    images = [b for b, m in zip(table.column("image").to_pylist(), mask, strict=True) if m]
    return decode_many(images, shape, image_size, where), labels


def rebatch(parts, size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Chunks of any length -> windows of exactly ``size`` rows (the last one shorter)."""
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    held = 0
    for x, y in parts:
        xs.append(x)
        ys.append(y)
        held += len(y)
        while held >= size:
            x_all, y_all = np.concatenate(xs), np.concatenate(ys)
            yield x_all[:size], y_all[:size]
            xs, ys, held = [x_all[size:]], [y_all[size:]], held - size
    if held:
        yield np.concatenate(xs), np.concatenate(ys)


_END = object()


def prefetched(parts: Iterator, depth: int = 1) -> Iterator:
    """``parts`` produced by a background thread, ``depth`` items ahead: the next shard is read
    and decoded (PIL releases the GIL while it decodes) while the trial trains on this one.
    A consumer that stops early (BN recalibration reads a few batches) stops the thread."""
    import queue
    import threading

    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in parts:
                if not put(item):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, raised there
            put(err)
            return
        put(_END)

    threading.Thread(target=produce, daemon=True, name="casd-prefetch").start()
    try:
        while (item := q.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
