"""The proxy-fidelity audit: how far to trust the search's ranking.

The search ranks candidates by a short, cheap distillation (few epochs, maybe a proxy subset
of the images). Whether that ranking predicts what the final recipe makes of each candidate
is the question every user of a search should ask. The audit fine-tunes the ``top_k``
completed trials with the final recipe (the winner and the uniform control reuse their
``winner/`` and ``uniform/`` folders) and reports the rank correlation between the search's
score and the final *validation* accuracy: Kendall τ and Spearman ρ (scipy). Close to 1:
the search ranks as the final training would; near 0: the search's choice is a coin flip
among these candidates. The test split chooses nothing; the same correlation against the
final *test* accuracy is reported beside it, because the search and the audit score on the
same validation images, whose quirks a validation τ cannot see (on CIFAR-10 the two differed:
18 of 19 pairs in order on validation, 14 of 19 on test).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from scipy import stats

from casd_ray.artifacts.network import Network
from casd_ray.artifacts.run_folder import PARTS
from casd_ray.artifacts.trials import eligible
from casd_ray.config import DistillConfig, FinetuneConfig
from casd_ray.data.splits import DataSplits
from casd_ray.files import read_json_or_none, write_json
from casd_ray.models.family import spec_from_json
from casd_ray.pipeline.stages.student import (
    StudentRecipe,
    add_preprocessing,
    part_settings,
    reusable,
    train_export,
)
from casd_ray.train import devices
from casd_ray.widths.space import SpaceRules

AUDIT_DIR = "audit"
AUDIT_FILE = "audit.json"


def audited_trials(trials: pd.DataFrame, top_k: int) -> pd.DataFrame:
    """The ``top_k`` eligible trials by search score, plus the control when it is eligible."""
    pool = trials[eligible(trials)].sort_values(
        ["best_val_acc", "flops"], ascending=[False, True], kind="stable"
    )
    chosen = pool.head(top_k)
    control = pool[pool["is_control"].astype(bool)]
    return pd.concat([chosen, control[~control["trial_id"].isin(chosen["trial_id"])]])


def _finished_parts(run_dir: Path) -> dict[str, dict]:
    """Trial id -> metrics of the fine-tune stage's exports (winner/, uniform/)."""
    out = {}
    for part in PARTS:
        m = read_json_or_none(run_dir / part / "metrics.json")
        if isinstance(m, dict) and m.get("trial_id") is not None:
            out.setdefault(str(m["trial_id"]), m)
    return out


def _corr(fn, x: list[float], y: list[float]) -> float | None:
    if len(x) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
        return None  # undefined (or meaningless) for fewer than 3 points or a constant list
    value = float(fn(x, y)[0])
    return None if math.isnan(value) else value


def run_audit(
    data: DataSplits,
    teacher: Network,
    trials: pd.DataFrame,
    *,
    top_k: int,
    finetune_cfg: FinetuneConfig,
    distill_cfg: DistillConfig,
    rules: SpaceRules,
    seed: int,
    run_dir: Path,
    settings: dict,
    amp: bool = True,
    log=print,
    device=None,
) -> dict:
    """Fine-tune the audited trials (reusing finished ones) and write ``audit.json``."""
    run_dir = Path(run_dir)
    if top_k == 0:
        result = {"top_k": 0, "trials": [], "kendall_tau": None, "spearman_rho": None,
                  "kendall_tau_test": None}  # fmt: skip
        write_json(run_dir / AUDIT_FILE, result)
        log("audit: off (audit.top_k: 0)")
        return result
    dev = devices.pick_device(1) if device is None else device
    done = _finished_parts(run_dir)
    rows = []
    chosen = audited_trials(trials, top_k)
    log(f"audit: {len(chosen)} trials with the final recipe ({finetune_cfg.epochs} epochs each)")
    for _, row in chosen.iterrows():
        tid = str(row["trial_id"])
        spec = spec_from_json(row["widths"])
        metrics = done.get(tid)
        if metrics is None:
            folder = run_dir / AUDIT_DIR / tid
            part = part_settings(settings, spec)
            if reusable(folder, part):
                add_preprocessing(folder, data)
                metrics = read_json_or_none(folder / "metrics.json")
            else:
                metrics = train_export(
                    data,
                    teacher,
                    spec,
                    folder,
                    recipe=StudentRecipe(finetune_cfg, distill_cfg, rules.importance, seed, amp),
                    settings=part,
                    device=dev,
                    log=log,
                    label=f"audit {tid}",
                    extra={"trial_id": tid},
                )
        rows.append(
            {
                "trial_id": tid,
                "is_control": bool(row["is_control"]),
                "search_val_acc": float(row["best_val_acc"]),
                "final_val_acc": float(metrics["val_acc"]),
                "final_test_acc": float(metrics["test_acc"]),
                "flops_ratio": float(row["flops_ratio"]),
            }
        )
    x = [r["search_val_acc"] for r in rows]
    y = [r["final_val_acc"] for r in rows]
    z = [r["final_test_acc"] for r in rows]
    result = {
        "top_k": top_k,
        "trials": rows,
        "kendall_tau": _corr(stats.kendalltau, x, y),
        "spearman_rho": _corr(stats.spearmanr, x, y),
        "kendall_tau_test": _corr(stats.kendalltau, x, z),
    }
    write_json(run_dir / AUDIT_FILE, result)
    log(f"audit: Kendall tau {result['kendall_tau']}, Spearman rho {result['spearman_rho']}")
    return result
