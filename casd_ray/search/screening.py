"""Rung 0: a candidate scored in seconds, with no (or a few hundred steps of) training.

The candidate inherits the teacher's most important channels, optionally distils for a few
hundred steps, has its BatchNorm statistics re-estimated on a few training batches (adaptive
BN, EagleEye), and is evaluated on a fixed validation subset: accuracy, cross-entropy and the
distillation loss against the teacher's logits on those images (a smoother score than
accuracy when most candidates are still far from the teacher). Which of these a search ranks
by, and how many steps it spends, is chosen by measured fidelity
(``benchmarks/proxy_fidelity.py``; docs/results.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from casd_ray.data.batches import Batching
from casd_ray.train.bn import recalibrate_bn
from casd_ray.train.devices import autocast
from casd_ray.train.kd import KD, SoftTargets, distillation_loss
from casd_ray.train.loop import evaluate, train_one_epoch
from casd_ray.train.recipe import make_optimizer, make_scheduler

SCORES = ("acc", "kd")  # what rung 0 may rank by: accuracy, or minus the KD loss


@dataclass(frozen=True)
class ScreenRecipe:
    """How rung 0 scores a candidate."""

    bn_batches: int = 20  # adaptive BN: training batches whose statistics BN re-estimates
    steps: int = 0  # distillation steps before scoring (0: inherited weights as they are)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    kd: KD = KD()


def _distil_steps(
    student: nn.Module, targets: SoftTargets, x: Tensor, y: Tensor, batching: Batching,
    recipe: ScreenRecipe, amp: bool,
) -> int:  # fmt: skip
    """``recipe.steps`` distillation steps on a cosine schedule, over as many epochs of the
    proxy's batches as they need; returns the images trained on."""
    per_epoch = max(1, batching.steps(len(x)))
    epochs = math.ceil(recipe.steps / per_epoch)
    opt = make_optimizer(
        student, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
    )
    sched = make_scheduler(opt, epochs=1, steps_per_epoch=recipe.steps)
    left, images = recipe.steps, 0
    for epoch in range(epochs):
        res = train_one_epoch(
            student, x, y, optimizer=opt, scheduler=sched, batching=batching, epoch=epoch,
            targets=targets, amp=amp, max_steps=left,
        )  # fmt: skip
        done = min(left, per_epoch)
        left -= done
        images += int(res["images_per_s"] * res["seconds"])
    return images


@torch.no_grad()
def _kd_loss(
    student: nn.Module, x_val: Tensor, y_val: Tensor, val_logits: Tensor, batching: Batching,
    kd: KD, amp: bool,
) -> float:  # fmt: skip
    """Mean ``T²·KL(teacher ‖ student)`` on the validation subset (the KD loss, α = 1)."""
    was = student.training
    student.eval()
    total, seen = 0.0, 0
    try:
        for xb, yb in batching.evaluation(x_val, y_val, 1024):
            with autocast(xb.device, amp):
                s = student(xb)
            t = val_logits[seen : seen + len(xb)]
            total += float(distillation_loss(s, t, yb, kd.temperature, 1.0)) * len(xb)
            seen += len(xb)
    finally:
        student.train(was)
    return total / max(seen, 1)


def screen(
    student: nn.Module,
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    batching: Batching,
    recipe: ScreenRecipe,
    val_logits: Tensor,
    targets: SoftTargets | None = None,
    amp: bool = False,
) -> dict[str, float]:
    """Score ``student`` (already inherited from the teacher) at rung 0; it is modified in
    place (BN statistics, and weights when ``recipe.steps``). ``val_logits``: the teacher's
    logits on ``x_val`` (computed once per search); ``targets``: the teacher's soft targets
    for the distillation steps (the search's shared logits of the same batches, or the
    teacher itself)."""
    images = 0
    if recipe.steps:
        if targets is None:
            raise ValueError("screening with distillation steps needs the teacher")
        images += _distil_steps(student, targets, x, y, batching, recipe, amp)
    recalibrate_bn(student, batching.epoch(x, y, 0), recipe.bn_batches)
    images += min(recipe.bn_batches * batching.batch_size, len(x)) + 2 * len(x_val)
    res = evaluate(
        student, x_val, y_val, batch_size=1024, mean=batching.mean, std=batching.std, amp=amp
    )
    kd_loss = _kd_loss(student, x_val, y_val, val_logits, batching, recipe.kd, amp)
    return {"acc": res["acc"], "loss": res["loss"], "kd_loss": kd_loss, "images": images}
