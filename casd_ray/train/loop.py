"""The training loop shared by the teacher, every search trial and the final fine-tune.

One loop serves all three so that a candidate's score during the search and its final
accuracy come from the same recipe. Batches are sliced from in-memory tensors on the
model's device (no DataLoader workers: for arrays already in memory they only add
inter-process copies), and their order and augmentation are seeded by (seed, epoch)
(:class:`~casd_ray.data.batches.Batching`), so every candidate sees identical batches and
the teacher's logits for a batch are the same in every trial.

Rule: ``train/`` never imports ``models/``, ``widths/``, ``artifacts/`` or ``search/``: a
loop takes any ``nn.Module``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from casd_ray.data.batches import Batching, eval_batches, to_tensors
from casd_ray.data.splits import DataSplits
from casd_ray.files import atomic_write
from casd_ray.train.devices import autocast
from casd_ray.train.kd import SoftTargets, distillation_loss

# On a GPU a host sync per step costs throughput; checking every few steps still stops a
# diverged run within a second, and the running loss sum keeps any NaN it has seen.
_GPU_CHECK_EVERY = 20


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def train_one_epoch(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR | None,
    batching: Batching,
    epoch: int,
    targets: SoftTargets | None = None,
    label_smoothing: float = 0.0,
    amp: bool = False,
    max_steps: int | None = None,
) -> dict:
    """One pass over ``(x, y)``: plain CE, or distillation when soft ``targets`` are given;
    ``max_steps`` stops it early (a screening budget of a few hundred steps).

    Returns ``{"loss", "acc", "images_per_s", "seconds"}`` (loss and accuracy are means over
    the epoch's training batches). Raises ``FloatingPointError`` on a non-finite loss, so a
    diverged candidate fails loudly instead of reporting a NaN score.
    """
    device = _device_of(model)
    model.train()
    teacher = targets.model if targets is not None else None
    if teacher is not None:
        teacher.eval()
    epoch_logits = targets.for_epoch(epoch, device) if targets is not None else None
    offset = 0  # rows of ``epoch_logits`` consumed so far
    check_every = 1 if device.type == "cpu" else _GPU_CHECK_EVERY
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    step = 0
    start = time.perf_counter()
    for step, (xb, yb) in enumerate(batching.epoch(x, y, epoch), start=1):
        with autocast(device, amp):
            logits = model(xb)
            if targets is not None:
                if epoch_logits is not None:
                    t_logits = epoch_logits[offset : offset + len(yb)]
                else:
                    with torch.no_grad():
                        t_logits = teacher(xb)
                kd = targets.kd
                loss = distillation_loss(
                    logits, t_logits, yb, kd.temperature, kd.alpha, label_smoothing
                )
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
        if max_steps is not None and step >= max_steps:
            break
    if seen and not torch.isfinite(loss_sum):
        raise FloatingPointError(f"non-finite loss at epoch {epoch} step {step}")
    seconds = time.perf_counter() - start
    return {
        "loss": loss_sum.item() / max(1, seen),
        "acc": correct.item() / max(1, seen),
        "images_per_s": seen / max(seconds, 1e-9),
        "seconds": seconds,
    }


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
    per_image: bool = False,
) -> dict:
    """Mean CE loss and accuracy over ``(x, y)`` in eval mode (BN running statistics);
    with ``per_image`` also ``correct``, a bool per image in order (paired comparisons).

    The model's train/eval mode is restored afterwards, so calling this between training
    epochs has no side effect.
    """
    device = _device_of(model)
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device)
    hits: list[Tensor] = []
    seen = 0
    try:
        for xb, yb in eval_batches(x, y, batch_size=batch_size, mean=mean, std=std):
            with autocast(device, amp):
                logits = model(xb)
            loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
            hits.append(logits.argmax(1) == yb)
            seen += len(yb)
    finally:
        model.train(was_training)
    correct = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool, device=device)
    out = {"loss": loss_sum.item() / max(1, seen), "acc": correct.sum().item() / max(1, seen)}
    if per_image:
        out["correct"] = correct.cpu().numpy()
    return out


def evaluate_splits(
    model: nn.Module,
    data: DataSplits,
    device: torch.device,
    *,
    batch_size: int,
    amp: bool = False,
    per_image: bool = False,
) -> dict:
    """``val_acc``/``val_loss``/``test_acc``/``test_loss`` of a finished model (with
    ``per_image`` also ``val_correct``/``test_correct``, bool arrays).

    Only the teacher and fine-tune stages call this: the test split is read here, for the
    final numbers, and never during selection.
    """
    out = {}
    for split in ("val", "test"):
        xs, ys = to_tensors(getattr(data, f"x_{split}"), getattr(data, f"y_{split}"), device)
        res = evaluate(model, xs, ys, batch_size=batch_size, mean=data.mean, std=data.std,
                       amp=amp, per_image=per_image)  # fmt: skip
        out[f"{split}_acc"], out[f"{split}_loss"] = res["acc"], res["loss"]
        if per_image:
            out[f"{split}_correct"] = res["correct"]
    return out


# --------------------------------------------------------------------------- resumable fit


@dataclass(frozen=True)
class Checkpoint:
    """Where a long training keeps its state after every epoch, and the settings it is valid
    for (a file written with other settings is ignored, never half-used)."""

    path: Path
    settings: dict


def resume(
    checkpoint: Checkpoint,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    *,
    log: Callable[[str], None] = print,
    label: str = "train",
) -> list[dict]:
    """Load ``checkpoint`` into model/optimizer/scheduler when it was written with the same
    settings; return the history of the epochs it holds (empty: start from scratch).

    A file from other settings is ignored (and left to be overwritten), never half-used.
    """
    settings, checkpoint = checkpoint.settings, checkpoint.path
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
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    *,
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    epochs: int,
    batching: Batching,
    checkpoint: Checkpoint,
    history: list[dict] | None = None,
    targets: SoftTargets | None = None,
    label_smoothing: float = 0.0,
    amp: bool = False,
    eval_batch_size: int = 1024,
    log: Callable[[str], None] = print,
    label: str = "train",
) -> list[dict]:
    """Train until ``epochs``, validating after each epoch and writing ``checkpoint``.

    The teacher and the final fine-tune both run long; the checkpoint (written atomically,
    with its settings inside so :func:`resume` can tell whether it fits) makes either one
    survive an interruption. ``history`` is what :func:`resume` returned. Returns one dict per
    epoch: the training metrics, ``val_loss``, ``val_acc`` and ``epoch_seconds`` (training +
    validation).
    """
    history = list(history or [])
    (x, y), (x_val, y_val) = train, val
    for epoch in range(len(history), epochs):
        began, cpu = time.perf_counter(), time.process_time()
        tr = train_one_epoch(
            model, x, y, optimizer=optimizer, scheduler=scheduler, batching=batching,
            epoch=epoch, targets=targets, label_smoothing=label_smoothing, amp=amp,
        )  # fmt: skip
        v = evaluate(
            model, x_val, y_val, batch_size=eval_batch_size, mean=batching.mean,
            std=batching.std, amp=amp,
        )  # fmt: skip
        history.append(
            {
                "epoch": epoch + 1,
                **tr,
                "val_loss": v["loss"],
                "val_acc": v["acc"],
                "epoch_seconds": time.perf_counter() - began,
                "cpu_seconds": time.process_time() - cpu,  # all threads of this process
            }
        )
        state = {
            "epochs": epochs,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "settings": checkpoint.settings,
            "history": history,
        }
        atomic_write(checkpoint.path, lambda p, s=state: torch.save(s, p))
        done = sum(h["epoch_seconds"] for h in history)
        eta = done / len(history) * (epochs - epoch - 1)
        log(
            f"{label} epoch {epoch + 1}/{epochs}: loss {tr['loss']:.4f} acc {tr['acc']:.4f} "
            f"val_acc {v['acc']:.4f} {tr['images_per_s']:.0f} img/s "
            f"{history[-1]['epoch_seconds']:.1f}s ETA {eta:.0f}s"
        )
    return history
