"""One student, start to finish: pruned from the teacher, fine-tuned with the recipe, exported.

Every network a run compares goes through :func:`train_export` with the same
:class:`StudentRecipe`: the winner and the uniform baseline (:mod:`.finetune`), the audited
trials (:mod:`.audit`) and the no-search baselines (:mod:`casd_ray.study.compare`). Only the
widths differ, and each export folder records the settings it was trained with, so a folder
with equal settings is reused and an interrupted one resumes from its ``last.pt``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from casd_ray.artifacts.correct import encode_correct
from casd_ray.artifacts.network import (
    PREPROCESSING,
    Network,
    is_complete,
    preprocessing_of,
    save_compressed,
    verify_export,
)
from casd_ray.config import DistillConfig, FinetuneConfig
from casd_ray.data.batches import to_tensors
from casd_ray.data.splits import DataSplits
from casd_ray.errors import ArtifactError
from casd_ray.files import read_json_or_none, write_json
from casd_ray.models.cost import measure_flops
from casd_ray.models.family import Spec, build_model, flops, params, spec_summary
from casd_ray.train import devices
from casd_ray.train.bn import recalibrate_bn
from casd_ray.train.kd import KD, SoftTargets, shared_teacher_logits
from casd_ray.train.loop import Checkpoint, evaluate_splits, fit, resume
from casd_ray.train.recipe import make_optimizer, make_scheduler, steps_per_epoch
from casd_ray.widths.inherit import inherit

EVAL_BATCH = 1024


@dataclass(frozen=True)
class StudentRecipe:
    """How every compared network is pruned and fine-tuned (identical for all of them)."""

    finetune: FinetuneConfig
    distill: DistillConfig
    importance: str
    seed: int
    amp: bool = True


def part_settings(stage: dict, spec: Spec) -> dict:
    """Everything that changes one fine-tuned student: the stage's fingerprint + its widths.

    Equal settings mean the part's folder (or its ``last.pt``) can be reused.
    """
    return {**stage, "widths": json.loads(spec.to_json())}


def reusable(folder: Path, settings: dict) -> bool:
    """Whether an exported part can be reused: complete, made with ``settings``, and it
    loads and runs (a garbled ``model.pt`` or ``widths.json`` is exported again)."""
    if not is_complete(folder):
        return False
    saved = read_json_or_none(folder / "metrics.json")
    if not (isinstance(saved, dict) and saved.get("settings") == json.loads(json.dumps(settings))):
        return False
    try:
        verify_export(folder)
    except ArtifactError:
        return False
    return True


def add_preprocessing(folder: Path, data: DataSplits) -> None:
    """Write ``preprocessing.json`` into a reused folder exported before it existed."""
    if not (folder / PREPROCESSING).is_file():
        write_json(folder / PREPROCESSING, preprocessing_of(data.describe()))


def finetune_student(
    recipe: StudentRecipe,
    data: DataSplits,
    teacher: Network,
    spec: Spec,
    folder: Path,
    settings: dict,
    device: torch.device,
    log=print,
    label: str = "student",
    start: dict[str, torch.Tensor] | None = None,
) -> tuple[nn.Module, list[dict]]:
    """Prune ``spec`` from the teacher and distill it for ``recipe.finetune.epochs``.

    Resumes from ``folder/last.pt`` (written atomically after each epoch) when it carries
    the same settings, so a long paper-scale fine-tune survives an interruption. The
    teacher's logits for the recipe's batches are computed once and shared by every network
    fine-tuned with the same recipe (:func:`casd_ray.train.kd.shared_teacher_logits`).
    ``start``: the weights of a student pruned by another tool (its own channel choice)
    instead of inheriting the teacher's most important channels. ``distill.alpha`` 0 trains
    on the labels alone (no teacher at all).
    """
    f, d = recipe.finetune, recipe.distill
    t_model = devices.prepare_model(teacher.model, device).eval()
    if start is None:
        student = inherit(t_model, teacher.spec, spec, criterion=recipe.importance)
    else:
        student = build_model(spec)
        student.load_state_dict(start)
    student = devices.prepare_model(student, device)
    x, y = to_tensors(data.x_train, data.y_train, device)
    xv, yv = to_tensors(data.x_val, data.y_val, device)
    opt = make_optimizer(student, lr=f.lr, momentum=f.momentum, weight_decay=f.weight_decay)
    sched = make_scheduler(
        opt,
        epochs=f.epochs,
        steps_per_epoch=max(1, steps_per_epoch(len(x), f.batch_size)),
        warmup_epochs=f.warmup_epochs,
    )
    amp = bool(recipe.amp and device.type == "cuda")
    batching = data.batching(f.batch_size, recipe.seed)
    targets = None
    if d.alpha > 0:
        logits = shared_teacher_logits(
            t_model, x, y, classes=data.num_classes, epochs=f.epochs, batching=batching,
            amp=amp, log=lambda m: log(f"finetune: {m}"),
            what="every network fine-tuned with this recipe",
        )  # fmt: skip
        targets = SoftTargets(KD(d.temperature, d.alpha), model=t_model, logits=logits)
    ckpt = Checkpoint(folder / "last.pt", settings)
    history = resume(ckpt, student, opt, sched, log=log, label=label)
    if not history and d.bn_recalibration_batches > 0:
        recalibrate_bn(student, batching.epoch(x, y, 0), d.bn_recalibration_batches)
    history = fit(
        student,
        (x, y),
        (xv, yv),
        optimizer=opt,
        scheduler=sched,
        epochs=f.epochs,
        batching=batching,
        checkpoint=ckpt,
        history=history,
        targets=targets,
        amp=amp,
        eval_batch_size=EVAL_BATCH,
        log=log,
        label=label,
    )
    return student.eval(), history


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
    recipe: StudentRecipe,
    settings: dict,
    device: torch.device,
    log=print,
    label: str = "student",
    extra: dict | None = None,
    start: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Prune ``spec`` from the teacher, fine-tune it with the recipe, evaluate, export.

    One recipe for every network compared; only the widths differ. Returns the metrics it
    writes into ``folder/metrics.json`` (with ``settings``, so equal settings mean a reusable
    folder).
    """
    model, history = finetune_student(
        recipe, data, teacher, spec, folder, settings, device, log, label, start
    )
    amp = bool(recipe.amp and device.type == "cuda")
    scores = evaluate_splits(model, data, device, batch_size=EVAL_BATCH, amp=amp, per_image=True)
    correct = {split: encode_correct(scores.pop(f"{split}_correct")) for split in ("val", "test")}
    metrics = {
        **scores,
        "correct": correct,  # per image: the report's paired standard errors
        **cost_entry(model, spec, teacher.spec),
        "epochs": recipe.finetune.epochs,
        "seconds": round(sum(h["epoch_seconds"] for h in history), 2),
        "cpu_seconds": round(sum(h.get("cpu_seconds", 0.0) for h in history), 2),
        **(extra or {}),
        "history": history,
        "settings": settings,
    }
    save_compressed(model, spec, folder, metrics, preprocessing=preprocessing_of(data.describe()))
    (folder / "last.pt").unlink(missing_ok=True)
    log(f"finetune: {label} val_acc {metrics['val_acc']:.4f} test_acc {metrics['test_acc']:.4f}")
    return metrics
