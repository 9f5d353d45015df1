"""Adapter: the registry's ed25519 signing keys on disk (PKCS#8 PEM, mode 0600).

Keys are made with securesystemslib's ``CryptoSigner.generate_ed25519()`` and written with
``atomic_write_bytes`` so a crash never leaves half a key. Loading derives the public key
(an ``SSlibKey``, scheme ``ed25519``) from the private one, so its key id is the one
securesystemslib computes by default, the id the repository's root lists.

``RegistryError`` lives here, the lowest module of the package, and is re-exported by
``cloud_sync.registry.repo``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

# securesystemslib re-exports these without __all__ (mypy: no implicit re-export)
from securesystemslib.signer import CryptoSigner, SSlibKey  # type: ignore[attr-defined,unused-ignore]

from agent.errors import BadDataError
from agent.fsutil import atomic_write_bytes

__all__ = [
    "KEY_FILE_MODE",
    "RegistryError",
    "generate_signer",
    "load_signer",
    "public_key",
    "save_signer",
]

KEY_FILE_MODE = 0o600


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
