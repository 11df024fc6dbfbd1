"""Shared fixtures: tiny datasets written in the real on-disk formats.

The experiment configs point at CIFAR and Fashion-MNIST; these writers let every config run
end to end in a smoke size without downloads (``--set data.root=<tmp>``). Images carry a
class-dependent brightness pattern, so a tiny network can learn something in one epoch.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from casd_ray.widths import space

CIFAR_LAYOUT = {
    # dataset: (folder, train files, test files, meta file, meta key, label key, classes)
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "batches.meta",
        "label_names",
        "labels",
        10,
    ),
    "cifar100": (
        "cifar-100-python",
        ["train"],
        ["test"],
        "meta",
        "fine_label_names",
        "fine_labels",
        100,
    ),
}


def _images(rng: np.random.Generator, labels: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """uint8 images whose mean brightness depends on the label (+ noise)."""
    classes = int(labels.max()) + 1 if len(labels) else 1
    base = (labels.astype(np.float64) + 0.5) / max(classes, 1) * 200
    noise = rng.normal(0, 20, (len(labels), *shape))
    return np.clip(base.reshape(-1, *([1] * len(shape))) + noise, 0, 255).astype(np.uint8)


def write_fake_cifar(root: Path, dataset: str = "cifar10", n: int = 120, n_test: int = 40) -> Path:
    """A CIFAR python-version folder under ``root`` with ``n`` train and ``n_test`` test images."""
    folder_name, train, test, meta_name, meta_key, label_key, classes = CIFAR_LAYOUT[dataset]
    folder = root / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for files, total in ((train, n), (test, n_test)):
        for i, name in enumerate(files):
            count = total // len(files) + (1 if i < total % len(files) else 0)
            labels = rng.integers(0, classes, count)
            data = _images(rng, labels, (3072,))
            batch = {b"data": data, label_key.encode(): [int(v) for v in labels]}
            if dataset == "cifar100":
                batch[b"coarse_labels"] = [int(v) // 5 for v in labels]
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {meta_key.encode(): [f"class{i}".encode() for i in range(classes)]}
    (folder / meta_name).write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_fake_fashion_mnist(root: Path, n: int = 120, n_test: int = 40) -> Path:
    """The four gzip'd idx files of Fashion-MNIST, tiny."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, count in (("train", n), ("t10k", n_test)):
        labels = rng.integers(0, 10, count).astype(np.uint8)
        images = _images(rng, labels, (28, 28))
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            header = struct.pack(f">{1 + arr.ndim}I", 0x0800 + arr.ndim, *arr.shape)
            (root / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + arr.tobytes()))
    return root


@pytest.fixture
def fake_cifar(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``fake_cifar(dataset="cifar10", n=120, n_test=40) -> data root`` in tmp_path."""

    def make(dataset: str = "cifar10", n: int = 120, n_test: int = 40) -> Path:
        return write_fake_cifar(tmp_path / f"data-{dataset}", dataset, n, n_test)

    return make


@pytest.fixture
def fake_fashion_mnist(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``fake_fashion_mnist(n=120, n_test=40) -> data root`` in tmp_path."""

    def make(n: int = 120, n_test: int = 40) -> Path:
        return write_fake_fashion_mnist(tmp_path / "data-fashion", n, n_test)

    return make


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks: one thread is fastest, and other suites share the two cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_run_config(path: Path, output_dir: Path, data_root: Path, **sections) -> Path:
    """A tiny Fashion-MNIST experiment YAML for command-line tests (``sections`` override)."""
    import yaml

    raw = {
        "name": "r",
        "output_dir": str(output_dir),
        "data": {"dataset": "fashion_mnist", "root": str(data_root), "val_size": 40},
        "model": {"arch": "resnet8", "width": 4},
        "teacher": {"epochs": 1, "batch_size": 32},
        "space": {"granularity": "stage", "budget": {"target": 0.5}},
        "search": {"num_samples": 4, "max_epochs": 2, "batch_size": 32},
        "finetune": {"epochs": 1, "batch_size": 32},
    }
    for key, value in sections.items():
        base = raw.get(key)
        raw[key] = {**base, **value} if isinstance(base, dict) else value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------- a small run without Ray


def tiny_config(output_dir: Path, data_root: Path, **sections):
    """A Fashion-MNIST-shaped config small enough to train in a second on one CPU."""
    from casd_ray.config import ExperimentConfig

    raw = {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(output_dir),
        "data": {"dataset": "fashion_mnist", "root": str(data_root), "val_size": 30},
        "model": {"arch": "resnet8", "width": 4},
        "teacher": {"epochs": 1, "batch_size": 32},
        "space": {"granularity": "stage", "budget": {"target": 0.5}},
        "search": {"max_epochs": 2, "num_samples": 4},
        "finetune": {"epochs": 1, "batch_size": 32},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return ExperimentConfig.model_validate(raw)


def fake_trials(cfg, teacher_spec, accs=(0.5, 0.7, 0.6, 0.9)):
    """A trials table in search.py's format, without running Ray: trial 0 is the control,
    trial 3 (best score) was stopped early, so trial 1 must win."""
    import json

    import pandas as pd

    from casd_ray.artifacts.trials import COLUMNS
    from casd_ray.models.family import flops, params, spec_summary

    rng = np.random.default_rng(0)
    names = space.gene_names(teacher_spec, cfg.space.granularity)
    rules = rules_of(cfg)
    genomes = [space.control_genome(rules, teacher_spec)]
    genomes += [{n: float(rng.uniform(0.2, 1.0)) for n in names} for _ in accs[1:]]
    rows = []
    for i, (genome, acc) in enumerate(zip(genomes, accs, strict=True)):
        spec = space.candidate_spec(rules, teacher_spec, genome)
        done = i != 3
        rows.append(
            {
                "trial_id": f"t{i}",
                "genome": json.dumps(genome),
                "widths": spec.model_dump_json(),
                "width_summary": json.dumps(spec_summary(spec)),
                "flops": flops(spec),
                "params": params(spec),
                "flops_ratio": flops(spec) / flops(teacher_spec),
                "params_ratio": params(spec) / params(teacher_spec),
                "best_val_acc": acc,
                "last_val_acc": acc,
                "last_val_loss": 1.0,
                "epochs": cfg.search.max_epochs if done else 1,
                "completed": done,
                "stopped_early": not done,
                "status": "TERMINATED",
                "error": None,
                "node_id": "local",
                "wall_time_s": 2.0,
                "start_time": 1000.0 + i,
                "end_time": 1002.0 + i,
                "is_control": i == 0,
                "meets_budget": True,
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


@pytest.fixture(scope="session")
def finetuned_run(tmp_path_factory: pytest.TempPathFactory):
    """A run folder with teacher/, a fake trials.parquet, winner/, uniform/ and finetune.json.

    Built once per session (a few seconds) and shared read-only by finetune/report tests.
    """
    base = tmp_path_factory.mktemp("finetuned")
    data_root = write_fake_fashion_mnist(base / "data")
    cfg = tiny_config(base / "runs", data_root)
    teacher = ensure_teacher(cfg)
    fake_trials(cfg, teacher.spec).to_parquet(cfg.run_dir / "trials.parquet")
    logs: list[str] = []
    summary = finetune_stage(cfg, log=logs.append)
    return cfg, summary, logs


def rules_of(cfg):
    """The space rules of an experiment config (what trials and selection use)."""

    return space.rules_of(cfg.space, cfg.search.algorithm)


def ensure_teacher(cfg, log=lambda _: None, num_threads: int = 1):
    """The run's teacher through the pipeline's teacher stage (trained once, then reused)."""
    import torch

    from casd_ray.artifacts.network import load_network
    from casd_ray.pipeline.run import execute

    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        execute(cfg, ["teacher"], log=log)
    finally:
        torch.set_num_threads(threads)
    return load_network(cfg.run_dir / "teacher")


def search_with(cfg, trainable, resume: bool = False, **kwargs):
    """The search stage on the run's teacher, each trial running ``trainable`` (tests wrap
    :func:`casd_ray.search.trial.distill_trial` to inject faults or delays); a fresh search
    unless ``resume``.
    ``kwargs`` go to ``run_search`` (e.g. ``address`` of a test cluster)."""
    from casd_ray.artifacts.network import load_network
    from casd_ray.search.run import run_search
    from casd_ray.search.trial_plan import trial_plan
    from casd_ray.stream.load import load_data

    return run_search(
        load_data(cfg.data, cfg.seed),
        load_network(cfg.run_dir / "teacher"),
        search_cfg=cfg.search,
        plan=trial_plan(cfg.space, cfg.distill, cfg.search, cfg.seed),
        run_dir=cfg.run_dir,
        resume=resume,
        trainable=trainable,
        **{"log": lambda _: None, **kwargs},
    )


def tiny_search_cfg(root: Path, images: Path, name: str, **search):
    """A seconds-sized search config on :func:`write_image_tree` data (``search`` overrides)."""
    from casd_ray.config import ExperimentConfig

    return ExperimentConfig.model_validate(
        {
            "name": name,
            "output_dir": str(root),
            "model": {"arch": "resnet8", "width": 4},
            "data": {"dataset": "imagefolder", "root": str(images), "val_size": 40},
            "teacher": {"epochs": 1, "batch_size": 32},
            "space": {"budget": {"target": 0.5}},
            "search": {"batch_size": 32} | search,
        }
    )


def finished_trials(exp) -> dict[str, dict]:
    """Trials Tune's own saved state (a folder or a bucket URI) marks finished: last row each."""
    from ray.tune import ExperimentAnalysis

    try:
        analysis = ExperimentAnalysis(str(exp))
    except Exception:  # noqa: BLE001 - not written yet, or mid-write
        return {}
    out = {}
    for t in analysis.trials:
        df = analysis.trial_dataframes.get(t.trial_id)
        if t.status == "TERMINATED" and df is not None and len(df):
            out[t.trial_id] = df.iloc[-1][["epoch", "val_acc", "timestamp"]].to_dict()
    return out


def kill_search_midway(
    config: Path, address: str, exp, log: Path, want: int = 2, on_poll=lambda: None
) -> dict:
    """``casd-ray search CONFIG --address ADDRESS`` in its own process group (we kill exactly
    what we started), SIGKILLed once ``want`` trials have finished; returns those trials.
    Tune snapshots its state every second here, so the watcher sees finished trials while
    most of the search is still ahead. ``on_poll()`` runs at every look (twice a second)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    argv = ["search", str(config), "--address", address]
    code = f"from casd_ray.cli import main; main({argv!r})"
    finished: dict = {}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"},
        )
        try:
            deadline = time.time() + 240
            while len(finished) < want and proc.poll() is None and time.time() < deadline:
                time.sleep(0.5)
                on_poll()
                finished = finished_trials(exp)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return finished


def finetune_stage(cfg, log=lambda _: None, **kwargs):
    """``run_finetune`` on the run folder's teacher and trials table, as the pipeline calls it."""
    from casd_ray.artifacts.network import load_network
    from casd_ray.artifacts.trials import read_trials
    from casd_ray.pipeline.plan import fingerprints
    from casd_ray.pipeline.stages.finetune import run_finetune
    from casd_ray.stream.load import load_data

    return run_finetune(
        load_data(cfg.data, cfg.seed),
        load_network(cfg.run_dir / "teacher"),
        read_trials(cfg.run_dir / "trials.parquet"),
        finetune_cfg=cfg.finetune,
        distill_cfg=cfg.distill,
        rules=rules_of(cfg),
        seed=cfg.seed,
        run_dir=cfg.run_dir,
        settings=fingerprints(cfg)["finetune"],
        amp=cfg.search.amp,
        log=log,
        **kwargs,
    )


def write_image_tree(
    root: Path, *, per_class: int = 60, test_per_class: int = 10, size: int = 8, rgb: bool = False
) -> Path:
    """``root/{train,test}/c<k>/*.png``: 4 classes of grayscale (or RGB) textures + noise.

    Horizontal stripes, vertical stripes, checkerboard, flat: the class survives the flips
    and pad-crops of the imagefolder augmentation, so a tiny net learns it in a few epochs,
    while a Ray Tune trial spends its time in Ray, not in training (search tests).
    """
    from PIL import Image

    rng = np.random.default_rng(0)
    i, j = np.indices((size, size))
    flat = np.full((size, size), 80)
    patterns = [(i % 2) * 160, (j % 2) * 160, ((i + j) % 2) * 160, flat]
    shape = (size, size, 3) if rgb else (size, size)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, pattern in enumerate(patterns):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(n):
                p = pattern[..., None] if rgb else pattern
                img = p + rng.integers(0, 90, shape)
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{k}.png")
    return root


@pytest.fixture(scope="session")
def image_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session-wide :func:`write_image_tree` (imagefolder dataset root)."""
    return write_image_tree(tmp_path_factory.mktemp("images"))


# ---------------------------------------------------------------- smoke size for any experiment


def smoke_overrides(config_path: Path, base: Path) -> list[str]:
    """``--set`` items that shrink an experiment to seconds, keeping everything else.

    Fake data in the dataset's real format is written under ``base``; the architecture is
    swapped for a ResNet-8 of width 4 (same family, same code paths), and every stage runs
    one epoch on ~100 images with two search trials. A source model (``torchvision:``…) is
    kept as it is: its groups and cost model are what the smoke run checks.
    """
    from casd_ray.config_file import load_config

    cfg = load_config(config_path)
    dataset = cfg.data.dataset
    if dataset == "fashion_mnist":
        root = write_fake_fashion_mnist(base / "data-fashion", n=120, n_test=40)
    elif dataset in CIFAR_LAYOUT:
        root = write_fake_cifar(base / f"data-{dataset}", dataset, n=120, n_test=40)
    elif dataset == "imagefolder" and ":" in cfg.model.arch:  # a user's model: RGB, 32x32
        root = write_image_tree(
            base / "data-rgb", per_class=30, test_per_class=10, size=32, rgb=True
        )
    elif dataset == "imagefolder":
        root = write_image_tree(base / "data-images", per_class=30, test_per_class=10)
    else:
        raise ValueError(f"no smoke data writer for {dataset}")
    items = {
        "output_dir": base / "runs",
        "data.root": root,
        "data.download": False,
        "data.val_size": 30,
        "teacher.epochs": 1,
        "teacher.batch_size": 32,
        "search.num_samples": 2,
        "search.max_epochs": 1,
        "search.batch_size": 32,
        "search.cpus_per_trial": 1,
        "search.gpus_per_trial": 0,
        "search.max_concurrent": 2,
        "distill.bn_recalibration_batches": min(cfg.distill.bn_recalibration_batches, 1),
        "finetune.epochs": 1,
        "finetune.batch_size": 32,
        "finetune.warmup_epochs": 0,
        "audit.top_k": 2,
    }
    if ":" not in cfg.model.arch:  # a built-in ResNet shrinks; a user's own model is kept
        items.update({"model.arch": "resnet8", "model.width": 4})
    return [f"{k}={v}" for k, v in items.items()]


def forget_cluster_address(address: str) -> None:
    """Remove the address a ``ray.cluster_utils.Cluster`` wrote to Ray's current-cluster file,
    where every later plain ``ray.init()`` on this machine would find it - only if it is still
    this cluster's (what a test started, nothing else)."""
    from ray._private.utils import get_ray_address_file

    address_file = Path(get_ray_address_file(None))
    if address_file.exists() and address_file.read_text().strip() == address:
        address_file.unlink()
