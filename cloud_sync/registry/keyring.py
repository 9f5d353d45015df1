"""Adapter: a repository's signing keys per role — which key files sign, made and rotated.

``keys.py`` reads and writes one key file; a ``KeyRing`` knows the key folder of one
repository (``DIR.keys``, with ``offline/`` for root): the signers a root accepts for a role,
the keys ``registry init`` makes, and the key file a rotation replaces. A rotation writes the
new key as ``ROLE.pending.pem`` first, so a crash never loses a key the root already names.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# securesystemslib and tuf re-export these without __all__ (mypy: no implicit re-export)
from securesystemslib.signer import CryptoSigner, Key  # type: ignore[attr-defined,unused-ignore]
from tuf.api.metadata import Root  # type: ignore[attr-defined,unused-ignore]

from agent.common.fsutil import fsync_dir
from cloud_sync.registry.keys import (
    KEY_DIR_MODE,
    RegistryError,
    generate_signer,
    key_files,
    key_home,
    load_signer,
    save_signer,
)
from cloud_sync.registry.metadata import KEY_ROLES, role_keys


@dataclass(frozen=True)
class Rotation:
    """A key rotation under way: the new key is in ``pending`` until ``finish`` moves it."""

    current: Path  # the role's key file
    pending: Path  # ROLE.pending.pem beside it
    old_key: Key
    new_signer: CryptoSigner


class KeyRing:
    """The key files of one repository (``keys_dir`` and its ``offline/``)."""

    def __init__(self, keys_dir: Path) -> None:
        self.keys_dir = keys_dir

    @staticmethod
    def create(keys_dir: Path, thresholds: Mapping[str, int]) -> dict[str, list[CryptoSigner]]:
        """Make ``thresholds[role]`` new keys per role of ``KEY_ROLES`` in ``keys_dir``.

        ``ROLE.pem``, then ``ROLE.2.pem``…; root's in ``offline/``; folders mode 0700.

        Raises:
            RegistryError: a folder or key file cannot be written.
        """
        try:
            for d in (keys_dir, key_home(keys_dir, "root")):
                d.mkdir(parents=True, exist_ok=True, mode=KEY_DIR_MODE)
                os.chmod(d, KEY_DIR_MODE)  # mkdir's mode is masked by the umask
        except OSError as e:
            raise RegistryError(f"cannot create {keys_dir}: {e}", path=str(keys_dir)) from e
        signers = {role: [generate_signer() for _ in range(thresholds[role])] for role in KEY_ROLES}
        for role, role_signers in signers.items():
            for i, s in enumerate(role_signers):
                name = f"{role}.pem" if i == 0 else f"{role}.{i + 1}.pem"
                save_signer(s, key_home(keys_dir, role) / name)
        return signers

    def key_file(self, role: str) -> Path:
        """``ROLE.pem`` where it is (``keys_dir`` or its ``offline/``), else where it goes."""
        for d in (self.keys_dir, self.keys_dir / "offline"):
            if (d / f"{role}.pem").is_file():
                return d / f"{role}.pem"
        return key_home(self.keys_dir, role) / f"{role}.pem"

    def has_key(self, role: str) -> bool:
        """Whether this host holds a signing key of ``role`` (online key)."""
        return self.key_file(role).is_file()

    def signers(self, role: str, root: Root) -> list[CryptoSigner]:
        """Signers from the ``ROLE*.pem`` key files whose key ids ``root`` lists for ``role``.

        Raises:
            RegistryError: (reason ``"key"``) fewer matching key files than the threshold.
        """
        keyids, threshold = role_keys(role, root)
        found: dict[str, CryptoSigner] = {}
        for f in key_files(self.keys_dir, role):
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

    def begin_rotation(self, role: str, root: Root) -> Rotation:
        """Write a new key of ``role`` to ``ROLE.pending.pem``, beside its current key file.

        An interrupted rotation's pending key is promoted first when ``root`` already names it.
        """
        current = self.key_file(role)
        pending = current.with_name(f"{role}.pending.pem")
        authorised = role_keys(role, root)[0]
        if pending.exists() and load_signer(pending).public_key.keyid in authorised:
            os.replace(pending, current)
        old_key = load_signer(current).public_key
        new_signer = generate_signer()
        save_signer(new_signer, pending)  # first: a crash later never loses the key
        return Rotation(current, pending, old_key, new_signer)

    @staticmethod
    def finish_rotation(rotation: Rotation) -> None:
        """The new key replaces the old one in the role's key file (the root names it now)."""
        os.replace(rotation.pending, rotation.current)
        fsync_dir(rotation.current.parent)
