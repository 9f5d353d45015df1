"""Pure: secrets sealed to one device's enrolled key (``sealed:v1:…`` strings), and redaction.

A camera URL with a password travels in a remote configuration as a sealed string that only
the device it was sealed for can open. The construction (ECIES-style, all primitives from the
``cryptography`` package):

1. an ephemeral P-256 key pair per sealed value; ECDH between its private half and the
   device's enrolled P-256 public key (the key of its mutual-TLS certificate);
2. HKDF-SHA256 over the shared secret → a 256-bit AES key; the HKDF ``info`` binds the format
   version, the device id, the ephemeral point and the device's public point, so a key is
   derived for exactly one (version, device, recipient key, token);
3. AES-256-GCM with a 96-bit random nonce; the associated data is ``sealed:v1:`` + device id,
   so a token sealed for device A does not open on device B even with A's key copied there,
   and cannot be moved between devices.

Token: ``sealed:v1:`` + base64url (RFC 4648 §5, written without ``=`` padding; padding is
accepted when reading) of ``ephemeral point (65 bytes, X9.62 uncompressed) || nonce (12) ||
ciphertext || tag (16)``. Plaintexts are at most ``MAX_PLAINTEXT_BYTES`` of UTF-8, tokens at
most ``MAX_TOKEN_CHARS``; anything longer is refused before any decoding.

Sealing gives confidentiality, not authenticity: anyone holding the device's public key can
seal a value for it. Authenticity comes from the signed desired state that carries the token.
No error message ever contains a plaintext.

``redact`` masks what must not reach a log line or a report (URL passwords, sealed tokens);
``install_redaction`` puts it on every log handler of a process.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent.common.errors import BadDataError
from agent.protocol.topics import valid_device_id

SEALED_PREFIX = "sealed:v1:"
_SEALED_RE = re.compile(re.escape(SEALED_PREFIX) + r"[A-Za-z0-9_=-]+")
# scheme://user:password@host → the password part (RFC 3986 userinfo: the password runs up to
# the last '@' before the path; it may hold ':' and percent-escapes, never '/' or whitespace).
# The scheme is bounded: unbounded, every letter of a long word would start a scan to its end
# (quadratic: 70 s for 100 kB), and reports from devices pass through here
_URL_PASSWORD_RE = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.-]{0,31}://[^:/@\s]*:)[^/\s]*(?=@)")

POINT_BYTES = 65  # X9.62 uncompressed P-256 point: 0x04 || X || Y
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_PLAINTEXT_BYTES = 4096  # a URL with credentials, a token, a key: never a file
_MAX_RAW = POINT_BYTES + NONCE_BYTES + MAX_PLAINTEXT_BYTES + TAG_BYTES
MAX_TOKEN_CHARS = len(SEALED_PREFIX) + (_MAX_RAW * 4 + 2) // 3  # unpadded base64 length
_MIN_RAW = POINT_BYTES + NONCE_BYTES + TAG_BYTES
_B64_RE = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_HKDF_LABEL = b"edgefleet " + SEALED_PREFIX.encode() + b"\x00"
_MAX_DEPTH = 64  # unseal_tree: deeper than any configuration document


class SealedError(BadDataError):
    """A sealed value that cannot be made or opened (wrong device, tampered, malformed).

    Attributes:
        reason: ``"format"`` (not a token), ``"size"`` (too long), ``"auth"`` (does not open
            with this device id and key: another device's, another key's, or altered), or
            ``"key"`` (a key that is not P-256, a bad device id).
        path: where in a tree the value sits (``pipelines[0].source``); ``""`` for one value.
    """

    def __init__(self, message: str, *, reason: str = "format", path: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.path = path


def is_sealed(value: object) -> bool:
    """True for a string that is a sealed secret."""
    return isinstance(value, str) and value.startswith(SEALED_PREFIX)


def _check_device_id(device_id: str) -> bytes:
    # the id goes into the HKDF info and the AAD; the contract's own rule keeps it unambiguous
    if not isinstance(device_id, str) or not valid_device_id(device_id):
        raise SealedError(f"bad device id {device_id!r} for a sealed value", reason="key")
    return device_id.encode("ascii")


def _point(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _check_p256(key: object, kind: type, what: str) -> None:
    if not isinstance(key, kind) or not isinstance(getattr(key, "curve", None), ec.SECP256R1):
        raise SealedError(f"{what} must be a P-256 (secp256r1) EC key", reason="key")


def _aead_key(shared: bytes, device: bytes, eph_point: bytes, recipient_point: bytes) -> AESGCM:
    info = _HKDF_LABEL + device + b"\x00" + eph_point + recipient_point
    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)
    return AESGCM(key)


def _aad(device: bytes) -> bytes:
    return SEALED_PREFIX.encode() + device


def seal(plaintext: str, public_key: ec.EllipticCurvePublicKey, *, device_id: str) -> str:
    """Seal ``plaintext`` so that only the holder of the device's private key opens it.

    Raises:
        SealedError: a plaintext over ``MAX_PLAINTEXT_BYTES``, a key that is not P-256, or a
            bad device id.
    """
    device = _check_device_id(device_id)
    _check_p256(public_key, ec.EllipticCurvePublicKey, "the device's public key")
    if not isinstance(plaintext, str):
        raise SealedError("only text can be sealed", reason="format")
    data = plaintext.encode("utf-8")
    if len(data) > MAX_PLAINTEXT_BYTES:
        raise SealedError(
            f"a secret is at most {MAX_PLAINTEXT_BYTES} bytes of UTF-8, this one is {len(data)}",
            reason="size",
        )
    eph = ec.generate_private_key(ec.SECP256R1())
    eph_point = _point(eph.public_key())
    shared = eph.exchange(ec.ECDH(), public_key)
    nonce = os.urandom(NONCE_BYTES)
    aead = _aead_key(shared, device, eph_point, _point(public_key))
    raw = eph_point + nonce + aead.encrypt(nonce, data, _aad(device))
    return SEALED_PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _decode(token: str) -> bytes:
    """The raw bytes of a token (size and alphabet checked first)."""
    if not isinstance(token, str) or not token.startswith(SEALED_PREFIX):
        raise SealedError(f"not a sealed value (expected it to start with {SEALED_PREFIX!r})",
                          reason="format")  # fmt: skip
    if len(token) > MAX_TOKEN_CHARS:
        raise SealedError(
            f"sealed value is {len(token)} characters, at most {MAX_TOKEN_CHARS} are allowed",
            reason="size",
        )
    body = token[len(SEALED_PREFIX) :]
    if not _B64_RE.fullmatch(body):
        raise SealedError("sealed value is not base64url (A-Z a-z 0-9 - _)", reason="format")
    body = body.rstrip("=")
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError) as e:
        raise SealedError(f"sealed value is not valid base64url: {e}", reason="format") from e
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode() != body:  # non-canonical last char
        raise SealedError("sealed value is not canonical base64url", reason="format")
    if len(raw) < _MIN_RAW:
        raise SealedError(
            f"sealed value is truncated: {len(raw)} bytes, at least {_MIN_RAW} "
            "(point, nonce, tag) expected",
            reason="format",
        )
    return raw


def unseal(token: str, private_key: ec.EllipticCurvePrivateKey, *, device_id: str) -> str:
    """Open one sealed string.

    Raises:
        SealedError: not sealed for this device and key, tampered with, or malformed.
    """
    device = _check_device_id(device_id)
    _check_p256(private_key, ec.EllipticCurvePrivateKey, "the device's private key")
    raw = _decode(token)
    eph_point, nonce = raw[:POINT_BYTES], raw[POINT_BYTES : POINT_BYTES + NONCE_BYTES]
    sealed_data = raw[POINT_BYTES + NONCE_BYTES :]
    try:
        eph = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), eph_point)
        shared = private_key.exchange(ec.ECDH(), eph)
    except ValueError as e:
        raise SealedError("sealed value's ephemeral key is not a P-256 point: altered or "
                          "malformed", reason="format") from e  # fmt: skip
    aead = _aead_key(shared, device, eph_point, _point(private_key.public_key()))
    try:
        data = aead.decrypt(nonce, sealed_data, _aad(device))
    except InvalidTag as e:
        raise SealedError(
            f"sealed value does not open for device {device_id} with its key: it was sealed "
            "for another device or key, or altered; seal it again for this device "
            f"(`edgefleet secret seal --device {device_id}`)",
            reason="auth",
        ) from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:  # authentic, so sealed by a broken sealer: say so only
        raise SealedError("sealed value holds bytes that are not UTF-8 text",
                          reason="format") from e  # fmt: skip


def _child_path(path: str, key: object) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    k = str(key)
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", k):
        return f"{path}.{k}" if path else k
    return f"{path}[{k!r}]"


def unseal_tree(
    obj: Any,
    private_key: ec.EllipticCurvePrivateKey,
    *,
    device_id: str,
    opened: list[str] | None = None,
) -> Any:
    """A copy of a JSON-like tree (dicts, lists, scalars) with every sealed string opened.

    Keys are never opened (only values). The input is not modified. With ``opened``, each
    plaintext is also appended to it, in tree order (what callers must mask in messages).

    Raises:
        SealedError: as ``unseal``, naming the path of the value (e.g. ``pipelines[0].source``),
            or a tree nested deeper than 64 levels.
    """
    _check_device_id(device_id)
    _check_p256(private_key, ec.EllipticCurvePrivateKey, "the device's private key")

    def walk(node: Any, path: str, depth: int) -> Any:
        if depth > _MAX_DEPTH:
            raise SealedError(f"nested deeper than {_MAX_DEPTH} levels at {path or '(root)'}",
                              reason="format", path=path)  # fmt: skip
        if isinstance(node, dict):
            return {k: walk(v, _child_path(path, k), depth + 1) for k, v in node.items()}
        if isinstance(node, (list, tuple)):
            return [walk(v, _child_path(path, i), depth + 1) for i, v in enumerate(node)]
        if is_sealed(node):
            try:
                plain = unseal(node, private_key, device_id=device_id)
            except SealedError as e:
                where = path or "(root)"
                raise SealedError(f"{where}: {e}", reason=e.reason, path=path) from e
            if opened is not None:
                opened.append(plain)
            return plain
        return node

    return walk(obj, "", 0)


def redact(text: str) -> str:
    """``text`` with sealed tokens shortened and URL passwords (``user:pw@``) masked."""
    text = _SEALED_RE.sub(SEALED_PREFIX + "…", text)
    return _URL_PASSWORD_RE.sub(r"\g<head>***", text)


class RedactingFilter(logging.Filter):
    """Applies ``redact`` to a record's final message (``msg % args``), its exception text and
    its stack text, so a password never reaches the handler's output, whatever the format."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit the format: the handler would print
            # them raw in its error report, so show them here, redacted, instead
            message = f"{record.msg} [unformattable log arguments: {record.args!r}]"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_redaction(logger: logging.Logger | None = None) -> int:
    """Add a ``RedactingFilter`` to every handler of ``logger`` (default: the root logger)
    that has none yet; returns how many handlers now redact. Call it after the handlers exist
    (a handler added later needs another call). Filters sit on handlers, not on the logger,
    because a logger's own filters skip records that propagate from its children."""
    target = logger if logger is not None else logging.getLogger()
    count = 0
    for handler in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
        count += 1
    return count
