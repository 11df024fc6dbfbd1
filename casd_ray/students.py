"""One student, start to finish: pruned from the teacher, fine-tuned with the recipe, exported.

Every network a run compares goes through :func:`train_export` with the same recipe, seed and
distillation: the winner and the uniform baseline (:mod:`casd_ray.finetune`), the audited
trials (:mod:`casd_ray.audit`) and the no-search baselines (:mod:`casd_ray.compare`). Only the
widths differ, and each export folder records the settings it was trained with, so a folder
with equal settings is reused and an interrupted one resumes from its ``last.pt``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from casd_ray import devices, distill, prune
from casd_ray.batches import to_tensors, train_batches
from casd_ray.config import DistillConfig, FinetuneConfig
from casd_ray.cost import measure_flops
from casd_ray.data import DataSplits
from casd_ray.export import Network, is_complete, save_compressed
from casd_ray.files import read_json_or_none
from casd_ray.models import Spec, flops, params, spec_summary

EVAL_BATCH = 1024
# Above this the fine-tune's teacher runs per batch (a paper-scale recipe on a big dataset).
SHARED_LOGITS_MAX_BYTES = 1 << 30
# The latest recipe's teacher logits, keyed by what determines them (one entry at a time).
_SHARED: dict[str, np.ndarray] = {}


def part_settings(stage: dict, spec: Spec) -> dict:
    """Everything that changes one fine-tuned student: the stage's fingerprint + its widths.

    Equal settings mean the part's folder (or its ``last.pt``) can be reused.
    """
    return {**stage, "widths": json.loads(spec.to_json())}


def reusable(folder: Path, settings: dict) -> bool:
    if not is_complete(folder):
        return False
    saved = read_json_or_none(folder / "metrics.json")
    return isinstance(saved, dict) and saved.get("settings") == json.loads(json.dumps(settings))


def finetune_student(
    f: FinetuneConfig,
    d: DistillConfig,
    importance: str,
    seed: int,
    amp: bool,
    data: DataSplits,
    teacher: nn.Module,
    teacher_spec: Spec,
    spec: Spec,
    folder: Path,
    settings: dict,
    device: torch.device,
    log=print,
    label: str = "student",
) -> tuple[nn.Module, list[dict]]:
    """Prune ``spec`` from the teacher and distill it for ``f.epochs``.

    Resumes from ``folder/last.pt`` (written atomically after each epoch) when it carries
    the same settings, so a long paper-scale fine-tune survives an interruption.
    """
    teacher = devices.prepare_model(teacher, device).eval()
    student = prune.inherit(teacher, teacher_spec, spec, criterion=importance)
    student = devices.prepare_model(student, device)
    x, y = to_tensors(data.x_train, data.y_train, device)
    xv, yv = to_tensors(data.x_val, data.y_val, device)
    opt = distill.make_optimizer(student, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
    sched = distill.make_scheduler(
        opt,
        epochs=f.epochs,
        steps_per_epoch=max(1, distill.steps_per_epoch(len(x), f.batch_size)),
        warmup_epochs=f.warmup_epochs,
    )
    amp = bool(amp and device.type == "cuda")
    logits = shared_logits(teacher, x, y, f, seed, data, amp, log)
    last = folder / "last.pt"
    history = distill.resume(last, settings, student, opt, sched, log=log, label=label)
    if not history and d.bn_recalibration_batches > 0:
        batches = train_batches(
            x,
            y,
            batch_size=f.batch_size,
            seed=seed,
            epoch=0,
            augment=data.augment,
            mean=data.mean,
            std=data.std,
        )
        prune.recalibrate_bn(student, batches, d.bn_recalibration_batches)
    history = distill.fit(
        student,
        x,
        y,
        xv,
        yv,
        optimizer=opt,
        scheduler=sched,
        epochs=f.epochs,
        checkpoint=last,
        settings=settings,
        history=history,
        log=log,
        label=label,
        eval_batch_size=EVAL_BATCH,
        batch_size=f.batch_size,
        seed=seed,
        augment=data.augment,
        mean=data.mean,
        std=data.std,
        teacher=teacher,
        teacher_logits=logits,
        temperature=d.temperature,
        alpha=d.alpha,
        amp=amp,
    )
    return student.eval(), history


def shared_logits(
    teacher: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    f: FinetuneConfig,
    seed: int,
    data: DataSplits,
    amp: bool,
    log=print,
) -> np.ndarray | None:
    """The teacher's logits for the fine-tune's batches, computed once per recipe.

    Every network a run fine-tunes (winner, uniform, audited trials, the arms of ``casd-ray
    compare``) trains on the same batches, so the teacher's forward passes (about 40% of a
    half-FLOPs student's compute) are done once and reused. The key is a hash of what decides
    the logits (the teacher's weights, the training images, batch size, seed, epochs, device),
    never a name, so a different teacher or data can never get them. None when they would
    not fit in :data:`SHARED_LOGITS_MAX_BYTES` even as float16: the teacher then runs per batch.
    """
    dtype = distill.logits_dtype(f.epochs, len(x), data.num_classes, SHARED_LOGITS_MAX_BYTES)
    if dtype is None:
        return None
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in teacher.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for tensor in (x, y):
        h.update(tensor.cpu().numpy().tobytes())
    h.update(repr((f.epochs, f.batch_size, seed, data.augment, data.mean, data.std)).encode())
    h.update(repr((str(x.device), amp, str(dtype))).encode())
    key = h.hexdigest()
    if key not in _SHARED:
        _SHARED.clear()
        _SHARED[key] = distill.teacher_logits(
            teacher, x, y, epochs=f.epochs, batch_size=f.batch_size, seed=seed,
            augment=data.augment, mean=data.mean, std=data.std, amp=amp, dtype=dtype,
        )  # fmt: skip
        log(
            f"finetune: teacher logits for {f.epochs} epochs x {len(x)} images computed once "
            f"({_SHARED[key].nbytes / 2**20:.1f} MiB {dtype.name}), shared by every network "
            "fine-tuned with this recipe"
        )
    return _SHARED[key]


def cost_entry(model: nn.Module, spec: Spec, teacher_spec: Spec) -> dict:
    """Analytic and measured cost; the two FLOPs must agree (a check on the analytic model)."""
    shape = (spec.in_channels, *spec.image_size)
    measured = measure_flops(model.cpu(), shape)
    return {
        "flops": flops(spec),
        "flops_measured": measured,
        "params": params(spec),
        "params_measured": sum(p.numel() for p in model.parameters()),
        "flops_ratio": flops(spec) / flops(teacher_spec),
        "params_ratio": params(spec) / params(teacher_spec),
        "width_summary": spec_summary(spec),
    }


def train_export(
    data: DataSplits,
    teacher: Network,
    spec: Spec,
    folder: Path,
    *,
    finetune_cfg: FinetuneConfig,
    distill_cfg: DistillConfig,
    importance: str,
    seed: int,
    amp: bool,
    settings: dict,
    device: torch.device,
    log=print,
    label: str = "student",
    extra: dict | None = None,
) -> dict:
    """Prune ``spec`` from the teacher, fine-tune it with the recipe, evaluate, export.

    One recipe for every network compared (winner, uniform, and the baselines of
    :mod:`casd_ray.compare`): only the widths differ. Returns the metrics it writes into
    ``folder/metrics.json`` (with ``settings``, so equal settings mean a reusable folder).
    """
    model, history = finetune_student(
        finetune_cfg,
        distill_cfg,
        importance,
        seed,
        amp,
        data,
        teacher.model,
        teacher.spec,
        spec,
        folder,
        settings,
        device,
        log,
        label,
    )
    metrics = {
        **distill.evaluate_splits(model, data, device, batch_size=EVAL_BATCH, amp=amp),
        **cost_entry(model, spec, teacher.spec),
        "epochs": finetune_cfg.epochs,
        "seconds": round(sum(h["epoch_seconds"] for h in history), 2),
        **(extra or {}),
        "history": history,
        "settings": settings,
    }
    save_compressed(model, spec, folder, metrics)
    (folder / "last.pt").unlink(missing_ok=True)
    log(f"finetune: {label} val_acc {metrics['val_acc']:.4f} test_acc {metrics['test_acc']:.4f}")
    return metrics
