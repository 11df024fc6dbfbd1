"""The trials table (``trials.parquet``): its columns, how it is built from Tune's results,
reading it safely, and choosing from it.

The search writes it; the fine-tune, the report and users read it. What counts as a
possible winner (a trial that ran every epoch within the budget) is decided here, once, so
every reader agrees. A truncated or foreign table is an :class:`ArtifactError` naming the
file, never a ``KeyError`` deep inside a stage.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from casd_ray.errors import ArtifactError, SelectionError
from casd_ray.files import atomic_write

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
    "control",  # which free allocation the trial is (uniform, global, torch_pruning), or None
    "rung0_score",  # the screening score (search.screen), or None
    "cpu_seconds",  # the trial's CPU time (its process), the search's cost
]
# Columns added later: a table written before them is read with them empty.
ADDED = ("control", "rung0_score", "cpu_seconds")


BUDGET_SLACK = 1e-9  # float slack when comparing a cost ratio with the budget


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
    for col in ADDED:
        if col not in df.columns:
            df[col] = None
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


def ranked_eligible(df: pd.DataFrame) -> pd.DataFrame:
    """Eligible trials, best ``best_val_acc`` first (ties: fewer FLOPs)."""
    pool = df[eligible(df)]
    return pool.sort_values(["best_val_acc", "flops"], ascending=[False, True], kind="stable")


def best_completed(df: pd.DataFrame) -> pd.Series | None:
    """Best ``best_val_acc`` among eligible trials (ties: fewer FLOPs), or None."""
    pool = ranked_eligible(df)
    return None if pool.empty else pool.iloc[0]


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
