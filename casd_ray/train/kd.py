"""Knowledge distillation: the loss, and the teacher's soft targets computed once per recipe.

Batches depend only on (seed, epoch) (:class:`casd_ray.data.batches.Batching`), so every
student trained with the same data and batch recipe needs exactly the same teacher logits.
They are computed once (:func:`shared_teacher_logits`: one cache, one size cap) and shared by
every search trial (through the object store) and every network fine-tuned with a recipe —
about 40% of a half-FLOPs student's compute saved — instead of running the teacher per batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from casd_ray.data.batches import Batching, Streamed
from casd_ray.train.devices import autocast

# Shared logits above this size are not kept: the teacher then runs per batch (a paper-scale
# recipe on a big dataset). float16 halves what fits (see logits_dtype).
LOGITS_MAX_BYTES = 1 << 30
# The latest recipe's logits, keyed by what determines them (one entry at a time).
_CACHE: dict[str, np.ndarray] = {}


@dataclass(frozen=True)
class KD:
    """The distillation loss's settings (Hinton et al.): temperature T and soft weight α."""

    temperature: float = 4.0
    alpha: float = 0.9


@dataclass
class SoftTargets:
    """Where a student's soft targets come from: the teacher run per batch (``model``), or its
    logits for every batch of the recipe (``logits``, ``[epochs, images, classes]``)."""

    kd: KD
    model: nn.Module | None = None
    logits: np.ndarray | None = None

    def for_epoch(self, epoch: int, device: torch.device) -> Tensor | None:
        """This epoch's precomputed logits on ``device`` (None: run the model per batch,
        also for an epoch beyond the precomputed ones)."""
        if self.logits is None or epoch >= len(self.logits):
            if self.model is None:
                raise ValueError(f"no teacher logits for epoch {epoch} and no teacher to run")
            return None
        return epoch_logits(self.logits, epoch, device)


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
    batching: Batching,
    amp: bool = False,
    dtype: np.dtype = np.dtype(np.float32),
) -> np.ndarray:
    """``teacher``'s logits for every batch ``batching`` draws in epochs ``0..epochs-1``:
    ``[epochs, images per epoch, classes]`` in ``dtype``, rows in batch order; each row equals
    the training loop's own teacher forward on that batch."""
    device = next(teacher.parameters()).device
    teacher.eval()
    out = []
    for epoch in range(epochs):
        rows = []
        for xb, _ in batching.epoch(x, y, epoch):
            with autocast(device, amp):
                rows.append(teacher(xb).float().cpu())
        out.append(torch.cat(rows).numpy().astype(dtype))
    return np.stack(out)


def epoch_logits(logits: np.ndarray, epoch: int, device: torch.device) -> Tensor:
    """One epoch of :func:`teacher_logits` as float32 on ``device``."""
    return torch.from_numpy(np.array(logits[epoch], dtype=np.float32)).to(device)


def _key(teacher: nn.Module, x: Tensor, y: Tensor, epochs: int, batching: Batching, amp: bool,
         dtype: np.dtype) -> str:  # fmt: skip
    """A hash of everything that decides the logits — never a name, so a different teacher
    or data can never get another's."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in teacher.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    for tensor in (x, y):  # a stream: its shards, rows and labels stand for its pixels
        h.update(
            repr(tensor).encode()
            if isinstance(tensor, Streamed)
            else tensor.cpu().numpy().tobytes()
        )
    h.update(repr((epochs, batching, str(x.device), amp, str(dtype))).encode())
    return h.hexdigest()


def shared_teacher_logits(
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    classes: int,
    epochs: int,
    batching: Batching,
    amp: bool = False,
    max_bytes: int | None = None,
    log: Callable[[str], None] = print,
    what: str = "every network of this recipe",
) -> np.ndarray | None:
    """The teacher's logits for ``epochs`` epochs of ``batching``, computed once and cached.

    None when they would not fit in ``max_bytes`` (default :data:`LOGITS_MAX_BYTES`) even as
    float16: the teacher then runs per batch.
    """
    cap = LOGITS_MAX_BYTES if max_bytes is None else max_bytes
    dtype = logits_dtype(epochs, len(x), classes, cap)
    if dtype is None:
        log(
            f"teacher logits for {epochs} epochs x {len(x)} images would exceed "
            f"{cap / 2**20:.0f} MiB even in float16: the teacher runs per batch instead"
        )
        return None
    key = _key(teacher, x, y, epochs, batching, amp, dtype)
    if key not in _CACHE:
        _CACHE.clear()
        _CACHE[key] = teacher_logits(
            teacher, x, y, epochs=epochs, batching=batching, amp=amp, dtype=dtype
        )
        log(
            f"teacher logits for {epochs} epochs x {len(x)} images computed once "
            f"({_CACHE[key].nbytes / 2**20:.1f} MiB {dtype.name}), shared by {what}"
        )
    return _CACHE[key]
