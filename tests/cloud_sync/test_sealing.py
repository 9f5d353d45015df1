"""Sealing for an enrolled device: a real fleet CA and bundles made by ``edgefleet ca init`` and
``edgefleet device enroll``, opened with the bundle's key; revoked, unknown and forged refused;
``edgefleet secret seal`` reading stdin; the CLI's logging masks passwords."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.protocol.sealed import SealedError, is_sealed, unseal
from cloud_sync.enroll import enroll_device
from cloud_sync.pki import FleetCA, PkiError
from cloud_sync.registry.repo import Repository
from cloud_sync.sealing import device_public_key, read_secret, seal_for_device

BIN = Path(sys.executable).parent
SECRET = "rtsp://admin:s3cr3t-Pa55word@10.0.0.7:554/stream1"
PASSWORD = "s3cr3t-Pa55word"
BROKER = "mqtts://127.0.0.1:8883"


def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "edgefleet"), *args], input=stdin, capture_output=True, text=True,
        timeout=60, env=os.environ.copy(),
    )  # fmt: skip


def device_key(bundles: Path, device_id: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(
        (bundles / device_id / "device.key").read_bytes(), None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


@pytest.fixture(scope="module")
def fleet_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A CA and two enrolled devices, made by the operator CLI."""
    tmp = tmp_path_factory.mktemp("fleet")
    ca, bundles = tmp / "ca", tmp / "bundles"
    Repository.init(tmp / "registry")
    assert run("ca", "init", "--dir", str(ca)).returncode == 0
    r = run("device", "enroll", "cam-1", "--ca", str(ca), "--broker", BROKER,
            "--root", str(tmp / "registry" / "root.json"), "--out", str(bundles))  # fmt: skip
    assert r.returncode == 0, r.stderr
    _enroll(ca, bundles, "cam-2")
    return ca, bundles


def _enroll(ca_dir: Path, bundles: Path, device_id: str) -> None:
    root = bundles.parent / "registry" / "root.json"
    enroll_device(FleetCA(ca_dir), device_id, bundles, broker_url=BROKER, root_json=root)


def test_enrollment_keeps_the_device_certificate(fleet_dirs: tuple[Path, Path]) -> None:
    ca, bundles = fleet_dirs
    copy = ca / "devices" / "cam-1.crt"
    assert copy.read_bytes() == (bundles / "cam-1" / "device.crt").read_bytes()


def test_cli_seal_from_stdin_opens_with_the_bundle_key(fleet_dirs: tuple[Path, Path]) -> None:
    ca, bundles = fleet_dirs
    r = run("secret", "seal", "--ca", str(ca), "--device", "cam-1", stdin=SECRET + "\n")
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert is_sealed(token) and PASSWORD not in r.stdout + r.stderr
    assert unseal(token, device_key(bundles, "cam-1"), device_id="cam-1") == SECRET
    with pytest.raises(SealedError):  # cam-2's key and id do not open cam-1's value
        unseal(token, device_key(bundles, "cam-2"), device_id="cam-2")


def test_cli_refuses_an_unknown_device(fleet_dirs: tuple[Path, Path]) -> None:
    ca, _ = fleet_dirs
    r = run("secret", "seal", "--ca", str(ca), "--device", "nobody", stdin=SECRET)
    assert r.returncode == 2 and r.stdout == ""
    assert "not enrolled" in r.stderr and "edgefleet device enroll nobody" in r.stderr
    assert PASSWORD not in r.stderr


def test_seal_for_device_and_read_secret(fleet_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    ca, bundles = fleet_dirs
    f = tmp_path / "secret.txt"
    f.write_text(SECRET + "\r\n")
    text = read_secret(f, "cam-2")
    assert text == SECRET
    token = seal_for_device(ca, "cam-2", text)
    assert unseal(token, device_key(bundles, "cam-2"), device_id="cam-2") == SECRET
    f.write_text("\n")
    with pytest.raises(PkiError, match="empty"):
        read_secret(f, "cam-2")


def test_revoked_device_is_refused_until_re_enrolled(fleet_dirs: tuple[Path, Path]) -> None:
    ca_dir, bundles = fleet_dirs
    _enroll(ca_dir, bundles, "cam-3")
    old_key = device_key(bundles, "cam-3")
    FleetCA(ca_dir).revoke("cam-3")
    with pytest.raises(PkiError) as e:
        seal_for_device(ca_dir, "cam-3", SECRET)
    assert "revoked" in str(e.value) and "re-enroll" in str(e.value)
    assert PASSWORD not in str(e.value)
    # re-enrolled: sealing works again, for the new key only
    (bundles / "cam-3").rename(bundles / "cam-3.old")
    _enroll(ca_dir, bundles, "cam-3")
    token = seal_for_device(ca_dir, "cam-3", SECRET)
    assert unseal(token, device_key(bundles, "cam-3"), device_id="cam-3") == SECRET
    with pytest.raises(SealedError):
        unseal(token, old_key, device_id="cam-3")


def test_missing_copy_names_what_to_do(fleet_dirs: tuple[Path, Path]) -> None:
    ca_dir, bundles = fleet_dirs
    _enroll(ca_dir, bundles, "cam-4")
    copy = ca_dir / "devices" / "cam-4.crt"
    copy.unlink()
    with pytest.raises(PkiError, match="no copy of device cam-4's certificate") as e:
        device_public_key(ca_dir, "cam-4")
    assert "device renew cam-4" in str(e.value)
    copy.write_bytes((bundles / "cam-4" / "device.crt").read_bytes())  # the documented fix
    assert device_public_key(ca_dir, "cam-4").public_numbers() == (
        device_key(bundles, "cam-4").public_key().public_numbers()
    )


def test_a_copy_not_issued_by_the_ca_is_refused(fleet_dirs: tuple[Path, Path]) -> None:
    ca_dir, bundles = fleet_dirs
    _enroll(ca_dir, bundles, "cam-5")
    ca = FleetCA(ca_dir)
    live = ca.active("cam-5")
    assert live is not None
    # an attacker's certificate for cam-5 with the live serial, signed by another key
    rogue, attacker = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    now = datetime.now(timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cam-5")]))
        .issuer_name(ca.cert.subject)
        .public_key(attacker.public_key())
        .serial_number(live.serial)
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(rogue, hashes.SHA256())
    )
    ca.device_cert_file("cam-5").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(PkiError, match="not issued by the fleet CA"):
        seal_for_device(ca_dir, "cam-5", SECRET)
    # another device's genuine certificate under cam-5's name: wrong serial
    ca.device_cert_file("cam-5").write_bytes((bundles / "cam-1" / "device.crt").read_bytes())
    with pytest.raises(PkiError, match="not device cam-5's live certificate"):
        seal_for_device(ca_dir, "cam-5", SECRET)


def test_no_ca_and_bad_ids(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="no fleet CA"):
        device_public_key(tmp_path, "cam-1")
    with pytest.raises(PkiError, match="bad device id"):
        device_public_key(tmp_path, "../etc/passwd")


@pytest.mark.parametrize(
    "setup",
    ["from cloud_sync.cli import _setup_logging", "from agent.cli import _setup_logging"],
)
def test_cli_logging_masks_passwords(setup: str) -> None:
    """The operator CLI's and the agent's real logging set-up, writing to a real stderr."""
    code = (
        f"import logging\n{setup}\n_setup_logging(False)\n"
        f"logging.getLogger('edgefleet.test').warning('camera %s failed', {SECRET!r})\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "camera rtsp://admin:***@10.0.0.7:554/stream1 failed" in r.stderr
    assert PASSWORD not in r.stderr
