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

from casd_ray.artifacts.network import (
    FILES,
    ONNX_FILE,
    PREPROCESSING,
    Network,
    load_compressed,
    read_spec,
)
from casd_ray.artifacts.run_folder import PARTS, SUMMARY
from casd_ray.artifacts.trials import rank_of, select_winner
from casd_ray.config import DistillConfig, FinetuneConfig
from casd_ray.data.splits import DataSplits
from casd_ray.files import atomic_write, write_json
from casd_ray.models.cost import cpu_latency
from casd_ray.models.family import Spec, flops, spec_from_json
from casd_ray.pipeline.latency import judge_budget, measured_winner, trained_onto_budget
from casd_ray.pipeline.stages.student import (
    EVAL_BATCH,
    StudentRecipe,
    add_preprocessing,
    cost_entry,
    part_settings,
    reusable,
    train_export,
)
from casd_ray.train import devices
from casd_ray.train.loop import evaluate_splits
from casd_ray.widths import space
from casd_ray.widths.latency_model import TOLERANCE, LatencyModel
from casd_ray.widths.latency_repair import repair_measured
from casd_ray.widths.space import SpaceRules


def uniform_spec(
    trials: pd.DataFrame, rules: SpaceRules, teacher_spec: Spec, winner: pd.Series
) -> tuple[Spec, str | None]:
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
            return spec_from_json(row["widths"]), str(row["trial_id"])
    if rules.latency is not None:  # the winner's predicted latency
        ratio_fn = rules.latency.ratio
        target = ratio_fn(spec_from_json(winner["widths"]))
    else:
        ratio_fn, target = None, float(winner[f"{metric}_ratio"])
    genome = space.uniform_genome(teacher_spec, rules.granularity, 1.0)
    spec, _ = space.repair(
        teacher_spec,
        rules.granularity,
        genome,
        target=target,
        metric=metric,
        min_channels=rules.min_channels,
        divisible_by=rules.divisible_by,
        ratio_fn=ratio_fn,
    )
    return spec, None


def _onto_measured_budget(
    specs: dict[str, Spec], winner: pd.Series, rules: SpaceRules, teacher_spec: Spec, log
) -> dict[str, Spec]:
    """A latency budget is judged by measurement: the winner and the uniform baseline are
    measured beside the teacher on the deployment and moved where the latency model
    under-predicted, or over-predicted by more than ``SLACK`` (a budget left unused). The
    uniform network is repaired again from the measurement (same genome, another target);
    the winner is kept as searched where the search's measurement found it within, else cut
    by single channel blocks from the network it trained (:func:`trained_onto_budget`)."""
    model = rules.latency
    uniform = space.control_genome(rules, teacher_spec)
    out = {}
    for name, spec in specs.items():
        if name == "winner":
            out[name] = trained_onto_budget(
                winner, spec, rules, teacher_spec, log, "finetune: winner"
            )
            continue
        out[name], lat = repair_measured(
            teacher_spec, rules.granularity, uniform, model,
            min_channels=rules.min_channels, divisible_by=rules.divisible_by,
        )  # fmt: skip
        if out[name] != spec:
            log(f"finetune: {name} measured off the target (fitted {model.target_ms:.3f} ms); "
                f"repaired from the measurement to {lat.median_ms:.3f} ms")  # fmt: skip
    return out


def _budget_latency(run_dir: Path, teacher: Network, model: LatencyModel, log) -> dict:
    """Teacher / uniform / winner measured on the budget's deployment in interleaved rounds
    and judged round by round (:func:`judge_budget`): the figures the report judges the
    budget by."""
    log(f"finetune: measuring latency on {model.runtime} {model.shape} (the budget's runtime)")
    nets = {"teacher": teacher.model, **_distinct_parts(run_dir)}
    measured = _as_parts(judge_budget({name: net.cpu() for name, net in nets.items()}, model))
    target = model.target_beside(measured["teacher"]["median_ms"])
    return {
        "runtime": model.runtime,
        "shape": list(model.shape),
        "threads": model.threads,
        "target_ms": target,  # a fraction of the teacher: of the teacher in these rounds
        "fitted_target_ms": model.target_ms,
        "model_error": model.error,
        "measured": measured,
        "tolerance": TOLERANCE,
        "winner_meets_budget": measured["winner"]["within_budget"],
    }


def _distinct_parts(run_dir: Path) -> dict[str, torch.nn.Module]:
    """The fine-tuned networks to time, uniform left out when it has the winner's widths
    (the winner's copy): the same network timed twice gave two latencies, and against a
    latency budget two verdicts. :func:`_as_parts` gives it the winner's figures."""
    uniform, winner = (read_spec(run_dir / p / "widths.json") for p in ("uniform", "winner"))
    same = uniform == winner
    return {p: load_compressed(run_dir / p) for p in PARTS if not (same and p == "uniform")}


def _as_parts(timed: dict) -> dict:
    """Figures per part, uniform given the winner's where it was not timed."""
    return {"uniform": timed["winner"], **timed}


# --------------------------------------------------------------------------- fine-tune


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
    ``winner/`` and ``uniform/`` (:mod:`casd_ray.artifacts.network`) and ``finetune.json``
    (teacher / uniform / winner: accuracy, cost, CPU latency, search rank), which the report
    reads.
    Returns that summary.
    """
    run_dir = Path(run_dir)
    teacher_spec = teacher.spec
    if rules.latency is not None:
        winner_row = measured_winner(trials, rules, teacher_spec, log)
    else:
        winner_row = select_winner(trials)
    specs = {"winner": spec_from_json(winner_row["widths"])}
    specs["uniform"], control_id = uniform_spec(trials, rules, teacher_spec, winner_row)
    if rules.latency is not None:
        specs = _onto_measured_budget(specs, winner_row, rules, teacher_spec, log)
    trial_ids = {"winner": str(winner_row["trial_id"]), "uniform": control_id}
    part = {k: part_settings(settings, s) for k, s in specs.items()}
    todo = [k for k in PARTS if not reusable(run_dir / k, part[k])]
    dev = torch.device(device) if device is not None else devices.pick_device(1)
    amp = bool(amp and dev.type == "cuda")
    f = finetune_cfg
    for name in PARTS:
        folder = run_dir / name
        if name not in todo:
            add_preprocessing(folder, data)
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
            recipe=StudentRecipe(f, distill_cfg, rules.importance, seed, amp),
            settings=part[name],
            device=dev,
            log=log,
            label=name,
            extra={"trial_id": trial_ids[name]},
        )

    summary = _summarize(run_dir, data, teacher, trials, trial_ids, part, dev, amp, log)
    if rules.latency is not None:
        summary["budget_latency"] = _budget_latency(run_dir, teacher, rules.latency, log)
        summary["budget_latency"]["finalists"] = winner_row.get("finalists_measured")
    write_json(run_dir / SUMMARY, summary)
    return summary


def _copy_export(src: Path, dst: Path, trial_id: str | None) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in (*FILES, ONNX_FILE, PREPROCESSING):
        if name != "metrics.json" and (src / name).is_file():
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
        t_metrics.update(evaluate_splits(teacher, data, dev, batch_size=EVAL_BATCH, amp=amp))
    entries: dict[str, dict] = {
        "teacher": {
            "val_acc": t_metrics["val_acc"],
            "test_acc": t_metrics["test_acc"],
            **cost_entry(teacher, teacher_spec, teacher_spec),
        }
    }
    for part in PARTS:
        m = json.loads((run_dir / part / "metrics.json").read_text())
        keep = ("val_acc", "test_acc", "flops", "flops_measured", "params", "params_measured",
                "correct")  # fmt: skip
        entries[part] = {k: m[k] for k in keep if k in m}
        entries[part].update(
            flops_ratio=m["flops_ratio"],
            params_ratio=m["params_ratio"],
            width_summary=m.get("width_summary"),
            search=rank_of(trials, trial_ids[part]),
        )
    log("finetune: measuring CPU latency (teacher, uniform, winner)")
    models = {"teacher": teacher.cpu(), **_distinct_parts(run_dir)}
    timed = _as_parts({name: cpu_latency(model, shape) for name, model in models.items()})
    for name, latency in timed.items():
        entries[name]["latency"] = latency
    return {
        "models": entries,
        "flops_reduction": 1 - entries["winner"]["flops"] / entries["teacher"]["flops"],
        "params_reduction": 1 - entries["winner"]["params"] / entries["teacher"]["params"],
        "flops_convention": "FlopCounterMode: 2 FLOPs per multiply-add; conv and linear only",
        "settings": settings,
    }
