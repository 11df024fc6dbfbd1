"""Training loops shared by the teacher, every search trial and the final fine-tune.

One loop serves all three so that a candidate's score during the search and its final
accuracy come from the same recipe. Batches are sliced from in-memory tensors on the
model's device (no DataLoader workers: for arrays already in memory they only add
inter-process copies), and their order and augmentation are seeded by (seed, epoch), so
every candidate sees identical batches and the teacher's logits for a batch are the same
in every trial.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from casd_ray.batches import eval_batches, to_tensors, train_batches
from casd_ray.data import DataSplits
from casd_ray.devices import autocast
from casd_ray.files import atomic_write

# On a GPU a host sync per step costs throughput; checking every few steps still stops a
# diverged run within a second, and the running loss sum keeps any NaN it has seen.
_GPU_CHECK_EVERY = 20


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    temperature: float,
    alpha: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """``alpha*T^2*KL(softmax(t/T) || softmax(s/T)) + (1-alpha)*CE(s, y)`` (Hinton et al.).

    The T^2 factor keeps the soft term's gradient scale independent of the temperature,
    so ``alpha`` means the same thing at any T. KL is averaged per sample (``batchmean``),
    which is the true KL divergence, not a per-class mean.
    """
    ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=label_smoothing)
    if alpha == 0:
        return ce
    t = temperature
    log_p_s = F.log_softmax(student_logits.float() / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return alpha * t * t * kl + (1.0 - alpha) * ce


def make_optimizer(
    model: nn.Module,
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool = True,
) -> torch.optim.SGD:
    """SGD with (Nesterov) momentum: the standard recipe for CIFAR ResNets and their students."""
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


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_one_epoch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR | None,
    batch_size: int,
    seed: int,
    epoch: int,
    augment: str,
    mean,
    std,
    teacher: nn.Module | None = None,
    teacher_logits: Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.9,
    label_smoothing: float = 0.0,
    amp: bool = False,
) -> dict:
    """One pass over ``(x, y)``: plain CE, or distillation when a ``teacher`` is given.

    ``teacher_logits``: this epoch's teacher logits in batch order (:func:`teacher_logits`,
    computed once per search or fine-tune recipe), used instead of running ``teacher``.
    Returns ``{"loss", "acc", "images_per_s", "seconds"}`` (loss and accuracy are means over
    the epoch's training batches). Raises ``FloatingPointError`` on a non-finite loss, so a
    diverged candidate fails loudly instead of reporting a NaN score.
    """
    device = _device_of(model)
    model.train()
    if teacher is not None:
        teacher.eval()
    distilled = teacher is not None or teacher_logits is not None
    offset = 0  # rows of ``teacher_logits`` consumed so far
    check_every = 1 if device.type == "cpu" else _GPU_CHECK_EVERY
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    step = 0
    start = time.perf_counter()
    batches = train_batches(
        x, y, batch_size=batch_size, seed=seed, epoch=epoch, augment=augment, mean=mean, std=std
    )
    for step, (xb, yb) in enumerate(batches, start=1):
        with autocast(device, amp):
            logits = model(xb)
            if distilled:
                if teacher_logits is not None:
                    t_logits = teacher_logits[offset : offset + len(yb)]
                else:
                    with torch.no_grad():
                        t_logits = teacher(xb)
                loss = distillation_loss(logits, t_logits, yb, temperature, alpha, label_smoothing)
            else:
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=label_smoothing)
        loss_sum += loss.detach() * len(yb)
        if step % check_every == 0 and not torch.isfinite(loss_sum):
            raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        correct += (logits.detach().argmax(1) == yb).sum()
        seen += len(yb)
        offset += len(yb)
    if seen and not torch.isfinite(loss_sum):
        raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}")
    seconds = time.perf_counter() - start
    return {
        "loss": loss_sum.item() / max(1, seen),
        "acc": correct.item() / max(1, seen),
        "images_per_s": seen / max(seconds, 1e-9),
        "seconds": seconds,
    }


def logits_dtype(epochs: int, images: int, classes: int, max_bytes: int) -> np.dtype | None:
    """How to store shared teacher logits within ``max_bytes``: float32, else float16 (half the
    memory; a logit's relative error <= 2**-11, far below what distillation at T=4 resolves),
    else None (too big: the teacher runs per batch instead)."""
    for dtype in (np.float32, np.float16):
        if epochs * images * classes * np.dtype(dtype).itemsize <= max_bytes:
            return np.dtype(dtype)
    return None


@torch.no_grad()
def teacher_logits(
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    seed: int,
    augment: str,
    mean,
    std,
    amp: bool = False,
    dtype: np.dtype = np.dtype(np.float32),
) -> np.ndarray:
    """``teacher``'s logits for every batch :func:`train_one_epoch` draws in epochs
    ``0..epochs-1``: ``[epochs, images per epoch, classes]`` in ``dtype``, rows in batch order.
    Batches depend only on (seed, epoch): every student trained with the same data, batch
    size and seed needs exactly these rows, and each equals the loop's own teacher forward."""
    device = _device_of(teacher)
    teacher.eval()
    out = []
    for epoch in range(epochs):
        rows = []
        batches = train_batches(
            x, y, batch_size=batch_size, seed=seed, epoch=epoch, augment=augment, mean=mean, std=std
        )
        for xb, _ in batches:
            with autocast(device, amp):
                rows.append(teacher(xb).float().cpu())
        out.append(torch.cat(rows).numpy().astype(dtype))
    return np.stack(out)


def epoch_logits(logits: np.ndarray, epoch: int, device: torch.device) -> Tensor:
    """One epoch of :func:`teacher_logits` as float32 on ``device``."""
    return torch.from_numpy(np.array(logits[epoch], dtype=np.float32)).to(device)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int,
    mean,
    std,
    amp: bool = False,
) -> dict:
    """Mean CE loss and accuracy over ``(x, y)`` in eval mode (BN running statistics).

    The model's train/eval mode is restored afterwards, so calling this between training
    epochs has no side effect.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    try:
        for xb, yb in eval_batches(x, y, batch_size=batch_size, mean=mean, std=std):
            with autocast(device, amp):
                logits = model(xb)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
            correct += (logits.argmax(1) == yb).sum()
            seen += len(yb)
    finally:
        model.train(was_training)
    return {"loss": loss_sum.item() / max(1, seen), "acc": correct.item() / max(1, seen)}


def evaluate_splits(
    model: nn.Module, data: DataSplits, device: torch.device, *, batch_size: int, amp: bool = False
) -> dict:
    """``val_acc``/``val_loss``/``test_acc``/``test_loss`` of a finished model.

    Only the teacher and fine-tune stages call this: the test split is read here, for the
    final numbers, and never during selection.
    """
    out = {}
    for split in ("val", "test"):
        xs, ys = to_tensors(getattr(data, f"x_{split}"), getattr(data, f"y_{split}"), device)
        res = evaluate(model, xs, ys, batch_size=batch_size, mean=data.mean, std=data.std, amp=amp)
        out[f"{split}_acc"], out[f"{split}_loss"] = res["acc"], res["loss"]
    return out


# --------------------------------------------------------------------------- resumable fit


def resume(
    checkpoint: Path,
    settings: dict,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    *,
    log: Callable[[str], None] = print,
    label: str = "train",
) -> list[dict]:
    """Load ``checkpoint`` into model/optimizer/scheduler when it was written with the same
    ``settings``; return the history of the epochs it holds (empty: start from scratch).

    A file from other settings is ignored (and left to be overwritten), never half-used.
    """
    if not checkpoint.is_file():
        return []
    try:
        ckpt = torch.load(checkpoint, map_location=_device_of(model), weights_only=True)
        same = isinstance(ckpt, dict) and ckpt.get("settings") == settings
    except Exception as err:  # noqa: BLE001 - a torn or foreign file is only a lost epoch
        log(f"{label}: ignoring unreadable {checkpoint} ({type(err).__name__}); starting over")
        return []
    if not same:
        log(f"{label}: ignoring {checkpoint} (written with other settings)")
        return []
    fresh = [copy.deepcopy(o.state_dict()) for o in (model, optimizer, scheduler)]
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history = list(ckpt["history"])
    except (KeyError, RuntimeError, TypeError, ValueError) as err:
        # The checkpoint is derived data: start over rather than fail the stage, from the
        # caller's fresh state (a failed load may have copied part of the file in).
        for obj, state in zip((model, optimizer, scheduler), fresh, strict=True):
            obj.load_state_dict(state)
        log(f"{label}: ignoring {checkpoint} ({type(err).__name__}); starting over")
        return []
    log(f"{label}: resuming from {checkpoint} after epoch {len(history)}/{ckpt['epochs']}")
    return history


def fit(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_val: Tensor,
    y_val: Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    epochs: int,
    checkpoint: Path,
    settings: dict,
    history: list[dict] | None = None,
    log: Callable[[str], None] = print,
    label: str = "train",
    eval_batch_size: int = 1024,
    teacher_logits: np.ndarray | None = None,
    **train_kw: Any,
) -> list[dict]:
    """Train until ``epochs``, validating after each epoch and writing ``checkpoint``.

    The teacher and the final fine-tune both run long; the checkpoint (written atomically,
    with ``settings`` inside so :func:`resume` can tell whether it fits) makes either one
    survive an interruption. ``history`` is what :func:`resume` returned; ``train_kw`` goes
    to :func:`train_one_epoch` (batch_size, seed, augment, mean, std, teacher, ...);
    ``teacher_logits`` (:func:`teacher_logits` of the same batches) replaces the teacher.
    Returns one dict per epoch: the training metrics, ``val_loss``, ``val_acc`` and
    ``epoch_seconds`` (training + validation).
    """
    history = list(history or [])
    mean, std, amp = train_kw["mean"], train_kw["std"], train_kw.get("amp", False)
    for epoch in range(len(history), epochs):
        began = time.perf_counter()
        if teacher_logits is not None:
            train_kw["teacher_logits"] = epoch_logits(teacher_logits, epoch, _device_of(model))
        tr = train_one_epoch(
            model, x, y, optimizer=optimizer, scheduler=scheduler, epoch=epoch, **train_kw
        )
        val = evaluate(model, x_val, y_val, batch_size=eval_batch_size, mean=mean, std=std, amp=amp)
        history.append(
            {
                "epoch": epoch + 1,
                **tr,
                "val_loss": val["loss"],
                "val_acc": val["acc"],
                "epoch_seconds": time.perf_counter() - began,
            }
        )
        state = {
            "epochs": epochs,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "settings": settings,
            "history": history,
        }
        atomic_write(checkpoint, lambda p, s=state: torch.save(s, p))
        done = sum(h["epoch_seconds"] for h in history)
        eta = done / len(history) * (epochs - epoch - 1)
        log(
            f"{label} epoch {epoch + 1}/{epochs}: loss {tr['loss']:.4f} acc {tr['acc']:.4f} "
            f"val_acc {val['acc']:.4f} {tr['images_per_s']:.0f} img/s "
            f"{history[-1]['epoch_seconds']:.1f}s ETA {eta:.0f}s"
        )
    return history
