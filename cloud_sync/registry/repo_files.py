"""Adapter: a registry repository's files — its current metadata loaded, the lock, writes.

``RepositoryFiles`` opens a repository folder (layout in ``repo.py``): it finds its keys
(``DIR.keys``, or ``DIR/keys`` for one made before keys moved out), loads the current root,
timestamp, snapshot and targets, and holds the ``flock`` on ``DIR/.lock`` that mutating
methods of ``repo.Repository`` take. ``create_files`` writes a new one (``registry init``);
every file is written atomically (``write_file``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import TypeVar

# tuf re-exports these without __all__ (mypy: no implicit re-export)
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (  # type: ignore[attr-defined,unused-ignore]
    Metadata,
    Root,
    Snapshot,
    Targets,
    Timestamp,
)

from agent.common.fsutil import atomic_write_bytes
from cloud_sync.registry.keyring import KeyRing
from cloud_sync.registry.keys import RegistryError, default_keys_dir, is_inside, legacy_keys_dir
from cloud_sync.registry.metadata import ROLES, ROOT_FILE
from cloud_sync.registry.signing import initial_metadata

_S = TypeVar("_S", Root, Snapshot, Targets, Timestamp)  # as Metadata's own T
_R = TypeVar("_R", bound="RepositoryFiles")


class RepositoryFiles:
    """The files of one repository folder and their loaded state (base of ``Repository``).

    Attributes:
        path: the repository folder.
        metadata_dir: what ngclient's ``metadata_base_url`` must point at.
        targets_dir: what ngclient's ``target_base_url`` must point at.
        keys_dir: where its keys are.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, keys_dir: str | os.PathLike[str] | None = None
    ) -> None:
        """Open an existing repository and load its current metadata.

        Args:
            path: the repository folder.
            keys_dir: where its keys are (default ``DIR.keys``; ``DIR/keys`` for a repository
                made before keys moved out, when ``DIR.keys`` does not exist).

        Raises:
            RegistryError: (reason ``"metadata"``) not a repository, or its metadata is
                unreadable or inconsistent.
        """
        self.path = Path(path)
        self.metadata_dir = self.path / "metadata"
        self.targets_dir = self.path / "targets"
        if keys_dir is not None:
            keys = Path(keys_dir)
        else:
            keys = default_keys_dir(self.path)
            legacy = legacy_keys_dir(self.path)
            if not keys.exists() and legacy.is_dir():
                keys = legacy
        self._keyring = KeyRing(keys)
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._load()

    @property
    def keys_dir(self) -> Path:
        """Where the repository's keys are (``DIR.keys``, or ``DIR/keys`` if made before)."""
        return self._keyring.keys_dir

    def _load(self) -> None:
        try:
            cfg = json.loads((self.path / "repo.json").read_text())
            self._expiry_days = {r: float(cfg["expiry_days"][r]) for r in ROLES}
            versions = [
                int(m.group(1))
                for p in self.metadata_dir.iterdir()
                if (m := ROOT_FILE.match(p.name)) is not None
            ]
            if not versions:
                raise FileNotFoundError(f"no N.root.json in {self.metadata_dir}")
            self._root = _read_md(self.metadata_dir / f"{max(versions)}.root.json", Root)
            self._timestamp = _read_md(self.metadata_dir / "timestamp.json", Timestamp)
            sv = self._timestamp.signed.snapshot_meta.version
            self._snapshot = _read_md(self.metadata_dir / f"{sv}.snapshot.json", Snapshot)
            tv = self._snapshot.signed.meta["targets.json"].version
            targets_file = self.metadata_dir / f"{tv}.targets.json"
            self._targets = _read_md(targets_file, Targets)
            self._targets_bytes = targets_file.read_bytes()
            self._snapshot_bytes = (self.metadata_dir / f"{sv}.snapshot.json").read_bytes()
        except (OSError, ValueError, KeyError, TypeError, RepositoryError) as e:
            raise RegistryError(
                f"{self.path} is not a readable registry: {e!s}; expected the layout "
                "`edgefleet registry init` makes",
                path=str(self.path),
                reason="metadata",
            ) from e

    @contextlib.contextmanager
    def transaction(self: _R) -> Iterator[_R]:
        """Hold the repository lock (re-entrant), with state reloaded from disk.

        On an exception the in-memory state is reloaded, so it again matches the disk.

        Raises:
            RegistryError: the lock file cannot be opened.
        """
        if self._lock_depth == 0:
            try:
                fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
            except OSError as e:
                raise RegistryError(f"cannot lock {self.path}: {e}", path=str(self.path)) from e
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
            self._load()
        self._lock_depth += 1
        try:
            yield self
        except BaseException:
            self._load()
            raise
        finally:
            self._lock_depth -= 1
            if self._lock_depth == 0 and self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
                self._lock_fd = None

    def _install_root(self, new_root: Metadata[Root], data: bytes) -> None:
        """Write a new root version (``metadata/N.root.json``, then ``root.json``); use it."""
        write_file(self.metadata_dir / f"{new_root.signed.version}.root.json", data)
        write_file(self.path / "root.json", data)
        self._root = new_root


def _check_new(root_dir: Path, keys: Path) -> None:
    """Refuse to ``init`` where a registry or keys already are, or keys that would be served."""
    if is_inside(keys, root_dir):
        raise RegistryError(
            f"keys folder {keys} is inside the repository {root_dir}, whose files are "
            f"served; expected one beside it (default {default_keys_dir(root_dir)})",
            path=str(keys),
            reason="usage",
        )
    for sub in ("keys", "metadata", "targets"):
        if (root_dir / sub).exists():
            raise RegistryError(
                f"{root_dir} already holds a registry ({sub}/ exists); expected a new or "
                "empty folder: remove it or choose another",
                path=str(root_dir),
                reason="exists",
            )
    if any(keys.rglob("*.pem")):
        raise RegistryError(
            f"{keys} already holds keys; expected a new or empty folder: move them away or "
            "pass another --keys-dir",
            path=str(keys),
            reason="exists",
        )


def create_files(
    root_dir: Path,
    keys: Path,
    days: Mapping[str, float],
    thresholds: Mapping[str, int],
    now: datetime,
) -> None:
    """Write a new repository: its keys, ``repo.json`` and version-1 metadata of all roles.

    Raises:
        RegistryError: the folder already holds a repository or keys (reason ``"exists"``),
            ``keys`` is inside it (``"usage"``), or a file cannot be written.
    """
    _check_new(root_dir, keys)
    try:
        root_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RegistryError(f"cannot create {keys}: {e}", path=str(keys)) from e
    signers = KeyRing.create(keys, thresholds)
    policy = {"format": 1, "expiry_days": dict(days)}
    write_file(root_dir / "repo.json", (json.dumps(policy, indent=2) + "\n").encode())
    files = initial_metadata(signers, days, thresholds, now)
    for name, data in files.items():
        write_file(root_dir / "metadata" / name, data)
    write_file(root_dir / "root.json", files["1.root.json"])
    (root_dir / "targets").mkdir(exist_ok=True)


def _read_md(path: Path, kind: type[_S]) -> Metadata[_S]:
    md: Metadata[_S] = Metadata.from_bytes(path.read_bytes())
    if not isinstance(md.signed, kind):
        raise TypeError(f"{path.name} holds {md.signed.type} metadata, expected {kind.type}")
    return md


def write_file(path: Path, data: bytes) -> None:
    """Write ``path`` atomically; ``RegistryError`` when it cannot be."""
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise RegistryError(f"cannot write {path}: {e}", path=str(path)) from e
