"""Architecture names, checked without importing torch.

``model.arch`` is a built-in pre-activation ResNet (``resnet20``, ``resnet164``, …) or a model
source: ``torchvision:<name>``, ``timm:<name>`` or ``python:<module or file.py>:<callable>``;
``object:<sha256>`` names an ``nn.Module`` handed to the Python API (:func:`casd_ray.compress`)
and registered in this process (:data:`OBJECTS`; trials receive it through the object store).
The config validates the name with this module, so reading a config (and starting the command
line) never pays for torch; building the model is :mod:`casd_ray.models.family`'s job.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from casd_ray.errors import SourceError

PREFIXES = ("torchvision", "timm", "python", "object")
# "object:<sha256>" -> the architecture (an nn.Module) it names, in this process only
OBJECTS: dict[str, Any] = {}

# name -> (depth, block) of the built-in pre-activation ResNets (standard CIFAR widths)
BUILTIN: dict[str, tuple[int, str]] = {
    **{f"resnet{d}": (d, "basic") for d in (8, 14, 20, 32, 44, 56, 110)},
    **{f"resnet{d}": (d, "bottleneck") for d in (164, 1001)},
}


def register_arch(name: str, depth: int, block: str) -> None:
    """Register a standard-width pre-activation ResNet under ``name``."""
    BUILTIN[name] = (depth, block)


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
    if prefix == "object" and arch not in OBJECTS:
        raise SourceError(
            f"model.arch: {arch!r} names an nn.Module given to casd_ray.compress in another "
            "Python session; call casd_ray.compress with the model again"
        )


def check_arch_name(arch: str) -> None:
    """Refuse an unknown built-in name or a malformed source (raises ValueError)."""
    if ":" in arch:
        check_arch(arch)
    elif arch not in BUILTIN:
        raise ValueError(
            f"unknown architecture; known: {', '.join(sorted(BUILTIN))}, "
            "or torchvision:<name>, timm:<name>, python:<module or file.py>:<callable>"
        )


def absolute_source(arch: str) -> str:
    """``arch`` with a ``python:`` file made absolute: trials run in other folders."""
    prefix, _, rest = arch.partition(":")
    where, _, name = rest.rpartition(":")
    if prefix == "python" and where.endswith(".py"):
        return f"python:{Path(where).resolve()}:{name}"
    return arch


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


def check_ignore(modules: list[str], arch: str, ignore: tuple[str, ...]) -> None:
    """Every ``space.ignore`` prefix must name one of ``modules``: a typo (``layr4``) kept
    nothing full and let the search prune what the user meant to protect (D7)."""
    for prefix in ignore:
        if not any(n == prefix or n.startswith(prefix + ".") for n in modules):
            close = difflib.get_close_matches(prefix, modules, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise SourceError(f"space.ignore: {arch} has no module {prefix!r}{hint}")
