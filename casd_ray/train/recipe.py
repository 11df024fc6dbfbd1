"""The optimiser and learning-rate schedule every training in casd-ray shares.

SGD with (Nesterov) momentum and a per-step cosine schedule (after an optional linear
warm-up) is the standard recipe for CIFAR ResNets and their students; teacher, trials and
fine-tune all use it, so a candidate's search score and its final accuracy come from the same
kind of training.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool = True,
) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum."""
    return torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        nesterov=nesterov and momentum > 0,
    )


class WarmupCosine:
    """LR factor per optimizer step: linear warm-up, then cosine decay to 0.

    A class rather than a closure so that the scheduler (and anything holding it) pickles,
    e.g. into a Ray checkpoint.
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0) -> None:
        self.total_steps = max(1, total_steps)
        self.warmup_steps = min(max(0, warmup_steps), self.total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    epochs: int,
    steps_per_epoch: int,
    warmup_epochs: int = 0,
) -> LambdaLR:
    """Per-step cosine schedule (optionally after a linear warm-up), stepped once per batch.

    Per step rather than per epoch because the quick runs have only a few epochs: a
    per-epoch cosine would hold the LR flat for a large fraction of the training.
    """
    fn = WarmupCosine(epochs * steps_per_epoch, warmup_epochs * steps_per_epoch)
    return LambdaLR(optimizer, fn)


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Batches ``train_batches`` yields for ``n`` images (it drops a last batch of < 2)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest >= 2 else 0)
