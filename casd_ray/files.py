"""Low-level file helpers every module may use: atomic writes and checked JSON reads.

A crash, Ctrl-C or a full disk must leave either the old file or the new one, never half of
one: every artefact is written to a uniquely named temporary file in the same folder,
flushed to disk, and renamed into place. Reads of artefacts go through :func:`read_json`,
which turns a missing or corrupt file into one :class:`ArtifactError` line naming the file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from casd_ray.errors import ArtifactError, ConfigError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a fresh temporary file next to ``path``, then rename it into place.

    The temporary name is unique (two writers never share it), the data is fsync'ed before
    the rename, and the rename is atomic on POSIX because both names are in one folder.
    ``mkstemp`` makes the file 0600; it gets the mode a plain ``open`` would (0666 less the
    umask), so others on a shared cluster can read a run as their umask allows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_writable(path: str | Path, field: str) -> None:
    """Refuse, naming ``field``, a ``path`` whose nearest existing folder takes no new entry.

    ``os.access`` says yes to root on ``/proc`` and ``/sys``, where making a folder fails
    later with a bare OS error; so a folder is made and removed in it (nothing stays).
    """
    path = Path(path).absolute()
    probe = next(p for p in (path, *path.parents) if p.exists())
    if not probe.is_dir():
        raise ConfigError(f"{field}: {probe} exists and is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".casd-ray-probe-", dir=probe))
    except OSError as err:
        raise ConfigError(f"{field}: {probe} is not writable ({err.strerror})") from None


def _umask() -> int:
    """The process umask (read by setting it, the only portable way, and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_text(path: str | Path, text: str) -> None:
    """Atomically write ``text``."""
    atomic_write(path, lambda p: p.write_text(text))


def write_json(path: str | Path, obj: object) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=1, default=_jsonable))


def _jsonable(obj: object) -> object:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path, *, hint: str = "", kind: type | None = dict) -> Any:
    """Parse a JSON artefact; a missing, unreadable or wrongly shaped one is an ArtifactError.

    ``kind`` is the top-level type the file must have (None: any); ``hint`` says what to do.
    """
    path = Path(path)
    try:
        obj = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing{'; ' + hint if hint else ''}") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        what = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ArtifactError(
            f"{path}: not valid JSON ({what}){'; ' + hint if hint else ''}"
        ) from None
    if kind is not None and not isinstance(obj, kind):
        raise ArtifactError(
            f"{path}: expected a JSON {kind.__name__}, got {type(obj).__name__}"
            f"{'; ' + hint if hint else ''}"
        )
    return obj


def read_json_or_none(path: str | Path) -> Any:
    """The parsed JSON file, or None when it is missing or corrupt (for optional extras)."""
    try:
        return read_json(path, kind=None)
    except ArtifactError:
        return None
