"""What every trial of a search shares, as plain values, and what it reports about itself.

:class:`TrialPlan` is built once on the driver from the config sections; a trial never sees
(or re-validates) the experiment config. The objective every searcher and ASHA rank by
(:func:`objective`) puts a candidate's fidelity first and its score second.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from casd_ray.config import DistillConfig, SearchConfig, SpaceConfig
from casd_ray.data.batches import to_tensors
from casd_ray.models.family import Spec, flops, params, spec_from_json, spec_summary
from casd_ray.search.packing import batching_of
from casd_ray.search.screening import ScreenRecipe
from casd_ray.train import devices
from casd_ray.train.kd import KD, teacher_logits
from casd_ray.widths import space


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
    screen: ScreenRecipe | None = None  # rung 0 (None: every trial distils from the start)
    screen_val_images: int = 2000
    screen_score: str = "acc"
    # (name, genome, exact spec JSON) of each control: a trial with that genome trains it
    controls: tuple[tuple[str, tuple[tuple[str, float], ...], str], ...] = ()

    @property
    def kd(self) -> KD:
        return KD(self.temperature, self.alpha)


def objective(epoch: int, score: float) -> float:
    """What searchers and ASHA rank by: the fidelity reached plus the score there (in [0, 1]),
    so a candidate that earned more training always outranks one stopped before it, and
    within one rung the score decides."""
    return float(epoch) + float(score)


def rung0_score(res: dict[str, float], kind: str) -> float:
    """Rung 0's score in [0, 1]: accuracy, or 1 / (1 + KD loss)."""
    return float(res["acc"]) if kind == "acc" else 1.0 / (1.0 + float(res["kd_loss"]))


def trial_plan(
    space_cfg: SpaceConfig,
    distill_cfg: DistillConfig,
    search_cfg: SearchConfig,
    seed: int,
    controls: tuple = (),
    rules: space.SpaceRules | None = None,
) -> TrialPlan:
    """The plan every trial of a search shares (``controls``: see :class:`TrialPlan`;
    ``rules``: the space's rules already resolved, e.g. carrying a fitted latency model)."""
    s = search_cfg
    sc = s.screen
    screen = None
    if sc.promote is not None:
        kd = KD(distill_cfg.temperature, distill_cfg.alpha)
        screen = ScreenRecipe(sc.bn_batches, sc.steps, s.lr, s.momentum, s.weight_decay, kd)
    return TrialPlan(
        rules=rules or space.rules_of(space_cfg, s.algorithm),
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
        screen=screen,
        screen_val_images=sc.val_images,
        screen_score=sc.score,
        controls=tuple(controls),
    )


def pack_logits(
    data: dict[str, Any],
    teacher: nn.Module,
    plan: TrialPlan,
    device: str = "cpu",
    dtype: np.dtype = np.dtype(np.float32),
) -> np.ndarray:
    """The teacher's logits for every batch a trial trains on (``search.shared_logits``):
    ``[max_epochs, images per epoch, classes]`` in ``dtype``, rows in batch order.

    ``data`` is :func:`~casd_ray.search.packing.pack_data`'s output (the search proxy) and
    batches are seeded by (seed, epoch), so these are the trials' own batches: one teacher
    forward per (epoch, image) for the whole search instead of one per trial. The teacher runs
    in eval mode, as in a trial, so each row equals the trial's own teacher forward up to
    float reduction order.
    """
    model = devices.prepare_model(copy.deepcopy(teacher), torch.device(device))
    x, y = to_tensors(data["x_train"], data["y_train"], device)
    return teacher_logits(
        model, x, y, epochs=plan.max_epochs, batching=batching_of(data, plan.batch_size, plan.seed),
        amp=bool(plan.amp and torch.device(device).type == "cuda"), dtype=dtype,
    )  # fmt: skip


def genome_of(config: dict[str, Any], teacher_spec: Spec, granularity: str) -> dict:
    """The genome inside a Tune config (Tune may add nothing, but be strict about genes)."""
    names = space.gene_names(teacher_spec, granularity)
    missing = [n for n in names if n not in config]
    if missing:
        raise KeyError(f"trial config lacks genes {missing}; got {sorted(config)}")
    return {n: float(config[n]) for n in names}


def control_of(plan: TrialPlan, genome: dict) -> tuple[str, Spec] | None:
    """The control whose genome this is (name, exact spec), or None."""
    for name, control_genome, spec_json in plan.controls:
        g = dict(control_genome)
        if set(g) == set(genome) and all(abs(g[k] - genome[k]) < 1e-9 for k in g):
            return name, spec_from_json(spec_json)
    return None


def candidate_facts(plan: TrialPlan, teacher_spec: Spec, genome: dict) -> tuple[Spec, dict]:
    """The candidate's spec and what the trial reports about it besides its scores."""
    control = control_of(plan, genome)
    if control is not None:
        student = control[1]
    else:
        student = space.candidate_spec(plan.rules, teacher_spec, genome)
    t_flops, t_params = flops(teacher_spec), params(teacher_spec)
    predicted = {}
    if plan.rules.metric == "latency":  # the model's prediction; finals are measured
        predicted["latency_ratio"] = plan.rules.ratio(student, teacher_spec)
    return student, {
        **predicted,
        "control": control[0] if control else "",
        "flops": flops(student),
        "params": params(student),
        "flops_ratio": flops(student) / t_flops,
        "params_ratio": params(student) / t_params,
        "genome_widths": student.model_dump_json(),
        "width_summary": json.dumps(spec_summary(student)),
    }
