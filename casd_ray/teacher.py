"""The teacher: trained once per run, reused by every later command and every trial.

``runs/<name>/teacher/`` holds everything needed to rebuild it without the config that made
it (state dict + width spec), what it was trained on (data.json), how good it is
(metrics.json) and the settings it was trained with (settings.json). settings.json is
written last, so its presence marks a finished teacher; a rerun with equal settings reuses
it, and a run interrupted mid-training resumes from ``last.pt`` (saved atomically after
every epoch) instead of starting over.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from casd_ray.config import ConfigError, ExperimentConfig
from casd_ray.data import DataSplits, load_dataset, to_tensors
from casd_ray.distill import (
    evaluate_splits,
    fit,
    make_optimizer,
    make_scheduler,
    pick_device,
    prepare_model,
    resume,
    steps_per_epoch,
)
from casd_ray.export import atomic_write, write_json
from casd_ray.models import WidthSpec, build_model, flops, params, spec_for

EVAL_BATCH = 1024
FILES = ("model.pt", "widths.json", "data.json", "metrics.json", "settings.json")


@dataclass
class TeacherArtifacts:
    """A ready teacher (eval mode, on CPU) with its spec, metrics and folder."""

    model: nn.Module
    spec: WidthSpec
    metrics: dict
    path: Path


# --------------------------------------------------------------------------- (de)serialisation


def state_to_numpy(state_dict: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """CPU numpy copies of a state dict: what goes into the Ray object store.

    Numpy arrays are read zero-copy by every worker on a node; torch tensors would be
    copied into each trial.
    """
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state_dict.items()}


def numpy_to_state(d: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Tensors from :func:`state_to_numpy` arrays; read-only (object-store) arrays are copied.

    ``torch.from_numpy`` on a read-only array warns and would allow writes into shared
    memory, so only writable arrays are shared.
    """
    out = {}
    for k, v in d.items():
        arr = np.asarray(v)
        out[k] = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    return out


def load_teacher(path: str | Path) -> tuple[nn.Module, WidthSpec]:
    """Rebuild a saved network from a ``teacher/`` or ``winner/`` folder (or its model.pt).

    The width spec next to the state dict is all the architecture there is, so a pruned
    student loads exactly like the teacher.
    """
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    model_file = path if path.is_file() else folder / "model.pt"
    widths = folder / "widths.json"
    if not model_file.is_file() or not widths.is_file():
        raise FileNotFoundError(
            f"{path}: expected model.pt and widths.json (a teacher/ or winner/ folder)"
        )
    spec = WidthSpec.load(widths)
    model = build_model(spec)
    model.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=True))
    model.eval()
    return model, spec


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- settings


def teacher_settings(cfg: ExperimentConfig) -> dict:
    """Everything that changes the trained teacher; equal settings mean the teacher is reused.

    The run name, output folder and the later stages' settings are left out on purpose:
    changing the search must not retrain the teacher.
    """
    return {
        "seed": cfg.seed,
        "data": cfg.data.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "teacher": cfg.teacher.model_dump(mode="json"),
    }


def _spec_for_data(cfg: ExperimentConfig, data: DataSplits) -> WidthSpec:
    return spec_for(
        cfg.model.arch,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=tuple(data.image_size),
        width=cfg.model.width,
    )


def _finished(folder: Path, settings: dict) -> bool:
    return all((folder / f).is_file() for f in FILES) and _read_json(
        folder / "settings.json"
    ) == json.loads(json.dumps(settings))


def _load_artifacts(folder: Path) -> TeacherArtifacts:
    model, spec = load_teacher(folder)
    return TeacherArtifacts(model, spec, _read_json(folder / "metrics.json") or {}, folder)


# --------------------------------------------------------------------------- ensure_teacher


def ensure_teacher(
    cfg: ExperimentConfig,
    data: DataSplits | None = None,
    log=print,
    *,
    num_threads: int | None = None,
    device: str | torch.device | None = None,
) -> TeacherArtifacts:
    """Return the run's teacher: reused, loaded from ``teacher.checkpoint``, or trained.

    ``num_threads`` sets torch's intra-op threads for this call only (restored after), so a
    caller sharing the CPU with other work can keep the teacher off the other cores;
    ``device`` defaults to CUDA when visible. Data is loaded only when something must be
    computed.
    """
    folder = cfg.run_dir / "teacher"
    settings = teacher_settings(cfg)
    if _finished(folder, settings):
        log(f"teacher: reusing {folder} (same settings)")
        return _load_artifacts(folder)
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        dev = torch.device(device) if device is not None else pick_device(1)
        if data is None:
            data = load_dataset(cfg.data, cfg.seed)
        folder.mkdir(parents=True, exist_ok=True)
        if cfg.teacher.checkpoint:
            model, spec = _from_checkpoint(cfg, data, log)
            epochs_done, seconds = 0, 0.0
        else:
            model, spec, seconds = _train(cfg, data, folder, settings, dev, log)
            epochs_done = cfg.teacher.epochs
        return _finish(cfg, data, folder, settings, model, spec, epochs_done, seconds, dev, log)
    finally:
        torch.set_num_threads(threads)


def _from_checkpoint(cfg: ExperimentConfig, data: DataSplits, log) -> tuple[nn.Module, WidthSpec]:
    """Load ``teacher.checkpoint``: a saved folder (with widths.json) or a bare state dict."""
    src = Path(cfg.teacher.checkpoint)
    if not src.exists():
        raise FileNotFoundError(f"teacher.checkpoint: {src} does not exist")
    if (src.is_dir() and (src / "widths.json").is_file()) or (
        src.is_file() and (src.parent / "widths.json").is_file()
    ):
        model, spec = load_teacher(src)
    else:
        if src.is_dir():
            raise FileNotFoundError(f"teacher.checkpoint: {src} has no model.pt/widths.json")
        spec = _spec_for_data(cfg, data)
        model = build_model(spec)
        state = torch.load(src, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]  # a last.pt resume checkpoint
        model.load_state_dict(state)
    expected = (data.in_channels, data.num_classes, tuple(data.image_size))
    got = (spec.in_channels, spec.num_classes, tuple(spec.image_size))
    if got != expected:
        raise ConfigError(
            f"teacher.checkpoint: {src} fits (channels, classes, size) {got}, data has {expected}"
        )
    log(f"teacher: loaded {src}")
    return model, spec


def _train(
    cfg: ExperimentConfig,
    data: DataSplits,
    folder: Path,
    settings: dict,
    dev: torch.device,
    log,
) -> tuple[nn.Module, WidthSpec, float]:
    """Train from scratch, or from ``last.pt`` when it was written with the same settings."""
    t = cfg.teacher
    spec = _spec_for_data(cfg, data)
    torch.manual_seed(cfg.seed)
    model = prepare_model(build_model(spec), dev)
    x, y = to_tensors(data.x_train, data.y_train, dev)
    xv, yv = to_tensors(data.x_val, data.y_val, dev)
    steps = steps_per_epoch(len(x), t.batch_size)
    opt = make_optimizer(
        model, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay, nesterov=t.nesterov
    )
    sched = make_scheduler(
        opt, epochs=t.epochs, steps_per_epoch=max(1, steps), warmup_epochs=t.warmup_epochs
    )
    history = resume(folder / "last.pt", settings, model, opt, sched, log=log, label="teacher")
    log(
        f"teacher: training {cfg.model.arch} (width {cfg.model.width}, {flops(spec) / 1e6:.1f} "
        f"MFLOPs, {params(spec) / 1e3:.1f}k params) on {len(x)} images, {t.epochs} epochs, {dev}"
    )
    history = fit(
        model,
        x,
        y,
        xv,
        yv,
        optimizer=opt,
        scheduler=sched,
        epochs=t.epochs,
        checkpoint=folder / "last.pt",
        settings=settings,
        history=history,
        log=log,
        label="teacher",
        eval_batch_size=EVAL_BATCH,
        batch_size=t.batch_size,
        seed=cfg.seed,
        augment=data.augment,
        mean=data.mean,
        std=data.std,
        label_smoothing=t.label_smoothing,
        amp=cfg.search.amp and dev.type == "cuda",
    )
    seconds = sum(h["epoch_seconds"] for h in history)  # training + validation, not saves
    return model, spec, seconds


def _finish(
    cfg: ExperimentConfig,
    data: DataSplits,
    folder: Path,
    settings: dict,
    model: nn.Module,
    spec: WidthSpec,
    epochs: int,
    seconds: float,
    dev: torch.device,
    log,
) -> TeacherArtifacts:
    """Evaluate on validation and test, write the folder (settings.json last), drop last.pt."""
    model = prepare_model(model, dev)
    amp = cfg.search.amp and dev.type == "cuda"
    metrics = {
        **evaluate_splits(model, data, dev, batch_size=EVAL_BATCH, amp=amp),
        "epochs": epochs,
        "seconds": round(seconds, 2),
        "flops": flops(spec),
        "params": params(spec),
    }
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    atomic_write(folder / "model.pt", lambda p: torch.save(model.state_dict(), p))
    atomic_write(folder / "widths.json", lambda p: p.write_text(spec.to_json()))
    write_json(folder / "data.json", data.describe())
    write_json(folder / "metrics.json", metrics)
    write_json(folder / "settings.json", settings)
    (folder / "last.pt").unlink(missing_ok=True)
    log(
        f"teacher: val_acc {metrics['val_acc']:.4f} test_acc {metrics['test_acc']:.4f} "
        f"saved to {folder}"
    )
    return TeacherArtifacts(model, spec, metrics, folder)
