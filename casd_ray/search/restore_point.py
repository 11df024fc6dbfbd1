"""Tune's saved state kept whole in one file, so a resumed search never mixes two snapshots.

Tune saves a search as several files (``experiment_state-*.json``: the trials;
``search_gen_state-*.json`` and ``searcher-state-*.pkl``: the searcher) in a staging folder,
then copies them to storage one by one in the background. A driver killed during that copy
(SIGKILL, a lost head node; seconds in a bucket) leaves storage holding, e.g., a trial list
newer than the searcher's state. Resumed from that, Ray 2.60's ``OptunaSearch`` meets a trial
it never proposed and stops the search with a ``KeyError``; the other way round, a
concurrency limiter waits for a trial Tune no longer has, and the signatures may no longer
cover the older file.

:class:`StateCallback` therefore, at the moment Tune has written its files and not yet begun
the copy (Tune asks callbacks for their state right after writing its own), signs the staged
files (:mod:`casd_ray.search.trust`) and writes all of them, signatures included, as one zip to
storage: under a temporary name, then renamed (a rename on a local or shared disk, a whole
object in a bucket). The zip is thus never older than any loose file in storage, and is
always one snapshot. Before a resume, :func:`repair` checks the zip's files against this
user's key and writes them back wherever storage's copies differ.
"""

from __future__ import annotations

import contextlib
import io
import logging
import zipfile
from collections.abc import Callable
from pathlib import Path

import pyarrow.fs as pafs
from ray import tune

from casd_ray.search import trust

NAME = trust.RESTORE_POINT
logger = logging.getLogger(__name__)


def _members(staging: Path) -> list[Path]:
    signatures = staging / trust.STATE_SIGNATURES
    return [*trust.state_files(staging), *([signatures] if signatures.is_file() else [])]


def write(staging: Path, fs: pafs.FileSystem, folder: str) -> None:
    """Zip the staged state files (and their signatures) to ``folder/NAME`` on ``fs``, whole."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for path in _members(staging):
            zf.writestr(path.name, path.read_bytes())
    fs.create_dir(folder, recursive=True)
    _put(fs, folder, NAME, buf.getvalue())


def _put(fs: pafs.FileSystem, folder: str, name: str, data: bytes) -> None:
    """Write under a temporary name, then rename: readers see the old file or the new one."""
    tmp = f"{folder}/.{name}.tmp"
    with fs.open_output_stream(tmp) as out:
        out.write(data)
    fs.move(tmp, f"{folder}/{name}")


def _read(fs: pafs.FileSystem, path: str) -> bytes | None:
    try:
        with fs.open_input_stream(path) as f:
            return f.readall()
    except FileNotFoundError:
        return None


def repair(uri: str, *, trusted: bool, log: Callable[[str], None]) -> list[str]:
    """Make the Tune state files in ``uri`` the restore point's, where they differ.

    Returns the names rewritten (none when storage already holds the restore point's state,
    or when there is no restore point: a folder from before it existed). Unless ``trusted``,
    the restore point's files must carry this user's signatures; otherwise
    :class:`~casd_ray.search.trust.UntrustedRunError` names it and nothing is written.
    """
    fs, folder = pafs.FileSystem.from_uri(uri)
    raw = _read(fs, f"{folder}/{NAME}")
    if raw is None:
        return []
    try:
        with zipfile.ZipFile(io.BytesIO(raw)) as zf:
            files = {name: zf.read(name) for name in zf.namelist() if "/" not in name}
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise trust.UntrustedRunError(f"{uri}/{NAME}: unreadable ({err})") from None
    if not trusted:
        trust.verify_files(files, f"{uri}/{NAME}: ")
    changed = [
        name for name, data in sorted(files.items()) if _read(fs, f"{folder}/{name}") != data
    ]
    for name in changed:
        _put(fs, folder, name, files[name])
    if changed:
        log(
            f"search: the interrupted copy of Tune's state left {len(changed)} file(s) from "
            f"another snapshot; restored them from the restore point ({', '.join(changed)})"
        )
    return changed


class StateCallback(tune.Callback):
    """Signs Tune's staged state and writes the restore point, right after Tune saves."""

    def __init__(self) -> None:
        self.trials: list = []  # Tune's trials; their StorageContext says where state is staged

    def __getstate__(self) -> dict:
        return {"trials": []}

    def on_step_begin(self, iteration, trials, **info) -> None:
        # Tune's own list, not a copy: Ray 2.60 never calls a callback's on_trial_add, and it
        # saves its first snapshot in the step that adds the first trials, after this hook
        # saw none. Through the list, that snapshot (and a Ctrl-C's last) is signed too.
        self.trials = trials

    def get_state(self) -> None:
        # Tune calls this inside its save, after writing the experiment and searcher state
        # and before copying the staging folder to storage. Returning None writes no file.
        if not self.trials:  # no trial yet: the snapshot holds nothing to resume
            return None
        storage = self.trials[0].storage
        staging = Path(storage.experiment_driver_staging_path)
        if not staging.is_dir():
            return None
        trust.sign(staging)
        fs, folder = storage.storage_filesystem, storage.experiment_fs_path
        try:
            write(staging, fs, folder)
        except OSError as err:  # storage unreachable: Tune's own copy will fail and say so
            logger.warning("casd-ray: could not write the restore point to %s: %s", folder, err)
            with contextlib.suppress(OSError):  # an older one must not pass for the newest
                fs.delete_file(f"{folder}/{NAME}")
        return None
