"""Where a user's own architecture comes from: ``torchvision:``, ``timm:`` or ``python:``.

``model.arch`` names a factory; this module turns the name into a freshly built, randomly
initialised ``nn.Module`` (no pretrained weights are ever downloaded: the teacher is trained
by ``casd-ray teacher`` or loaded from ``teacher.checkpoint``). Every failure is one
:class:`SourceError` line that names ``model.arch`` or ``model.kwargs``.

- ``torchvision:<name>`` -> ``torchvision.models.get_model(name, weights=None, **kwargs)``
- ``timm:<name>`` -> ``timm.create_model(name, pretrained=False, **kwargs)``
- ``python:<module>:<callable>`` or ``python:<file.py>:<callable>``: a factory the user
  writes. A file path is resolved against the working directory; on a cluster the file must
  exist at that path on every node (a shared file system or the same checkout).

The data decides ``num_classes`` (and ``in_chans`` for timm); a factory that takes a
``num_classes`` or ``in_channels`` argument receives them unless ``model.kwargs`` sets them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from casd_ray.errors import SourceError
from casd_ray.models.names import OBJECTS, check_arch


def _python_factory(target: str) -> Callable[..., nn.Module]:
    where, _, name = target.rpartition(":")
    path = Path(where).resolve()
    module_name = f"casd_user_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    try:
        if where.endswith(".py"):
            if not path.is_file():
                raise SourceError(f"model.arch: {where} does not exist")
            module = sys.modules.get(module_name)
            if module is None:
                spec = importlib.util.spec_from_file_location(module_name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except SourceError:
        raise
    except Exception as err:  # noqa: BLE001 - a user's module can raise anything on import
        sys.modules.pop(module_name, None)
        raise SourceError(
            f"model.arch: importing {where} failed ({type(err).__name__}: {err})"
        ) from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise SourceError(f"model.arch: {where} has no callable {name!r}")
    return factory


def _accepts(factory: Callable, arg: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return arg in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def build_external(
    arch: str, kwargs: dict[str, Any], in_channels: int, num_classes: int
) -> nn.Module:
    """A fresh, randomly initialised model from ``arch`` with the data's classes and channels."""
    check_arch(arch)
    prefix, _, name = arch.partition(":")
    kw = dict(kwargs)
    if prefix == "object":  # a module given to the Python API: a copy of it (weights unused)
        return copy.deepcopy(OBJECTS[arch]).cpu()
    try:
        if prefix == "torchvision":
            import torchvision

            if name not in torchvision.models.list_models():
                raise SourceError(f"model.arch: torchvision has no model {name!r}")
            kw.setdefault("num_classes", num_classes)
            model = torchvision.models.get_model(name, weights=None, **kw)
        elif prefix == "timm":
            try:
                import timm
            except ImportError:
                raise SourceError("model.arch: timm is not installed (pip install timm)") from None
            if not timm.is_model(name):
                raise SourceError(f"model.arch: timm has no model {name!r}")
            kw.setdefault("num_classes", num_classes)
            kw.setdefault("in_chans", in_channels)
            model = timm.create_model(name, pretrained=False, **kw)
        else:
            factory = _python_factory(name)
            if _accepts(factory, "num_classes"):
                kw.setdefault("num_classes", num_classes)
            if _accepts(factory, "in_channels"):
                kw.setdefault("in_channels", in_channels)
            model = factory(**kw)
    except SourceError:
        raise
    except Exception as err:  # noqa: BLE001 - a factory can raise anything for bad kwargs
        raise SourceError(
            f"model.kwargs: {arch} failed to build with {kw} ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(model, nn.Module):
        raise SourceError(f"model.arch: {arch} returned {type(model).__name__}, not an nn.Module")
    return model


def architecture_digest(model: nn.Module) -> str:
    """SHA-256 of a module's class, structure and weights: an in-memory model's identity.

    The weights count: the model *is* the teacher, so a retrained model is a new teacher.
    """
    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}".encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def register_object(model: nn.Module) -> str:
    """Register ``model``'s architecture under ``object:<sha256>`` and return that name.

    A CPU copy is kept (the caller's model is never touched), so candidates of it can be
    built anywhere in this process; Ray trials get it by :func:`register_as` from the object
    store.
    """
    arch = f"object:{architecture_digest(model)}"
    if arch not in OBJECTS:
        OBJECTS[arch] = copy.deepcopy(model).cpu().eval()
    return arch


def register_as(arch: str, model: nn.Module) -> None:
    """Make ``arch`` buildable in this process (a Ray worker) from the module shipped to it."""
    OBJECTS.setdefault(arch, model)
