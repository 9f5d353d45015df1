"""Pure: secrets sealed to one device's enrolled key (``sealed:v1:…`` strings).

STUB: the interface the remote configuration relies on; the implementation lands with the
secrets work (ECDH P-256 with an ephemeral key + HKDF-SHA256 + AES-256-GCM, the device id as
associated data, from the ``cryptography`` package).
"""

from __future__ import annotations

import re
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from agent.common.errors import BadDataError

SEALED_PREFIX = "sealed:v1:"
_SEALED_RE = re.compile(re.escape(SEALED_PREFIX) + r"[A-Za-z0-9_=-]+")
# scheme://user:password@host → the password part (RFC 3986 userinfo; no '@' or '/' inside)
_URL_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)[^@/\s]*(?=@)")


class SealedError(BadDataError):
    """A sealed value that cannot be opened (wrong device, tampered, malformed)."""


def is_sealed(value: object) -> bool:
    """True for a string that is a sealed secret."""
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def seal(plaintext: str, public_key: ec.EllipticCurvePublicKey, *, device_id: str) -> str:
    """Seal ``plaintext`` so that only the holder of the device's private key opens it."""
    raise NotImplementedError


def unseal(token: str, private_key: ec.EllipticCurvePrivateKey, *, device_id: str) -> str:
    """Open one sealed string.

    Raises:
        SealedError: not sealed for this device and key, tampered with, or malformed.
    """
    raise NotImplementedError


def unseal_tree(obj: Any, private_key: ec.EllipticCurvePrivateKey, *, device_id: str) -> Any:
    """A copy of a JSON-like tree (dicts, lists, scalars) with every sealed string opened.

    Raises:
        SealedError: as ``unseal``, naming the path of the value (e.g. ``pipelines[0].source``).
    """
    raise NotImplementedError


def redact(text: str) -> str:
    """``text`` with sealed tokens shortened and URL passwords (``user:pw@``) masked."""
    text = _SEALED_RE.sub(SEALED_PREFIX + "…", text)
    return _URL_PASSWORD_RE.sub(r"\g<head>***", text)
