"""The last training stage: the search winner and the uniform baseline, pruned and fine-tuned.

Both students start from the teacher (weight inheritance) and are fine-tuned with the same
recipe, seed and distillation, so the only difference between them is where the channels
are: the comparison measures the search, not the training. The test split is touched here
and nowhere else — once, for the final numbers.

Each of ``winner/`` and ``uniform/`` stores the settings it was trained with inside
``metrics.json`` (written last); a rerun whose trials table and config give the same
settings reuses the folder, and an interrupted fine-tune resumes from ``last.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from casd_ray import distill, prune, space
from casd_ray.config import ExperimentConfig
from casd_ray.cost import cpu_latency, measure_flops
from casd_ray.data import DataSplits, load_dataset, to_tensors, train_batches
from casd_ray.export import FILES, atomic_write, is_complete, save_compressed, write_json
from casd_ray.models import WidthSpec, flops, params, spec_summary

PARTS = ("winner", "uniform")
EVAL_BATCH = 1024
SUMMARY = "finetune.json"


class SelectionError(RuntimeError):
    """No trial can be the winner (all failed, stopped early or over budget)."""


# --------------------------------------------------------------------------- selection


def eligible(trials: pd.DataFrame) -> pd.Series:
    """Trials that may win: finished every epoch, met the budget, and did not error.

    ASHA-stopped trials reach the searcher with partial scores; comparing a 1-epoch score
    with a 4-epoch one would be meaningless, so only complete trials compete.
    """
    return (
        trials["completed"].astype(bool)
        & trials["meets_budget"].astype(bool)
        & (trials["status"] == "TERMINATED")
        & trials["best_val_acc"].notna()
    )


def select_winner(trials: pd.DataFrame, cfg: ExperimentConfig | None = None) -> pd.Series:
    """The trial with the best ``best_val_acc`` among eligible ones; ties go to fewer FLOPs.

    ``best_val_acc`` (best epoch on validation) rather than the last epoch's: validation is
    carved from train and never used for training, so picking on it leaks nothing into the
    test score. ``cfg`` is accepted for the contract's signature; the budget is already in
    the ``meets_budget`` column.
    """
    pool = trials[eligible(trials)]
    if pool.empty:
        counts = (
            f"{len(trials)} trials, {int(trials['completed'].astype(bool).sum())} completed, "
            f"{int(trials['meets_budget'].astype(bool).sum())} within budget"
        )
        raise SelectionError(
            f"trials.parquet: no completed trial within the budget ({counts}); "
            "rerun the search with more search.num_samples or a looser space.budget.target"
        )
    ranked = pool.sort_values(["best_val_acc", "flops"], ascending=[False, True], kind="stable")
    return ranked.iloc[0]


def uniform_spec(
    trials: pd.DataFrame, cfg: ExperimentConfig, teacher_spec: WidthSpec, winner: pd.Series
) -> tuple[WidthSpec, str | None]:
    """The uniform-width baseline at the winner's cost, and its control trial id if any.

    With repair on, the control trial (the uniform genome repaired onto the budget) is that
    network already. Without repair (NSGA-II) the winner may sit below the budget, so the
    uniform genome is repaired onto the winner's own cost ratio: same cost, fair comparison.
    """
    metric = cfg.space.budget.metric
    if space.repair_enabled(cfg) and "is_control" in trials:
        control = trials[trials["is_control"].astype(bool) & trials["widths"].notna()]
        if not control.empty:
            row = control.iloc[0]
            return WidthSpec.from_json(row["widths"]), str(row["trial_id"])
    target = float(winner[f"{metric}_ratio"])
    genome = space.uniform_genome(teacher_spec, cfg.space.granularity, 1.0)
    spec, _ = space.repair(
        teacher_spec,
        cfg.space.granularity,
        genome,
        target=target,
        metric=metric,
        min_channels=cfg.space.min_channels,
        divisible_by=cfg.space.divisible_by,
    )
    return spec, None


def rank_of(trials: pd.DataFrame, trial_id: str | None) -> dict[str, Any]:
    """Where the search put a trial by ``best_val_acc``: among eligible trials and among all.

    1 is best; ties share the better rank. ``None`` when the trial is not in that pool.
    """
    out: dict[str, Any] = {"trial_id": trial_id, "rank": None, "of": 0, "rank_all": None}
    pool = trials[eligible(trials)]
    scored = trials[trials["best_val_acc"].notna()]
    out["of"], out["of_all"] = len(pool), len(scored)
    if trial_id is None:
        return out
    for key, df in (("rank", pool), ("rank_all", scored)):
        row = df[df["trial_id"].astype(str) == str(trial_id)]
        if not row.empty:
            acc = float(row["best_val_acc"].iloc[0])
            out[key] = int((df["best_val_acc"] > acc).sum()) + 1
    return out


# --------------------------------------------------------------------------- fine-tune


def part_settings(cfg: ExperimentConfig, teacher_dir: Path, spec: WidthSpec) -> dict:
    """Everything that changes a fine-tuned student; equal settings mean the folder is reused."""
    teacher = teacher_dir / "settings.json"
    return {
        "seed": cfg.seed,
        "finetune": cfg.finetune.model_dump(mode="json"),
        "distill": cfg.distill.model_dump(mode="json"),
        "importance": cfg.space.importance,
        "widths": json.loads(spec.to_json()),
        "teacher": json.loads(teacher.read_text()) if teacher.is_file() else None,
    }


def _reusable(folder: Path, settings: dict) -> bool:
    if not is_complete(folder):
        return False
    try:
        saved = json.loads((folder / "metrics.json").read_text()).get("settings")
    except (OSError, ValueError):
        return False
    return saved == json.loads(json.dumps(settings))


def finetune_student(
    cfg: ExperimentConfig,
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
    """Prune ``spec`` from the teacher and distill it for ``cfg.finetune.epochs``.

    Resumes from ``folder/last.pt`` (written atomically after each epoch) when it carries
    the same settings, so a long paper-scale fine-tune survives an interruption.
    """
    f = cfg.finetune
    teacher = distill.prepare_model(teacher, device).eval()
    student = prune.inherit(teacher, teacher_spec, spec, criterion=cfg.space.importance)
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
    amp = bool(cfg.search.amp and device.type == "cuda")
    last = folder / "last.pt"
    history = distill.resume(last, settings, student, opt, sched, log=log, label=label)
    if not history and cfg.distill.bn_recalibration_batches > 0:
        batches = train_batches(
            x,
            y,
            batch_size=f.batch_size,
            seed=cfg.seed,
            epoch=0,
            augment=data.augment,
            mean=data.mean,
            std=data.std,
        )
        prune.recalibrate_bn(student, batches, cfg.distill.bn_recalibration_batches)
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
        seed=cfg.seed,
        augment=data.augment,
        mean=data.mean,
        std=data.std,
        teacher=teacher,
        temperature=cfg.distill.temperature,
        alpha=cfg.distill.alpha,
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


def run_finetune(
    cfg: ExperimentConfig,
    log=print,
    *,
    data: DataSplits | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Select the winner, fine-tune it and the uniform baseline, export both, measure all three.

    Writes ``winner/`` and ``uniform/`` (see :mod:`casd_ray.export`) and ``finetune.json``
    (teacher / uniform / winner: accuracy, cost, CPU latency, search rank), which the report
    reads. Returns that summary.
    """
    from casd_ray.teacher import ensure_teacher

    run_dir = cfg.run_dir
    trials_path = run_dir / "trials.parquet"
    if not trials_path.is_file():
        raise FileNotFoundError(f"{trials_path}: not found; run `casd-ray search CONFIG` first")
    trials = pd.read_parquet(trials_path)
    winner_row = select_winner(trials, cfg)
    teacher_dir = run_dir / "teacher"
    if not (teacher_dir / "widths.json").is_file():
        raise FileNotFoundError(f"{teacher_dir}: no teacher; run `casd-ray teacher CONFIG` first")
    teacher_spec = WidthSpec.load(teacher_dir / "widths.json")
    specs = {"winner": WidthSpec.from_json(winner_row["widths"])}
    specs["uniform"], control_id = uniform_spec(trials, cfg, teacher_spec, winner_row)
    trial_ids = {"winner": str(winner_row["trial_id"]), "uniform": control_id}
    settings = {k: part_settings(cfg, teacher_dir, s) for k, s in specs.items()}
    todo = [k for k in PARTS if not _reusable(run_dir / k, settings[k])]
    summary_path = run_dir / SUMMARY
    if not todo and summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("settings") == json.loads(json.dumps(settings)):
            log(f"finetune: reusing {run_dir / 'winner'} and {run_dir / 'uniform'} (same settings)")
            return summary

    if data is None:
        data = load_dataset(cfg.data, cfg.seed)
    dev = torch.device(device) if device is not None else distill.pick_device(1)
    amp = bool(cfg.search.amp and dev.type == "cuda")
    art = ensure_teacher(cfg, data, log=log)
    teacher = art.model
    # ensure_teacher retrains when the teacher settings changed since the search: record
    # the teacher actually used, so a later rerun compares against the truth.
    settings = {k: part_settings(cfg, teacher_dir, s) for k, s in specs.items()}
    todo = [k for k in PARTS if not _reusable(run_dir / k, settings[k])]
    for part in PARTS:
        folder = run_dir / part
        if part not in todo:
            log(f"finetune: reusing {folder} (same settings)")
            continue
        spec = specs[part]
        # metrics.json marks a finished export: drop it first, so a crash mid-export can
        # never leave an old marker next to new weights.
        (folder / "metrics.json").unlink(missing_ok=True)
        if part == "uniform" and spec == specs["winner"]:
            # The control trial won: same widths, recipe and seed give the same network.
            _copy_export(run_dir / "winner", folder, trial_ids[part])
            log("finetune: the uniform control won the search; uniform/ is a copy of winner/")
            continue
        log(
            f"finetune: {part} ({flops(spec) / flops(teacher_spec):.3f} of the teacher's FLOPs, "
            f"trial {trial_ids[part]}) for {cfg.finetune.epochs} epochs on {dev}"
        )
        model, history = finetune_student(
            cfg, data, teacher, teacher_spec, spec, folder, settings[part], dev, log, part
        )
        metrics = {
            **distill.evaluate_splits(model, data, dev, batch_size=EVAL_BATCH, amp=amp),
            **_cost_entry(model, spec, teacher_spec),
            "epochs": cfg.finetune.epochs,
            "seconds": round(sum(h["epoch_seconds"] for h in history), 2),
            "trial_id": trial_ids[part],
            "history": history,
            "settings": settings[part],
        }
        save_compressed(model, spec, folder, metrics)
        (folder / "last.pt").unlink(missing_ok=True)
        log(f"finetune: {part} val_acc {metrics['val_acc']:.4f} test_acc {metrics['test_acc']:.4f}")

    summary = _summarize(cfg, data, art, teacher_spec, trials, trial_ids, settings, dev, amp, log)
    write_json(summary_path, summary)
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
    cfg: ExperimentConfig,
    data: DataSplits,
    art: Any,
    teacher_spec: WidthSpec,
    trials: pd.DataFrame,
    trial_ids: dict[str, str | None],
    settings: dict,
    dev: torch.device,
    amp: bool,
    log,
) -> dict:
    """Teacher / uniform / winner side by side, with CPU latency measured the same way."""
    from casd_ray.export import load_compressed

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
        m = json.loads((cfg.run_dir / part / "metrics.json").read_text())
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
        **{p: load_compressed(cfg.run_dir / p) for p in PARTS},
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
