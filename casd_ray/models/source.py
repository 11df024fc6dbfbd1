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

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from casd_ray.config import ConfigError

PREFIXES = ("torchvision", "timm", "python")


class SourceError(ConfigError):
    """A model source that cannot be built, as one line naming the config key."""


def is_external(arch: str) -> bool:
    """Whether ``arch`` names a model source (``prefix:...``) rather than a built-in ResNet."""
    return arch.split(":", 1)[0] in PREFIXES and ":" in arch


def check_arch(arch: str) -> None:
    """Refuse a malformed source before anything runs (the factory itself is found later)."""
    prefix, _, rest = arch.partition(":")
    if prefix not in PREFIXES or not rest:
        raise SourceError(f"model.arch: {arch!r} is not <{'|'.join(PREFIXES)}>:<name>")
    if prefix == "python" and rest.count(":") < 1:
        raise SourceError(f"model.arch: {arch!r} is not python:<module or file.py>:<callable>")


def absolute_source(arch: str) -> str:
    """``arch`` with a ``python:`` file made absolute: trials run in other folders."""
    prefix, _, rest = arch.partition(":")
    where, _, name = rest.rpartition(":")
    if prefix == "python" and where.endswith(".py"):
        return f"python:{Path(where).resolve()}:{name}"
    return arch


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


def source_digest(arch: str) -> str | None:
    """SHA-256 of a ``python:`` factory's file (fingerprinted: editing it retrains the
    teacher); None for library models, whose code is pinned by the installed version."""
    prefix, _, rest = arch.partition(":")
    if prefix != "python":
        return None
    where = rest.rpartition(":")[0]
    if where.endswith(".py"):
        path = Path(where)
    else:
        spec = importlib.util.find_spec(where)
        path = Path(spec.origin) if spec and spec.origin else None
    if path is None or not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()
