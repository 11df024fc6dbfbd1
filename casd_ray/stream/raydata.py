"""Windows of a stream read and decoded by Ray Data's workers instead of the trial.

Ray Data reads the shards in the epoch's order (``preserve_order``: its output keeps the
input order, so the windows are those of the in-trial decoder, common random numbers kept)
and decodes them in parallel tasks, limited to ``data_cpus`` CPUs per trial. The tasks run
outside the trial's placement group (a group that also held them starved Ray Data's
scheduler in Ray 2.60: the trial hung), on CPUs the search leaves free:
:func:`casd_ray.search.session.check_resources` requires ``max_concurrent`` x
(``cpus_per_trial`` + ``data_cpus``) CPUs, so data workers and trials never oversubscribe.
WebDataset tars are read with Ray Data's own ``read_webdataset`` (undecoded: the bytes go
through the same decoder as Parquet shards').
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import ray

from casd_ray.errors import DataError
from casd_ray.stream.decode import decode_table
from casd_ray.stream.shards import IMAGE_EXTENSIONS, SCHEMA, SHARD_SUFFIX, filesystem, shard_path


def _decode(batch, keep, shape, image_size) -> dict[str, np.ndarray]:
    if "__key__" in batch.column_names:
        batch = _webdataset_table(batch)
    x, y = decode_table(batch, keep, shape, image_size, "ray data batch")
    return {"x": x, "y": y}


def _webdataset_table(batch: pa.Table) -> pa.Table:
    """``read_webdataset``'s columns (``__key__``, ``cls``, one per image extension) as a
    shard table; a sample's image is in whichever extension column it has."""
    pictures = [batch.column(c).to_pylist() for c in batch.column_names if c in IMAGE_EXTENSIONS]
    images = [next(v for v in values if v is not None) for values in zip(*pictures, strict=True)]
    labels = [int(v) for v in batch.column("cls").to_pylist()]
    rows = [int(k.rpartition("/")[2]) for k in batch.column("__key__").to_pylist()]
    return pa.table([images, labels, rows], schema=SCHEMA)


def ray_chunks(images, order: list[int], size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 NCHW, int64 labels) chunks of ``size`` rows of ``images`` (a
    :class:`~casd_ray.stream.images.StreamedImages`), in the shard order ``order``."""
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.execution_options.resource_limits = ray.data.ExecutionResources(cpu=images.data_cpus)
    ctx.enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a start/finish line per epoch
    fs, _ = filesystem(images.root)
    paths = [shard_path(images.root, images.files[i]) for i in order]
    # Outside the trial's placement group: its CPUs are the trial's own (see the module doc).
    free = {"scheduling_strategy": "DEFAULT"}
    with warnings.catch_warnings():  # no named parameter for scheduling_strategy in 2.60
        # (read_* and map_batches warn that ray_remote_args goes in 2.64)
        warnings.simplefilter("ignore", DeprecationWarning)
        if all(p.endswith(SHARD_SUFFIX["webdataset"]) for p in paths):
            ds = ray.data.read_webdataset(
                paths, filesystem=fs, decoder=None, shuffle=None, ray_remote_args=free
            )
        else:
            ds = ray.data.read_parquet(paths, filesystem=fs, shuffle=None, ray_remote_args=free)
        ds = ds.map_batches(
            _decode,
            batch_format="pyarrow",
            fn_kwargs={"keep": images.keep, "shape": images.image_shape,
                       "image_size": images.image_size},
            num_cpus=1,
            **free,
        )  # fmt: skip
    want = sum(int(images.keep[lo:hi].sum()) for lo, hi in (images.spans[i] for i in order))
    got = 0
    for batch in ds.iter_batches(batch_size=size, batch_format="numpy", prefetch_batches=1):
        got += len(batch["y"])
        yield batch["x"], batch["y"].astype(np.int64)
    if got != want:  # a tar cut between samples reads without an error
        raise DataError(f"{images.root}: Ray Data read {got} of {want} rows; a shard is "
                        "truncated or changed (casd-ray data verify names it)")  # fmt: skip
