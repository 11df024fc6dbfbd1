"""Where a search's Tune experiment lives: the run folder, or ``search.storage_path``.

Ray >= 2.7 writes trial checkpoints and Tune's state straight to ``RunConfig.storage_path``,
so a search whose trials run on other nodes needs storage every node can write: a shared
folder (NFS) or a bucket (``s3://bucket/prefix``, ``gs://…``; any URI ``pyarrow.fs``
resolves, with its usual credentials and endpoint settings, e.g. ``AWS_ENDPOINT_URL`` for
S3-compatible storage). The experiment goes to ``<storage_path>/<run name>/search``; the run
folder on the driver keeps its layout (``trials.parquet``, fine-tune, report) either way.

The trust rules hold for remote experiments too: Tune's state files are checked against this
user's signatures (copied down first) before Tune loads anything, and ``tuner.pkl``'s
signature is written beside it. A resume first puts back Tune's last whole snapshot
(:mod:`casd_ray.search.restore_point`), which a driver killed mid-copy would otherwise leave torn.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs

from casd_ray.errors import ConfigError
from casd_ray.files import check_writable
from casd_ray.search import restore_point, trust

SEARCH_DIR = "search"


def check_storage(run_dir: Path, storage_path: str | None) -> None:
    """Refuse, before the teacher trains, a ``search.storage_path`` the search cannot use.

    A URI whose scheme ``pyarrow.fs`` does not know (or whose bucket cannot be reached) and
    a folder that cannot be written both failed only when the search started.
    """
    if not storage_path:
        return
    if "://" not in storage_path:
        check_writable(storage_path, "search.storage_path")
        return
    try:
        SearchStorage.of(run_dir, storage_path)._fs()
    except Exception as err:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        first = (str(err).splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"search.storage_path: {storage_path}: {first[:200]}") from None


@dataclass(frozen=True)
class SearchStorage:
    """Tune's ``storage_path`` and experiment ``name`` for one run, and what to do with them."""

    root: str
    name: str = SEARCH_DIR

    @classmethod
    def of(cls, run_dir: Path, storage_path: str | None) -> SearchStorage:
        if not storage_path:
            return cls(str(Path(run_dir).absolute()))
        root = storage_path if "://" in storage_path else str(Path(storage_path).absolute())
        return cls(f"{root.rstrip('/')}/{Path(run_dir).name}")

    @property
    def uri(self) -> str:
        return f"{self.root}/{self.name}"

    @property
    def remote(self) -> bool:
        return "://" in self.root

    def _fs(self) -> tuple[pafs.FileSystem, str]:
        return pafs.FileSystem.from_uri(self.uri)

    def exists(self) -> bool:
        fs, path = self._fs()
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def restorable(self) -> bool:
        """Whether there is a search to resume: ``tuner.pkl`` *and* a snapshot of Tune's
        state that holds a trial. An interrupt between the first two leaves only
        ``tuner.pkl``, which ``Tuner.can_restore`` accepts and ``Tuner.restore`` then refuses;
        one before Tune added its first trial leaves an empty snapshot, unsigned (the signing
        callback learns where Tune stages its state from a trial) and with nothing in it.
        Only the JSON skeleton is read here, never its pickled parts."""
        fs, path = self._fs()
        if fs.get_file_info(f"{path}/tuner.pkl").type != pafs.FileType.File:
            return False
        found = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        snapshots = [
            i.path for i in found
            if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json")
        ]  # fmt: skip
        if not snapshots:
            return False
        try:  # the newest by name, as Tune chooses
            with fs.open_input_stream(max(snapshots)) as f:
                state = json.loads(f.readall())
        except (OSError, ValueError):
            return True  # torn or odd: let the resume's checks name the file
        return not isinstance(state, dict) or bool(state.get("trial_data", True))

    def set_aside(self, log: Callable[[str], None]) -> None:
        """Move an old experiment under ``previous/`` beside it (never delete a user's work)."""
        if not self.exists():
            return
        fs, path = self._fs()
        parent, name = path.rsplit("/", 1)
        aside = f"{parent}/previous/{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        fs.create_dir(aside.rsplit("/", 1)[0], recursive=True)
        if self.remote:  # buckets have no rename: copy, then remove
            pafs.copy_files(path, aside, source_filesystem=fs, destination_filesystem=fs)
            fs.delete_dir(path)
        else:
            fs.move(path, aside)
        log(f"search: previous search folder moved to {aside}")

    def verify(self) -> None:
        """``trust.verify`` on the experiment's state files, wherever they are."""
        if not self.remote:
            trust.verify(Path(self.uri))
            return
        fs, path = self._fs()
        files = {}
        for info in fs.get_file_info(pafs.FileSelector(path)):
            if info.type == pafs.FileType.File:
                with fs.open_input_stream(info.path) as f:
                    files[info.base_name] = f.readall()
        trust.verify_files(files, f"{self.uri}/")

    def prepare_resume(self, *, trusted: bool, log: Callable[[str], None]) -> None:
        """Put back one consistent snapshot of Tune's state (:func:`restore_point.repair`),
        then check every state file against this user's signatures unless ``trusted``."""
        restore_point.repair(self.uri, trusted=trusted, log=log)
        if not trusted:
            self.verify()

    def sign_tuner(self) -> None:
        """Sign ``tuner.pkl``, which Tune writes to storage outside its staged state."""
        if not self.remote:
            folder = Path(self.uri)
            trust.sign(folder, [folder / "tuner.pkl"], out=trust.TUNER_SIGNATURES)
            return
        fs, path = self._fs()
        local = pafs.LocalFileSystem()
        with tempfile.TemporaryDirectory(prefix="casd-sign-") as tmp:
            pafs.copy_files(f"{path}/tuner.pkl", f"{tmp}/tuner.pkl", fs, local)
            trust.sign(Path(tmp), [Path(tmp) / "tuner.pkl"], out=trust.TUNER_SIGNATURES)
            name = trust.TUNER_SIGNATURES
            pafs.copy_files(f"{tmp}/{name}", f"{path}/{name}", local, fs)

    def prune_checkpoints(self) -> int:
        """Delete every trial checkpoint but the newest, once the search has finished.

        While a search runs all checkpoints are kept (a resume after a killed driver may need
        an older one); a finished search is never resumed, so only the last of each trial is
        worth its disk space. Returns the number of checkpoints deleted.
        """
        fs, path = self._fs()
        selector = pafs.FileSelector(path, allow_not_found=True)
        deleted = 0
        for trial in fs.get_file_info(selector):
            if trial.type != pafs.FileType.Directory:
                continue
            inner = fs.get_file_info(pafs.FileSelector(trial.path))
            names = sorted(
                i.path for i in inner
                if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
            )  # fmt: skip
            for old in names[:-1]:
                fs.delete_dir(old)
                deleted += 1
        return deleted
