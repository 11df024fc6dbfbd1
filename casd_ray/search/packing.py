"""What goes into the Ray object store for a search: data, teacher weights, teacher logits.

Everything is plain numpy: ``tune.with_parameters`` puts it into the object store once, and
numpy arrays come back zero-copy (read-only views of shared memory) in every trial on a
node. Torch tensors would be deserialised into a private copy per trial, which is why
nothing torch-typed is put into the store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from casd_ray.artifacts.network import state_to_numpy
from casd_ray.data.batches import Batching, Streamed
from casd_ray.data.splits import DataSplits

DATA_KEYS = ("x_train", "y_train", "x_val", "y_val")


def pack_data(data: DataSplits, train_subset: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The parts of the data a trial needs, as numpy arrays + plain metadata.

    The test split is left out on purpose: the search never looks at it. ``train_subset``
    keeps a seeded random subset of the training images (``search.train_subset``): every
    trial ranks candidates on the same proxy, while the fine-tune uses all of them.
    """
    if isinstance(data.x_train, Streamed):  # the stream itself travels: a few shard names
        packed = {k: np.ascontiguousarray(getattr(data, k)) for k in DATA_KEYS[1:]}
        packed["x_train"] = data.x_train
        if train_subset is not None and train_subset < len(data.x_train):
            packed["x_train"] = data.x_train.subset(train_subset, seed)
            packed["y_train"] = packed["x_train"].labels
        packed.update(name=data.name, mean=tuple(data.mean), std=tuple(data.std),
                      augment=data.augment)  # fmt: skip
        return packed
    packed: dict[str, Any] = {k: np.ascontiguousarray(getattr(data, k)) for k in DATA_KEYS}
    n = len(packed["y_train"])
    if train_subset is not None and train_subset < n:
        keep = np.sort(np.random.default_rng(seed).choice(n, train_subset, replace=False))
        packed["x_train"] = np.ascontiguousarray(packed["x_train"][keep])
        packed["y_train"] = np.ascontiguousarray(packed["y_train"][keep])
    packed.update(name=data.name, mean=tuple(data.mean), std=tuple(data.std), augment=data.augment)
    return packed


def batching_of(packed: dict[str, Any], batch_size: int, seed: int) -> Batching:
    """The batch recipe of packed data (what every trial of the search draws)."""
    return Batching(
        batch_size, seed, packed["augment"], tuple(packed["mean"]), tuple(packed["std"])
    )


def pack_teacher(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Teacher weights as numpy arrays (zero-copy from the object store, unlike tensors)."""
    return state_to_numpy({k: v.detach().cpu() for k, v in model.state_dict().items()})
