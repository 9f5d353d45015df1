"""Pure: signing the registry's TUF metadata — version 1 of a new repository, new root versions.

Signers are handed in (``keyring.KeyRing`` reads them from key files), so nothing here touches
the disk: ``initial_metadata`` builds and signs the four roles ``registry init`` writes;
``renewed_root`` and ``rotated_root`` make the next root version and check it as a client
does (client workflow 5.3.4 and 5.3.5: the old and the new root threshold).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any

# securesystemslib and tuf re-export these without __all__ (mypy: no implicit re-export)
from securesystemslib.signer import CryptoSigner, Key  # type: ignore[attr-defined,unused-ignore]
from tuf.api.exceptions import RepositoryError
from tuf.api.metadata import (  # type: ignore[attr-defined,unused-ignore]
    Metadata,
    MetaFile,
    Root,
    Snapshot,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from cloud_sync.registry.keys import RegistryError
from cloud_sync.registry.metadata import DESIRED, DESIRED_FIELD, ROLES

_SERIALIZER = JSONSerializer(compact=False)


def sign_all(md: Metadata[Any], signers: list[CryptoSigner]) -> bytes:
    """Replace ``md``'s signatures with those of ``signers``; returns its bytes as written."""
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes(_SERIALIZER)


def initial_metadata(
    signers: Mapping[str, list[CryptoSigner]],
    days: Mapping[str, float],
    thresholds: Mapping[str, int],
    now: datetime,
) -> dict[str, bytes]:
    """Version 1 of all four roles, signed: ``metadata/`` file name → bytes.

    The root names every key of ``signers`` (``"desired"`` in ``DESIRED_FIELD``) with the
    ``thresholds``; consistent snapshots are on. Dependency order: targets, snapshot,
    timestamp, root.
    """
    root = Root(expires=now + timedelta(days=days["root"]), consistent_snapshot=True)
    for role in ROLES:
        for s in signers[role]:
            root.add_key(s.public_key, role)
        root.roles[role].threshold = thresholds[role]
    desired_keys = {s.public_key.keyid: s.public_key.to_dict() for s in signers[DESIRED]}
    root.unrecognized_fields[DESIRED_FIELD] = {
        "keys": desired_keys,
        "threshold": thresholds[DESIRED],
    }
    targets = Metadata(Targets(version=1, expires=now + timedelta(days=days["targets"])))
    targets_bytes = sign_all(targets, signers["targets"])
    snapshot = Metadata(
        Snapshot(
            version=1,
            expires=now + timedelta(days=days["snapshot"]),
            meta={"targets.json": MetaFile.from_data(1, targets_bytes, ["sha256"])},
        )
    )
    snapshot_bytes = sign_all(snapshot, signers["snapshot"])
    timestamp = Metadata(
        Timestamp(
            version=1,
            expires=now + timedelta(days=days["timestamp"]),
            snapshot_meta=MetaFile.from_data(1, snapshot_bytes, ["sha256"]),
        )
    )
    return {
        "1.targets.json": targets_bytes,
        "1.snapshot.json": snapshot_bytes,
        "timestamp.json": sign_all(timestamp, signers["timestamp"]),
        "1.root.json": sign_all(Metadata(root), signers["root"]),
    }


def renewed_root(
    old: Metadata[Root], signers: list[CryptoSigner], expires: datetime
) -> tuple[Metadata[Root], bytes]:
    """The next root version with the same keys and a new expiry, signed by ``signers``.

    Raises:
        RegistryError: the new root does not verify under the old or its own threshold.
    """
    new_root, r = _next_root(old, expires)
    data = sign_all(new_root, signers)
    try:
        _verify_chain(old, new_root)
    except RepositoryError as e:
        raise RegistryError(f"renewed root v{r.version} does not verify: {e}") from e
    return new_root, data


def rotated_root(
    old: Metadata[Root],
    role: str,
    keys: tuple[Key, Key],
    expires: datetime,
    signers_for: Callable[[Root], list[CryptoSigner]],
    *,
    where: str,
) -> tuple[Metadata[Root], bytes]:
    """The next root version with ``keys = (old key, new key)`` of ``role`` swapped.

    Signed by the old AND the new root keys (``signers_for(root)``), so a client holding the
    old root verifies the chain.

    Raises:
        RegistryError: (reason ``"key"``) the old key (from the file ``where``) is not one of
            ``role``, or the new root does not verify.
    """
    new_root, r = _next_root(old, expires, before=lambda r: _swap_key(r, role, *keys, where))
    signers = {s.public_key.keyid: s for s in signers_for(old.signed)}
    signers.update({s.public_key.keyid: s for s in signers_for(r)})
    data = sign_all(new_root, list(signers.values()))
    try:
        _verify_chain(old, new_root)
    except RepositoryError as e:
        raise RegistryError(f"new root v{r.version} does not verify: {e}", reason="key") from e
    return new_root, data


def _next_root(
    old: Metadata[Root], expires: datetime, before: Callable[[Root], None] | None = None
) -> tuple[Metadata[Root], Root]:
    """A copy of ``old`` changed by ``before``, then with the next version and ``expires``."""
    new_root: Metadata[Root] = Metadata.from_bytes(old.to_bytes())
    r = new_root.signed
    if not isinstance(r, Root):
        raise RegistryError("root metadata is not a root", reason="metadata")
    if before is not None:
        before(r)
    r.version += 1
    r.expires = expires
    return new_root, r


def _verify_chain(old: Metadata[Root], new: Metadata[Root]) -> None:
    """Client workflow 5.3.4 and 5.3.5: ``new`` meets the old and its own root threshold."""
    old.signed.verify_delegate("root", new.signed_bytes, new.signatures)
    new.signed.verify_delegate("root", new.signed_bytes, new.signatures)


def _swap_key(root: Root, role: str, old_key: Key, new_key: Key, where: str) -> None:
    """Replace ``old_key`` of ``role`` (``"desired"`` included) with ``new_key`` in ``root``."""
    try:
        if role == DESIRED:
            field = root.unrecognized_fields[DESIRED_FIELD]
            del field["keys"][old_key.keyid]
            field["keys"][new_key.keyid] = new_key.to_dict()
        else:
            root.revoke_key(old_key.keyid, role)
            root.add_key(new_key, role)
    except (KeyError, ValueError) as e:
        raise RegistryError(
            f"key {old_key.keyid[:12]}… in {where} is not a {role} key of root v{root.version}:"
            f" {e!s}",
            reason="key",
        ) from e
