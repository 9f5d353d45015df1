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
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypeVar

from securesystemslib.exceptions import FormatError
from securesystemslib.formats import encode_canonical

# securesystemslib and tuf re-export these without __all__ (mypy: no implicit re-export)
from securesystemslib.signer import CryptoSigner, Key  # type: ignore[attr-defined,unused-ignore]
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (  # type: ignore[attr-defined,unused-ignore]
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from agent.common.fsutil import atomic_write_bytes, fsync_dir
from cloud_sync.registry.freshness import RoleStatus, assess
from cloud_sync.registry.keys import (
    KEY_DIR_MODE,
    RegistryError,
    default_keys_dir,
    generate_signer,
    is_inside,
    key_files,
    key_home,
    legacy_keys_dir,
    load_signer,
    save_signer,
)

__all__ = [
    "DEFAULT_EXPIRY_DAYS",
    "DESIRED_FIELD",
    "KEY_ROLES",
    "ROLES",
    "DesiredTrust",
    "RegistryError",
    "Repository",
    "Versions",
    "parse_desired_trust",
    "target_file_name",
]

ROLES = ("root", "targets", "snapshot", "timestamp")
DESIRED = "desired"
KEY_ROLES = (*ROLES, DESIRED)
DESIRED_FIELD = "x-edgefleet-desired"
DEFAULT_EXPIRY_DAYS: Mapping[str, float] = {
    "root": 365.0,
    "targets": 90.0,
    "snapshot": 7.0,
    "timestamp": 1.0,
}
MAX_THRESHOLD = 16
# Target paths must survive the MQTT fetch request pattern (agent/protocol/fetch.py:
# ``targets/`` + 64 hex + ``.`` + path within 512 characters of [A-Za-z0-9._/-]); no segment
# starts with a dot, so ``..`` and hidden files cannot occur.
_TARGET_PATH = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*\Z")
MAX_TARGET_PATH = 400
_SERIALIZER = JSONSerializer(compact=False)
_ROOT_FILE = re.compile(r"^([1-9][0-9]*)\.root\.json\Z")
_S = TypeVar("_S", Root, Snapshot, Targets, Timestamp)  # as Metadata's own T


@dataclass(frozen=True)
class Versions:
    """The current version of each top-level role."""

    root: int
    targets: int
    snapshot: int
    timestamp: int


@dataclass(frozen=True)
class DesiredTrust:
    """The desired-state signing keys a root delegates to, and how many must sign."""

    keys: dict[str, Key]
    threshold: int


def parse_desired_trust(root: Root) -> DesiredTrust:
    """Pure: the desired-state keys and threshold named in a (verified) root.

    Args:
        root: the signed part of a root the caller already trusts (e.g. ngclient's).

    Returns:
        Key id → key, and the threshold.

    Raises:
        RegistryError: (reason ``"metadata"``) the field is missing or malformed.
    """
    field = root.unrecognized_fields.get(DESIRED_FIELD)
    try:
        if not isinstance(field, dict):
            raise TypeError(f"expected an object, got {type(field).__name__}")
        raw_keys, threshold = field["keys"], field["threshold"]
        if not isinstance(raw_keys, dict) or not raw_keys:
            raise TypeError("'keys' must be a non-empty object")
        if isinstance(threshold, bool) or not isinstance(threshold, int):
            raise TypeError(f"'threshold' must be an integer, got {threshold!r}")
        if not 1 <= threshold <= len(raw_keys):
            raise ValueError(f"'threshold' is {threshold}, expected 1..{len(raw_keys)}")
        # Key.from_dict pops fields off the dict it is given: hand it a deep copy.
        keys = {kid: Key.from_dict(kid, json.loads(json.dumps(kd))) for kid, kd in raw_keys.items()}
    except (KeyError, TypeError, ValueError) as e:
        raise RegistryError(
            f"root v{root.version} field {DESIRED_FIELD!r} is invalid: {e!s}; expected "
            '{"keys": {keyid: key}, "threshold": n}',
            reason="metadata",
        ) from e
    return DesiredTrust(keys, threshold)


def target_file_name(target: TargetFile) -> str:
    """Pure: where a target lives under ``targets/`` (ngclient's consistent-snapshot name).

    ``models/d/1.0.0/model.onnx`` with sha256 ``ab…`` → ``models/d/1.0.0/ab….model.onnx``,
    as ``Updater.download_target`` builds it from the first (here the only) hash.
    """
    dirname, sep, basename = target.path.rpartition("/")
    return f"{dirname}{sep}{target.hashes['sha256']}.{basename}"


def _check_target_path(path: str) -> None:
    if len(path) > MAX_TARGET_PATH or not _TARGET_PATH.fullmatch(path):
        raise RegistryError(
            f"target path {path!r} is invalid: expected at most {MAX_TARGET_PATH} characters "
            "of [A-Za-z0-9._-] in '/'-separated segments not starting with '.'",
            reason="usage",
        )


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc)
    return now.astimezone(timezone.utc)


def _check_policy(
    expiry_days: Mapping[str, float] | None, thresholds: Mapping[str, int] | None
) -> tuple[dict[str, float], dict[str, int]]:
    days = dict(DEFAULT_EXPIRY_DAYS)
    for role, d in (expiry_days or {}).items():
        if role not in ROLES:
            raise RegistryError(
                f"expiry for unknown role {role!r}, expected one of {ROLES}", reason="usage"
            )
        if not 0 < d <= 3650:
            raise RegistryError(
                f"expiry of {role} is {d} days, expected 0 < days <= 3650", reason="usage"
            )
        days[role] = float(d)
    thr = dict.fromkeys(KEY_ROLES, 1)
    for role, n in (thresholds or {}).items():
        if role not in KEY_ROLES:
            raise RegistryError(
                f"threshold for unknown role {role!r}, expected one of {KEY_ROLES}",
                reason="usage",
            )
        if not 1 <= n <= MAX_THRESHOLD:
            raise RegistryError(
                f"threshold of {role} is {n}, expected 1..{MAX_THRESHOLD}", reason="usage"
            )
        thr[role] = int(n)
    return days, thr


class Repository:
    """Adapter: one TUF repository folder (see the module docstring for its layout).

    Attributes:
        path: the repository folder.
        metadata_dir: what ngclient's ``metadata_base_url`` must point at.
        targets_dir: what ngclient's ``target_base_url`` must point at.
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
            self.keys_dir = Path(keys_dir)
        else:
            self.keys_dir = default_keys_dir(self.path)
            legacy = legacy_keys_dir(self.path)
            if not self.keys_dir.exists() and legacy.is_dir():
                self.keys_dir = legacy
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._load()

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
                (defaults in ``DEFAULT_EXPIRY_DAYS``).
            thresholds: signatures needed per role, including ``"desired"`` (default 1);
                that many keys are made for the role.
            now: the signing time (default: the clock).

        Returns:
            The open repository.

        Raises:
            RegistryError: bad policy values (reason ``"usage"``), the folder already holds
                a repository (``"exists"``), or a file cannot be written.
        """
        days, thr = _check_policy(expiry_days, thresholds)
        root_dir = Path(path)
        keys = Path(keys_dir) if keys_dir is not None else default_keys_dir(root_dir)
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
        t = _utc(now)
        try:
            root_dir.mkdir(parents=True, exist_ok=True)
            for d in (keys, key_home(keys, "root")):
                d.mkdir(parents=True, exist_ok=True, mode=KEY_DIR_MODE)
                os.chmod(d, KEY_DIR_MODE)  # mkdir's mode is masked by the umask
        except OSError as e:
            raise RegistryError(f"cannot create {keys}: {e}", path=str(keys)) from e
        signers = {role: [generate_signer() for _ in range(thr[role])] for role in KEY_ROLES}
        for role, role_signers in signers.items():
            for i, s in enumerate(role_signers):
                name = f"{role}.pem" if i == 0 else f"{role}.{i + 1}.pem"
                save_signer(s, key_home(keys, role) / name)
        policy = {"format": 1, "expiry_days": days}
        _write(root_dir / "repo.json", (json.dumps(policy, indent=2) + "\n").encode())

        root = Root(expires=t + timedelta(days=days["root"]), consistent_snapshot=True)
        for role in ROLES:
            for s in signers[role]:
                root.add_key(s.public_key, role)
            root.roles[role].threshold = thr[role]
        desired_keys = {s.public_key.keyid: s.public_key.to_dict() for s in signers[DESIRED]}
        root.unrecognized_fields[DESIRED_FIELD] = {
            "keys": desired_keys,
            "threshold": thr[DESIRED],
        }
        targets = Metadata(Targets(version=1, expires=t + timedelta(days=days["targets"])))
        targets_bytes = _sign_all(targets, signers["targets"])
        snapshot = Metadata(
            Snapshot(
                version=1,
                expires=t + timedelta(days=days["snapshot"]),
                meta={"targets.json": MetaFile.from_data(1, targets_bytes, ["sha256"])},
            )
        )
        snapshot_bytes = _sign_all(snapshot, signers["snapshot"])
        timestamp = Metadata(
            Timestamp(
                version=1,
                expires=t + timedelta(days=days["timestamp"]),
                snapshot_meta=MetaFile.from_data(1, snapshot_bytes, ["sha256"]),
            )
        )
        timestamp_bytes = _sign_all(timestamp, signers["timestamp"])
        root_md = Metadata(root)
        root_bytes = _sign_all(root_md, signers["root"])
        meta = root_dir / "metadata"
        _write(meta / "1.targets.json", targets_bytes)
        _write(meta / "1.snapshot.json", snapshot_bytes)
        _write(meta / "timestamp.json", timestamp_bytes)
        _write(meta / "1.root.json", root_bytes)
        _write(root_dir / "root.json", root_bytes)
        (root_dir / "targets").mkdir(exist_ok=True)
        repo = cls(root_dir, keys_dir=keys)
        for role in KEY_ROLES:  # the keys on disk really satisfy the root we wrote
            repo._signers(role, repo._root.signed)
        return repo

    # ----------------------------------------------------------------- loading
    def _load(self) -> None:
        try:
            cfg = json.loads((self.path / "repo.json").read_text())
            self._expiry_days = {r: float(cfg["expiry_days"][r]) for r in ROLES}
            versions = [
                int(m.group(1))
                for p in self.metadata_dir.iterdir()
                if (m := _ROOT_FILE.match(p.name)) is not None
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
    def transaction(self) -> Iterator[Repository]:
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
        return self._signers(DESIRED, self._root.signed)[0]

    # ----------------------------------------------------------------- keys
    def _role_keys(self, role: str, root: Root) -> tuple[set[str], int]:
        if role == DESIRED:
            trust = parse_desired_trust(root)
            return set(trust.keys), trust.threshold
        r = root.roles[role]
        return set(r.keyids), r.threshold

    def _signers(self, role: str, root: Root) -> list[CryptoSigner]:
        """Signers from the ``ROLE*.pem`` key files whose key ids ``root`` lists for ``role``."""
        keyids, threshold = self._role_keys(role, root)
        files = key_files(self.keys_dir, role)
        found: dict[str, CryptoSigner] = {}
        for f in files:
            s = load_signer(f)
            if s.public_key.keyid in keyids:
                found.setdefault(s.public_key.keyid, s)
        if len(found) < threshold:
            raise RegistryError(
                f"role {role} of root v{root.version} needs {threshold} signing key(s), found "
                f"{len(found)} matching key file(s) in {self.keys_dir}",
                path=str(self.keys_dir),
                reason="key",
            )
        return list(found.values())

    def _sign(self, md: Metadata[Any], role: str) -> bytes:
        signers = self._signers(role, self._root.signed)
        data = _sign_all(md, signers)
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
            _write(self.metadata_dir / f"{t.version}.targets.json", self._targets_bytes)
        if targets or snapshot:
            s = self._snapshot.signed
            s.meta["targets.json"] = MetaFile.from_data(
                self._targets.signed.version, self._targets_bytes, ["sha256"]
            )
            s.version += 1
            s.expires = self._expiry("snapshot", now)
            self._snapshot_bytes = self._sign(self._snapshot, "snapshot")
            _write(self.metadata_dir / f"{s.version}.snapshot.json", self._snapshot_bytes)
        ts = self._timestamp.signed
        ts.snapshot_meta = MetaFile.from_data(
            self._snapshot.signed.version, self._snapshot_bytes, ["sha256"]
        )
        ts.version += 1
        ts.expires = self._expiry("timestamp", now)
        _write(self.metadata_dir / "timestamp.json", self._sign(self._timestamp, "timestamp"))
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
        if not files:
            raise RegistryError("add_targets got no files, expected at least one", reason="usage")
        for path in files:
            _check_target_path(path)
        if extra := sorted(set(custom) - set(files)):
            raise RegistryError(f"custom metadata for targets not added: {extra}", reason="usage")
        for path, c in custom.items():
            try:  # what TUF signs: OLPC canonical JSON (no floats)
                encode_canonical(json.loads(json.dumps(c, allow_nan=False)))
            except (TypeError, ValueError, FormatError) as e:
                raise RegistryError(
                    f"custom metadata of {path} cannot be signed: {e}; expected JSON of "
                    "objects, arrays, strings, integers, booleans and null (no floats)",
                    reason="usage",
                ) from e
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
                _write(self.target_path(target), data)
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
        return self._key_file(role).is_file()

    def _key_file(self, role: str) -> Path:
        """``ROLE.pem`` where it is (``keys_dir`` or its ``offline/``), else where it goes."""
        for d in (self.keys_dir, self.keys_dir / "offline"):
            if (d / f"{role}.pem").is_file():
                return d / f"{role}.pem"
        return key_home(self.keys_dir, role) / f"{role}.pem"

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
            old_root = self._root
            new_root = Metadata.from_bytes(old_root.to_bytes())
            r = new_root.signed
            if not isinstance(r, Root):
                raise RegistryError("root metadata is not a root", reason="metadata")
            r.version += 1
            r.expires = t + timedelta(days=self._expiry_days["root"])
            data = _sign_all(new_root, self._signers("root", old_root.signed))
            try:  # client workflow 5.3.4 and 5.3.5: old and new threshold
                old_root.signed.verify_delegate("root", new_root.signed_bytes, new_root.signatures)
                r.verify_delegate("root", new_root.signed_bytes, new_root.signatures)
            except RepositoryError as e:
                raise RegistryError(f"renewed root v{r.version} does not verify: {e}") from e
            _write(self.metadata_dir / f"{r.version}.root.json", data)
            _write(self.path / "root.json", data)
            self._root = new_root
            return r.version

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
            old_root = self._root
            current = self._key_file(role)
            pending = current.with_name(f"{role}.pending.pem")
            authorised = self._role_keys(role, old_root.signed)[0]
            # An interrupted rotation: promote its key if the root already names it.
            if pending.exists() and load_signer(pending).public_key.keyid in authorised:
                os.replace(pending, current)
            old_key = load_signer(current).public_key
            new_signer = generate_signer()
            save_signer(new_signer, pending)  # first: a crash later never loses the key
            new_root = Metadata.from_bytes(old_root.to_bytes())
            r = new_root.signed
            if not isinstance(r, Root):
                raise RegistryError("root metadata is not a root", reason="metadata")
            try:
                if role == DESIRED:
                    field = r.unrecognized_fields[DESIRED_FIELD]
                    del field["keys"][old_key.keyid]
                    field["keys"][new_signer.public_key.keyid] = new_signer.public_key.to_dict()
                else:
                    r.revoke_key(old_key.keyid, role)
                    r.add_key(new_signer.public_key, role)
            except (KeyError, ValueError) as e:
                raise RegistryError(
                    f"key {old_key.keyid[:12]}… in {current} is not a "
                    f"{role} key of root v{r.version}: {e!s}",
                    reason="key",
                ) from e
            r.version += 1
            r.expires = t + timedelta(days=self._expiry_days["root"])
            signers = {s.public_key.keyid: s for s in self._signers("root", old_root.signed)}
            signers.update({s.public_key.keyid: s for s in self._signers("root", r)})
            data = _sign_all(new_root, list(signers.values()))
            try:  # client workflow 5.3.4 and 5.3.5: old threshold and new threshold
                old_root.signed.verify_delegate("root", new_root.signed_bytes, new_root.signatures)
                r.verify_delegate("root", new_root.signed_bytes, new_root.signatures)
            except RepositoryError as e:
                raise RegistryError(
                    f"new root v{r.version} does not verify: {e}", reason="key"
                ) from e
            _write(self.metadata_dir / f"{r.version}.root.json", data)
            _write(self.path / "root.json", data)
            self._root = new_root
            if role in ("targets", "snapshot", "timestamp"):
                self._commit(t, targets=role == "targets", snapshot=role != "timestamp")
            os.replace(pending, current)
            fsync_dir(current.parent)
            return r.version


def _sign_all(md: Metadata[Any], signers: list[CryptoSigner]) -> bytes:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes(_SERIALIZER)


def _read_md(path: Path, kind: type[_S]) -> Metadata[_S]:
    md: Metadata[_S] = Metadata.from_bytes(path.read_bytes())
    if not isinstance(md.signed, kind):
        raise TypeError(f"{path.name} holds {md.signed.type} metadata, expected {kind.type}")
    return md


def _write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as e:
        raise RegistryError(f"cannot write {path}: {e}", path=str(path)) from e
