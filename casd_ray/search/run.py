"""The width search on Ray Tune: one trial per genome, results as ``trials.parquet``.

``run_search`` takes the stage's inputs (the data splits, the finished teacher, the search
section and a :class:`~casd_ray.search.trial.TrialPlan`), puts data and teacher into the
object store once (through ``tune.with_parameters``), and lets a searcher
(:mod:`casd_ray.search.searchers`) propose genomes while ASHA (or FIFO) decides how long
each candidate trains. The uniform-width control is always the first trial, so every search
has a baseline at the same budget. Whether a search is reused, resumed or refused is decided
by :mod:`casd_ray.pipeline.run`, not here.

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

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray import tune

from casd_ray.artifacts.network import Network
from casd_ray.artifacts.run_folder import SEARCH_DRIVER
from casd_ray.artifacts.trials import TRIALS_FILE, best_completed, write_table
from casd_ray.config import SearchConfig
from casd_ray.data.batches import to_tensors
from casd_ray.data.splits import DataSplits
from casd_ray.errors import ConfigError, SearchInterrupted
from casd_ray.files import write_json
from casd_ray.models.family import Spec
from casd_ray.models.names import OBJECTS
from casd_ray.search import interrupts, progress, restore_point
from casd_ray.search.packing import batching_of, pack_data, pack_teacher
from casd_ray.search.progress import ProgressCallback
from casd_ray.search.results import trials_table
from casd_ray.search.rungs import make_scheduler
from casd_ray.search.searchers import build_searcher, tune_search_space
from casd_ray.search.session import check_resources, data_cpus, start_ray
from casd_ray.search.storage import SearchStorage
from casd_ray.search.trial import distill_trial, trial_resources
from casd_ray.search.trial_plan import TrialPlan, pack_logits
from casd_ray.train.kd import LOGITS_MAX_BYTES, logits_dtype
from casd_ray.widths import space as space_mod
from casd_ray.widths.controls import control_points, control_specs
from casd_ray.widths.space import SpaceRules

Log = Callable[[str], None]


def _shared_logits(
    packed: dict, teacher: Network, s: SearchConfig, plan: TrialPlan, log: Log
) -> np.ndarray | None:
    """The teacher's logits for every search epoch, once (``search.shared_logits``)."""
    if not s.shared_logits:
        return None
    n, classes = len(packed["y_train"]), teacher.spec.num_classes
    dtype = logits_dtype(s.max_epochs, n, classes, LOGITS_MAX_BYTES)
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


def _val_logits(packed: dict, teacher: Network, plan: TrialPlan) -> np.ndarray | None:
    """The teacher's logits on rung 0's validation subset, once for every trial."""
    if plan.screen is None:
        return None
    import torch

    n = min(plan.screen_val_images, len(packed["y_val"]))
    batching = batching_of(packed, 1024, plan.seed)
    x, y = to_tensors(packed["x_val"][:n], packed["y_val"][:n], "cpu")
    model = teacher.model.eval()
    with torch.no_grad():
        return torch.cat([model(xb).float() for xb, _ in batching.evaluation(x, y)]).numpy()


def _sources(spec: Spec) -> dict:
    """In-memory architectures a trial must be able to build (a model given to the Python
    API): shipped through the object store with the teacher.

    Ray pickles a class by reference when its module is importable here; a worker may not
    import it (a notebook's helper file, a test module, a script's folder): such modules are
    pickled by value, their code travelling with the model. Installed packages stay by
    reference.
    """
    arch = getattr(spec, "arch", "")
    if arch not in OBJECTS:
        return {}
    module = sys.modules.get(type(OBJECTS[arch]).__module__)
    where = getattr(module, "__file__", None) or ""
    installed = any(part in where for part in ("site-packages", "dist-packages"))
    if module is not None and module.__name__ != "__main__" and where and not installed:
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(module)
    return {arch: OBJECTS[arch]}


def _tuner(
    trainable: Any,
    store: SearchStorage,
    s: SearchConfig,
    plan: TrialPlan,
    bounds: dict,
    points: list[dict],
    restore: bool,
    log: Log,
) -> tune.Tuner:
    """A fresh Tuner in ``store``, or the interrupted one restored from it."""
    if restore:
        log(f"search: resuming {store.uri} (finished trials are kept)")
        return tune.Tuner.restore(
            store.uri,
            trainable=trainable,
            param_space=tune_search_space(bounds),
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
        )
    store.set_aside(log)  # a fresh search never mixes with an old (or unrestorable) folder
    tuner = tune.Tuner(
        trainable,
        param_space=tune_search_space(bounds),
        tune_config=tune.TuneConfig(
            search_alg=build_searcher(s, plan.seed, bounds, points),
            scheduler=make_scheduler(s, points),
            num_samples=s.num_samples,
            # a finished trial's worker (torch imported, data mapped) runs the next
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=store.name,
            storage_path=store.root,
            verbose=0,
            callbacks=[
                ProgressCallback(s, plan.rules, log),
                restore_point.StateCallback(),
                interrupts.ForwardInterrupt(),
            ],
            failure_config=tune.FailureConfig(max_failures=s.max_failures, fail_fast=False),
            # Tune's saved state lags the trials (more on a busy machine): a resumed trial
            # may name a checkpoint already rotated out. A trial makes at most max_epochs,
            # so keep them all (store.prune_checkpoints() trims at the end); a number, not
            # None: Tune also syncs its state every that many.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=s.max_epochs),
        ),
    )
    store.sign_tuner()
    return tuner


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
    pass :func:`casd_ray.search.trust.verify` (or ``trust_folder``); otherwise an old folder
    is set aside under ``previous/``, never mixed in. A trial that fails is recorded (status
    ERROR, reason) and the search goes on. A search stopped before every trial finished
    (Ctrl-C, SIGTERM) raises :class:`~casd_ray.errors.SearchInterrupted` and writes no table:
    it must not be fine-tuned.

    ``address`` joins a running cluster (``auto`` on a cluster node, or ``ray://head:10001``);
    only a Ray instance started here is shut down. ``dashboard`` starts the local instance
    with the dashboard on 127.0.0.1 and keeps Ray 2.60's token authentication on.
    ``trainable`` is what each trial runs (tests wrap :func:`distill_trial` to inject faults).
    """
    s, rules = search_cfg, plan.rules
    run_dir = Path(run_dir).absolute()
    store = SearchStorage.of(run_dir, s.storage_path)
    space_mod.check_budget(rules, teacher.spec)
    bounds = space_mod.search_bounds(rules, teacher.spec)
    names = ["uniform", *(c for c in s.controls if c != "uniform")]
    cpu = time.process_time()
    specs = control_specs(teacher.model, teacher.spec, rules, names, log)
    driver_cpu = {"controls": time.process_time() - cpu}
    controls = control_points(rules, teacher.spec, specs)
    plan = replace(
        plan, controls=tuple((n, tuple(sorted(g.items())), sp.to_json()) for n, g, sp in controls)
    )
    points = [g for _, g, _ in controls]
    if not rules.repair:
        log("search: no budget repair (multi-objective or space.repair off): cost varies")
    restore = resume and store.restorable()
    if restore:
        store.prepare_resume(trusted=trust_folder, log=log)  # before Tune unpickles anything
    progress.LOG[0] = log
    # Tune warns whenever per-epoch checkpoints force frequent experiment snapshots; with
    # tiny trials that is every few seconds, by design.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # ray.init replaces a SIGTERM handler (with sys.exit) and Tune's SIGINT handler outlives
    # fit(): the caller's handlers are put back, so one signal stops any stage gracefully.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    started = start_ray(address, dashboard, log)
    if callable(handlers[signal.SIGTERM]):
        signal.signal(signal.SIGTERM, handlers[signal.SIGTERM])
    try:
        import ray

        with interrupts.recorded():
            try:
                check_resources(s, ray.cluster_resources(), data_cpus=data_cpus(data))
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
                    teacher_logits=_timed(
                        driver_cpu, "teacher_logits", _shared_logits, packed, teacher, s, plan, log
                    ),
                    val_logits=_val_logits(packed, teacher, plan),
                    sources=_sources(teacher.spec),
                ),
                trial_resources(s),
            )
            tuner = _tuner(trainable, store, s, plan, bounds, points, restore, log)
            log(
                f"search: {s.algorithm}, {s.num_samples} trials, {s.scheduler}, "
                f"<= {s.max_epochs} epochs, {s.max_concurrent} concurrent; storage {store.uri}"
            )
            if interrupts.received():  # lost on its way through our own set-up
                raise KeyboardInterrupt
            with _quiet_trial_failures():
                tuner.fit()
            if interrupts.received():  # Tune's set-up lost it and the search ran on
                raise KeyboardInterrupt
            # Tune's own saved state says how far the search got: its last snapshot is taken
            # before it stops the trials still running at an interrupt, which its in-memory
            # results then show as TERMINATED like finished ones.
            finished = _finished(store.uri)
            if finished >= s.num_samples:
                table = trials_table(store.uri, rules, s.max_epochs, teacher.spec)
    except KeyboardInterrupt:  # before or after fit(), where Tune's handler is not installed
        finished = _finished(store.uri) if store.restorable() else 0
        if finished >= s.num_samples:
            raise
    finally:
        if started:
            import ray

            ray.shutdown()  # its core worker leaves SIGTERM at the default (process death)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    if finished < s.num_samples:  # Ctrl-C, SIGTERM: never fine-tune a partial search
        raise SearchInterrupted(
            f"search interrupted: {finished} of {s.num_samples} trials finished; the state "
            f"is saved in {store.uri}"
        )
    # what the search spent outside its trials (a resumed search: this run's part only)
    write_json(run_dir / SEARCH_DRIVER, {k: round(v, 2) for k, v in driver_cpu.items()})
    out = write_table(table, run_dir / TRIALS_FILE)
    store.prune_checkpoints()
    _log_summary(table, log)
    return out


def _timed(into: dict, key: str, fn: Callable, *args: Any) -> Any:
    """``fn(*args)``, its CPU seconds (this process) recorded as ``into[key]``."""
    cpu = time.process_time()
    try:
        return fn(*args)
    finally:
        into[key] = time.process_time() - cpu


@contextlib.contextmanager
def _quiet_trial_failures() -> Iterator[None]:
    """Tune logs every failed trial with a full traceback (and all of them again at the end);
    the progress callback already says each in one line, and trials.parquet keeps the reason,
    so a search with failures stays readable."""
    names = ("ray.tune.execution.tune_controller", "ray.tune.tune")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _finished(uri: str) -> int:
    """Trials Tune's saved state records as ended (finished, stopped early or failed)."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(uri)
    return sum(t.status in ("TERMINATED", "ERROR") for t in analysis.trials)


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
