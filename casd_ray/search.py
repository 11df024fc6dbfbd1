"""The width search on Ray Tune: one trial per genome, results as ``trials.parquet``.

``run_search`` loads data and teacher once, puts them into the object store once (through
``tune.with_parameters``), and lets a searcher (``casd_ray.searchers``) propose genomes while
ASHA (or FIFO) decides how long each candidate trains. The uniform-width control is always
the first trial, so every search has a baseline at the same budget.

Ray 2.60 behaviours this module is built around:

* Trials stopped by ASHA reach the searcher as *complete*, with their partial score; an
  NSGA-II front can hold them. Winners and Pareto fronts are therefore taken only among
  trials that ran all ``max_epochs`` (column ``completed``).
* Multi-objective Optuna: the metric list lives on the searcher; ASHA gets its own scalar
  ``val_acc``; ``TuneConfig`` gets no metric/mode at all.
* ``Tuner.restore`` restores the searcher's state (Optuna study / evolution population) and
  every trial's status and latest checkpoint, but NOT ASHA's rung statistics. A resumed
  search therefore starts with empty rungs: trials that were running when the driver died
  continue from their checkpoint and are compared at the next rung only against trials
  that report after the restore. Early rungs are briefly more lenient (fewer results to be
  worse than), so a resumed search may train a few weak trials longer than an uninterrupted
  one; it never stops a trial that the original run would have kept, finished trials are
  kept as they are and never rerun, and the winner is still chosen among completed trials.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
from ray import tune

from casd_ray import space as space_mod
from casd_ray.config import ConfigError, ExperimentConfig, save_config
from casd_ray.models import WidthSpec, flops, params, spec_summary
from casd_ray.trial import distill_trial, pack_data, pack_teacher, trial_resources

TRIALS_FILE = "trials.parquet"
SEARCH_DIR = "search"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
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
_BUDGET_SLACK = 1e-9

Log = Callable[[str], None]


# --------------------------------------------------------------------------- progress


class ProgressCallback(tune.Callback):
    """One log line per finished trial: outcome, counts, best completed score, ETA.

    Tune pickles callbacks into the experiment state; the log function is dropped on
    pickling (it may be a closure of the caller), and after a restore the module-level
    ``_LOG`` (set by ``run_search``) is used instead.
    """

    def __init__(self, cfg: ExperimentConfig, log: Log) -> None:
        self.log: Log | None = log
        self.t0 = time.time()
        self.best: tuple[float, str] | None = None
        self.max_epochs, self.total = cfg.search.max_epochs, cfg.search.num_samples
        self.target, self.metric = cfg.space.budget.target, cfg.space.budget.metric

    def __getstate__(self) -> dict:
        return {**self.__dict__, "log": None}

    def _emit(self, msg: str) -> None:
        (self.log or _LOG[0])(msg)

    def _counts(self, trials, current, outcome: str) -> str:
        # the callback fires before Tune marks ``current`` finished: count it as such
        status = [t.status for t in trials if t is not current]
        status.append(outcome)
        done = sum(s in ("TERMINATED", "ERROR") for s in status)
        eta = ""
        if done:
            left = max(0, self.total - done)
            eta = f", ETA {_fmt_s((time.time() - self.t0) / done * left)}"
        return (
            f"{done}/{self.total} done, {status.count('RUNNING')} running, "
            f"{status.count('ERROR')} errored{eta}"
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        res = trial.last_result or {}
        epochs = int(res.get("epoch", 0))
        acc = float(res.get("best_val_acc", float("nan")))
        full = epochs >= self.max_epochs
        ok = float(res.get(f"{self.metric}_ratio", math.inf)) <= self.target + _BUDGET_SLACK
        if full and ok and (self.best is None or acc > self.best[0]):
            self.best = (acc, trial.trial_id)
        what = "finished" if full else f"stopped early at epoch {epochs}/{self.max_epochs}"
        best = f"best completed {self.best[0]:.4f} ({self.best[1]})" if self.best else "-"
        self._emit(
            f"trial {trial.trial_id} {what}: val_acc {acc:.4f}, "
            f"flops_ratio {float(res.get('flops_ratio', float('nan'))):.3f} | "
            f"{self._counts(trials, trial, 'TERMINATED')} | {best}"
        )

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        reason = error_reason(_trial_error(trial))
        self._emit(
            f"trial {trial.trial_id} failed: {reason} | {self._counts(trials, trial, 'ERROR')}"
        )


_LOG: list[Log] = [print]


def _fmt_s(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def _trial_error(trial) -> str | None:
    """The trial's error text: the local error file (written before callbacks run; the
    storage copy ``get_error`` reads may not be synced yet), else Tune's stored copy."""
    path = trial.error_file
    if path and Path(path).is_file():
        return Path(path).read_text()
    return trial.get_error()


def error_reason(err: BaseException | str | None) -> str | None:
    """The last meaningful line of a trial's error: ``FloatingPointError: non-finite ...``."""
    if err is None:
        return None
    lines = [ln.strip() for ln in str(err).splitlines()]
    lines = [ln for ln in lines if ln and not set(ln) <= set("^~ ")]
    return lines[-1] if lines else type(err).__name__


# --------------------------------------------------------------------------- results table


def _teacher_spec(cfg: ExperimentConfig) -> WidthSpec:
    return WidthSpec.load(cfg.run_dir / "teacher" / "widths.json")


def trials_table(
    source: Any, cfg: ExperimentConfig, teacher_spec: WidthSpec | None = None
) -> pd.DataFrame:
    """One row per trial (the contract's columns) from a ResultGrid or an experiment path.

    Widths and costs are recomputed from the genome on the driver, so a trial that failed
    before its first report still has them. ``completed`` means it reported all
    ``max_epochs``; ``stopped_early`` means Tune ended it cleanly before that (ASHA).
    """
    from ray.tune import ExperimentAnalysis, ResultGrid

    path = source.experiment_path if isinstance(source, ResultGrid) else str(source)
    analysis = ExperimentAnalysis(path)
    teacher_spec = teacher_spec or _teacher_spec(cfg)
    names = space_mod.gene_names(teacher_spec, cfg.space.granularity)
    control = space_mod.control_genome(cfg, teacher_spec)
    t_flops, t_params = flops(teacher_spec), params(teacher_spec)
    max_epochs, target = cfg.search.max_epochs, cfg.space.budget.target
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        genome = {n: float(trial.config[n]) for n in names if n in trial.config}
        df = analysis.trial_dataframes.get(trial.trial_id)
        df = df if df is not None and len(df) else None
        spec = (
            space_mod.candidate_spec(cfg, teacher_spec, genome)
            if len(genome) == len(names)
            else None
        )
        epochs = int(df["epoch"].max()) if df is not None else 0
        start = trial.run_metadata.start_time
        if df is not None:
            first = df.iloc[0]
            start = float(first["timestamp"]) - float(first["time_this_iter_s"])
        end = float(df["timestamp"].iloc[-1]) if df is not None else None
        completed = trial.status == "TERMINATED" and epochs >= max_epochs
        f = flops(spec) if spec else None
        p = params(spec) if spec else None
        ratio = {"flops": f / t_flops if f else None, "params": p / t_params if p else None}
        budget_ratio = ratio[cfg.space.budget.metric]
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
                "best_val_acc": float(df["val_acc"].max()) if df is not None else None,
                "last_val_acc": float(df["val_acc"].iloc[-1]) if df is not None else None,
                "last_val_loss": float(df["val_loss"].iloc[-1]) if df is not None else None,
                "epochs": epochs,
                "completed": completed,
                "stopped_early": trial.status == "TERMINATED" and not completed,
                "status": trial.status,
                "error": error_reason(_trial_error(trial)) if trial.status == "ERROR" else None,
                "node_id": str(df["node_id"].iloc[-1]) if df is not None else None,
                "wall_time_s": (end - start) if end is not None and start else None,
                "start_time": start,
                "end_time": end,
                "is_control": bool(genome)
                and all(abs(genome[n] - control[n]) < 1e-9 for n in names if n in genome),
                "meets_budget": budget_ratio is not None and budget_ratio <= target + _BUDGET_SLACK,
            }
        )
    table = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("flops", "params", "epochs"):
        table[col] = table[col].astype("Int64")
    return table


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


def best_completed(df: pd.DataFrame) -> pd.Series | None:
    """Best ``best_val_acc`` among completed, within-budget trials (ties: fewer FLOPs)."""
    pool = df[df["completed"].astype(bool) & df["meets_budget"].astype(bool)]
    pool = pool[pool["status"] == "TERMINATED"]
    if pool.empty:
        return None
    return pool.sort_values(["best_val_acc", "flops"], ascending=[False, True]).iloc[0]


def write_table(df: pd.DataFrame, path: Path) -> Path:
    """Atomic parquet write: a reader never sees a half-written table."""
    tmp = path.with_suffix(".parquet.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


# --------------------------------------------------------------------------- Ray session


def dashboard_login_hint() -> str:
    """How to log into the dashboard: Ray 2.60 keeps token authentication on by default."""
    if os.environ.get(TOKEN_ENV):
        where = f"the token in ${TOKEN_ENV}"
    else:
        path = os.environ.get(TOKEN_PATH_ENV) or Path.home() / ".ray" / "auth_token"
        where = f"the token in {path}"
    return f"log in with {where} (print it with `ray get-auth-token`)"


def _start_ray(address: str | None, dashboard: bool, log: Log) -> bool:
    """Connect to or start Ray; returns whether this call started it (and must stop it)."""
    import ray

    if ray.is_initialized():
        if address or dashboard:
            log("ray: already initialised in this process; --address/--dashboard ignored")
        return False
    if address:
        ray.init(address=address)
        log(f"ray: joined cluster at {address}: {ray.cluster_resources()}")
        return True
    extra = {"dashboard_host": "127.0.0.1"} if dashboard else {}
    # Trial workers' own output stays in Ray's session logs: what a user needs from a trial
    # (its metrics, or its error) reaches the driver through Tune and trials.parquet, and
    # forwarding would print a SIGTERM traceback for every trial ASHA stops.
    ctx = ray.init(
        include_dashboard=dashboard, logging_level=logging.WARNING, log_to_driver=False, **extra
    )
    if dashboard:
        log(f"ray dashboard: http://{ctx.dashboard_url} - {dashboard_login_hint()}")
    return True


# --------------------------------------------------------------------------- run_search


def search_bounds(cfg: ExperimentConfig, teacher_spec: WidthSpec) -> dict[str, tuple[float, float]]:
    """``{gene: (min_ratio, max_ratio)}``: the searchers' space."""
    lo, hi = cfg.space.min_ratio, cfg.space.max_ratio
    return {n: (lo, hi) for n in space_mod.gene_names(teacher_spec, cfg.space.granularity)}


def _scheduler(cfg: ExperimentConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    s = cfg.search
    if s.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        metric="val_acc",
        mode="max",
        time_attr="epoch",
        max_t=s.max_epochs,
        grace_period=min(s.grace_period, s.max_epochs),
        reduction_factor=s.reduction_factor,
    )


def _check_resources(cfg: ExperimentConfig, *, fixed: bool, log: Log) -> None:
    """Refuse a trial size the Ray instance can never hold (Tune would wait forever).

    ``fixed``: a local instance, which will not grow; a joined cluster may autoscale, so
    there a shortfall is only logged.
    """
    import ray

    have = ray.cluster_resources()
    for name, key, want in (
        ("cpus_per_trial", "CPU", cfg.search.cpus_per_trial),
        ("gpus_per_trial", "GPU", cfg.search.gpus_per_trial),
    ):
        if want > have.get(key, 0.0):
            msg = (
                f"search.{name}: {want:g} per trial, but Ray sees {have.get(key, 0.0):g} "
                f"{key}s in total; lower search.{name}"
            )
            if fixed:
                raise ConfigError(msg)
            log(f"warning: {msg} (or let the cluster scale up)")


def _finished_table(table: Path, exp_path: Path, cfg: ExperimentConfig) -> bool:
    """A trials table written after the search's last state save, with every trial done."""
    if not table.is_file() or not exp_path.is_dir():
        return False
    states = list(exp_path.glob("experiment_state-*.json"))
    if not states or max(p.stat().st_mtime for p in states) > table.stat().st_mtime:
        return False
    df = pd.read_parquet(table, columns=["status"])
    return len(df) >= cfg.search.num_samples and df["status"].isin(["TERMINATED", "ERROR"]).all()


def _set_aside(path: Path, log: Log) -> None:
    if path.exists():
        aside = path.with_name(f"{path.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        shutil.move(str(path), str(aside))
        log(f"search: previous search moved to {aside} (use --resume to continue one)")


def run_search(
    cfg: ExperimentConfig,
    *,
    address: str | None = None,
    dashboard: bool = False,
    resume: bool = False,
    log: Log = print,
) -> Path:
    """Run (or resume) the search; writes ``runs/<name>/trials.parquet`` and returns its path.

    Refuses an unreachable budget before Ray starts. With ``resume`` an interrupted search
    continues with ``Tuner.restore`` (finished trials kept, errored ones not retried);
    without it a previous ``search/`` folder is moved aside, never mixed in. A trial that
    fails is recorded (status ERROR, reason) and the search goes on. A resume of a search
    whose table is already complete returns that table without starting Ray.

    ``address`` joins a running cluster (``auto`` on a cluster node, or ``ray://head:10001``);
    only a Ray instance started here is shut down. Tune's storage is ``runs/<name>/search``
    on the machine running this driver, so with a Ray Client address the run folder must be
    visible to the head node (run ``casd-ray search`` on the head, as ``cluster.yaml``
    does, to avoid that). ``dashboard`` starts the local instance with the dashboard on
    127.0.0.1 and keeps Ray 2.60's token authentication on.
    """
    from casd_ray.data import load_dataset
    from casd_ray.searchers import build_searcher, tune_search_space
    from casd_ray.teacher import ensure_teacher

    run_dir = cfg.run_dir.absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    data = load_dataset(cfg.data, cfg.seed)
    teacher = ensure_teacher(cfg, data, log)
    space_mod.check_budget(cfg, teacher.spec)
    bounds = search_bounds(cfg, teacher.spec)
    points = [space_mod.control_genome(cfg, teacher.spec)]
    if not space_mod.repair_enabled(cfg):
        log("search: no budget repair (multi-objective or space.repair off): cost varies")

    exp_path = run_dir / SEARCH_DIR
    table_path = run_dir / TRIALS_FILE
    if resume and _finished_table(table_path, exp_path, cfg):
        log(f"search: already finished, reusing {table_path}")
        return table_path
    _LOG[0] = log
    # Tune warns whenever per-epoch checkpoints force frequent experiment snapshots; with
    # tiny trials that is every few seconds, by design.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    started = _start_ray(address, dashboard, log)
    try:
        _check_resources(cfg, fixed=address is None, log=log)
        trainable = tune.with_resources(
            tune.with_parameters(
                distill_trial,
                data=pack_data(data, cfg.search.train_subset, cfg.seed),
                teacher_state=pack_teacher(teacher.model),
                teacher_spec_json=teacher.spec.to_json(),
                exp=cfg.model_dump(),
            ),
            trial_resources(cfg),
        )
        if resume and tune.Tuner.can_restore(str(exp_path)):
            log(f"search: resuming {exp_path} (finished trials are kept)")
            tuner = tune.Tuner.restore(
                str(exp_path),
                trainable=trainable,
                param_space=tune_search_space(bounds),
                resume_unfinished=True,
                resume_errored=False,
                restart_errored=False,
            )
        else:  # a fresh search never mixes with an old (or unrestorable) folder
            _set_aside(exp_path, log)
            tuner = tune.Tuner(
                trainable,
                param_space=tune_search_space(bounds),
                tune_config=tune.TuneConfig(
                    search_alg=build_searcher(cfg, bounds, points),
                    scheduler=_scheduler(cfg),
                    num_samples=cfg.search.num_samples,
                    # a finished trial's worker (torch imported, data mapped) runs the next
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=SEARCH_DIR,
                    storage_path=str(run_dir),
                    verbose=0,
                    callbacks=[ProgressCallback(cfg, log)],
                    failure_config=tune.FailureConfig(
                        max_failures=cfg.search.max_failures, fail_fast=False
                    ),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                ),
            )
        log(
            f"search: {cfg.search.algorithm}, {cfg.search.num_samples} trials, "
            f"{cfg.search.scheduler}, <= {cfg.search.max_epochs} epochs, "
            f"{cfg.search.max_concurrent} concurrent; storage {exp_path}"
        )
        results = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    table = trials_table(results, cfg, teacher.spec)
    out = write_table(table, table_path)
    _log_summary(table, cfg, log)
    return out


def _log_summary(table: pd.DataFrame, cfg: ExperimentConfig, log: Log) -> None:
    counts = table["status"].value_counts().to_dict()
    done = int(table["completed"].sum())
    early = int(table["stopped_early"].sum())
    log(f"search done: {len(table)} trials, {done} completed, {early} stopped early, {counts}")
    best = best_completed(table)
    if best is not None:
        log(
            f"best completed trial {best['trial_id']}: val_acc {best['best_val_acc']:.4f}, "
            f"flops_ratio {best['flops_ratio']:.3f}, epochs {best['epochs']}"
        )
    else:
        log("no completed trial within the budget")
    if table["is_control"].any():
        ctrl = table[table["is_control"]].iloc[0]
        acc = "-" if pd.isna(ctrl["best_val_acc"]) else f"{ctrl['best_val_acc']:.4f}"
        log(f"uniform control {ctrl['trial_id']}: val_acc {acc}, status {ctrl['status']}")
