"""Pure: signing and verifying the desired state a device receives on its retained topic.

The registry signs the canonical JSON (OLPC canonical JSON, the encoding TUF signs) of
``DesiredState.model_dump(mode="json")`` with one or more keys; the envelope is
``{"signed": …, "signatures": [{"keyid", "sig"}]}`` like TUF metadata. The keys and threshold
the device trusts come from the custom ``x-edgefleet-desired`` field of the *signed* TUF root,
so rotating them is an ordinary, threshold-signed root rotation.

``verify_desired`` checks, in this order (a forged message must be refused for its signature,
never described by the claims it makes):

1. a threshold of distinct trusted keys signed the body (``reason="signature"``/``"threshold"``);
2. the body names this device (``"device"``);
3. its contract major version is ours (``"contract"``);
4. its revision is not lower than the last accepted one (``"rollback"``); equal → ``SAME``;
5. nor more than ``MAX_REVISION_STEP`` above it (``"jump"``), so no single message can use up
   the revision space.

A compromised broker can therefore delay an update but neither forge nor replay one. Callers
must pass the highest revision they have *accepted* (persisted before acting on it), not the
last one fully applied: otherwise a replay of revision 8 while revision 9 is still being
applied would pass.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, Literal, Protocol

# securesystemslib re-exports these without __all__ or "as" (mypy --strict: no implicit re-export)
from securesystemslib.signer import (  # type: ignore[attr-defined,unused-ignore]
    Key,
    Signer,
)

from agent.common.errors import BadDataError
from agent.protocol import CONTRACT_VERSION
from agent.protocol.signing import canonical_body, count_valid, sign_body
from agent.protocol.state import (
    MAX_REVISION_STEP,
    DesiredState,
    SignedDesired,
    contract_major,
)

ROOT_FIELD = "x-edgefleet-desired"

RejectReason = Literal["signature", "threshold", "device", "rollback", "jump", "contract"]


class Verdict(Enum):
    """Outcome of a successful verification."""

    ACCEPT = "accept"  # newer revision: act on it
    SAME = "same"  # the revision already accepted, redelivered (retained message): nothing to do


class DesiredRejected(BadDataError):
    """A desired state the device refuses; never retry the same message.

    Attributes:
        reason: ``"signature"``, ``"threshold"``, ``"device"``, ``"rollback"`` or ``"contract"``.
        revision: the revision the refused message claims.
        last_revision: the revision the device keeps (``None`` if it has none).
    """

    def __init__(
        self,
        message: str,
        *,
        reason: RejectReason,
        revision: int,
        last_revision: int | None,
    ) -> None:
        super().__init__(message)
        self.reason: RejectReason = reason
        self.revision = revision
        self.last_revision = last_revision


class DesiredKeysError(BadDataError):
    """The trust root does not name usable desired-state keys."""


class _HasUnrecognizedFields(Protocol):
    unrecognized_fields: dict[str, Any]


def canonical_bytes(state: DesiredState) -> bytes:
    """The exact bytes that get signed: canonical JSON of the body's JSON form.

    Raises:
        ValueError: the body holds a value canonical JSON cannot encode (floats); the schema
            has none, so this means a programming error.
    """
    return canonical_body(state)


def sign_desired(state: DesiredState, signers: Sequence[Signer]) -> SignedDesired:
    """Sign a desired state with every signer.

    Raises:
        ValueError: no signers given.
    """
    return SignedDesired(signed=state, signatures=sign_body(state, signers))


def _keeping(last_revision: int | None) -> str:
    return (
        f"keeping revision {last_revision}"
        if last_revision is not None
        else "keeping the current state"
    )


def verify_desired(
    envelope: SignedDesired,
    *,
    trusted_keys: Mapping[str, Key],
    threshold: int,
    device_id: str,
    last_revision: int | None,
) -> Verdict:
    """Decide whether to act on a received desired state.

    Args:
        envelope: the decoded message from the retained ``desired`` topic.
        trusted_keys: keyid → public key, from ``desired_keys_from_root``.
        threshold: distinct trusted keys that must have signed.
        device_id: this device.
        last_revision: highest revision accepted so far (``None`` before the first).

    Returns:
        ``Verdict.ACCEPT`` for a newer revision, ``Verdict.SAME`` for the one already accepted.

    Raises:
        DesiredRejected: with ``reason`` set; the device keeps its current state.
        ValueError: ``threshold`` below 1 (a caller bug, not bad data).
    """
    if threshold < 1:
        raise ValueError(f"threshold must be at least 1, got {threshold}")
    body = envelope.signed
    rev = body.revision
    keep = _keeping(last_revision)

    def reject(reason: RejectReason, message: str) -> DesiredRejected:
        return DesiredRejected(message, reason=reason, revision=rev, last_revision=last_revision)

    valid, signed_by = count_valid(canonical_bytes(body), envelope.signatures, trusted_keys)
    if valid == 0:
        raise reject(
            "signature",
            f"desired state revision {rev} has no valid signature from a trusted key"
            f" ({len(envelope.signatures)} signatures, {signed_by} by trusted keys, 0 valid;"
            f" {threshold} needed): ignored, {keep}",
        )
    if valid < threshold:
        raise reject(
            "threshold",
            f"desired state revision {rev} has {valid} valid signature(s) from trusted keys,"
            f" {threshold} needed: ignored, {keep}",
        )
    if body.device_id != device_id:
        raise reject(
            "device",
            f"desired state revision {rev} is for device {body.device_id!r}, this is"
            f" {device_id!r}: ignored, {keep}",
        )
    ours = contract_major(CONTRACT_VERSION)
    if contract_major(body.contract) != ours:
        raise reject(
            "contract",
            f"desired state revision {rev} uses contract {body.contract}, this agent speaks"
            f" {CONTRACT_VERSION} (major {ours}): ignored, {keep}; update the agent",
        )
    if last_revision is not None:
        if rev < last_revision:
            raise reject(
                "rollback",
                f"desired state revision {rev} is older than the applied revision"
                f" {last_revision}: replay refused, {keep}",
            )
        if rev == last_revision:
            return Verdict.SAME
        if rev - last_revision > MAX_REVISION_STEP:
            raise reject(
                "jump",
                f"desired state revision {rev} is {rev - last_revision} above the accepted"
                f" revision {last_revision} (at most {MAX_REVISION_STEP} allowed): ignored, {keep}",
            )
    return Verdict.ACCEPT


def desired_keys_from_root(
    root: Mapping[str, Any] | _HasUnrecognizedFields,
) -> tuple[dict[str, Key], int]:
    """Read the desired-state keys and threshold from the signed TUF root.

    Args:
        root: a ``tuf.api.metadata.Root`` (its ``unrecognized_fields`` are read), that dict
            itself, or the raw ``signed`` dict of ``root.json``; all hold
            ``{"x-edgefleet-desired": {"keys": {keyid: key dict}, "threshold": n}}``.

    Returns:
        (keyid → public key, threshold).

    Raises:
        DesiredKeysError: the field is absent or malformed, a key is unsupported, the same
            public key appears under two keyids, or the threshold cannot be met.
    """
    fields: Mapping[str, Any] = root if isinstance(root, Mapping) else root.unrecognized_fields
    section = fields.get(ROOT_FIELD)
    if section is None:
        raise DesiredKeysError(
            f"trust root has no {ROOT_FIELD!r} field: the device cannot verify desired states"
            " and will refuse them; publish a root that names the desired-state keys"
        )
    if not isinstance(section, Mapping):
        raise DesiredKeysError(f"{ROOT_FIELD} must be an object, got {type(section).__name__}")
    key_dicts = section.get("keys")
    threshold = section.get("threshold")
    if not isinstance(key_dicts, Mapping) or not key_dicts:
        raise DesiredKeysError(f"{ROOT_FIELD}.keys must be a non-empty object of keyid → key")
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise DesiredKeysError(f"{ROOT_FIELD}.threshold must be an integer ≥ 1, got {threshold!r}")
    if threshold > len(key_dicts):
        raise DesiredKeysError(
            f"{ROOT_FIELD}.threshold is {threshold} but only {len(key_dicts)} keys are listed:"
            " no desired state could ever be accepted"
        )
    keys: dict[str, Key] = {}
    seen: dict[str, str] = {}
    for keyid, key_dict in key_dicts.items():
        if not isinstance(keyid, str) or not isinstance(key_dict, Mapping):
            raise DesiredKeysError(f"{ROOT_FIELD}.keys[{keyid!r}] must be a key object")
        try:
            # from_dict pops fields off its argument: give it a deep copy
            key = Key.from_dict(keyid, json.loads(json.dumps(key_dict)))
        except (KeyError, TypeError, ValueError) as e:
            raise DesiredKeysError(f"{ROOT_FIELD}.keys[{keyid!r}] is not a usable key: {e}") from e
        material = json.dumps([key.keytype, key.scheme, key.keyval], sort_keys=True)
        if material in seen:
            # one key under two ids would count twice towards the threshold
            raise DesiredKeysError(
                f"{ROOT_FIELD} lists the same public key as {seen[material]!r} and {keyid!r}"
            )
        seen[material] = keyid
        keys[keyid] = key
    return keys, threshold
