"""The Ray Tune trainable: one candidate width genome, distilled from the teacher.

A trial turns its genome into widths (repaired onto the budget), inherits the teacher's
most important channels, optionally recalibrates BN, and distills for up to ``max_epochs``,
re-estimating BN statistics before each validation (Precise BN) and reporting every epoch
with a checkpoint so ASHA can stop it and ``Tuner.restore`` can resume it mid-way.

Data and teacher arrive as plain numpy arrays: ``tune.with_parameters`` puts them into the
object store once, and numpy arrays come back zero-copy (read-only views of shared memory)
in every trial on a node. Torch tensors would be deserialised into a private copy per trial,
which is why nothing torch-typed is put into the store.

``report`` and ``get_checkpoint`` are parameters (defaults: ``ray.tune.report`` /
``ray.tune.get_checkpoint``) so the whole trial runs in a unit test without Ray.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from casd_ray import devices, distill, prune, space
from casd_ray.batches import to_tensors, train_batches
from casd_ray.config import DistillConfig, SearchConfig, SpaceConfig
from casd_ray.data import DataSplits
from casd_ray.distill import steps_per_epoch
from casd_ray.export import numpy_to_state, state_to_numpy
from casd_ray.models import Spec, build_model, flops, params, spec_from_json, spec_summary

STATE_FILE = "state.pt"
DATA_KEYS = ("x_train", "y_train", "x_val", "y_val")


@dataclass(frozen=True)
class TrialPlan:
    """Everything a trial needs besides its genome, data and teacher, as plain values.

    Built once on the driver from the config sections; a trial never sees (or re-validates)
    the experiment config.
    """

    rules: space.SpaceRules
    seed: int
    max_epochs: int
    batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    temperature: float
    alpha: float
    bn_recalibration_batches: int = 0
    precise_bn_batches: int = 0
    cpus: float = 1.0
    gpus: float = 0.0
    amp: bool = True


def trial_plan(
    space_cfg: SpaceConfig, distill_cfg: DistillConfig, search_cfg: SearchConfig, seed: int
) -> TrialPlan:
    """The plan every trial of a search shares."""
    s = search_cfg
    return TrialPlan(
        rules=space.rules_of(space_cfg, s.algorithm),
        seed=seed,
        max_epochs=s.max_epochs,
        batch_size=s.batch_size,
        lr=s.lr,
        momentum=s.momentum,
        weight_decay=s.weight_decay,
        temperature=distill_cfg.temperature,
        alpha=distill_cfg.alpha,
        bn_recalibration_batches=distill_cfg.bn_recalibration_batches,
        precise_bn_batches=s.precise_bn_batches,
        cpus=s.cpus_per_trial,
        gpus=s.gpus_per_trial,
        amp=s.amp,
    )


def pack_data(data: DataSplits, train_subset: int | None = None, seed: int = 0) -> dict[str, Any]:
    """The parts of the data a trial needs, as numpy arrays + plain metadata.

    The test split is left out on purpose: the search never looks at it. ``train_subset``
    keeps a seeded random subset of the training images (``search.train_subset``): every
    trial ranks candidates on the same proxy, while the fine-tune uses all of them.
    """
    packed: dict[str, Any] = {k: np.ascontiguousarray(getattr(data, k)) for k in DATA_KEYS}
    n = len(packed["y_train"])
    if train_subset is not None and train_subset < n:
        keep = np.sort(np.random.default_rng(seed).choice(n, train_subset, replace=False))
        packed["x_train"] = np.ascontiguousarray(packed["x_train"][keep])
        packed["y_train"] = np.ascontiguousarray(packed["y_train"][keep])
    packed.update(name=data.name, mean=tuple(data.mean), std=tuple(data.std), augment=data.augment)
    return packed


def pack_teacher(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Teacher weights as numpy arrays (zero-copy from the object store, unlike tensors)."""
    return state_to_numpy({k: v.detach().cpu() for k, v in model.state_dict().items()})


def pack_logits(
    data: dict[str, Any],
    teacher: torch.nn.Module,
    plan: TrialPlan,
    device: str = "cpu",
    dtype: np.dtype = np.dtype(np.float32),
) -> np.ndarray:
    """The teacher's logits for every batch a trial trains on (``search.shared_logits``):
    ``[max_epochs, images per epoch, classes]`` in ``dtype``, rows in batch order.

    ``data`` is :func:`pack_data`'s output (the search proxy) and batches are seeded by
    (seed, epoch), so these are the trials' own batches: one teacher forward per (epoch,
    image) for the whole search instead of one per trial (about 40% of a half-FLOPs
    student's compute). The teacher runs in eval mode, as in a trial, so each row equals the
    trial's own teacher forward up to float reduction order.
    """
    model = devices.prepare_model(copy.deepcopy(teacher), torch.device(device))
    x, y = to_tensors(data["x_train"], data["y_train"], device)
    return distill.teacher_logits(
        model, x, y, epochs=plan.max_epochs, batch_size=plan.batch_size, seed=plan.seed,
        augment=data["augment"], mean=data["mean"], std=data["std"],
        amp=bool(plan.amp and torch.device(device).type == "cuda"), dtype=dtype,
    )  # fmt: skip


def genome_of(config: dict[str, Any], teacher_spec: Spec, granularity: str) -> dict:
    """The genome inside a Tune config (Tune may add nothing, but be strict about genes)."""
    names = space.gene_names(teacher_spec, granularity)
    missing = [n for n in names if n not in config]
    if missing:
        raise KeyError(f"trial config lacks genes {missing}; got {sorted(config)}")
    return {n: float(config[n]) for n in names}


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


def _save_state(
    path: Path, model, optimizer, scheduler, epoch: int, best: float, metrics: dict
) -> None:
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "best_val_acc": best,
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
    report: Callable[..., None] | None = None,
    get_checkpoint: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Distill one candidate; ``report(metrics, checkpoint=...)`` once per epoch.

    ``teacher_logits``: :func:`pack_logits` of this search (shared by every trial), used
    instead of running the teacher on each batch; the teacher is then only the source of the
    inherited weights. Returns the last metrics (handy in tests; Tune ignores it).
    """
    entered, started_at = time.perf_counter(), time.time()
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

    teacher_spec = spec_from_json(teacher_spec_json)
    genome = genome_of(config, teacher_spec, s.rules.granularity)
    student_spec = space.candidate_spec(s.rules, teacher_spec, genome)
    t_flops, t_params = flops(teacher_spec), params(teacher_spec)
    static = {
        "flops": flops(student_spec),
        "params": params(student_spec),
        "flops_ratio": flops(student_spec) / t_flops,
        "params_ratio": params(student_spec) / t_params,
        "genome_widths": student_spec.model_dump_json(),
        "width_summary": json.dumps(spec_summary(student_spec)),
        "node_id": _node_id(),
        "started_at": started_at,  # wall clock: Tune's trial start -> here is actor start-up
    }

    teacher = build_model(teacher_spec)
    teacher.load_state_dict(numpy_to_state(teacher_state))
    teacher.eval()

    mean, std, augment = data["mean"], data["std"], data["augment"]
    x_train, y_train = to_tensors(data["x_train"], data["y_train"], device)
    x_val, y_val = to_tensors(data["x_val"], data["y_val"], device)

    def epoch_batches(epoch: int):  # the epoch's own training batches (seeded by seed, epoch)
        return train_batches(
            x_train, y_train, batch_size=s.batch_size, seed=s.seed, epoch=epoch,
            augment=augment, mean=mean, std=std,
        )  # fmt: skip

    ckpt = get_checkpoint()
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    if state is None:
        student = prune.inherit(teacher, teacher_spec, student_spec, criterion=s.rules.importance)
    else:
        student = build_model(student_spec)
    student = devices.prepare_model(student, device)
    # With shared logits the teacher is only the source of the inherited weights: it is never
    # moved to the trial's device or run.
    runner = None if teacher_logits is not None else devices.prepare_model(teacher, device)

    optimizer = distill.make_optimizer(
        student, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay
    )
    scheduler = distill.make_scheduler(
        optimizer, epochs=s.max_epochs, steps_per_epoch=steps_per_epoch(len(x_train), s.batch_size)
    )
    start_epoch, best = 0, 0.0
    if state is not None:
        student.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best = int(state["epoch"]), float(state["best_val_acc"])
    else:
        # Adaptive BN (EagleEye): pruned channels shift the BN statistics; re-estimating them
        # makes early-rung scores rank candidates like their final accuracy.
        prune.recalibrate_bn(student, epoch_batches(0), s.bn_recalibration_batches)

    metrics: dict[str, Any] = {}
    if state is not None and start_epoch >= s.max_epochs and state.get("metrics"):
        # The worker died after saving its last checkpoint but before Tune recorded that
        # epoch's result: report it again, or the trial would look unfinished.
        metrics = dict(state["metrics"])
        report(metrics)
    # start-up of this run of the trial (inheritance, BN recalibration, a restore): what a
    # trial spends before its first batch (benchmarks/search_startup.py)
    static["setup_seconds"] = time.perf_counter() - entered
    for epoch in range(start_epoch, s.max_epochs):
        t0 = time.perf_counter()
        train = distill.train_one_epoch(
            student,
            x_train,
            y_train,
            optimizer=optimizer,
            scheduler=scheduler,
            batch_size=s.batch_size,
            seed=s.seed,
            epoch=epoch,
            augment=augment,
            mean=mean,
            std=std,
            teacher=runner,
            teacher_logits=None
            if teacher_logits is None
            else distill.epoch_logits(teacher_logits, epoch, device),
            temperature=s.temperature,
            alpha=s.alpha,
            amp=amp,
        )
        # Precise BN: statistics of the epoch's final weights, not a lagging running average.
        prune.recalibrate_bn(student, epoch_batches(epoch), s.precise_bn_batches)
        val = distill.evaluate(
            student, x_val, y_val, batch_size=max(s.batch_size, 256), mean=mean, std=std, amp=amp
        )
        best = max(best, float(val["acc"]))
        metrics = {
            "val_acc": float(val["acc"]),
            "val_loss": float(val["loss"]),
            "best_val_acc": best,
            "train_loss": float(train["loss"]),
            "train_acc": float(train["acc"]),
            "images_per_s": float(train["images_per_s"]),
            "epoch_seconds": time.perf_counter() - t0,
            "epoch": epoch + 1,  # 1-based: ASHA's time_attr, max_t = max_epochs
            "max_epochs": s.max_epochs,
            **static,
        }
        export_metrics(metrics)
        with tempfile.TemporaryDirectory(prefix="casd-ckpt-") as tmp:
            _save_state(Path(tmp), student, optimizer, scheduler, epoch + 1, best, metrics)
            # Tune copies the directory into its storage inside report().
            report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
    return metrics


def trial_resources(search_cfg: SearchConfig) -> dict[str, float]:
    """Resources of one trial, for ``tune.with_resources``."""
    res = {"cpu": search_cfg.cpus_per_trial}
    if search_cfg.gpus_per_trial > 0:
        res["gpu"] = search_cfg.gpus_per_trial
    return res


__all__ = [
    "distill_trial",
    "genome_of",
    "pack_data",
    "pack_logits",
    "pack_teacher",
    "steps_per_epoch",
    "TrialPlan",
    "trial_plan",
    "trial_resources",
]
