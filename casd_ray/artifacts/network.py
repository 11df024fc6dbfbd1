"""Export a compressed model as data: a state dict plus its width spec, and TorchScript.

The width spec *is* the search result, so ``widths.json`` + ``model.pt`` rebuild the network
with no config and no casd-ray run folder (timm's ``_pruned`` widths, TAS's channel JSON).
``model.ts`` is a traced TorchScript module and ``model.onnx`` an ONNX graph (batch size
dynamic; written when the model exports — a missing one is not an incomplete folder) for
runtimes without casd-ray installed.
Every file is written to a temporary name and renamed into place, and ``metrics.json`` is
written last: a folder with ``metrics.json`` is complete, so an interrupted export is redone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor, nn

from casd_ray.files import ArtifactError, atomic_write, read_json, write_json, write_text
from casd_ray.models.family import Spec, build_model, group_widths, spec_from_json
from casd_ray.models.names import OBJECTS
from casd_ray.models.source import register_as

FILES = ("model.pt", "widths.json", "model.ts", "metrics.json")
ONNX_FILE = "model.onnx"
PREPROCESSING = "preprocessing.json"  # optional: folders exported before it lack it


@dataclass
class Network:
    """A saved network loaded back: eval mode, on CPU, with its spec and metrics."""

    model: nn.Module
    spec: Spec
    path: Path
    metrics: dict = field(default_factory=dict)


def read_spec(path: Path) -> Spec:
    """A ``widths.json``, checked: a corrupt or foreign file is one ArtifactError line."""
    raw = read_json(path, hint="it should hold a width spec written by casd-ray")
    try:
        return spec_from_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "spec"
        raise ArtifactError(f"{path}: not a valid width spec ({where}: {first['msg']})") from None


def read_group_widths(path: Path) -> dict[str, int]:
    """Kept channels per channel group of the network whose ``widths.json`` is ``path``."""
    return group_widths(read_spec(path))


def load_state(path: Path, model: nn.Module, spec_file: Path) -> None:
    """Load a state dict file into ``model`` (``weights_only``: a file never runs code)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises many types for a bad file
        raise ArtifactError(f"{path}: not a readable state dict ({type(err).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a resume checkpoint (last.pt)
    if not isinstance(state, dict):
        raise ArtifactError(f"{path}: expected a state dict, got {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, ValueError) as err:
        first = str(err).strip().splitlines()
        detail = next((ln.strip() for ln in first[1:] if ln.strip()), first[0] if first else "")
        raise ArtifactError(
            f"{path}: does not fit the architecture in {spec_file.name} ({detail[:160]})"
        ) from None


def trace(model: nn.Module, spec: Spec) -> torch.jit.ScriptModule:
    """TorchScript by tracing on one image: the forward has no data-dependent control flow."""
    example = torch.zeros(1, spec.in_channels, *spec.image_size)
    with warnings.catch_warnings():
        # torch >= 2.9 flags torch.jit as deprecated; TorchScript is still the format that
        # loads without Python-side model code, which is the point of this file.
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.trace(model, example, check_trace=False)


def preprocessing_of(data: dict) -> dict:
    """What an input to the exported network must look like, from the teacher's
    ``data.json`` (:meth:`casd_ray.data.splits.DataSplits.describe`): per-channel mean and
    std, the input shape, the class names in output order, and the formula that uses them.
    Without them an export cannot be used: the numbers lived only in the run folder."""
    out = {k: data.get(k) for k in ("mean", "std", "shape", "classes", "dtype")}
    scale = "pixels / 255" if data.get("dtype", "uint8") == "uint8" else "x"
    out["formula"] = f"input = ({scale} - mean) / std, per channel, NCHW"
    return out


def save_compressed(
    model: nn.Module,
    spec: Spec,
    out_dir: str | Path,
    metrics: dict | None = None,
    *,
    preprocessing: dict | None = None,
) -> Path:
    """Write ``model.pt``, ``widths.json``, ``model.ts``, ``model.onnx``, ``preprocessing.json``
    (when given) and ``metrics.json`` (last: it marks a complete folder) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if preprocessing is not None:
        write_json(out / PREPROCESSING, preprocessing)
    net = _cpu_copy(model, spec)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    atomic_write(out / "model.pt", lambda p: torch.save(state, p))
    write_text(out / "widths.json", spec.to_json())
    scripted = trace(net, spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        atomic_write(out / "model.ts", lambda p: torch.jit.save(scripted, str(p)))
    export_onnx(net, spec, out / ONNX_FILE)
    write_json(out / "metrics.json", metrics or {})
    return out


def export_onnx(model: nn.Module, spec: Spec, path: Path) -> bool:
    """Write ``model`` as ONNX (opset 17, dynamic batch); False when it does not export.

    The TorchScript-based exporter is used: it needs only the ``onnx`` package and exports
    the CNNs here in about a second (the torch.export-based one takes ~4x longer and needs
    onnxscript). A model with an op ONNX lacks is left without ``model.onnx``; a warning
    says why.
    """
    example = torch.zeros(1, spec.in_channels, *spec.image_size)
    path.unlink(missing_ok=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            atomic_write(
                path,
                lambda p: torch.onnx.export(
                    model,
                    (example,),
                    str(p),
                    input_names=["images"],
                    output_names=["logits"],
                    dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                    opset_version=17,
                    dynamo=False,
                ),
            )
        return True
    except Exception as err:  # noqa: BLE001 - exporters raise many types for unsupported ops
        warnings.warn(
            f"{path}: not written, the model does not export to ONNX ({err})", stacklevel=2
        )
        return False


def _cpu_copy(model: nn.Module, spec: Spec) -> nn.Module:
    """A fresh CPU eval-mode model carrying ``model``'s weights (the original is untouched)."""
    net = build_model(spec)
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    net.load_state_dict(state)
    return net.eval()


def load_network(path: str | Path) -> Network:
    """Rebuild a saved network from its folder (``teacher/``, ``winner/``…) or its model.pt.

    The width spec next to the state dict is all the architecture there is, so a pruned
    student loads exactly like the teacher. Every file is checked: a corrupt one, or weights
    that do not fit the spec, is one :class:`ArtifactError` line naming the file.
    """
    p = Path(path)
    folder = p.parent if p.is_file() else p
    widths, weights = folder / "widths.json", (p if p.is_file() else folder / "model.pt")
    for f in (widths, weights):
        if not f.is_file():
            raise ArtifactError(f"{f}: missing; expected a saved network folder with {FILES[:2]}")
    spec = read_spec(widths)
    model = build_model(spec)
    load_state(weights, model, widths)
    metrics_file = folder / "metrics.json"
    metrics = read_json(metrics_file) if metrics_file.is_file() else {}
    return Network(model.eval(), spec, folder, metrics)


def verify_export(path: str | Path) -> Network:
    """Load an exported network and run it on one blank image: what a user is told to deploy
    must load with :func:`load_compressed` and give one finite row of class scores.

    A garbled ``model.pt`` or ``widths.json`` used to pass reruns and reach the report's
    *Deploy* line; here it is one :class:`ArtifactError` naming the file.
    """
    net = load_network(path)
    spec = net.spec
    with torch.no_grad():
        y = net.model(torch.zeros(1, spec.in_channels, *spec.image_size))
    if tuple(y.shape) != (1, spec.num_classes) or not bool(torch.isfinite(y).all()):
        raise ArtifactError(
            f"{net.path / 'model.pt'}: gives scores of shape {tuple(y.shape)} (or not finite) "
            f"for one image, not (1, {spec.num_classes}); export it again"
        )
    return net


def load_compressed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild an exported model from ``widths.json`` + ``model.pt`` alone (eval mode, CPU).

    ``path`` is the export folder (``winner/``, ``uniform/``, ``teacher/``, or where
    :meth:`casd_ray.Result.save` wrote) or its ``model.pt``. A network compressed from an
    ``nn.Module`` given to :func:`casd_ray.compress` has no importable factory: pass ``model``,
    any instance of that architecture (its weights are not used), or load ``model.ts``.

    The module's ``preprocessing`` attribute holds ``preprocessing.json`` (mean, std, input
    shape, classes and the input formula; None for a folder exported before it existed).
    """
    p = Path(path)
    spec = read_spec((p.parent if p.is_file() else p) / "widths.json")
    arch = getattr(spec, "arch", "")
    if arch.startswith("object:") and arch not in OBJECTS:
        if model is None:
            raise ArtifactError(
                f"{p}: compressed from an in-memory nn.Module; pass model=<an instance of its "
                "architecture> to load_compressed, or load model.ts with torch.jit.load"
            )
        register_as(arch, model)
    net = load_network(path).model
    pre = (p.parent if p.is_file() else p) / PREPROCESSING
    net.preprocessing = read_json(pre) if pre.is_file() else None
    return net


def state_to_numpy(state_dict: dict[str, Tensor]) -> dict[str, np.ndarray]:
    """CPU numpy copies of a state dict: what goes into the Ray object store.

    Numpy arrays are read zero-copy by every worker on a node; torch tensors would be
    copied into each trial.
    """
    return {k: v.detach().cpu().contiguous().numpy() for k, v in state_dict.items()}


def numpy_to_state(d: dict[str, np.ndarray]) -> dict[str, Tensor]:
    """Tensors from :func:`state_to_numpy` arrays; read-only (object-store) arrays are copied.

    ``torch.from_numpy`` on a read-only array warns and would allow writes into shared
    memory, so only writable arrays are shared.
    """
    out = {}
    for k, v in d.items():
        arr = np.asarray(v)
        out[k] = torch.from_numpy(arr if arr.flags.writeable else arr.copy())
    return out


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
