"""Pure: TUF-style signatures over the canonical JSON of a wire message's body.

The envelope is ``{"signed": BODY, "signatures": [{"keyid", "sig"}]}`` as in TUF metadata;
the bytes signed are the OLPC canonical JSON (the encoding TUF signs) of
``BODY.model_dump(mode="json")``. Desired states (``agent.protocol.desired``) and commands
(``agent.protocol.command``) are signed and checked this same way, with the keys and threshold
the signed TUF root names (``x-edgefleet-desired``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel
from securesystemslib.exceptions import FormatError, UnverifiedSignatureError
from securesystemslib.formats import encode_canonical

# securesystemslib re-exports these without __all__ or "as" (mypy --strict: no implicit re-export)
from securesystemslib.signer import (  # type: ignore[attr-defined,unused-ignore]
    Key,
    Signature,
    Signer,
)

from agent.protocol.state import SignatureEntry

__all__ = ["canonical_body", "count_valid", "sign_body"]


def canonical_body(body: BaseModel) -> bytes:
    """The exact bytes that get signed: canonical JSON of the body's JSON form.

    Raises:
        ValueError: the body holds a value canonical JSON cannot encode (floats); the wire
            bodies that get signed have none, so this means a programming error.
    """
    try:
        text = encode_canonical(body.model_dump(mode="json"))
    except FormatError as e:
        raise ValueError(f"{type(body).__name__} cannot be canonicalized: {e}") from e
    if not isinstance(text, str):  # pragma: no cover - encode_canonical returns str w/o output fn
        raise ValueError("encode_canonical returned no text")
    return text.encode("utf-8")


def sign_body(body: BaseModel, signers: Sequence[Signer]) -> list[SignatureEntry]:
    """One signature entry per signer over ``canonical_body(body)``.

    Raises:
        ValueError: no signers given.
    """
    if not signers:
        raise ValueError("signing needs at least one signer")
    payload = canonical_body(body)
    entries = []
    for signer in signers:
        sig = signer.sign(payload)
        entries.append(SignatureEntry(keyid=sig.keyid, sig=sig.signature))
    return entries


def count_valid(
    payload: bytes, signatures: Sequence[SignatureEntry], trusted_keys: Mapping[str, Key]
) -> tuple[int, int]:
    """(distinct trusted keys with a valid signature, distinct trusted keys that signed)."""
    valid: set[str] = set()
    trusted_signers: set[str] = set()
    for entry in signatures:
        key = trusted_keys.get(entry.keyid)
        if key is None:
            continue  # unknown keys are ignored, as in TUF
        trusted_signers.add(entry.keyid)
        if entry.keyid in valid:
            continue  # a key counts once, however often it signed
        try:
            key.verify_signature(Signature(entry.keyid, entry.sig), payload)
        except UnverifiedSignatureError:  # VerificationError is a subclass
            continue
        valid.add(entry.keyid)
    return len(valid), len(trusted_signers)
