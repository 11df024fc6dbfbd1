"""The trials table (``trials.parquet``): its columns, how it is built from Tune's results,
reading it safely, and choosing from it.

The search writes it; the fine-tune, the report and users read it. What counts as a
possible winner (a trial that ran every epoch within the budget) is decided here, once, so
every reader agrees. A truncated or foreign table is an :class:`ArtifactError` naming the
file, never a ``KeyError`` deep inside a stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from casd_ray import space as space_mod
from casd_ray.files import ArtifactError, atomic_write
from casd_ray.models import Spec, flops, params, spec_summary
from casd_ray.space import SpaceRules

TRIALS_FILE = "trials.parquet"
COLUMNS = [
    "trial_id",
    "genome",
    "widths",
    "width_summary",
    "flops",
    "params",
    "flops_ratio",
    "params_ratio",
    "best_val_acc",
    "last_val_acc",
    "last_val_loss",
    "epochs",
    "completed",
    "stopped_early",
    "status",
    "error",
    "node_id",
    "wall_time_s",
    "start_time",
    "end_time",
    "is_control",
    "meets_budget",
]


BUDGET_SLACK = 1e-9  # float slack when comparing a cost ratio with the budget


class SelectionError(RuntimeError):
    """No trial can be the winner (all failed, stopped early or over budget)."""


# --------------------------------------------------------------------------- from Tune


def trial_error(trial) -> str | None:
    """The trial's error text from Tune's ``error.txt`` (local copy first: it is written
    before callbacks run). Never ``trial.get_error()``: that unpickles ``error.pkl``."""
    path = trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text()
    folder = getattr(trial, "path", None)
    if folder and (Path(folder) / "error.txt").is_file():
        return (Path(folder) / "error.txt").read_text()
    return "error (no error.txt)"


def error_reason(err: BaseException | str | None) -> str | None:
    """The last meaningful line of a trial's error: ``FloatingPointError: non-finite ...``."""
    if err is None:
        return None
    lines = [ln.strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln and not set(ln) <= set("^~ ")]
    return lines[-1] if lines else type(err).__name__


def trials_table(
    source: Any, rules: SpaceRules, max_epochs: int, teacher_spec: Spec
) -> pd.DataFrame:
    """One row per trial (the contract's columns) from a ResultGrid or an experiment path.

    Widths and costs are recomputed from the genome on the driver, so a trial that failed
    before its first report still has them. ``completed`` means it reported all
    ``max_epochs``; ``stopped_early`` means Tune ended it cleanly before that (ASHA).
    """
    from ray.tune import ExperimentAnalysis, ResultGrid

    if isinstance(source, ResultGrid):  # its path has no scheme: pass its filesystem
        analysis = ExperimentAnalysis(source.experiment_path, storage_filesystem=source.filesystem)
    else:
        analysis = ExperimentAnalysis(str(source))
    names = space_mod.gene_names(teacher_spec, rules.granularity)
    control = space_mod.control_genome(rules, teacher_spec)
    t_flops, t_params = flops(teacher_spec), params(teacher_spec)
    target = rules.target
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        genome = {n: float(trial.config[n]) for n in names if n in trial.config}
        df = analysis.trial_dataframes.get(trial.trial_id)
        df = df if df is not None and len(df) else None
        spec = (
            space_mod.candidate_spec(rules, teacher_spec, genome)
            if len(genome) == len(names)
            else None
        )
        epochs = int(df["epoch"].max()) if df is not None else 0
        best_col = "best_val_acc" if df is not None and "best_val_acc" in df else "val_acc"
        start = trial.run_metadata.start_time
        if df is not None:
            first = df.iloc[0]
            start = float(first["timestamp"]) - float(first["time_this_iter_s"])
        end = float(df["timestamp"].iloc[-1]) if df is not None else None
        completed = trial.status == "TERMINATED" and epochs >= max_epochs
        f = flops(spec) if spec else None
        p = params(spec) if spec else None
        ratio = {"flops": f / t_flops if f else None, "params": p / t_params if p else None}
        budget_ratio = ratio[rules.metric]
        rows.append(
            {
                "trial_id": trial.trial_id,
                "genome": json.dumps(genome, sort_keys=True),
                "widths": spec.model_dump_json() if spec else None,
                "width_summary": json.dumps(spec_summary(spec)) if spec else None,
                "flops": f,
                "params": p,
                "flops_ratio": ratio["flops"],
                "params_ratio": ratio["params"],
                # the trial's running best (kept in its checkpoint), so a result lost with a
                # dead worker does not lower it
                "best_val_acc": float(df[best_col].max()) if df is not None else None,
                "last_val_acc": float(df["val_acc"].iloc[-1]) if df is not None else None,
                "last_val_loss": float(df["val_loss"].iloc[-1]) if df is not None else None,
                "epochs": epochs,
                "completed": completed,
                "stopped_early": trial.status == "TERMINATED" and not completed,
                "status": trial.status,
                "error": error_reason(trial_error(trial)) if trial.status == "ERROR" else None,
                "node_id": str(df["node_id"].iloc[-1]) if df is not None else None,
                "wall_time_s": (end - start) if end is not None and start else None,
                "start_time": start,
                "end_time": end,
                "is_control": bool(genome)
                and all(abs(genome[n] - control[n]) < 1e-9 for n in names if n in genome),
                "meets_budget": budget_ratio is not None and budget_ratio <= target + BUDGET_SLACK,
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("flops", "params", "epochs"):
        table[col] = table[col].astype("Int64")
    return table


# --------------------------------------------------------------------------- read / write


def write_table(df: pd.DataFrame, path: Path) -> Path:
    """Atomic parquet write: a reader never sees a half-written table."""
    atomic_write(path, lambda p: df.to_parquet(p, index=False))
    return path


def read_trials(path: Path) -> pd.DataFrame:
    """Read and check a trials table: readable parquet with every column of :data:`COLUMNS`."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: not found; run the search first")
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - pyarrow raises many types for a torn file
        raise ArtifactError(
            f"{path}: not a readable parquet table ({type(err).__name__}); "
            "rerun the same command to rebuild it from the search"
        ) from None
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ArtifactError(
            f"{path}: not a casd-ray trials table (missing columns {missing[:4]}); "
            "rerun the same command to rebuild it from the search"
        )
    return df


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


def best_completed(df: pd.DataFrame) -> pd.Series | None:
    """Best ``best_val_acc`` among eligible trials (ties: fewer FLOPs), or None."""
    pool = df[eligible(df)]
    if pool.empty:
        return None
    return pool.sort_values(["best_val_acc", "flops"], ascending=[False, True], kind="stable").iloc[
        0
    ]


def select_winner(trials: pd.DataFrame) -> pd.Series:
    """The trial with the best ``best_val_acc`` among eligible ones; ties go to fewer FLOPs.

    ``best_val_acc`` (best epoch on validation) rather than the last epoch's: validation is
    carved from train and never used for training, so picking on it leaks nothing into the
    test score.
    """
    best = best_completed(trials)
    if best is None:
        counts = (
            f"{len(trials)} trials, {int(trials['completed'].astype(bool).sum())} completed, "
            f"{int(trials['meets_budget'].astype(bool).sum())} within budget"
        )
        raise SelectionError(
            f"trials.parquet: no completed trial within the budget ({counts}); "
            "rerun the search with more search.num_samples or a looser space.budget.target"
        )
    return best


def pareto_front(df: pd.DataFrame) -> pd.DataFrame:
    """Non-dominated completed trials: maximise ``best_val_acc``, minimise ``flops``.

    Only trials that ran every epoch take part; an ASHA-stopped trial's partial score says
    nothing about the accuracy its widths would reach.
    """
    pool = df[df["completed"].astype(bool) & (df["status"] == "TERMINATED")]
    pool = pool.sort_values(["flops", "best_val_acc"], ascending=[True, False], kind="stable")
    keep, best = [], -math.inf
    for idx, acc in zip(pool.index, pool["best_val_acc"], strict=True):
        if acc > best:  # cheaper trials already seen all have lower accuracy
            keep.append(idx)
            best = acc
    return pool.loc[keep]


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
