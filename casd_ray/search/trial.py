"""The Ray Tune trainable: one candidate width genome, distilled from the teacher.

A trial turns its genome into widths (repaired onto the budget), inherits the teacher's
most important channels, optionally recalibrates BN, and distills for up to ``max_epochs``,
re-estimating BN statistics before each validation (Precise BN) and reporting every epoch
with a checkpoint so ASHA can stop it and ``Tuner.restore`` can resume it mid-way.

Data and teacher arrive as plain numpy arrays from the object store
(:mod:`casd_ray.search.packing`). ``report`` and ``get_checkpoint`` are parameters
(defaults: ``ray.tune.report`` / ``ray.tune.get_checkpoint``) so the whole trial runs in a
unit test without Ray.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from casd_ray.artifacts.network import numpy_to_state
from casd_ray.config import SearchConfig
from casd_ray.data.batches import Batching, to_tensors
from casd_ray.models.family import Spec, build_model, spec_from_json
from casd_ray.models.source import register_as
from casd_ray.search.packing import batching_of
from casd_ray.search.scratch import checkpoint_dir
from casd_ray.search.screening import screen
from casd_ray.search.trial_plan import TrialPlan, candidate_facts, genome_of, objective, rung0_score
from casd_ray.train import devices
from casd_ray.train.bn import recalibrate_bn
from casd_ray.train.kd import SoftTargets
from casd_ray.train.loop import evaluate, train_one_epoch
from casd_ray.train.recipe import make_optimizer, make_scheduler
from casd_ray.widths.inherit import inherit

STATE_FILE = "state.pt"


def _node_id() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - the id is informative only
        pass
    return "local"


# Per-trial gauges in Ray's Prometheus metrics (``ray_casd_trial_*``, tag ``trial_id``): Ray
# 2.60's dashboard has no Tune page, so this is how a search shows on its Metrics page.
EXPORTED = {
    "epoch": "epochs the trial has trained",
    "val_acc": "the trial's validation accuracy after its last epoch",
    "flops_ratio": "the candidate's FLOPs as a fraction of the teacher's",
    "images_per_s": "the trial's training throughput in its last epoch",
}
_GAUGES: dict[str, Any] = {}


def export_metrics(metrics: dict[str, Any]) -> None:
    """Set this trial's gauges (inside a Tune trial only; a no-op in unit tests)."""
    import ray

    if not ray.is_initialized():
        return
    from ray import tune
    from ray.util.metrics import Gauge

    try:
        trial_id = tune.get_context().get_trial_id()
    except Exception:  # noqa: BLE001 - not inside a Tune trial
        return
    if not trial_id:
        return
    if not _GAUGES:  # once per worker process (reused actors run several trials)
        for key, what in EXPORTED.items():
            _GAUGES[key] = Gauge(f"casd_trial_{key}", description=what, tag_keys=("trial_id",))
    for key, gauge in _GAUGES.items():
        gauge.set(float(metrics[key]), tags={"trial_id": trial_id})


@dataclass
class _Training:
    """A trial's student with its optimiser state, fresh or restored from a checkpoint."""

    student: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    start_epoch: int = 0
    best: float = 0.0
    last_metrics: dict | None = None
    cpu_before: float = 0.0  # CPU seconds of the runs before a restore


def _start(
    plan: TrialPlan, teacher: nn.Module, teacher_spec: Spec, student_spec: Spec,
    state: dict | None, device: torch.device, steps: int, batches: Callable,
) -> _Training:  # fmt: skip
    """Inherit the teacher's channels (fresh) or load the checkpoint's state (resumed)."""
    if state is None:
        student = inherit(teacher, teacher_spec, student_spec, criterion=plan.rules.importance)
    else:
        student = build_model(student_spec)
    student = devices.prepare_model(student, device)
    optimizer = make_optimizer(
        student, lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay
    )
    scheduler = make_scheduler(optimizer, epochs=plan.max_epochs, steps_per_epoch=steps)
    run = _Training(student, optimizer, scheduler)
    if state is not None:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        run.start_epoch, run.best = int(state["epoch"]), float(state["best_val_acc"])
        run.last_metrics = state.get("metrics")
        run.cpu_before = float((run.last_metrics or {}).get("cpu_seconds", 0.0))
    elif plan.screen is None:  # (rung 0 re-estimates BN itself)
        # Adaptive BN (EagleEye): pruned channels shift the BN statistics; re-estimating them
        # makes early-rung scores rank candidates like their final accuracy.
        recalibrate_bn(student, batches(0), plan.bn_recalibration_batches)
    return run


def _save_state(path: Path, run: _Training, epoch: int, metrics: dict) -> None:
    torch.save(
        {
            "model": run.student.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "epoch": epoch,
            "best_val_acc": run.best,
            "metrics": metrics,  # re-sent if the worker dies before Tune records them
        },
        path / STATE_FILE,
    )


def distill_trial(
    config: dict[str, Any],
    *,
    data: dict[str, Any],
    teacher_state: dict[str, np.ndarray],
    teacher_spec_json: str,
    plan: TrialPlan,
    teacher_logits: np.ndarray | None = None,
    val_logits: np.ndarray | None = None,
    sources: dict[str, nn.Module] | None = None,
    report: Callable[..., None] | None = None,
    get_checkpoint: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Distill one candidate; ``report(metrics, checkpoint=...)`` once per epoch.

    ``teacher_logits``: :func:`pack_logits` of this search (shared by every trial), used
    instead of running the teacher on each batch; the teacher is then only the source of the
    inherited weights. ``val_logits``: the teacher's logits on rung 0's validation subset
    (for its KD score). ``sources``: in-memory architectures (``object:`` archs) to register
    before anything is built. Returns the last metrics (handy in tests; Tune ignores it).
    """
    entered, started_at, cpu0 = time.perf_counter(), time.time(), time.process_time()
    from ray import tune

    if report is None:  # inside Tune: one "checkpoint created" INFO line per epoch is noise
        logging.getLogger("ray.train._internal.storage").setLevel(logging.WARNING)
    report = report or tune.report
    get_checkpoint = get_checkpoint or tune.get_checkpoint
    s = plan
    # One intra-op thread per CPU the trial holds: concurrent trials must not oversubscribe.
    torch.set_num_threads(max(1, int(s.cpus)))
    device = devices.pick_device(s.gpus)
    amp = bool(s.amp and device.type == "cuda")

    for arch, module in (sources or {}).items():
        register_as(arch, module)
    teacher_spec = spec_from_json(teacher_spec_json)
    genome = genome_of(config, teacher_spec, s.rules.granularity)
    student_spec, static = candidate_facts(s, teacher_spec, genome)
    static["node_id"] = _node_id()
    static["started_at"] = started_at  # wall clock: Tune's trial start -> here is start-up

    teacher = build_model(teacher_spec)
    teacher.load_state_dict(numpy_to_state(teacher_state))
    teacher.eval()

    batching: Batching = batching_of(data, s.batch_size, s.seed)
    x_train, y_train = to_tensors(data["x_train"], data["y_train"], device)
    x_val, y_val = to_tensors(data["x_val"], data["y_val"], device)

    def batches(epoch: int):  # the epoch's own training batches (seeded by seed, epoch)
        return batching.epoch(x_train, y_train, epoch)

    ckpt = get_checkpoint()
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    steps = batching.steps(len(x_train))
    run = _start(s, teacher, teacher_spec, student_spec, state, device, steps, batches)
    # With shared logits the teacher is only the source of the inherited weights: it is never
    # moved to the trial's device or run (unless rung 0's steps outrun the shared epochs).
    screen_epochs = 0
    if s.screen is not None and s.screen.steps:
        screen_epochs = -(-s.screen.steps // max(1, batching.steps(len(x_train))))
    run_teacher = teacher_logits is None or screen_epochs > len(teacher_logits)
    targets = SoftTargets(
        s.kd,
        model=devices.prepare_model(teacher, device) if run_teacher else None,
        logits=teacher_logits,
    )

    metrics: dict[str, Any] = {}
    if state is not None and run.start_epoch >= s.max_epochs and run.last_metrics:
        # The worker died after saving its last checkpoint but before Tune recorded that
        # epoch's result: report it again, or the trial would look unfinished.
        metrics = dict(run.last_metrics)
        report(metrics)
    # start-up of this run of the trial (inheritance, BN recalibration, a restore): what a
    # trial spends before its first batch (benchmarks/search_startup.py)
    static["setup_seconds"] = time.perf_counter() - entered
    if s.screen is not None and state is None:
        t0 = time.perf_counter()
        n = min(s.screen_val_images, len(y_val))
        res = screen(
            run.student, x_train, y_train, x_val[:n], y_val[:n], batching=batching,
            recipe=s.screen,
            val_logits=_val_logits(val_logits, n, device, teacher, x_val[:n], y_val[:n], batching),
            targets=targets, amp=amp,
        )  # fmt: skip
        score = rung0_score(res, s.screen_score)
        metrics = {
            "val_acc": float(res["acc"]),
            "val_loss": float(res["loss"]),
            "best_val_acc": 0.0,  # rung 0 is not a validation of the trained candidate
            "rung0_score": score,
            "rung0_kd_loss": float(res["kd_loss"]),
            "objective": objective(0, score),
            "epoch_seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - cpu0,
            "epoch": 0,
            "max_epochs": s.max_epochs,
            **static,
        }
        report(metrics)  # the scheduler stops most candidates here
    for epoch in range(run.start_epoch, s.max_epochs):
        t0 = time.perf_counter()
        train = train_one_epoch(
            run.student, x_train, y_train, optimizer=run.optimizer, scheduler=run.scheduler,
            batching=batching, epoch=epoch, targets=targets, amp=amp,
        )  # fmt: skip
        # Precise BN: statistics of the epoch's final weights, not a lagging running average.
        recalibrate_bn(run.student, batches(epoch), s.precise_bn_batches)
        val = evaluate(
            run.student, x_val, y_val, batch_size=max(s.batch_size, 256), mean=batching.mean,
            std=batching.std, amp=amp,
        )  # fmt: skip
        run.best = max(run.best, float(val["acc"]))
        metrics = {
            "val_acc": float(val["acc"]),
            "val_loss": float(val["loss"]),
            "best_val_acc": run.best,
            "train_loss": float(train["loss"]),
            "train_acc": float(train["acc"]),
            "images_per_s": float(train["images_per_s"]),
            "epoch_seconds": time.perf_counter() - t0,
            # this run of the trial's CPU time so far (its process: all of its threads):
            # what a search costs, whatever else the machine was doing
            "cpu_seconds": time.process_time() - cpu0 + (run.cpu_before or 0.0),
            "epoch": epoch + 1,  # 1-based: ASHA's time_attr, max_t = max_epochs
            "max_epochs": s.max_epochs,
            "objective": objective(epoch + 1, float(val["acc"])),
            **static,
        }
        export_metrics(metrics)
        with checkpoint_dir() as tmp:
            _save_state(tmp, run, epoch + 1, metrics)
            # Tune copies the directory into its storage inside report().
            report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
    return metrics


def _val_logits(
    logits: np.ndarray | None, n: int, device: torch.device, teacher: nn.Module,
    x_val: Tensor, y_val: Tensor, batching: Batching,
) -> Tensor:  # fmt: skip
    """The teacher's logits on the first ``n`` validation images: shipped by the search
    (computed once), or computed here (a unit test without the search)."""
    if logits is not None:
        return torch.as_tensor(np.asarray(logits[:n], dtype=np.float32), device=device)
    model = devices.prepare_model(copy.deepcopy(teacher), device).eval()
    with torch.no_grad():
        parts = [model(xb).float() for xb, _ in batching.evaluation(x_val, y_val, 1024)]
    return torch.cat(parts)


def trial_resources(search_cfg: SearchConfig) -> dict[str, float]:
    """Resources of one trial, for ``tune.with_resources``."""
    res = {"cpu": search_cfg.cpus_per_trial}
    if search_cfg.gpus_per_trial > 0:
        res["gpu"] = search_cfg.gpus_per_trial
    return res
