"""Adapter: seal a secret for one enrolled device (``edgefleet secret seal``, rollouts).

The device's public key is the one in the certificate the fleet CA issued it: the CA keeps a
copy of each device's newest certificate in ``CA_DIR/devices/ID.crt`` (``FleetCA.issue``).
Before sealing, that copy must be the device's live certificate by the CA's own records
(``issued.json`` and ``crl.pem``: not revoked, not superseded, not expired) and signed by the
CA, so a secret is never sealed to a key an attacker slipped into the directory or to a
device that was taken out of the fleet. The construction is ``agent.protocol.sealed``'s.

The value to seal is read from stdin or a file, never from the command line: argv is readable
by every local user (``/proc/PID/cmdline``) and lands in shell history (see
``cloud_sync.secrets``).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import datetime, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.protocol.sealed import MAX_PLAINTEXT_BYTES, seal
from agent.protocol.topics import valid_device_id
from cloud_sync.pki import FleetCA, PkiError


def _enroll_hint(ca_dir: Path, device_id: str) -> str:
    return f"`edgefleet device enroll {device_id} --ca {ca_dir} …`"


def device_public_key(
    ca_dir: Path, device_id: str, *, now: datetime | None = None
) -> ec.EllipticCurvePublicKey:
    """The P-256 public key of ``device_id``'s live certificate from the fleet CA in ``ca_dir``.

    Raises:
        PkiError: no CA there, a bad id, a device the CA never enrolled or has revoked, no
            copy of its certificate, or a copy that is not the live one the CA issued.
    """
    ca_dir = Path(ca_dir)
    if not valid_device_id(device_id):
        raise PkiError(f"bad device id {device_id!r}: letters, digits, '_', '.', '-' (max 64)")
    ca = FleetCA(ca_dir)
    records = [r for r in ca.issued() if r.name == device_id and r.role == "device"]
    live = ca.active(device_id)
    if live is None or live.role != "device":
        if records:
            raise PkiError(
                f"device {device_id}'s certificate was revoked ({records[-1].revoked_at}); "
                "nothing is sealed for a device taken out of the fleet: re-enroll it with "
                f"{_enroll_hint(ca_dir, device_id)} and seal again for its new key"
            )
        raise PkiError(
            f"device {device_id} is not enrolled in the fleet CA {ca_dir}; enroll it first "
            f"with {_enroll_hint(ca_dir, device_id)}"
        )
    path = ca.device_cert_file(device_id)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(
            f"the CA has no copy of device {device_id}'s certificate ({path}; devices enrolled "
            "before copies were kept have none): copy device.crt from its enrollment bundle "
            f"there, or renew it (`edgefleet device renew {device_id} --ca {ca_dir} …`)"
        ) from None
    except ValueError as e:
        raise PkiError(f"{path} is not a PEM certificate: {e}") from e
    _check_issued(ca, cert, live.serial, device_id, path, now or datetime.now(timezone.utc))
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise PkiError(f"{path}: device {device_id}'s key is not P-256; re-enroll it")
    return key


def _check_issued(
    ca: FleetCA, cert: x509.Certificate, serial: int, device_id: str, path: Path, now: datetime
) -> None:
    """Raises PkiError unless ``cert`` is the live certificate the CA issued ``device_id``."""
    if cert.serial_number != serial:
        raise PkiError(
            f"{path} is not device {device_id}'s live certificate (serial "
            f"{cert.serial_number:x}, the CA's records say {serial:x}); copy device.crt from "
            "its newest bundle there"
        )
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if [a.value for a in cns] != [device_id]:
        raise PkiError(f"{path} names {[a.value for a in cns]}, not device {device_id}")
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature) as e:
        raise PkiError(f"{path} was not issued by the fleet CA in {ca.dir}: not sealing") from e
    try:  # issued.json is the record; crl.pem is what the broker enforces: both must agree
        crl = x509.load_pem_x509_crl(ca.crl_file.read_bytes())
    except (OSError, ValueError):
        crl = None
    if crl is not None and crl.get_revoked_certificate_by_serial_number(serial) is not None:
        raise PkiError(f"device {device_id}'s certificate is on {ca.crl_file}; re-enroll it")
    if cert.not_valid_after_utc <= now:
        raise PkiError(
            f"device {device_id}'s certificate expired {cert.not_valid_after_utc:%Y-%m-%d}; "
            f"renew it (`edgefleet device renew {device_id} --ca {ca.dir} …`)"
        )


def seal_for_device(ca_dir: Path, device_id: str, plaintext: str) -> str:
    """``plaintext`` sealed to ``device_id``'s enrolled key: a ``sealed:v1:…`` string.

    Raises:
        PkiError: as ``device_public_key``.
        SealedError: a plaintext over the size limit.
    """
    return seal(plaintext, device_public_key(ca_dir, device_id), device_id=device_id)


# --- command line ----------------------------------------------------------------------------


def add_secret_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sec = sub.add_parser("secret", help="secrets in configuration (camera passwords)")
    ssub = sec.add_subparsers(dest="secret_cmd", required=True)
    s = ssub.add_parser(
        "seal",
        help="seal a value (read from stdin) for one device; prints sealed:v1:…",
        description="Reads the value from stdin (a prompt without echo on a terminal) or "
        "--from-file, never from the command line; one trailing newline is dropped.",
    )
    s.add_argument("--ca", required=True, type=Path, help="the fleet CA directory")
    s.add_argument("--device", required=True, help="the device id the value is for")
    s.add_argument("--from-file", type=Path, default=None, metavar="F",
                   help="read the value from F instead of stdin")  # fmt: skip
    s.set_defaults(fn=_seal)


def read_secret(from_file: Path | None, device_id: str) -> str:
    """The value to seal: from ``from_file``, a no-echo prompt on a terminal, else all of
    stdin; one trailing newline dropped.

    Raises:
        PkiError: an empty value, unreadable file, or more than the size limit.
    """
    if from_file is not None:
        try:
            text = from_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise PkiError(f"cannot read the value to seal from {from_file}: {e}") from e
    elif sys.stdin.isatty():
        text = getpass.getpass(f"value to seal for {device_id} (not echoed): ")
    else:
        text = sys.stdin.read(MAX_PLAINTEXT_BYTES * 4 + 2)
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise PkiError("nothing to seal: the value is empty")
    return text


def _seal(args: argparse.Namespace) -> int:
    key = device_public_key(args.ca, args.device)  # refuse an unknown device before reading
    text = read_secret(args.from_file, args.device)
    print(seal(text, key, device_id=args.device))
    return 0
