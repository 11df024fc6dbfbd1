"""The teacher stage: train the network to compress (or import a given one) into ``teacher/``.

``teacher/`` holds everything needed to rebuild it without the config that made it (state
dict + width spec), what it was trained on (data.json), how good it is (metrics.json) and
the settings it was trained with (settings.json, written last). Whether an existing
teacher is reused is the pipeline's decision (:mod:`casd_ray.pipeline.run`); this module only
makes one. A run interrupted mid-training resumes from ``last.pt`` (saved atomically after
every epoch, and only used when it carries the same settings).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from casd_ray.artifacts.network import Network, load_network, load_state
from casd_ray.config import ModelConfig, TeacherConfig
from casd_ray.data.batches import to_tensors
from casd_ray.data.splits import DataSplits
from casd_ray.errors import ArtifactError, ConfigError
from casd_ray.files import atomic_write, write_json, write_text
from casd_ray.models.family import Spec, build_model, flops, group_widths, params, spec_for
from casd_ray.train.devices import pick_device, prepare_model
from casd_ray.train.loop import Checkpoint, evaluate_splits, fit, resume
from casd_ray.train.recipe import make_optimizer, make_scheduler, steps_per_epoch

EVAL_BATCH = 1024
FILES = ("model.pt", "widths.json", "data.json", "metrics.json", "settings.json")


def teacher_spec(model_cfg: ModelConfig, data: DataSplits, ignore: list[str] = ()) -> Spec:
    """The architecture ``model`` names, shaped for ``data`` (channels, classes, image size);
    ``ignore`` (``space.ignore``) lists a source model's modules that stay full."""
    return spec_for(
        model_cfg.arch,
        in_channels=data.in_channels,
        num_classes=data.num_classes,
        image_size=tuple(data.image_size),
        width=model_cfg.width,
        kwargs=model_cfg.kwargs,
        ignore=ignore,
    )


def make_teacher(
    data: DataSplits,
    model_cfg: ModelConfig,
    teacher_cfg: TeacherConfig,
    seed: int,
    folder: Path,
    *,
    settings: dict,
    amp: bool = True,
    log=print,
    num_threads: int | None = None,
    device: str | torch.device | None = None,
    given: nn.Module | None = None,
) -> Network:
    """Train the teacher (or load ``teacher.checkpoint``) and write ``folder``.

    ``settings`` is the stage's fingerprint: stored in ``last.pt`` (a resume only continues
    a checkpoint made with the same settings) and as ``settings.json``, written last.
    ``num_threads`` sets torch's intra-op threads for this call only; ``device`` defaults to
    CUDA when visible. ``given``: a trained network (the Python API's model) used as it is.
    """
    threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        dev = torch.device(device) if device is not None else pick_device(1)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "settings.json").unlink(missing_ok=True)  # written last: marks a finished one
        if given is not None:  # a trained network from the Python API: used as it is
            spec = teacher_spec(model_cfg, data)
            model = build_model(spec)
            model.load_state_dict(given.state_dict())
            epochs_done, seconds = 0, 0.0
            log("teacher: using the given trained model")
        elif teacher_cfg.checkpoint:
            model, spec = load_checkpoint(teacher_cfg.checkpoint, model_cfg, data, log)
            epochs_done, seconds = 0, 0.0
        else:
            model, spec, seconds = _train(
                data, model_cfg, teacher_cfg, seed, folder, settings, dev, amp, log
            )
            epochs_done = teacher_cfg.epochs
        return _finish(data, folder, settings, model, spec, epochs_done, seconds, dev, amp, log)
    finally:
        torch.set_num_threads(threads)


def load_checkpoint(
    checkpoint: str, model_cfg: ModelConfig, data: DataSplits, log
) -> tuple[nn.Module, Spec]:
    """Load ``teacher.checkpoint``: a saved folder (with widths.json) or a bare state dict.

    Any problem with the file is a ConfigError naming ``teacher.checkpoint``.
    """
    src = Path(checkpoint)
    if not src.exists():
        raise ConfigError(f"teacher.checkpoint: {src} does not exist")
    try:
        if (src.is_dir() and (src / "widths.json").is_file()) or (
            src.is_file() and (src.parent / "widths.json").is_file()
        ):
            net = load_network(src)
            model, spec = net.model, net.spec
            _check_same_architecture(src, spec, teacher_spec(model_cfg, data), model_cfg)
        else:
            if src.is_dir():
                raise ConfigError(f"teacher.checkpoint: {src} has no model.pt/widths.json")
            spec = teacher_spec(model_cfg, data)
            model = build_model(spec)
            load_state(src, model, Path(f"model.arch={model_cfg.arch}"))
    except ArtifactError as err:
        raise ConfigError(f"teacher.checkpoint: {err}") from None
    expected = (data.in_channels, data.num_classes, tuple(data.image_size))
    got = (spec.in_channels, spec.num_classes, tuple(spec.image_size))
    if got != expected:
        raise ConfigError(
            f"teacher.checkpoint: {src} fits (channels, classes, size) {got}, data has {expected}"
        )
    log(f"teacher: loaded {src}")
    return model, spec


def _check_same_architecture(src: Path, spec: Spec, expected: Spec, model_cfg: ModelConfig):
    """A checkpoint's own widths.json must describe the network the config names: it used to
    replace ``model.arch`` silently, so a run was labelled with one network and was another."""
    same = (
        type(spec) is type(expected)
        and getattr(spec, "arch", None) == getattr(expected, "arch", None)
        and group_widths(spec) == group_widths(expected)
    )
    if not same:
        width = "" if ":" in model_cfg.arch else f", model.width {model_cfg.width}"
        raise ConfigError(
            f"teacher.checkpoint: {src} holds another network than model.arch "
            f"{model_cfg.arch}{width} describes; set model.* to the checkpoint's network"
        )


def _train(
    data: DataSplits,
    model_cfg: ModelConfig,
    t: TeacherConfig,
    seed: int,
    folder: Path,
    settings: dict,
    dev: torch.device,
    amp: bool,
    log,
) -> tuple[nn.Module, Spec, float]:
    """Train from scratch, or from ``last.pt`` when it was written with the same settings."""
    spec = teacher_spec(model_cfg, data)
    torch.manual_seed(seed)
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
    ckpt = Checkpoint(folder / "last.pt", settings)
    history = resume(ckpt, model, opt, sched, log=log, label="teacher")
    width = "" if ":" in model_cfg.arch else f"width {model_cfg.width}, "
    log(
        f"teacher: training {model_cfg.arch} ({width}{flops(spec) / 1e6:.1f} MFLOPs, "
        f"{params(spec) / 1e3:.1f}k params) on {len(x)} images, {t.epochs} epochs, {dev}"
    )
    history = fit(
        model,
        (x, y),
        (xv, yv),
        optimizer=opt,
        scheduler=sched,
        epochs=t.epochs,
        batching=data.batching(t.batch_size, seed),
        checkpoint=ckpt,
        history=history,
        label_smoothing=t.label_smoothing,
        amp=amp and dev.type == "cuda",
        eval_batch_size=EVAL_BATCH,
        log=log,
        label="teacher",
    )
    seconds = sum(h["epoch_seconds"] for h in history)  # training + validation, not saves
    return model, spec, seconds


def _finish(
    data: DataSplits,
    folder: Path,
    settings: dict,
    model: nn.Module,
    spec: Spec,
    epochs: int,
    seconds: float,
    dev: torch.device,
    amp: bool,
    log,
) -> Network:
    """Evaluate on validation and test, write the folder (settings.json last), drop last.pt."""
    model = prepare_model(model, dev)
    amp = amp and dev.type == "cuda"
    metrics = {
        **evaluate_splits(model, data, dev, batch_size=EVAL_BATCH, amp=amp),
        "epochs": epochs,
        "seconds": round(seconds, 2),
        "flops": flops(spec),
        "params": params(spec),
    }
    model = model.cpu().to(memory_format=torch.contiguous_format).eval()
    atomic_write(folder / "model.pt", lambda p: torch.save(model.state_dict(), p))
    write_text(folder / "widths.json", spec.to_json())
    write_json(folder / "data.json", data.describe())
    write_json(folder / "metrics.json", metrics)
    write_json(folder / "settings.json", settings)
    (folder / "last.pt").unlink(missing_ok=True)
    log(
        f"teacher: val_acc {metrics['val_acc']:.4f} test_acc {metrics['test_acc']:.4f} "
        f"saved to {folder}"
    )
    return Network(model, spec, folder, metrics)
