"""A trial's scratch folder for the checkpoint it hands to Tune, and the sweep of those a
killed trial left behind.

Tune copies a reported checkpoint folder into its storage inside ``report()``; the folder
itself is scratch, removed when ``report()`` returns. A trial killed inside it (a lost node,
the OOM killer, a test's SIGKILL) never returns, and its folder stays in the temp directory:
63 had piled up in /tmp on the development machine, each a full model state. So each folder's
name carries its process id, and a new one first removes those whose process no longer runs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PREFIX = "casd-ckpt-"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(root: Path) -> None:
    """Remove the scratch folders under ``root`` of processes that no longer run (a folder
    not named ``<PREFIX><pid>-...`` is left alone: whose it is cannot be told)."""
    for folder in root.glob(f"{PREFIX}*-*"):
        pid = folder.name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def checkpoint_dir(root: Path | None = None) -> Iterator[Path]:
    """A scratch folder named by this process, removed on exit; stale ones swept first."""
    root = Path(root or tempfile.gettempdir())
    sweep_stale(root)
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}{os.getpid()}-", dir=root) as tmp:
        yield Path(tmp)
