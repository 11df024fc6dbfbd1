"""Does the search pay for itself? Ways to spend the same FLOPs, over several seeds.

Per seed, with the same teacher, fine-tune recipe, distillation and seed for every arm:

1. ``winner``: the configured search's winner (the normal pipeline);
2. ``uniform``: every group at one keep-ratio (the search's control trial);
3. ``random``: the winner of a random search at equal compute: the same search section with
   the random searcher, so the same number of candidates screened and distilled (exactly
   so with ``search.screen.promote`` and FIFO after rung 0);
4. ``global``: no search, global channel ranking (:mod:`casd_ray.widths.baselines`) with the
   run's importance criterion;
5. ``torch_pruning``: no search, what Torch-Pruning alone gives — its global pruning with its
   own importance and channel choice — fine-tuned with the same distillation;
6. ``uniform_ce``: the uniform network fine-tuned on the labels alone (what distillation is
   worth).

Beside them, ``picked``: what the pipeline tells a user to deploy, the winner or the uniform
network, whichever validated higher after the identical fine-tune
(:func:`casd_ray.report.deploy.validated_pick`; no extra training).

Only the widths differ between arms (each arm's ``metrics.json`` records its settings, and
they are equal apart from ``widths``). The result is per-seed test accuracy, mean ± std per
arm, and the paired differences of the winner (and of picked) against each other arm with a
95% t-interval over seeds. Test accuracy is reported, never used to choose: each search
still selects on validation.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from casd_ray.artifacts.run_folder import PARTS, SEARCH_DRIVER
from casd_ray.artifacts.trials import TRIALS_FILE, read_trials, select_winner
from casd_ray.config import ExperimentConfig
from casd_ray.files import read_json_or_none, write_json, write_text
from casd_ray.models.family import spec_from_json
from casd_ray.pipeline.latency import saved_latency
from casd_ray.pipeline.run import execute, load_teacher
from casd_ray.report.deploy import validated_pick
from casd_ray.study.arms import Log, arm_widths, fine_tuned_arm
from casd_ray.study.latency_arms import (
    LATENCY_ARMS,
    latency_arms,
    model_summary,
    share_latency_model,
)
from casd_ray.widths import space
from casd_ray.widths.baselines import global_ranking_spec, torch_pruning_allocation

ARMS = ("winner", "uniform", "random", "global", "torch_pruning", "uniform_ce")
# Under a latency budget: LATENCY_ARMS (casd_ray/study/latency_arms.py).
# The reference fine-tune a search's cost is measured against: experiments/cifar10_resnet20's
# own recipe (5 epochs on 45k images). Cost is linear in images, so any run's fine-tune time
# scales to it.
REFERENCE_FINETUNE_IMAGES = 5 * 45_000
PICKED = "picked"  # the better of winner and uniform on validation, not a trained arm
KEEP = (
    "test_acc", "val_acc", "flops", "params", "flops_ratio", "seconds", "cpu_seconds", "settings",
)  # fmt: skip


def seed_config(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
    return cfg.model_copy(update={"seed": seed, "name": f"{cfg.name}-s{seed}"})


def random_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """The same search with a random searcher, on the seed run's teacher (not retrained)."""
    return cfg.model_copy(
        update={
            "name": f"{cfg.name}-random",
            "search": cfg.search.model_copy(update={"algorithm": "random"}),
            "teacher": cfg.teacher.model_copy(update={"checkpoint": str(cfg.run_dir / "teacher")}),
        }
    )


def _search_cost(run: Path, finetune: dict, images: int) -> dict:
    """A search's compute as a multiple of one fine-tune, in CPU-seconds (its trials'
    processes, whatever else the machine did; wall seconds where CPU time is not recorded),
    of this run's recipe and of the reference recipe (the same CPU-seconds per image)."""
    trials = read_trials(run / TRIALS_FILE)
    cpu = trials["cpu_seconds"].astype(float)
    trial_s = float(cpu.sum()) if cpu.notna().all() else float(trials["wall_time_s"].sum())
    driver = read_json_or_none(run / SEARCH_DRIVER) or {}
    trial_s += float(sum(driver.values()))
    ft_s = finetune.get("cpu_seconds") or finetune.get("seconds")
    ft_images = finetune.get("epochs", 0) * images
    per_image = ft_s / ft_images if ft_s and ft_images else None
    return {
        "trial_seconds": round(trial_s, 1),
        "driver_seconds": driver,
        "trials": len(trials),
        "distilled": int((trials["epochs"].fillna(0) > 0).sum()),
        "trial_epochs": int(trials["epochs"].fillna(0).sum()),
        "finetune_seconds": ft_s,
        "multiple": round(trial_s / ft_s, 2) if ft_s else None,
        "multiple_of_reference": round(trial_s / (per_image * REFERENCE_FINETUNE_IMAGES), 2)
        if per_image
        else None,
    }


def run_seed(cfg: ExperimentConfig, log: Log = print) -> dict[str, dict]:
    """Every arm for one (already seeded) config; every stage is reused when done."""
    execute(cfg, ["teacher", "search", "finetune", "report"], log=log)
    run = cfg.run_dir
    arms = {p: json.loads((run / p / "metrics.json").read_text()) for p in PARTS}
    latency = cfg.space.budget.metric == "latency"
    rnd = random_config(cfg)
    if latency:
        share_latency_model(cfg, rnd)
    execute(rnd, ["teacher", "search"], log=log)
    teacher = load_teacher(cfg, run / "teacher")
    rnd_trials = read_trials(rnd.run_dir / TRIALS_FILE)
    rules = saved_latency(cfg, space.rules_of(cfg.space, cfg.search.algorithm))
    ce = cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"alpha": 0.0})})
    arms["uniform_ce"] = fine_tuned_arm(ce, arm_widths(arms["uniform"]), "uniform_ce", log)
    if latency:
        latency_arms(cfg, rules, arms, teacher, rnd_trials, log)
        return {**_collect(cfg, arms, rnd, LATENCY_ARMS),
                "latency_model": model_summary(rules.latency)}  # fmt: skip
    row = select_winner(rnd_trials)
    arms["random"] = fine_tuned_arm(cfg, spec_from_json(row["widths"]), "random", log)
    spec = global_ranking_spec(
        teacher.model,
        teacher.spec,
        target=rules.target,
        metric=rules.metric,
        criterion=rules.importance,
        min_channels=rules.min_channels,
        divisible_by=rules.divisible_by,
    )
    arms["global"] = fine_tuned_arm(cfg, spec, "global", log)
    tp_spec, tp_state = torch_pruning_allocation(
        teacher.model, teacher.spec, target=rules.target, metric=rules.metric
    )
    arms["torch_pruning"] = fine_tuned_arm(cfg, tp_spec, "torch_pruning", log, start=tp_state)
    return _collect(cfg, arms, rnd, ARMS)


def _collect(
    cfg: ExperimentConfig, arms: dict, rnd: ExperimentConfig, names: Sequence[str]
) -> dict[str, dict]:
    """Per arm built (of ``names``) the figures compared, the deployed pick, and the two
    searches' costs."""
    run = cfg.run_dir
    keep = (*KEEP, "latency_ratio", "within_budget")
    out = {a: {k: arms[a].get(k) for k in keep} for a in names if a in arms}
    pick = validated_pick({p: arms[p] for p in PARTS})
    out[PICKED] = {**out[pick], "part": pick}
    data_json = read_json_or_none(run / "teacher" / "data.json") or {}
    images = int(data_json.get("sizes", {}).get("train", 0))
    # what a user weighs the gain against: the search's compute, and the equal-compute arm's
    out["search_cost"] = _search_cost(run, arms["winner"], images)
    out["random_cost"] = _search_cost(rnd.run_dir, arms["winner"], images)
    return out


def _paired(d: np.ndarray) -> dict:
    """Mean of paired differences with a 95% t-interval over seeds (None for one seed)."""
    entry = {"diffs": d.tolist(), "mean": float(d.mean()), "ci95": None}
    if len(d) > 1:
        half = stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
        entry["ci95"] = [float(d.mean() - half), float(d.mean() + half)]
    return entry


def summarize(per_seed: dict[int, dict[str, dict]]) -> dict:
    """Mean ± std per arm and paired differences (winner − other, picked − other) with 95%
    t-intervals."""
    seeds = sorted(per_seed)
    # an arm some seed could not build (uniform_aligned off a reachable budget) is left out
    names = [*(a for a in arms_in(per_seed[seeds[0]]) if all(a in per_seed[s] for s in seeds)),
             PICKED]  # fmt: skip
    acc = {a: np.array([per_seed[s][a]["test_acc"] for s in seeds], dtype=float) for a in names}
    out: dict = {"seeds": seeds, "arms": {}}
    for a in names:
        out["arms"][a] = {
            "test_acc": acc[a].tolist(),
            "mean": float(acc[a].mean()),
            "std": float(acc[a].std(ddof=1)) if len(seeds) > 1 else None,
        }
    for lead in ("winner", PICKED):
        out[f"{lead}_minus"] = {a: _paired(acc[lead] - acc[a]) for a in names[1:-1]}
    return out


def arms_in(seed_result: dict) -> list[str]:
    """The arms one seed's result holds, in the order of the tables."""
    order = dict.fromkeys([*ARMS, *LATENCY_ARMS])
    return [a for a in order if a in seed_result]


def render(summary: dict, per_seed: dict[int, dict[str, dict]]) -> str:
    """The comparison as Markdown tables (percent test accuracy)."""

    def pct(x: float | None) -> str:
        return "–" if x is None else f"{100 * x:.2f}"

    seeds = summary["seeds"]
    first = per_seed[seeds[0]]
    measured = first["winner"].get("latency_ratio") is not None
    extra = " latency ratio (measured) |" if measured else ""
    lines = [
        "| arm | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | FLOPs ratio |"
        + extra,
        "|---|" + "---:|" * (len(seeds) + 2 + measured),
    ]  # fmt: skip
    for a in summary["arms"]:
        m = summary["arms"][a]
        ratio = first[a]["flops_ratio"]
        lat = first[a].get("latency_ratio")
        over = " (over the budget)" if first[a].get("within_budget") is False else ""
        tail = (" – |" if lat is None else f" {lat:.3f}{over} |") if measured else ""
        lines.append(
            f"| {a} | "
            + " | ".join(pct(v) for v in m["test_acc"])
            + f" | {pct(m['mean'])} ± {pct(m['std'])} | {ratio:.3f} |"
            + tail
        )
    for lead in ("winner", PICKED):
        lines += ["", f"| {lead} − | mean (points) | 95% CI |", "|---|---:|---|"]
        for a, e in summary[f"{lead}_minus"].items():
            ci = "–" if e["ci95"] is None else f"[{pct(e['ci95'][0])}, {pct(e['ci95'][1])}]"
            lines.append(f"| {a} | {pct(e['mean'])} | {ci} |")
    parts = ", ".join(f"{s}: {per_seed[s][PICKED]['part']}" for s in seeds)
    lines += [
        "",
        "picked = the network the run says to deploy, the winner or uniform, whichever "
        f"validated higher after the identical fine-tune (per seed: {parts}).",
    ]

    def costs(key: str, field: str) -> str:
        values = [per_seed[s].get(key, {}).get(field) for s in seeds]
        return ", ".join("–" if c is None else f"{c:.2f}×" for c in values)

    lines += [
        "",
        "Search cost (its trials' CPU-seconds / the winner's fine-tune CPU-seconds), per seed: "
        + costs("search_cost", "multiple"),
        "Search cost / one fine-tune of the reference recipe (5 epochs on 45k images, at this "
        "run's seconds per image), per seed: " + costs("search_cost", "multiple_of_reference"),
        "The random arm's search, likewise: " + costs("random_cost", "multiple_of_reference"),
    ]
    models = {s: per_seed[s]["latency_model"] for s in seeds if "latency_model" in per_seed[s]}
    if models:
        lines += ["", "Latency model, per seed (random networks; then where the search looks):"]
        lines += [f"- seed {s}: {_model_line(m)}" for s, m in models.items()]
    return "\n".join(lines) + "\n"


def _model_line(m: dict) -> str:
    """One seed's latency model in words (:func:`model_summary`)."""
    text = f"{m['predictor']}, not checked on random networks (check_networks: 0)"
    if m.get("networks"):
        text = (f"{m['predictor']}, MAPE {m['mape_pct']} % (worst {m['worst_pct']} %) on "
                f"{m['networks']} networks")  # fmt: skip
        if m.get("features_mape_pct") is not None:
            text += f" (the features model there {m['features_mape_pct']} %)"
    if m.get("calibration") is not None:
        text += f"; calibrated ×{m['calibration']:.3f}"
    if m.get("held_out_networks"):
        text += (f", held out MAPE {m['held_out_mape_pct']} %, {m['held_out_within']} of "
                 f"{m['held_out_networks']} within the budget")  # fmt: skip
    return text


def compare(cfg: ExperimentConfig, seeds: Sequence[int], log: Log = print) -> Path:
    """Run every arm for every seed; write ``<output_dir>/<name>-compare.{json,md}``.

    Under a latency budget the arms are :data:`LATENCY_ARMS`, each held to the budget as
    measured, with its measured latency over the teacher's in the tables.
    """
    if cfg.teacher.checkpoint and cfg.data.split_seed is None and len(seeds) > 1:
        log(
            "compare: one teacher.checkpoint for every seed, but each seed carves its own "
            "validation split: the teacher has trained on some seeds' validation images; set "
            "data.split_seed to the seed the teacher was trained with"
        )
    per_seed = {s: run_seed(seed_config(cfg, s), log) for s in seeds}
    summary = summarize(per_seed)
    base = Path(cfg.output_dir) / f"{cfg.name}-compare"
    write_json(base.with_suffix(".json"), {"summary": summary, "per_seed": per_seed})
    write_text(base.with_suffix(".md"), render(summary, per_seed))
    return base.with_suffix(".md")
