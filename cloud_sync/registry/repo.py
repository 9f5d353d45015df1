"""Adapter: the model registry's TUF repository on disk, built with python-tuf's Metadata API.

Layout of a repository folder ``DIR`` (what ``tuf.ngclient.Updater`` fetches is under
``metadata/`` and ``targets/``, named as it requests them with ``consistent_snapshot``; the chunk
server serves nothing else)::

    DIR/repo.json                    expiry policy (days per role); not served
    DIR/root.json                    the current root: provision devices with it
    DIR/metadata/N.root.json         every root version, N = 1, 2, …
    DIR/metadata/timestamp.json      the only unversioned file
    DIR/metadata/N.snapshot.json     every snapshot version
    DIR/metadata/N.targets.json      every targets version
    DIR/targets/DIRS/SHA256.NAME     target ``DIRS/NAME`` (ngclient's hash-prefixed naming)

and its keys (ed25519 PKCS#8, mode 0600; ``ROLE.2.pem``… for thresholds above 1) outside it,
in ``DIR.keys`` unless told otherwise (``cloud_sync.registry.keys``)::

    DIR.keys/{targets,snapshot,timestamp}.pem   online: ``registry serve`` re-signs with them
    DIR.keys/desired.pem                        desired-state signing (deploy, rollouts)
    DIR.keys/offline/root.pem                   offline: keep it off the serving hosts

A repository made before keys moved out keeps them in ``DIR/keys``: it is still opened (the
keys are read from there when ``DIR.keys`` does not exist), and ``registry serve`` refuses it
with the commands that move them.

The desired-state signing key is named in the SIGNED root, under
``root.signed.unrecognized_fields["x-edgefleet-desired"] = {"keys": {keyid: key dict},
"threshold": n}``: a device trusts it through its trusted root, and rotating it is a new root
version (``parse_desired_trust`` reads it back).

Every file is written atomically, newest-last in dependency order (targets, then
``N.targets.json``, ``N.snapshot.json``, ``timestamp.json``): a reader never sees metadata that
points at a file not yet written. Mutating methods hold an ``flock`` on ``DIR/.lock``.

``Repository`` publishes targets, re-signs what expires and renews or rotates the root; its
parts: ``repo_files.py`` (loading, the lock, atomic writes, a new repository's files),
``keyring.py`` (the key files of each role), ``signing.py`` (version-1 metadata and new root
versions, pure) and ``metadata.py`` (roles, policy, desired-state trust, target paths, pure).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

# securesystemslib and tuf re-export these without __all__ (mypy: no implicit re-export)
from securesystemslib.signer import CryptoSigner  # type: ignore[attr-defined,unused-ignore]
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (  # type: ignore[attr-defined,unused-ignore]
    Metadata,
    MetaFile,
    Root,
    TargetFile,
)

from cloud_sync.registry.freshness import RoleStatus, assess
from cloud_sync.registry.keys import RegistryError, default_keys_dir
from cloud_sync.registry.metadata import (
    DESIRED,
    KEY_ROLES,
    ROLES,
    DesiredTrust,
    check_policy,
    check_targets,
    parse_desired_trust,
    target_file_name,
)
from cloud_sync.registry.repo_files import RepositoryFiles, create_files, write_file
from cloud_sync.registry.signing import renewed_root, rotated_root, sign_all

__all__ = ["RegistryError", "Repository", "Versions"]


@dataclass(frozen=True)
class Versions:
    """The current version of each top-level role."""

    root: int
    targets: int
    snapshot: int
    timestamp: int


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


class Repository(RepositoryFiles):
    """Adapter: one TUF repository folder (see the module docstring for its layout).

    Attributes:
        path: the repository folder.
        metadata_dir: what ngclient's ``metadata_base_url`` must point at.
        targets_dir: what ngclient's ``target_base_url`` must point at.
        keys_dir: where its keys are.
    """

    # ----------------------------------------------------------------- creation
    @classmethod
    def init(
        cls,
        path: str | os.PathLike[str],
        *,
        keys_dir: str | os.PathLike[str] | None = None,
        expiry_days: Mapping[str, float] | None = None,
        thresholds: Mapping[str, int] | None = None,
        now: datetime | None = None,
    ) -> Repository:
        """Create keys and version-1 metadata of all four roles (consistent snapshots on).

        Args:
            path: the repository folder (created; must not hold keys or metadata yet).
            keys_dir: where the keys go (default ``DIR.keys``); never inside ``path``.
            expiry_days: days each of root/targets/snapshot/timestamp stays valid
                (defaults in ``metadata.DEFAULT_EXPIRY_DAYS``).
            thresholds: signatures needed per role, including ``"desired"`` (default 1);
                that many keys are made for the role.
            now: the signing time (default: the clock).

        Returns:
            The open repository.

        Raises:
            RegistryError: bad policy values (reason ``"usage"``), the folder already holds
                a repository (``"exists"``), or a file cannot be written.
        """
        days, thr = check_policy(expiry_days, thresholds)
        root_dir = Path(path)
        keys = Path(keys_dir) if keys_dir is not None else default_keys_dir(root_dir)
        create_files(root_dir, keys, days, thr, _utc(now))
        repo = cls(root_dir, keys_dir=keys)
        for role in KEY_ROLES:  # the keys on disk really satisfy the root we wrote
            repo._keyring.signers(role, repo._root.signed)
        return repo

    # ----------------------------------------------------------------- reading
    def versions(self) -> Versions:
        """The current version of each top-level role."""
        return Versions(
            self._root.signed.version,
            self._targets.signed.version,
            self._snapshot.signed.version,
            self._timestamp.signed.version,
        )

    def targets(self) -> dict[str, TargetFile]:
        """The current targets: path → ``TargetFile`` (length, sha256, ``custom``)."""
        return dict(self._targets.signed.targets)

    def target_path(self, target: TargetFile) -> Path:
        """The local file holding a target (``targets/DIRS/SHA256.NAME``)."""
        return self.targets_dir / target_file_name(target)

    def root(self) -> Root:
        """The signed part of the current root."""
        return self._root.signed

    def timestamp_expires(self) -> datetime:
        """When the current timestamp expires (UTC)."""
        return self._timestamp.signed.expires

    def trusted_root_bytes(self) -> bytes:
        """The current root's bytes, exactly as served (``DIR/root.json``).

        Raises:
            RegistryError: the file cannot be read.
        """
        try:
            return (self.path / "root.json").read_bytes()
        except OSError as e:
            raise RegistryError(f"cannot read {self.path / 'root.json'}: {e}") from e

    def desired_trust(self) -> DesiredTrust:
        """The desired-state keys and threshold the current root names."""
        return parse_desired_trust(self._root.signed)

    def desired_signer(self) -> CryptoSigner:
        """The desired-state signer (the first, when the threshold asks for several).

        Raises:
            RegistryError: (reason ``"key"``) no key file matches a key the root names.
        """
        return self._keyring.signers(DESIRED, self._root.signed)[0]

    # ----------------------------------------------------------------- signing
    def _sign(self, md: Metadata[Any], role: str) -> bytes:
        data = sign_all(md, self._keyring.signers(role, self._root.signed))
        try:
            self._root.signed.verify_delegate(role, md.signed_bytes, md.signatures)
        except RepositoryError as e:
            raise RegistryError(f"new {role} metadata does not verify: {e}", reason="key") from e
        return data

    # ----------------------------------------------------------------- writing
    def _expiry(self, role: str, now: datetime) -> datetime:
        return now + timedelta(days=self._expiry_days[role])

    def _commit(self, now: datetime, *, targets: bool, snapshot: bool) -> Versions:
        """Bump, sign and write targets (if asked), snapshot (if asked or needed), timestamp."""
        if targets:
            t = self._targets.signed
            t.version += 1
            t.expires = self._expiry("targets", now)
            self._targets_bytes = self._sign(self._targets, "targets")
            write_file(self.metadata_dir / f"{t.version}.targets.json", self._targets_bytes)
        if targets or snapshot:
            s = self._snapshot.signed
            s.meta["targets.json"] = MetaFile.from_data(
                self._targets.signed.version, self._targets_bytes, ["sha256"]
            )
            s.version += 1
            s.expires = self._expiry("snapshot", now)
            self._snapshot_bytes = self._sign(self._snapshot, "snapshot")
            write_file(self.metadata_dir / f"{s.version}.snapshot.json", self._snapshot_bytes)
        ts = self._timestamp.signed
        ts.snapshot_meta = MetaFile.from_data(
            self._snapshot.signed.version, self._snapshot_bytes, ["sha256"]
        )
        ts.version += 1
        ts.expires = self._expiry("timestamp", now)
        write_file(self.metadata_dir / "timestamp.json", self._sign(self._timestamp, "timestamp"))
        return self.versions()

    def add_targets(
        self,
        files: Mapping[str, str | os.PathLike[str]],
        custom: Mapping[str, Mapping[str, Any]] | None = None,
        *,
        now: datetime | None = None,
    ) -> Versions:
        """Add (or replace) target files and publish new targets, snapshot and timestamp.

        Args:
            files: target path (e.g. ``models/digits/1.0.0/model.onnx``) → local file.
            custom: target path → JSON object signed as that target's ``custom`` field.
            now: the signing time (default: the clock).

        Returns:
            The versions after the change.

        Raises:
            RegistryError: an invalid target path or ``custom`` (reason ``"usage"``), an
                unreadable file, or a failed write or signature.
        """
        custom = custom or {}
        check_targets(files, custom)
        t = _utc(now)
        with self.transaction():
            for path, local in files.items():
                try:
                    data = Path(local).read_bytes()
                except OSError as e:
                    raise RegistryError(
                        f"cannot read {local} (target {path}): {e}", path=str(local)
                    ) from e
                target = TargetFile.from_data(path, data, ["sha256"])
                if path in custom:
                    target.unrecognized_fields["custom"] = json.loads(json.dumps(custom[path]))
                write_file(self.target_path(target), data)
                self._targets.signed.targets[path] = target
            return self._commit(t, targets=True, snapshot=True)

    def refresh_timestamp(
        self, now: datetime, *, min_remaining: timedelta = timedelta(hours=6)
    ) -> bool:
        """Re-sign the timestamp (new version and expiry) if it expires within ``min_remaining``.

        Args:
            now: the current time (naive means UTC).
            min_remaining: refresh when ``expires - now <= min_remaining``.

        Returns:
            True when a new timestamp was written.

        Raises:
            RegistryError: signing or writing failed.
        """
        t = _utc(now)
        with self.transaction():
            if self._timestamp.signed.expires - t > min_remaining:
                return False
            self._commit(t, targets=False, snapshot=False)
            return True

    def refresh_expiring(
        self,
        now: datetime,
        *,
        min_remaining: timedelta | Mapping[str, timedelta] = timedelta(hours=6),
        roles: tuple[str, ...] = ("targets", "snapshot", "timestamp"),
    ) -> tuple[str, ...]:
        """Re-sign whichever of targets, snapshot and timestamp expire within ``min_remaining``.

        A new targets needs a new snapshot, and a new snapshot a new timestamp.

        Args:
            now: the signing time.
            min_remaining: one threshold, or one per role (``refresh_thresholds``).
            roles: the roles this caller may re-sign (whose keys it holds).

        Returns:
            The roles re-signed, e.g. ``("snapshot", "timestamp")``; empty when none.

        Raises:
            RegistryError: signing or writing failed.
        """
        t = _utc(now)

        def limit(role: str) -> timedelta:
            return min_remaining[role] if isinstance(min_remaining, Mapping) else min_remaining

        with self.transaction():
            due = {
                role: role in roles and md.signed.expires - t <= limit(role)
                for role, md in (
                    ("targets", self._targets),
                    ("snapshot", self._snapshot),
                    ("timestamp", self._timestamp),
                )
            }
            if not any(due.values()):
                return ()
            self._commit(t, targets=due["targets"], snapshot=due["snapshot"])
            if due["targets"]:
                return ("targets", "snapshot", "timestamp")
            return ("snapshot", "timestamp") if due["snapshot"] else ("timestamp",)

    def lifetimes(self) -> dict[str, timedelta]:
        """How long each role's metadata stays valid once signed (``repo.json`` policy)."""
        return {r: timedelta(days=self._expiry_days[r]) for r in ROLES}

    def refresh_thresholds(self) -> dict[str, timedelta]:
        """Re-sign a role when half its lifetime is left (timestamp 1 d: at 12 h; snapshot
        7 d: at 3.5 d; targets 90 d: at 45 d), so a registry that cannot sign for a while
        (host down, key offline) still has half a lifetime of slack."""
        return {r: life / 2 for r, life in self.lifetimes().items()}

    def freshness(self, now: datetime) -> list[RoleStatus]:
        """Each role's version, expiry and warning level at ``now`` (``freshness.assess``)."""
        online = {r: self.has_key(r) for r in ROLES}
        return assess(self.expiries(), self.lifetimes(), online, _utc(now))

    def expiries(self) -> dict[str, tuple[int, datetime]]:
        """``{role: (version, expires)}`` of root, targets, snapshot and timestamp."""
        return {
            "root": (self._root.signed.version, self._root.signed.expires),
            "targets": (self._targets.signed.version, self._targets.signed.expires),
            "snapshot": (self._snapshot.signed.version, self._snapshot.signed.expires),
            "timestamp": (self._timestamp.signed.version, self._timestamp.signed.expires),
        }

    def has_key(self, role: str) -> bool:
        """Whether this host holds a signing key of ``role`` (online key)."""
        return self._keyring.has_key(role)

    def renew_root(self, *, now: datetime | None = None) -> int:
        """Re-sign the root with the same keys and a new expiry, in a new version.

        Needs the root key(s) (offline: bring them to the host, run this, take them away).
        Devices follow the new root at their next refresh (client workflow 5.3).

        Returns:
            The new root version.

        Raises:
            RegistryError: a root key is missing or the new root does not verify.
        """
        t = _utc(now)
        with self.transaction():
            signers = self._keyring.signers("root", self._root.signed)
            new_root, data = renewed_root(self._root, signers, self._expiry("root", t))
            self._install_root(new_root, data)
            return new_root.signed.version

    def rotate_root_key(self, role: str, *, now: datetime | None = None) -> int:
        """Replace the key in ``ROLE.pem`` with a new one (same folder), in a new root version.

        The new root is signed by the old AND the new root keys (so clients holding the old
        root verify the chain). When a targets/snapshot/timestamp key changes, that role and
        the ones after it are re-signed with the new key in new versions.

        Args:
            role: one of ``KEY_ROLES`` (``"desired"`` rotates the desired-state key).
            now: the signing time (default: the clock).

        Returns:
            The new root version.

        Raises:
            RegistryError: unknown role (reason ``"usage"``), missing key, or a write failed.
        """
        if role not in KEY_ROLES:
            raise RegistryError(
                f"unknown role {role!r}, expected one of {KEY_ROLES}", reason="usage"
            )
        t = _utc(now)
        with self.transaction():
            rotation = self._keyring.begin_rotation(role, self._root.signed)
            new_root, data = rotated_root(
                self._root,
                role,
                (rotation.old_key, rotation.new_signer.public_key),
                self._expiry("root", t),
                lambda root: self._keyring.signers("root", root),
                where=str(rotation.current),
            )
            self._install_root(new_root, data)
            if role in ("targets", "snapshot", "timestamp"):
                self._commit(t, targets=role == "targets", snapshot=role != "timestamp")
            self._keyring.finish_rotation(rotation)
            return new_root.signed.version
