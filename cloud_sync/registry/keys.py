"""Adapter: the registry's ed25519 signing keys on disk (PKCS#8 PEM, mode 0600), and where.

Keys are made with securesystemslib's ``CryptoSigner.generate_ed25519()`` and written with
``atomic_write_bytes`` so a crash never leaves half a key. Loading derives the public key
(an ``SSlibKey``, scheme ``ed25519``) from the private one, so its key id is the one
securesystemslib computes by default, the id the repository's root lists.

Keys never live in the repository folder the chunk server serves. Beside it, by default
(``default_keys_dir``: ``/srv/registry`` → ``/srv/registry.keys``)::

    KEYS/{timestamp,snapshot,targets}.pem   online: `registry serve` re-signs with these
    KEYS/desired.pem                        `deploy` and rollouts sign desired states
    KEYS/offline/root.pem                   offline: move it to offline storage after init;
                                            `registry renew-root --keys-dir` brings it back

``ROLE.N.pem`` hold the further keys of a threshold above 1. A role's keys are looked up in
``KEYS`` and ``KEYS/offline``, so ``--keys-dir`` may also name a flat folder (a USB stick
holding ``root.pem``). ``check_serving_keys`` is what ``registry serve`` runs first: it
refuses to serve while it can read a root key or finds keys inside the repository (the
layout before keys moved out: ``REPO/keys``).

``RegistryError`` lives here, the lowest module of the package, and is re-exported by
``cloud_sync.registry.repo``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

# securesystemslib re-exports these without __all__ (mypy: no implicit re-export)
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined,unused-ignore]

from agent.common.errors import BadDataError
from agent.common.fsutil import atomic_write_bytes

__all__ = [
    "KEY_FILE_MODE",
    "OFFLINE_DIR",
    "OFFLINE_ROLES",
    "SERVING_ROLES",
    "RegistryError",
    "check_serving_keys",
    "default_keys_dir",
    "generate_signer",
    "is_inside",
    "key_files",
    "key_home",
    "legacy_keys_dir",
    "load_signer",
    "public_key",
    "save_signer",
]

KEY_FILE_MODE = 0o600
KEY_DIR_MODE = 0o700
OFFLINE_DIR = "offline"  # KEYS/offline: the keys no serving host may hold
SERVING_ROLES = ("targets", "snapshot", "timestamp")  # what `registry serve` may re-sign
OFFLINE_ROLES = ("root",)  # `registry serve` refuses to start while it can read these


class RegistryError(BadDataError):
    """A registry operation refused or failed; retrying it unchanged fails again.

    Attributes:
        path: the file or repository involved, when there is one.
        reason: short machine-friendly cause (``"exists"``, ``"older"``, ``"model"``,
            ``"accuracy"``, ``"key"``, ``"metadata"``, ``"usage"``, ...).
    """

    def __init__(self, message: str, *, path: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.path = path
        self.reason = reason


def generate_signer() -> CryptoSigner:
    """Adapter: a new ed25519 signer (the OS random source is read).

    Returns:
        The signer; ``signer.public_key`` is its ``SSlibKey``.
    """
    return CryptoSigner.generate_ed25519()


def public_key(signer: CryptoSigner) -> SSlibKey:
    """Pure: the signer's public key, as root metadata lists it."""
    return signer.public_key


def save_signer(signer: CryptoSigner, path: str | os.PathLike[str]) -> None:
    """Adapter: write the private key as unencrypted PKCS#8 PEM, mode 0600, atomically.

    Args:
        signer: a ``CryptoSigner`` (its ``private_bytes`` are PKCS#8 PEM).
        path: the key file; its folder is created if missing.

    Raises:
        RegistryError: (reason ``"key"``) the file cannot be written.
    """
    try:
        atomic_write_bytes(path, signer.private_bytes, mode=KEY_FILE_MODE)
    except OSError as e:
        raise RegistryError(
            f"cannot write key file {path}: {e}", path=str(path), reason="key"
        ) from e


def load_signer(path: str | os.PathLike[str]) -> CryptoSigner:
    """Adapter: read a PKCS#8 PEM ed25519 private key written by ``save_signer``.

    Args:
        path: the key file.

    Returns:
        A signer whose public key has the default securesystemslib key id.

    Raises:
        RegistryError: (reason ``"key"``) the file is missing, readable by group or others,
            not PEM, or not an ed25519 key.
    """
    p = Path(path)
    try:
        mode = stat.S_IMODE(p.stat().st_mode)
        pem = p.read_bytes()
    except OSError as e:
        raise RegistryError(f"cannot read key file {p}: {e}", path=str(p), reason="key") from e
    if mode & 0o077:
        raise RegistryError(
            f"key file {p} has mode {mode:04o}, expected 0600 (private keys must not be "
            f"readable by group or others); fix it with: chmod 600 {p}",
            path=str(p),
            reason="key",
        )
    try:
        private = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise RegistryError(
            f"key file {p} is not an unencrypted PKCS#8 PEM private key: {e}",
            path=str(p),
            reason="key",
        ) from e
    if not isinstance(private, Ed25519PrivateKey):
        raise RegistryError(
            f"key file {p} holds a {type(private).__name__}, expected an ed25519 key",
            path=str(p),
            reason="key",
        )
    return CryptoSigner(private, SSlibKey.from_crypto(private.public_key(), scheme="ed25519"))


def default_keys_dir(repo_dir: str | os.PathLike[str]) -> Path:
    """Pure: where a repository's keys live unless told otherwise: beside it, ``DIR.keys``.

    Raises:
        RegistryError: (reason ``"usage"``) ``repo_dir`` has no name (``/``).
    """
    p = Path(os.path.abspath(repo_dir))
    if not p.name:
        raise RegistryError(
            f"cannot place keys beside {p}: give the registry its own folder", reason="usage"
        )
    return p.with_name(p.name + ".keys")


def legacy_keys_dir(repo_dir: str | os.PathLike[str]) -> Path:
    """Pure: where repositories made before keys moved out kept them (``DIR/keys``)."""
    return Path(repo_dir) / "keys"


def key_home(keys_dir: Path, role: str) -> Path:
    """Pure: the folder a new key of ``role`` goes to (``KEYS/offline`` for root)."""
    return keys_dir / OFFLINE_DIR if role in OFFLINE_ROLES else keys_dir


def key_files(keys_dir: Path, role: str) -> list[Path]:
    """Adapter: ``ROLE.pem`` and ``ROLE.*.pem`` in ``keys_dir`` and ``keys_dir/offline``."""
    found: set[Path] = set()
    for d in (keys_dir, keys_dir / OFFLINE_DIR):
        found.update(d.glob(f"{role}.pem"))
        found.update(d.glob(f"{role}.*.pem"))
    return sorted(found)


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """Adapter: ``path`` is ``folder`` or below it, symlinks resolved."""
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or p.is_relative_to(f)


def _pem_files(folders: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    for folder in folders:
        for dirpath, _dirs, files in os.walk(folder):
            out.extend(Path(dirpath) / f for f in files if f.endswith(".pem"))
    return sorted(out)


def check_serving_keys(repo_dir: str | os.PathLike[str], keys_dir: str | os.PathLike[str]) -> str:
    """Adapter: refuse to serve ``repo_dir`` while this process can read keys it must not hold.

    Serving needs only the online keys (timestamp, snapshot, and targets when it is kept
    online) in ``keys_dir``. Refused: any key inside the repository (``REPO/keys``, the layout
    before keys moved out, or a ``.pem`` under ``metadata/`` or ``targets/``), a ``keys_dir``
    inside the repository, and a root key this process can read.

    Returns:
        A warning for the operator, or "": the desired-state key is readable (deploys sign
        with it; a host that only serves should not hold it).

    Raises:
        RegistryError: (reason ``"key"``) naming every file and what to do.
    """
    repo = Path(repo_dir)
    keys = Path(keys_dir)
    problems: list[str] = []
    legacy = legacy_keys_dir(repo)
    inside = [f for f in sorted(legacy.rglob("*")) if f.is_file()] if legacy.is_dir() else []
    inside += _pem_files(repo / d for d in ("metadata", "targets"))
    if inside:
        problems.append(
            f"private keys inside the served repository {repo}: "
            + ", ".join(str(f) for f in inside[:8])
            + (f" and {len(inside) - 8} more" if len(inside) > 8 else "")
            + f". Move them out: mkdir -m 700 -p {keys}/{OFFLINE_DIR} && mv {legacy}/root*.pem "
            f"{keys}/{OFFLINE_DIR}/ && mv {legacy}/*.pem {keys}/ && rmdir {legacy}; then take "
            f"{keys}/{OFFLINE_DIR} off this host"
        )
    elif is_inside(keys, repo):
        problems.append(
            f"the keys folder {keys} is inside the served repository {repo}; move it beside "
            f"the repository (default {default_keys_dir(repo)}) and pass --keys-dir"
        )
    readable = [
        f
        for role in OFFLINE_ROLES
        for f in key_files(keys, role)
        if f.is_file() and os.access(f, os.R_OK)
    ]
    for f in readable:
        problems.append(
            f"{f} is the offline root key and this process can read it; serving needs only the "
            f"timestamp, snapshot (and online targets) keys. Move it to offline storage (e.g. "
            f"mv {f.parent} /media/offline-keys/) and bring it back only for "
            f"`edgefleet registry renew-root --keys-dir /media/offline-keys`"
        )
    if problems:
        raise RegistryError(
            "registry serve refuses to start: " + "; ".join(problems),
            path=str(inside[0] if inside else readable[0] if readable else keys),
            reason="key",
        )
    desired = [f for f in key_files(keys, "desired") if os.access(f, os.R_OK)]
    if desired:
        return (
            f"{desired[0]} (the desired-state key) is readable: serving does not need it; "
            "a host that only serves should not hold it"
        )
    return ""
