"""The arms of ``casd-ray compare`` under a latency budget, each held to the budget *as
measured* beside the teacher, and each decided once (:func:`decided_arm`): the random
search's winner (picked as the search's own is), the FLOPs-budget search's winner scaled onto
the latency budget, the global ranking allocated with the run's latency model, and the
uniform network in whole channel blocks; then every network measured side by side.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd

from casd_ray.artifacts.trials import TRIALS_FILE, read_trials, select_winner
from casd_ray.config import ExperimentConfig
from casd_ray.errors import BudgetError
from casd_ray.models.family import Spec, build_model, spec_from_json
from casd_ray.pipeline.latency import (
    LATENCY_FILE,
    judge_budget,
    measured_winner,
    trained_onto_budget,
)
from casd_ray.pipeline.run import execute
from casd_ray.study.arms import Log, arm_widths, decided_arm, fine_tuned_arm, kept_arm
from casd_ray.widths import space
from casd_ray.widths.baselines import aligned_uniform, global_ranking_spec
from casd_ray.widths.latency_model import LatencyModel
from casd_ray.widths.latency_repair import onto_measured_budget, repair_measured

# Torch-Pruning (which prunes to a FLOPs count) is replaced by what a user with a FLOPs-budget
# search would deploy: its winner's allocation scaled onto the latency budget.
# ``uniform_aligned`` is the uniform network with every width in whole blocks of the device's
# fast channel multiple (the latency model's block): what a user who knows the hardware gets
# by rounding alone.
LATENCY_ARMS = (
    "winner", "uniform", "uniform_aligned", "random", "flops_winner", "global", "uniform_ce",
)  # fmt: skip


def flops_config(cfg: ExperimentConfig, target: float) -> ExperimentConfig:
    """The same search under a FLOPs budget of ``target`` (what a user without a latency
    budget would run), on the seed run's teacher."""
    budget = cfg.space.budget.model_copy(update={"metric": "flops", "target": target})
    return cfg.model_copy(
        update={
            "name": f"{cfg.name}-flops",
            "space": cfg.space.model_copy(update={"budget": budget}),
            "teacher": cfg.teacher.model_copy(update={"checkpoint": str(cfg.run_dir / "teacher")}),
        }
    )


def share_latency_model(cfg: ExperimentConfig, other: ExperimentConfig) -> None:
    """Give ``other``'s run the seed run's fitted latency model, so both repair genomes with
    the same model (a second fit would measure, and predict, a little differently)."""
    src, dst = cfg.run_dir / LATENCY_FILE, other.run_dir / LATENCY_FILE
    if src.is_file() and not dst.is_file():
        other.run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def latency_arms(
    cfg: ExperimentConfig,
    rules: space.SpaceRules,
    arms: dict,
    teacher,
    rnd_trials: pd.DataFrame,
    log: Log,
) -> None:
    """The latency budget's arms, each held to the budget *as measured* beside the teacher:
    the random search's winner and the global ranking (allocated with the run's latency
    model), the FLOPs-budget search's winner (at the uniform network's FLOPs) scaled onto
    the latency budget, and the uniform network in whole channel blocks
    (:func:`aligned_uniform`), each decided once; ``rules`` carry the run's latency model."""
    model, t = rules.latency, teacher.spec
    kw = {"min_channels": rules.min_channels, "divisible_by": rules.divisible_by}

    def onto_budget(genome: dict) -> Spec:
        return repair_measured(t, rules.granularity, genome, model, **kw)[0]

    def random_winner() -> Spec:  # picked as the search's own: the best within as measured,
        row = measured_winner(rnd_trials, rules, t, log)  # judged once, else cut by blocks
        spec = spec_from_json(row["widths"])
        return trained_onto_budget(row, spec, rules, t, log, "compare: random")

    def flops_winner() -> Spec:
        flops = flops_config(cfg, float(arms["uniform"]["flops_ratio"]))
        execute(flops, ["teacher", "search"], log=log)
        row = select_winner(read_trials(flops.run_dir / TRIALS_FILE))
        return onto_budget(json.loads(row["genome"]))

    arms["random"] = decided_arm(cfg, "random", random_winner, log)
    arms["flops_winner"] = decided_arm(cfg, "flops_winner", flops_winner, log)

    def global_at(ratio: float) -> Spec:
        return global_ranking_spec(
            teacher.model, t, target=ratio, metric="latency", criterion=rules.importance,
            ratio_fn=model.ratio, **kw,
        )  # fmt: skip

    def global_ranking() -> Spec:
        low = space.smallest_ratio(t, "latency", ratio_fn=model.ratio, **kw)
        return onto_measured_budget(t, global_at, model, low=low)[0]

    arms["global"] = decided_arm(cfg, "global", global_ranking, log)
    uniform = arm_widths(arms["uniform"])
    aligned = kept_arm(cfg, "uniform_aligned", log)
    if aligned is None:
        try:
            spec = aligned_uniform(rules, t, uniform)
        except BudgetError as e:  # whole blocks of this size cannot reach the target
            log(f"compare: no uniform_aligned arm: {e}")
        else:  # the uniform arm itself where it already is in whole blocks
            same = spec == uniform
            aligned = arms["uniform"] if same else fine_tuned_arm(cfg, spec, "uniform_aligned", log)
    if aligned is not None:
        arms["uniform_aligned"] = aligned
    # every network measured side by side with the teacher, in interleaved rounds; once
    # (uniform_ce has uniform's widths, a winning control the winner's): timed twice, one
    # network gave two ratios
    names = [a for a in LATENCY_ARMS if a in arms]
    first = {}
    for a in names:
        first.setdefault(arm_widths(arms[a]), a)
    nets = {"teacher": build_model(t)} | {a: build_model(w) for w, a in first.items()}
    measured = judge_budget(nets, model)
    for a in names:
        m = measured[first[arm_widths(arms[a])]]
        arms[a] = {**arms[a], "latency_ratio": round(m["teacher_ratio"], 4),
                   "within_budget": m["within_budget"]}  # fmt: skip


def model_summary(model: LatencyModel) -> dict:
    """The seed run's latency model as the comparison reports it: which predictor, its error
    on random networks (and the features model's there, beside a table), its calibration
    where the search looks and the held-out check after it."""
    err = model.error
    cal = err.get("searched_space", {})
    held = cal.get("held_out", {})
    return {
        "predictor": err.get("predictor", "features"),
        "networks": err.get("networks"), "mape_pct": err.get("mape_pct"),
        "worst_pct": err.get("worst_pct"),
        "features_mape_pct": err.get("features", {}).get("mape_pct"),
        "calibration": cal.get("calibration"),
        "held_out_mape_pct": held.get("mape_pct"), "held_out_networks": held.get("networks"),
        "held_out_within": held.get("within_budget"),
    }  # fmt: skip
