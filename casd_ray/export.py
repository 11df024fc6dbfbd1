"""Export a compressed model as data: a state dict plus its width spec, and TorchScript.

The width spec *is* the search result, so ``widths.json`` + ``model.pt`` rebuild the network
with no config and no casd-ray run folder (timm's ``_pruned`` widths, TAS's channel JSON).
``model.ts`` is a traced TorchScript module for runtimes without casd-ray installed.
Every file is written to a temporary name and renamed into place, and ``metrics.json`` is
written last: a folder with ``metrics.json`` is complete, so an interrupted export is redone.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from casd_ray.models import WidthSpec, build_model

FILES = ("model.pt", "widths.json", "model.ts", "metrics.json")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place.

    A crash leaves either the old file or the new one, never half of one; the rename is
    atomic on POSIX because the temporary file lives in the same folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: object) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=1, default=_jsonable)))


def _jsonable(obj: object) -> object:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def trace(model: nn.Module, spec: WidthSpec) -> torch.jit.ScriptModule:
    """TorchScript by tracing on one image: the forward has no data-dependent control flow."""
    example = torch.zeros(1, spec.in_channels, *spec.image_size)
    with warnings.catch_warnings():
        # torch >= 2.9 flags torch.jit as deprecated; TorchScript is still the format that
        # loads without Python-side model code, which is the point of this file.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(model, example, check_trace=False)


def save_compressed(
    model: nn.Module, spec: WidthSpec, out_dir: str | Path, metrics: dict | None = None
) -> Path:
    """Write ``model.pt``, ``widths.json``, ``model.ts`` and ``metrics.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    net = _cpu_copy(model, spec)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    atomic_write(out / "model.pt", lambda p: torch.save(state, p))
    atomic_write(out / "widths.json", lambda p: p.write_text(spec.to_json()))
    scripted = trace(net, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        atomic_write(out / "model.ts", lambda p: torch.jit.save(scripted, str(p)))
    write_json(out / "metrics.json", metrics or {})
    return out


def _cpu_copy(model: nn.Module, spec: WidthSpec) -> nn.Module:
    """A fresh CPU eval-mode model carrying ``model``'s weights (the original is untouched)."""
    net = build_model(spec)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    net.load_state_dict(state)
    return net.eval()


def load_compressed(path: str | Path) -> nn.Module:
    """Rebuild an exported model from ``widths.json`` + ``model.pt`` alone (eval mode, CPU).

    ``path`` is the export folder (``winner/``, ``uniform/``, ``teacher/``) or its ``model.pt``.
    """
    p = Path(path)
    folder = p.parent if p.is_file() else p
    widths, weights = folder / "widths.json", folder / "model.pt"
    for f in (widths, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing; expected an export folder with {FILES[:2]}")
    spec = WidthSpec.load(widths)
    model = build_model(spec)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_torchscript(path: str | Path) -> torch.jit.ScriptModule:
    """Load ``model.ts`` (from the folder or the file) with ``torch.jit.load``, on CPU."""
    p = Path(path)
    f = p / "model.ts" if p.is_dir() else p
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(f), map_location="cpu")


def is_complete(out_dir: str | Path) -> bool:
    """Whether every export file is present (``metrics.json`` is written last)."""
    return all((Path(out_dir) / f).is_file() for f in FILES)
