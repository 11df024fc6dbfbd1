"""The last training stage: the search winner and the uniform baseline, pruned and fine-tuned.

Both students start from the teacher (weight inheritance) and are fine-tuned with the same
recipe, seed and distillation, so the only difference between them is where the channels
are: the comparison measures the search, not the training. The test split is touched here
and nowhere else — once, for the final numbers.

The stage takes the teacher and the trials table as artefacts (never the search's code).
Each of ``winner/`` and ``uniform/`` stores the settings it was trained with inside
``metrics.json`` (written last); a part whose settings are unchanged is reused, and an
interrupted fine-tune resumes from ``last.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from casd_ray import distill, prune, space
from casd_ray.batches import to_tensors, train_batches
from casd_ray.config import DistillConfig, FinetuneConfig
from casd_ray.cost import cpu_latency, measure_flops
from casd_ray.data import DataSplits
from casd_ray.export import (
    FILES,
    PARTS,
    SUMMARY,
    Network,
    is_complete,
    load_compressed,
    save_compressed,
)
from casd_ray.files import atomic_write, read_json_or_none, write_json
from casd_ray.models import WidthSpec, flops, params, spec_summary
from casd_ray.space import SpaceRules
from casd_ray.trials import rank_of, select_winner

EVAL_BATCH = 1024


def uniform_spec(
    trials: pd.DataFrame, rules: SpaceRules, teacher_spec: WidthSpec, winner: pd.Series
) -> tuple[WidthSpec, str | None]:
    """The uniform-width baseline at the winner's cost, and its control trial id if any.

    With repair on, the control trial (the uniform genome repaired onto the budget) is that
    network already. Without repair (NSGA-II) the winner may sit below the budget, so the
    uniform genome is repaired onto the winner's own cost ratio: same cost, fair comparison.
    """
    metric = rules.metric
    if rules.repair and "is_control" in trials:
        control = trials[trials["is_control"].astype(bool) & trials["widths"].notna()]
        if not control.empty:
            row = control.iloc[0]
            return WidthSpec.from_json(row["widths"]), str(row["trial_id"])
    target = float(winner[f"{metric}_ratio"])
    genome = space.uniform_genome(teacher_spec, rules.granularity, 1.0)
    spec, _ = space.repair(
        teacher_spec,
        rules.granularity,
        genome,
        target=target,
        metric=metric,
        min_channels=rules.min_channels,
        divisible_by=rules.divisible_by,
    )
    return spec, None


# --------------------------------------------------------------------------- fine-tune


def part_settings(stage: dict, spec: WidthSpec) -> dict:
    """Everything that changes one fine-tuned student: the stage's fingerprint + its widths.

    Equal settings mean the part's folder (or its ``last.pt``) can be reused.
    """
    return {**stage, "widths": json.loads(spec.to_json())}


def _reusable(folder: Path, settings: dict) -> bool:
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
    teacher_spec: WidthSpec,
    spec: WidthSpec,
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
    teacher = distill.prepare_model(teacher, device).eval()
    student = prune.inherit(teacher, teacher_spec, spec, criterion=importance)
    student = distill.prepare_model(student, device)
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
        temperature=d.temperature,
        alpha=d.alpha,
        amp=amp,
    )
    return student.eval(), history


def _cost_entry(model: nn.Module, spec: WidthSpec, teacher_spec: WidthSpec) -> dict:
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
    spec: WidthSpec,
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
        **_cost_entry(model, spec, teacher.spec),
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


def run_finetune(
    data: DataSplits,
    teacher: Network,
    trials: pd.DataFrame,
    *,
    finetune_cfg: FinetuneConfig,
    distill_cfg: DistillConfig,
    rules: SpaceRules,
    seed: int,
    run_dir: Path,
    settings: dict,
    amp: bool = True,
    log=print,
    device: str | torch.device | None = None,
) -> dict:
    """Select the winner, fine-tune it and the uniform baseline, export both, measure all three.

    ``settings`` is the stage's fingerprint; a part whose folder carries the same settings
    plus its widths is reused, an interrupted one resumes from its ``last.pt``. Writes
    ``winner/`` and ``uniform/`` (see :mod:`casd_ray.export`) and ``finetune.json`` (teacher /
    uniform / winner: accuracy, cost, CPU latency, search rank), which the report reads.
    Returns that summary.
    """
    run_dir = Path(run_dir)
    winner_row = select_winner(trials)
    teacher_spec = teacher.spec
    specs = {"winner": WidthSpec.from_json(winner_row["widths"])}
    specs["uniform"], control_id = uniform_spec(trials, rules, teacher_spec, winner_row)
    trial_ids = {"winner": str(winner_row["trial_id"]), "uniform": control_id}
    part = {k: part_settings(settings, s) for k, s in specs.items()}
    todo = [k for k in PARTS if not _reusable(run_dir / k, part[k])]
    dev = torch.device(device) if device is not None else distill.pick_device(1)
    amp = bool(amp and dev.type == "cuda")
    f = finetune_cfg
    for name in PARTS:
        folder = run_dir / name
        if name not in todo:
            log(f"finetune: reusing {folder} (same settings)")
            continue
        spec = specs[name]
        # metrics.json marks a finished export: drop it first, so a crash mid-export can
        # never leave an old marker next to new weights.
        (folder / "metrics.json").unlink(missing_ok=True)
        if name == "uniform" and spec == specs["winner"]:
            # The control trial won: same widths, recipe and seed give the same network.
            _copy_export(run_dir / "winner", folder, trial_ids[name])
            log("finetune: the uniform control won the search; uniform/ is a copy of winner/")
            continue
        log(
            f"finetune: {name} ({flops(spec) / flops(teacher_spec):.3f} of the teacher's FLOPs, "
            f"trial {trial_ids[name]}) for {f.epochs} epochs on {dev}"
        )
        train_export(
            data,
            teacher,
            spec,
            folder,
            finetune_cfg=f,
            distill_cfg=distill_cfg,
            importance=rules.importance,
            seed=seed,
            amp=amp,
            settings=part[name],
            device=dev,
            log=log,
            label=name,
            extra={"trial_id": trial_ids[name]},
        )

    summary = _summarize(run_dir, data, teacher, trials, trial_ids, part, dev, amp, log)
    write_json(run_dir / SUMMARY, summary)
    return summary


def _copy_export(src: Path, dst: Path, trial_id: str | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if name != "metrics.json":
            data = (src / name).read_bytes()
            atomic_write(dst / name, lambda p, d=data: p.write_bytes(d))
    metrics = json.loads((src / "metrics.json").read_text())
    write_json(dst / "metrics.json", {**metrics, "trial_id": trial_id})


def _summarize(
    run_dir: Path,
    data: DataSplits,
    art: Network,
    trials: pd.DataFrame,
    trial_ids: dict[str, str | None],
    settings: dict,
    dev: torch.device,
    amp: bool,
    log,
) -> dict:
    """Teacher / uniform / winner side by side, with CPU latency measured the same way."""
    teacher_spec = art.spec
    shape = (teacher_spec.in_channels, *teacher_spec.image_size)
    teacher = art.model.to(dev).eval()
    t_metrics = dict(art.metrics)
    if "test_acc" not in t_metrics or "val_acc" not in t_metrics:
        t_metrics.update(
            distill.evaluate_splits(teacher, data, dev, batch_size=EVAL_BATCH, amp=amp)
        )
    entries: dict[str, dict] = {
        "teacher": {
            "val_acc": t_metrics["val_acc"],
            "test_acc": t_metrics["test_acc"],
            **_cost_entry(teacher, teacher_spec, teacher_spec),
        }
    }
    for part in PARTS:
        m = json.loads((run_dir / part / "metrics.json").read_text())
        keep = ("val_acc", "test_acc", "flops", "flops_measured", "params", "params_measured")
        entries[part] = {k: m[k] for k in keep if k in m}
        entries[part].update(
            flops_ratio=m["flops_ratio"],
            params_ratio=m["params_ratio"],
            width_summary=m.get("width_summary"),
            search=rank_of(trials, trial_ids[part]),
        )
    log("finetune: measuring CPU latency (teacher, uniform, winner)")
    models = {
        "teacher": teacher.cpu(),
        **{p: load_compressed(run_dir / p) for p in PARTS},
    }
    for name, model in models.items():
        entries[name]["latency"] = cpu_latency(model, shape)
    return {
        "models": entries,
        "flops_reduction": 1 - entries["winner"]["flops"] / entries["teacher"]["flops"],
        "params_reduction": 1 - entries["winner"]["params"] / entries["teacher"]["params"],
        "flops_convention": "FlopCounterMode: 2 FLOPs per multiply-add; conv and linear only",
        "settings": settings,
    }
