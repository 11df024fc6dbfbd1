"""BatchNorm statistics re-estimated on a few batches: adaptive BN and Precise BN.

Pruning changes the statistics every BN sees, so inherited running statistics are stale and
an early score says little about a candidate (EagleEye's adaptive BN fixes that before
scoring); during short training the running averages lag behind fast-moving weights (Precise
BN, Wu & Johnson 2021, re-estimates them before each validation).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches: Iterable, num_batches: int) -> None:
    """Re-estimate BN running statistics on a few batches (EagleEye's adaptive BN; also
    Precise BN before each search validation, ``search.precise_bn_batches``).

    Pruning changes the statistics every BN sees, so inherited running stats are stale and
    early accuracy says little about a candidate. Stats are reset and replaced by the exact
    average over ``num_batches`` train-mode forwards (momentum None = cumulative average).
    ``batches`` yields image tensors or ``(images, labels)`` pairs. Parameters, momenta and
    the train/eval mode of every module are restored afterwards.
    """
    if num_batches <= 0:
        return
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    modes = {m: m.training for m in model.modules()}
    device = next(model.parameters()).device
    seen = 0
    try:
        for batch in batches:
            if seen >= num_batches:
                break
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if seen == 0:  # reset only once a batch exists, never leave empty stats
                for m in bns:
                    m.reset_running_stats()
                    m.momentum = None
                model.train()
            model(x.to(device))
            seen += 1
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
