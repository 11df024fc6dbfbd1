"""A search on streamed shards: trials read the shards themselves (nothing but shard names
goes into the object store) and every trial sees the same samples in the same order.

The opt-in ``bigdata`` test runs teacher, search and fine-tune with an object store smaller
than the dataset (``pytest -m bigdata tests/test_stream_search.py``, a few minutes).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ensure_teacher, search_with, write_image_tree
from ray import cloudpickle

from casd_ray.config import ExperimentConfig
from casd_ray.search.packing import pack_data
from casd_ray.search.trial import distill_trial
from casd_ray.stream.images import StreamedImages
from casd_ray.stream.load import load_data
from casd_ray.stream.pack import pack


def stream_cfg(root: Path, shards: Path, name: str, data=None, **search) -> ExperimentConfig:
    return ExperimentConfig.model_validate(
        {
            "name": name,
            "output_dir": str(root),
            "model": {"arch": "resnet8", "width": 4},
            "data": {"dataset": "shards", "root": str(shards), "val_size": 24,
                     "stream": "stream", "window": 40, **(data or {})},
            "teacher": {"epochs": 1, "batch_size": 16},
            "space": {"budget": {"target": 0.5}},
            "search": {"batch_size": 16, "num_samples": 2, "max_epochs": 1, "max_concurrent": 2,
                       "scheduler": "fifo", "algorithm": "random", **search},
            "finetune": {"epochs": 1, "batch_size": 16},
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    src = write_image_tree(tmp_path_factory.mktemp("src"), per_class=30, test_per_class=5)
    dst = tmp_path_factory.mktemp("shards") / "p"
    pack(src, dst, shard_rows=32, log=lambda _: None)
    return dst


def test_the_search_ships_the_stream_not_the_images(shards, tmp_path):
    data = load_data(stream_cfg(tmp_path, shards, "x").data, 0)
    assert isinstance(data.x_train, StreamedImages) and len(data.x_train) == 120 - 24
    assert data.x_val.shape == (24, 1, 8, 8)  # validation is decoded once, into memory
    packed = pack_data(data, train_subset=50, seed=0)
    assert isinstance(packed["x_train"], StreamedImages) and len(packed["y_train"]) == 50
    assert len(packed["x_train"].files) < len(data.x_train.files)  # whole shards, not rows
    assert len(cloudpickle.dumps(packed["x_train"])) < 4096  # names and masks, no pixels
    auto = load_data(stream_cfg(tmp_path, shards, "x", {"stream": "auto"}).data, 0)
    assert isinstance(auto.x_train, np.ndarray)  # small data: in memory, chosen by size


def make_recorder(folder: Path):
    """:func:`distill_trial`, writing every batch it draws (pixels' hash and labels)."""

    def recording_trial(config, **kwargs):
        from ray import tune

        from casd_ray.data import batches

        drawn = []
        original = getattr(batches.Batching, "_original_epoch", batches.Batching.epoch)
        batches.Batching._original_epoch = original

        def epoch(self, x, y, e):
            for xb, yb in original(self, x, y, e):
                drawn.append([e, hashlib.sha1(xb.numpy().tobytes()).hexdigest(), yb.tolist()])
                yield xb, yb

        batches.Batching.epoch = epoch
        out = distill_trial(config, **kwargs)
        name = tune.get_context().get_trial_id()
        (folder / f"{name}.json").write_text(json.dumps(drawn))
        return out

    return recording_trial


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_two_streaming_trials_see_the_same_batches(shards, tmp_path, ray_local):
    cfg = stream_cfg(tmp_path, shards, "crn", cpus_per_trial=1)
    ensure_teacher(cfg)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers can't import tests/
    (tmp_path / "drawn").mkdir()
    df = pd.read_parquet(search_with(cfg, make_recorder(tmp_path / "drawn")))
    assert len(df) == 2 and (df["status"] == "TERMINATED").all()
    a, b = (json.loads(p.read_text()) for p in sorted((tmp_path / "drawn").glob("*.json")))
    assert len(a) >= cfg.search.max_epochs * (96 // 16) and a == b  # same images, same order


# ---------------------------------------------------------------- opt-in: data > object store


@pytest.mark.bigdata
def test_search_and_finetune_with_an_object_store_smaller_than_the_data(tmp_path):
    import ray

    from casd_ray.pipeline.run import execute

    src = tmp_path / "src"  # 25,000 RGB 64x64 images
    write_image_tree(src, per_class=6250, test_per_class=50, size=64, rgb=True)
    t0 = time.time()
    pack(src, tmp_path / "shards", shard_rows=2048, log=lambda _: None)
    packed_s = time.time() - t0
    cfg = stream_cfg(tmp_path, tmp_path / "shards", "big", {"val_size": 500, "window": 2048},
                     batch_size=128, cpus_per_trial=1, max_concurrent=1)  # fmt: skip
    # every stage at batch 128: the fine-tune at stream_cfg's 16 took most of the test's time
    big_batch = {"batch_size": 128}
    cfg = cfg.model_copy(
        update={
            "teacher": cfg.teacher.model_copy(update=big_batch),
            "finetune": cfg.finetune.model_copy(update=big_batch),
        }
    )
    decoded, store = 25_000 * 3 * 64 * 64, 100 * 10**6  # 307.2 MB of pixels, a 100 MB store
    assert decoded > 3 * store
    ray.init(address="local", num_cpus=2, object_store_memory=store,
             include_dashboard=False, logging_level="ERROR")  # fmt: skip
    try:
        t0 = time.time()
        execute(cfg, ["teacher", "search", "finetune"], log=lambda _: None)
        run_s = time.time() - t0
    finally:
        ray.shutdown()
    assert (cfg.run_dir / "winner" / "model.pt").is_file()
    trials = pd.read_parquet(cfg.run_dir / "trials.parquet")
    assert (trials["status"] == "TERMINATED").all()
    print(
        f"bigdata: {decoded / 1e6:.0f} MB decoded, store {store / 1e6:.0f} MB, "
        f"pack {packed_s:.0f}s, run {run_s:.0f}s"
    )
