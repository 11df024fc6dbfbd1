"""Signatures on Ray Tune's state files, so a run folder from elsewhere never runs code here.

``Tuner.restore`` and ``ExperimentAnalysis`` unpickle files of the search folder
(``tuner.pkl``, ``searcher-state-*.pkl``, and cloudpickled parts of
``experiment_state-*.json``): a crafted file would run its author's code. casd-ray therefore
signs every such file it lets Tune write with HMAC-SHA256 under a key private to this user
(``~/.config/casd-ray/signing.key``, mode 0600, made on first use; ``CASD_RAY_KEY_FILE``
points elsewhere), and reads Tune's state only after checking every file against those
signatures. A folder made by another user or machine, or changed since, is refused unless
the user says they trust it (``--trust-run-folder``); the message says which file failed.

Tune writes its state into a staging folder and copies it to the search folder in the
background; :class:`casd_ray.search.restore_point.StateCallback` signs the staging folder at the one
moment the files are complete and the copy has not begun, so the signatures travel with the
files they sign.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
from pathlib import Path

from casd_ray.errors import UntrustedRunError

KEY_ENV = "CASD_RAY_KEY_FILE"
STATE_SIGNATURES = "casd-signatures.json"  # the staged state files (synced by Tune)
TUNER_SIGNATURES = "casd-tuner-signature.json"  # tuner.pkl, written by Tune outside staging
SIGNATURE_FILES = (STATE_SIGNATURES, TUNER_SIGNATURES)
RESTORE_POINT = "casd-restore-point.zip"  # the signed state in one file (restore_point.py)


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or Path.home() / ".config" / "casd-ray" / "signing.key")


def _key() -> bytes:
    """This user's signing key, created (0600) on first use."""
    path = key_path()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def _mac(key: bytes, name: str, data: bytes) -> str:
    return hmac.new(key, name.encode() + b"\0" + data, hashlib.sha256).hexdigest()


def state_files(folder: Path) -> list[Path]:
    """The files at the top of a Tune experiment folder that Tune may load on restore."""
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in (*SIGNATURE_FILES, RESTORE_POINT)
    )


# Signatures of a file's last few versions are kept: Tune copies its state to storage file by
# file in the background, and a driver killed mid-copy (seconds, in a bucket) can leave a
# state file one snapshot behind the signatures uploaded with it.
KEEP_VERSIONS = 4


def _macs(path: Path) -> dict[str, list[str]]:
    """Name -> signatures (newest first) in a signature file; {} when missing or torn."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(raw, dict):
        return {}
    return {k: [v] if isinstance(v, str) else [m for m in v if isinstance(m, str)]
            for k, v in raw.items() if isinstance(v, str | list)}  # fmt: skip


def sign(folder: Path, files: list[Path] | None = None, out: str = STATE_SIGNATURES) -> None:
    """Write ``out`` in ``folder``: an HMAC of every state file (or of ``files``), beside the
    signatures of their previous few versions."""
    key = _key()
    old = _macs(Path(folder) / out)
    macs = {}
    for p in files or state_files(folder):
        mac = _mac(key, p.name, p.read_bytes())
        macs[p.name] = [mac, *[m for m in old.get(p.name, []) if m != mac]][:KEEP_VERSIONS]
    tmp = Path(folder) / f".{out}.tmp"
    tmp.write_text(json.dumps(macs, indent=1, sort_keys=True))
    os.replace(tmp, Path(folder) / out)


def verify(folder: Path) -> None:
    """Raise :class:`UntrustedRunError` unless every state file carries a valid signature."""
    key = _key()
    macs: dict[str, list[str]] = {}
    for name in SIGNATURE_FILES:
        macs.update(_macs(Path(folder) / name))
    for p in state_files(folder):
        have = _mac(key, p.name, p.read_bytes())
        if not any(hmac.compare_digest(want, have) for want in macs.get(p.name, [])):
            raise UntrustedRunError(
                f"{p}: not signed by this user's casd-ray key ({key_path()}); Tune's state "
                "files are pickles that can run code when loaded. If this folder is yours "
                "(e.g. the driver was killed while saving) or you trust who made it, rerun "
                "with --trust-run-folder"
            )


def verify_files(files: dict[str, bytes], shown_as: str) -> None:
    """:func:`verify` on files held in memory (copied from a bucket, or out of a zip); the
    error names each file as ``shown_as`` + its name."""
    with tempfile.TemporaryDirectory(prefix="casd-verify-") as tmp:
        for name, data in files.items():
            Path(tmp, name).write_bytes(data)
        try:
            verify(Path(tmp))
        except UntrustedRunError as err:
            raise UntrustedRunError(str(err).replace(f"{tmp}/", shown_as)) from None
