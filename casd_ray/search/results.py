"""Tune's results as the trials table: one row per trial, costs recomputed from the genome.

The table's format and who may win are :mod:`casd_ray.artifacts.trials`'s; this module reads
Tune's own records (``ExperimentAnalysis``), which only the search package may touch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd

from casd_ray.artifacts.trials import BUDGET_SLACK, COLUMNS
from casd_ray.models.family import Spec, flops, params, spec_from_json, spec_summary
from casd_ray.widths import space as space_mod
from casd_ray.widths.space import SpaceRules


def _attr(trial: Any, name: str) -> Any:
    """A trial attribute that may need a live Ray session (``error_file`` asks Ray for its
    session folder): None when Ray is not running, e.g. after the search shut it down."""
    try:
        return getattr(trial, name, None)
    except Exception:  # noqa: BLE001 - Ray raises AssertionError and others here
        return None


def trial_error(trial: Any) -> str | None:
    """The trial's error text from Tune's ``error.txt`` (the local staging copy first: it is
    written before callbacks run; then the trial's storage folder). Never
    ``trial.get_error()``: that unpickles ``error.pkl``."""
    for folder in (_attr(trial, "error_file"), _attr(trial, "path")):
        if not folder:
            continue
        path = Path(folder)
        path = path if path.name == "error.txt" else path / "error.txt"
        if path.is_file():
            return path.read_text()
    return "error (no error.txt)"


def error_reason(err: BaseException | str | None) -> str | None:
    """The last meaningful line of a trial's error: ``FloatingPointError: non-finite ...``."""
    if err is None:
        return None
    lines = [ln.strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln and not set(ln) <= set("^~ ")]
    return lines[-1] if lines else type(err).__name__


def _last(df: pd.DataFrame | None, column: str) -> Any:
    if df is None or column not in df or df[column].isna().all():
        return None
    return df[column].dropna().iloc[-1]


def _first(df: pd.DataFrame | None, column: str) -> float | None:
    if df is None or column not in df or df[column].isna().all():
        return None
    return float(df[column].dropna().iloc[0])


def trials_table(
    source: Any, rules: SpaceRules, max_epochs: int, teacher_spec: Spec
) -> pd.DataFrame:
    """One row per trial (the contract's columns) from a ResultGrid or an experiment path.

    Widths are what the trial reported it trained (a control trains its allocation's exact
    widths); a trial that failed before its first report gets them recomputed from its
    genome. ``completed`` means it reported all ``max_epochs``; ``stopped_early`` means Tune
    ended it cleanly before that (at rung 0 or an ASHA rung).
    """
    from ray.tune import ExperimentAnalysis, ResultGrid

    if isinstance(source, ResultGrid):  # its path has no scheme: pass its filesystem
        analysis = ExperimentAnalysis(source.experiment_path, storage_filesystem=source.filesystem)
    else:
        analysis = ExperimentAnalysis(str(source))
    names = space_mod.gene_names(teacher_spec, rules.granularity)
    control = space_mod.control_genome(rules, teacher_spec)
    t_flops, t_params = flops(teacher_spec), params(teacher_spec)
    target = rules.budget()[0]  # a latency budget's is its model's target ratio
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        genome = {n: float(trial.config[n]) for n in names if n in trial.config}
        df = analysis.trial_dataframes.get(trial.trial_id)
        df = df if df is not None and len(df) else None
        reported = _last(df, "genome_widths")
        if reported:
            spec = spec_from_json(reported)
        elif len(genome) == len(names):
            spec = space_mod.candidate_spec(rules, teacher_spec, genome)
        else:
            spec = None
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
        if rules.metric == "latency":  # predicted by the run's latency model
            ratio["latency"] = rules.ratio(spec, teacher_spec) if spec else None
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
                "control": _last(df, "control") or None,
                "cpu_seconds": _last(df, "cpu_seconds"),
                "rung0_score": _first(df, "rung0_score"),
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("flops", "params", "epochs"):
        table[col] = table[col].astype("Int64")
    return table
