"""The width search on Ray Tune: one trial per genome, results as ``trials.parquet``.

``run_search`` takes the stage's inputs (the data splits, the finished teacher, the search
section and a :class:`~casd_ray.trial.TrialPlan`), puts data and teacher into the object store
once (through ``tune.with_parameters``), and lets a searcher (``casd_ray.searchers``) propose
genomes while ASHA (or FIFO) decides how long each candidate trains. The uniform-width control
is always the first trial, so every search has a baseline at the same budget. Whether a search
is reused, resumed or refused is decided by :mod:`casd_ray.pipeline`, not here.

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

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray import tune

from casd_ray import restore_point
from casd_ray import space as space_mod
from casd_ray.config import ConfigError, SearchConfig
from casd_ray.data import DataSplits
from casd_ray.distill import logits_dtype
from casd_ray.export import Network
from casd_ray.models import Spec
from casd_ray.rungs import make_scheduler
from casd_ray.space import SpaceRules
from casd_ray.storage import SearchStorage
from casd_ray.trial import (
    TrialPlan,
    distill_trial,
    pack_data,
    pack_logits,
    pack_teacher,
    trial_resources,
)
from casd_ray.trials import (
    BUDGET_SLACK,
    TRIALS_FILE,
    best_completed,
    error_reason,
    trial_error,
    trials_table,
    write_table,
)

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"

Log = Callable[[str], None]


# --------------------------------------------------------------------------- progress


class ProgressCallback(tune.Callback):
    """One log line per finished trial: outcome, counts, best completed score, ETA.

    Tune pickles callbacks into the experiment state; the log function is dropped on
    pickling (it may be a closure of the caller), and after a restore the module-level
    ``_LOG`` (set by ``run_search``) is used instead.
    """

    def __init__(self, search_cfg: SearchConfig, rules: SpaceRules, log: Log) -> None:
        self.log: Log | None = log
        self.t0 = time.time()
        self.best: tuple[float, str] | None = None
        self.max_epochs, self.total = search_cfg.max_epochs, search_cfg.num_samples
        self.target, self.metric = rules.target, rules.metric

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
        ok = float(res.get(f"{self.metric}_ratio", math.inf)) <= self.target + BUDGET_SLACK
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
        reason = error_reason(trial_error(trial))
        self._emit(
            f"trial {trial.trial_id} failed: {reason} | {self._counts(trials, trial, 'ERROR')}"
        )


_LOG: list[Log] = [print]


def _fmt_s(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


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


class SearchInterrupted(KeyboardInterrupt):
    """The search ended before every trial finished (Ctrl-C, SIGTERM): never fine-tune it."""


def check_resources(s: SearchConfig, have: dict[str, float] | None = None) -> None:
    """Refuse a trial size the Ray instance can never hold (Tune would wait forever).

    ``have``: the cluster's resources; by default what a local instance started here gets
    (every CPU, every visible GPU), so the check runs before Ray starts or anything is written.
    """
    if have is None:
        import torch

        have = {"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}
    for name, key, want in (
        ("cpus_per_trial", "CPU", s.cpus_per_trial),
        ("gpus_per_trial", "GPU", s.gpus_per_trial),
    ):
        if want > have.get(key, 0.0):
            raise ConfigError(
                f"search.{name}: {want:g} per trial, but Ray sees {have.get(key, 0.0):g} "
                f"{key}s in total; lower search.{name}"
            )


# Above this the logits stay per trial: ImageNet-sized proxies need top-k or fp16 storage.
SHARED_LOGITS_MAX_BYTES = 2 << 30


def _shared_logits(
    packed: dict, teacher: Network, s: SearchConfig, plan: TrialPlan, log: Log
) -> np.ndarray | None:
    """The teacher's logits for every search epoch, once (``search.shared_logits``)."""
    if not s.shared_logits:
        return None
    n, classes = len(packed["y_train"]), teacher.spec.num_classes
    dtype = logits_dtype(s.max_epochs, n, classes, SHARED_LOGITS_MAX_BYTES)
    if dtype is None:
        log(
            f"search: shared teacher logits would take {s.max_epochs * n * classes / 2**29:.1f}"
            f" GiB in float16 ({s.max_epochs} epochs x {n} images x {classes} classes); the "
            "teacher runs in every trial instead (lower search.train_subset to share them)"
        )
        return None
    import torch

    t0 = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits = pack_logits(packed, teacher.model, plan, device, dtype)
    log(
        f"search: teacher logits for {s.max_epochs} epochs x {n} images computed once "
        f"({logits.nbytes / 2**20:.1f} MiB {dtype.name}, {time.time() - t0:.1f}s on {device}), "
        "shared by every trial"
    )
    return logits


def run_search(
    data: DataSplits,
    teacher: Network,
    *,
    search_cfg: SearchConfig,
    plan: TrialPlan,
    run_dir: Path,
    resume: bool = True,
    trust_folder: bool = False,
    address: str | None = None,
    dashboard: bool = False,
    log: Log = print,
    trainable: Callable[..., Any] = distill_trial,
) -> Path:
    """Run (or resume) the search; writes ``run_dir/trials.parquet`` and returns its path.

    With ``resume`` an interrupted search in ``run_dir/search`` continues with
    ``Tuner.restore`` (finished trials kept, errored ones not retried) after its state files
    pass :func:`casd_ray.trust.verify` (or ``trust_folder``); otherwise an old folder is set
    aside under ``previous/``, never mixed in. A trial that fails is recorded (status ERROR,
    reason) and the search goes on. A search stopped before every trial finished (Ctrl-C,
    SIGTERM) raises :class:`SearchInterrupted` and writes no table: it must not be fine-tuned.

    ``address`` joins a running cluster (``auto`` on a cluster node, or ``ray://head:10001``);
    only a Ray instance started here is shut down. ``dashboard`` starts the local instance
    with the dashboard on 127.0.0.1 and keeps Ray 2.60's token authentication on.
    ``trainable`` is what each trial runs (tests wrap :func:`distill_trial` to inject faults).
    """
    from casd_ray.searchers import build_searcher, tune_search_space

    s, rules = search_cfg, plan.rules
    run_dir = Path(run_dir).absolute()
    store = SearchStorage.of(run_dir, s.storage_path)
    space_mod.check_budget(rules, teacher.spec)
    bounds = space_mod.search_bounds(rules, teacher.spec)
    points = [space_mod.control_genome(rules, teacher.spec)]
    if not rules.repair:
        log("search: no budget repair (multi-objective or space.repair off): cost varies")
    restore = resume and tune.Tuner.can_restore(store.uri)
    if restore:
        store.prepare_resume(trusted=trust_folder, log=log)  # before Tune unpickles anything
    _LOG[0] = log
    # Tune warns whenever per-epoch checkpoints force frequent experiment snapshots; with
    # tiny trials that is every few seconds, by design.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # ray.init replaces a SIGTERM handler (with sys.exit) and Tune's SIGINT handler outlives
    # fit(): the caller's handlers are put back, so one signal stops any stage gracefully.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    started = _start_ray(address, dashboard, log)
    if callable(handlers[signal.SIGTERM]):
        signal.signal(signal.SIGTERM, handlers[signal.SIGTERM])
    try:
        import ray

        have = ray.cluster_resources()
        try:
            check_resources(s, have)
        except ConfigError as err:
            if address is None:
                raise
            log(f"warning: {err} (or let the cluster scale up)")
        packed = pack_data(data, s.train_subset, plan.seed)
        trainable = tune.with_resources(
            tune.with_parameters(
                trainable,
                data=packed,
                teacher_state=pack_teacher(teacher.model),
                teacher_spec_json=teacher.spec.to_json(),
                plan=plan,
                teacher_logits=_shared_logits(packed, teacher, s, plan, log),
            ),
            trial_resources(s),
        )
        if restore:
            log(f"search: resuming {store.uri} (finished trials are kept)")
            tuner = tune.Tuner.restore(
                store.uri,
                trainable=trainable,
                param_space=tune_search_space(bounds),
                resume_unfinished=True,
                resume_errored=False,
                restart_errored=False,
            )
        else:  # a fresh search never mixes with an old (or unrestorable) folder
            store.set_aside(log)
            tuner = tune.Tuner(
                trainable,
                param_space=tune_search_space(bounds),
                tune_config=tune.TuneConfig(
                    search_alg=build_searcher(s, plan.seed, bounds, points),
                    scheduler=make_scheduler(s, points[0]),
                    num_samples=s.num_samples,
                    # a finished trial's worker (torch imported, data mapped) runs the next
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=store.name,
                    storage_path=store.root,
                    verbose=0,
                    callbacks=[ProgressCallback(s, rules, log), restore_point.StateCallback()],
                    failure_config=tune.FailureConfig(max_failures=s.max_failures, fail_fast=False),
                    # Tune's saved state lags the trials (more on a busy machine): a resumed
                    # trial may name a checkpoint already rotated out. A trial makes at most
                    # max_epochs, so keep them all (store.prune_checkpoints() trims at the
                    # end); a number, not None: Tune also syncs its state every that many.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=s.max_epochs),
                ),
            )
            store.sign_tuner()
        log(
            f"search: {s.algorithm}, {s.num_samples} trials, {s.scheduler}, "
            f"<= {s.max_epochs} epochs, {s.max_concurrent} concurrent; storage {store.uri}"
        )
        results = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()  # its core worker leaves SIGTERM at the default (process death)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    done = results.num_terminated + results.num_errors  # after Ctrl-C the rest are pending
    if done < s.num_samples:
        raise SearchInterrupted(
            f"search interrupted: {done} of {s.num_samples} trials finished; the state is "
            f"saved in {store.uri}"
        )
    table = trials_table(results, rules, s.max_epochs, teacher.spec)
    out = write_table(table, run_dir / TRIALS_FILE)
    store.prune_checkpoints()
    _log_summary(table, log)
    return out


def rebuild_table(
    run_dir: Path,
    rules: SpaceRules,
    max_epochs: int,
    teacher_spec: Spec,
    trust_folder: bool,
    storage_path: str | None = None,
) -> Path:
    """Rewrite ``trials.parquet`` from the finished search's own results (a corrupt or lost
    table is derived data: it is rebuilt, not trusted or refused)."""
    store = SearchStorage.of(run_dir, storage_path)
    if not trust_folder:
        store.verify()
    table = trials_table(store.uri, rules, max_epochs, teacher_spec)
    return write_table(table, Path(run_dir) / TRIALS_FILE)


def _log_summary(table: pd.DataFrame, log: Log) -> None:
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
