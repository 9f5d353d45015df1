"""Adapter: the fleet's certificate authority — device and service identities for mutual TLS.

``FleetCA`` keeps its files in one directory (private keys 0600):

- ``ca.key`` / ``ca.crt``: the fleet CA (ECDSA P-256; TLS stacks everywhere speak it);
- ``issued.json``: every certificate issued (identity, role, serial, expiry, revoked);
- ``crl.pem``: the revocation list Mosquitto loads (``crlfile``), rewritten on each revoke;
- ``server/``: the broker's certificate; ``identities/NAME/``: service and operator identities;
- ``devices/ID.crt``: a copy of each device's newest certificate (public), whose key the cloud
  seals secrets to (``cloud_sync.sealing``);
- ``share-groups.json`` (0600): the deployment's secret shared-subscription group per service
  role. Mosquitto 2.0 lets any client join any shared subscription (its ACL file does not check
  SUBSCRIBE), and a device in a service's group makes the broker drop that share of every
  device's messages; a group name nobody can guess keeps devices out. ``issue`` writes it
  next to an ingest or registry identity's certificate (``share-group``), where the service
  finds it (``service_share_group``).

An identity's certificate carries its name as the subject CN, which the broker takes as the
MQTT username (``use_identity_as_username true``) for its ACL, and as its client id
(``use_username_as_clientid true``): one connection per identity, so every ingest worker and
registry replica gets its own (``svc:ingest-1``, ``svc:ingest-2``). Device ids cannot contain
``:``, so service identities (``svc:ingest``, ``op:alice``) never collide with a device.
All cryptography is the ``cryptography`` package's; this module only picks the parameters.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.common.errors import BadDataError
from agent.common.fsutil import atomic_write_bytes
from agent.protocol.topics import valid_device_id

Role = Literal["device", "ingest", "registry", "operator"]
ROLE_PREFIX: dict[str, str] = {
    "device": "", "ingest": "svc:", "registry": "svc:", "operator": "op:",
}  # fmt: skip
SHARED_ROLES = ("ingest", "registry")  # roles that take their volume through $share groups
SHARE_GROUP_FILE = "share-group"  # next to a service's certificate: its group name

log = logging.getLogger(__name__)


class PkiError(BadDataError):
    """A CA operation refused: missing CA, unknown or duplicate identity, bad name."""


@dataclass(frozen=True)
class Issued:
    """One certificate the CA issued."""

    name: str
    role: str
    serial: int
    not_after: str
    revoked_at: str | None = None


@dataclass(frozen=True)
class Credentials:
    """Where an identity's files are (``share_group``: ingest and registry identities)."""

    cert: Path
    key: Path
    ca: Path
    share_group: Path | None = None


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_secret(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, mode=0o600)


def identity_name(role: Role, name: str) -> str:
    """The certificate CN / MQTT username of an identity: ``dev-01``, ``svc:ingest``, ``op:alice``.

    Raises:
        PkiError: a name that is not a valid device id (letters, digits, ``_.-``).
    """
    bare = name.split(":", 1)[1] if ":" in name and name.split(":", 1)[0] in ("svc", "op") else name
    if not valid_device_id(bare):
        raise PkiError(f"bad identity name {name!r}: letters, digits, '_', '.', '-' (max 64)")
    return ROLE_PREFIX[role] + bare


class FleetCA:
    """The CA in ``directory`` (``init`` creates it)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        if not (self.dir / "ca.crt").is_file() or not (self.dir / "ca.key").is_file():
            raise PkiError(f"no fleet CA in {self.dir}; create one with `edgefleet ca init`")
        self.cert = x509.load_pem_x509_certificate((self.dir / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((self.dir / "ca.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.dir / 'ca.key'} is not an EC key")
        self.key = key

    @property
    def ca_file(self) -> Path:
        return self.dir / "ca.crt"

    @property
    def crl_file(self) -> Path:
        return self.dir / "crl.pem"

    def device_cert_file(self, device_id: str) -> Path:
        """Where the CA keeps its copy of a device's newest certificate."""
        return self.dir / "devices" / f"{device_id}.crt"

    @classmethod
    def init(cls, directory: Path, *, name: str = "edgefleet fleet CA", days: int = 3650,
             now: datetime | None = None) -> FleetCA:  # fmt: skip
        """Create a new CA (refuses to overwrite one).

        Raises:
            PkiError: a CA already exists there.
        """
        d = Path(directory)
        if (d / "ca.key").exists():
            raise PkiError(f"{d} already holds a fleet CA; not overwriting it")
        d.mkdir(parents=True, exist_ok=True)
        now = now or datetime.now(timezone.utc)
        key = _new_key()
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )  # fmt: skip
        _write_secret(d / "ca.key", _key_pem(key))
        atomic_write_bytes(d / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
        atomic_write_bytes(d / "issued.json", b"[]\n")
        ca = cls(d)
        ca.write_crl(now=now)
        return ca

    # --- records ---------------------------------------------------------------------------

    def issued(self) -> list[Issued]:
        """Every certificate issued, oldest first."""
        return [Issued(**r) for r in json.loads((self.dir / "issued.json").read_text())]

    def _save(self, records: list[Issued]) -> None:
        data = json.dumps([asdict(r) for r in records], indent=1).encode() + b"\n"
        atomic_write_bytes(self.dir / "issued.json", data)

    def active(self, name: str) -> Issued | None:
        """The newest unrevoked certificate of ``name``."""
        live = [r for r in self.issued() if r.name == name and r.revoked_at is None]
        return live[-1] if live else None

    # --- issuing ---------------------------------------------------------------------------

    def _sign(self, cn: str, key: ec.EllipticCurvePrivateKey, *, server: bool, days: int,
              now: datetime, hosts: tuple[str, ...] = ()) -> x509.Certificate:  # fmt: skip
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(min(now + timedelta(days=days), self.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )  # fmt: skip
        if hosts:
            names: list[x509.GeneralName] = []
            for h in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    names.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return b.sign(self.key, hashes.SHA256())

    def _write_pair(self, out: Path, stem: str, cert: x509.Certificate,
                    key: ec.EllipticCurvePrivateKey) -> Credentials:  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        _write_secret(out / f"{stem}.key", _key_pem(key))
        atomic_write_bytes(out / f"{stem}.crt", cert.public_bytes(serialization.Encoding.PEM))
        atomic_write_bytes(out / "ca.crt", self.ca_file.read_bytes())
        return Credentials(out / f"{stem}.crt", out / f"{stem}.key", out / "ca.crt")

    def issue(self, role: Role, name: str, out: Path, *, days: int = 825,
              now: datetime | None = None) -> Credentials:  # fmt: skip
        """A client certificate for a device or a service; files go to ``out``.

        Raises:
            PkiError: a bad name, or the identity already has a live certificate (revoke first).
        """
        cn = identity_name(role, name)
        if self.active(cn) is not None:
            raise PkiError(f"{cn} already has a certificate; `edgefleet ca revoke {cn}` first")
        now = now or datetime.now(timezone.utc)
        key = _new_key()
        cert = self._sign(cn, key, server=False, days=days, now=now)
        creds = self._write_pair(out, "device" if role == "device" else "client", cert, key)
        if role == "device":  # the cloud seals a device's secrets to this certificate's key
            pem = cert.public_bytes(serialization.Encoding.PEM)
            atomic_write_bytes(self.device_cert_file(cn), pem)
        if role in SHARED_ROLES:
            group = out / SHARE_GROUP_FILE
            _write_secret(group, f"{self.share_group(role)}\n".encode())
            creds = replace(creds, share_group=group)
        rec = Issued(cn, role, cert.serial_number, cert.not_valid_after_utc.isoformat())
        self._save([*self.issued(), rec])
        return creds

    def share_group(self, role: str) -> str:
        """The deployment's shared-subscription group for a service role, made on first use:
        ``ROLE-`` and 128 random bits, so no device can guess it and join.

        Raises:
            PkiError: a role without shared subscriptions.
        """
        if role not in SHARED_ROLES:
            raise PkiError(f"role {role!r} has no shared-subscription group; {SHARED_ROLES} do")
        path = self.dir / "share-groups.json"
        groups: dict[str, str] = json.loads(path.read_text()) if path.is_file() else {}
        if role not in groups:
            groups[role] = f"{role}-{secrets.token_hex(16)}"
            _write_secret(path, json.dumps(groups, indent=1).encode() + b"\n")
        return groups[role]

    def issue_server(self, hosts: tuple[str, ...], *, days: int = 825,
                     now: datetime | None = None) -> Credentials:  # fmt: skip
        """The broker's server certificate for ``hosts`` (DNS names or IPs) in ``server/``."""
        if not hosts:
            raise PkiError("the broker certificate needs at least one host name or IP")
        now = now or datetime.now(timezone.utc)
        key = _new_key()
        cert = self._sign(hosts[0], key, server=True, days=days, now=now, hosts=hosts)
        return self._write_pair(self.dir / "server", "server", cert, key)

    # --- revocation ------------------------------------------------------------------------

    def revoke(self, name: str, *, now: datetime | None = None) -> Issued:
        """Revoke the live certificate of ``name`` and rewrite ``crl.pem``.

        Raises:
            PkiError: ``name`` has no live certificate.
        """
        now = now or datetime.now(timezone.utc)
        records = self.issued()
        live = self.active(name)
        if live is None:
            raise PkiError(f"{name} has no live certificate to revoke")
        revoked = Issued(live.name, live.role, live.serial, live.not_after, now.isoformat())
        self._save([revoked if r == live else r for r in records])
        self.write_crl(now=now)
        return revoked

    def _crl(self) -> x509.CertificateRevocationList | None:
        try:
            return x509.load_pem_x509_crl(self.crl_file.read_bytes())
        except (OSError, ValueError):
            return None

    def crl_next_update(self) -> datetime | None:
        """When ``crl.pem`` stops being valid (Mosquitto then refuses every handshake)."""
        crl = self._crl()
        return crl.next_update_utc if crl is not None else None

    def crl_last_update(self) -> datetime | None:
        """When ``crl.pem`` was signed (its ``lastUpdate``)."""
        crl = self._crl()
        return crl.last_update_utc if crl is not None else None

    def refresh_crl(
        self, *, now: datetime | None = None, days: int = 30, within: timedelta | None = None
    ) -> bool:
        """Re-sign ``crl.pem`` when it expires within ``within`` (default: half of ``days``),
        or is missing or unreadable. Returns True when it was rewritten."""
        now = now or datetime.now(timezone.utc)
        within = within if within is not None else timedelta(days=days) / 2
        nxt = self.crl_next_update()
        if nxt is not None and nxt - now > within:
            return False
        self.write_crl(now=now, days=days)
        return True

    def renew(self, name: str, out: Path, *, days: int = 825,
              now: datetime | None = None) -> Credentials:  # fmt: skip
        """A new certificate and key for an identity whose certificate nears expiry; the old
        one is revoked (CRL rewritten), so only the new one connects from then on.

        Raises:
            PkiError: ``name`` has no live certificate (enroll it instead).
        """
        live = self.active(name)
        if live is None:
            raise PkiError(f"{name} has no live certificate to renew; enroll it instead")
        role = live.role
        bare = name.split(":", 1)[1] if ":" in name else name
        self.revoke(name, now=now)
        return self.issue(role, bare, out, days=days, now=now)  # type: ignore[arg-type]

    def expiries(self) -> dict[str, datetime]:
        """``{what: expires}``: the CA, the broker certificate, the CRL and every live
        identity (``device:NAME``, ``svc:NAME``, ``op:NAME``)."""
        out = {"ca": self.cert.not_valid_after_utc}
        server = self.dir / "server" / "server.crt"
        if server.is_file():
            cert = x509.load_pem_x509_certificate(server.read_bytes())
            out["broker certificate"] = cert.not_valid_after_utc
        nxt = self.crl_next_update()
        if nxt is not None:
            out["crl"] = nxt
        for r in self.issued():
            if r.revoked_at is None:
                out[r.name if ":" in r.name else f"device:{r.name}"] = datetime.fromisoformat(
                    r.not_after
                )
        return out

    def write_crl(self, *, now: datetime | None = None, days: int = 30) -> Path:
        """(Re)write ``crl.pem`` with every revoked serial; valid ``days`` (re-run before)."""
        now = now or datetime.now(timezone.utc)
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - timedelta(minutes=5))
            .next_update(now + timedelta(days=days))
        )
        for r in self.issued():
            if r.revoked_at is not None:
                b = b.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(r.serial)
                    .revocation_date(datetime.fromisoformat(r.revoked_at))
                    .build()
                )
        crl = b.sign(self.key, hashes.SHA256())
        atomic_write_bytes(self.crl_file, crl.public_bytes(serialization.Encoding.PEM))
        return self.crl_file


def service_share_group(default: str, env: Mapping[str, str] | None = None) -> str:
    """The shared-subscription group a cloud service joins: the name in ``share-group`` next to
    its certificate (``EDGEFLEET_TLS_CERT``, an identity from ``edgefleet ca identity``), else
    ``default`` (plain brokers, tests, the demo). Read once, at start-up.

    With a certificate but no ``share-group`` beside it (an identity issued before group names
    were secret), logs a warning: any device can join the public ``default`` group, and the
    broker then drops that device's share of every device's messages.

    Raises:
        PkiError: the file holds something that is not a topic-safe group name.
    """
    env = os.environ if env is None else env
    cert = env.get("EDGEFLEET_TLS_CERT")
    if not cert:
        return default
    path = Path(cert).parent / SHARE_GROUP_FILE
    try:
        name = path.read_text().strip()
    except FileNotFoundError:
        log.warning(
            "no %s next to %s: joining the public shared-subscription group %r, which any "
            "device can join (the broker then drops its share of every device's messages); "
            "re-issue the identity (`edgefleet ca revoke`, `edgefleet ca identity`), which "
            "writes %s",
            SHARE_GROUP_FILE, cert, default, SHARE_GROUP_FILE,
        )  # fmt: skip
        return default
    if not valid_device_id(name):
        raise PkiError(f"{path} holds {name[:80]!r}, not a group name (letters, digits, _.-)")
    return name
