"""What expires when, as Prometheus metrics (node_exporter textfile): parsed back, levels and
dates match what `ca status` says."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cloud_sync.cli import main
from cloud_sync.expiry import expiry_registry, write_textfile
from cloud_sync.pki import FleetCA


def _samples(path: Path) -> dict[tuple[str, str, str], float]:
    out = {}
    for fam in text_string_to_metric_families(path.read_text()):
        for s in fam.samples:
            out[(s.name, s.labels["component"], s.labels["what"])] = s.value
    return out


def test_ca_status_writes_levels_and_dates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(timezone.utc)
    ca = FleetCA.init(tmp_path / "ca", now=now - timedelta(days=40))  # CRL (30 d) lapsed
    ca.issue("device", "cam-1", tmp_path / "id", days=50, now=now - timedelta(days=40))
    prom = tmp_path / "textfile" / "edgefleet-ca.prom"
    rc = main(["ca", "status", "--dir", str(ca.dir), "--textfile", str(prom)])
    assert rc == 2  # something expired: the CRL
    got = _samples(prom)
    assert got[("edgefleet_expiry_level", "ca", "crl")] == 2
    assert got[("edgefleet_expiry_level", "ca", "device:cam-1")] == 1  # 10 days left
    assert got[("edgefleet_expiry_level", "ca", "ca")] == 0
    cert_expiry = ca.expiries()["device:cam-1"].timestamp()
    assert got[("edgefleet_expiry_timestamp_seconds", "ca", "device:cam-1")] == pytest.approx(
        cert_expiry
    )
    assert "EXPIRED  crl" in capsys.readouterr().out
    ca.refresh_crl(now=now)
    main(["ca", "status", "--dir", str(ca.dir), "--textfile", str(prom)])
    assert _samples(prom)[("edgefleet_expiry_level", "ca", "crl")] == 0


def test_unknown_level_is_refused_and_the_file_is_readable(tmp_path: Path) -> None:
    t = datetime(2027, 1, 1, tzinfo=timezone.utc)
    with pytest.raises(ValueError, match="unknown level"):
        expiry_registry([("ca", "crl", t, "fine")])
    old = os.umask(0o077)  # the CRL unit's umask
    try:
        path = write_textfile(tmp_path / "x.prom", [("registry", "root", t, "warn")])
    finally:
        os.umask(old)
    assert _samples(path)[("edgefleet_expiry_level", "registry", "root")] == 1
    assert not list(tmp_path.glob("*.tmp*"))  # written via a temp file and renamed
    assert path.stat().st_mode & 0o777 == 0o644  # node_exporter reads it, whatever the umask


def test_registry_status_and_the_serve_keeper_write_role_expiries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud_sync.cli import metadata_keeper
    from cloud_sync.registry.repo import Repository

    now = datetime.now(timezone.utc)
    repo = Repository.init(tmp_path / "repo", now=now - timedelta(days=340))  # root: 25 d left
    prom = tmp_path / "registry.prom"
    assert main(["registry", "status", "--repo", str(repo.path), "--textfile", str(prom)]) == 2
    got = _samples(prom)
    assert got[("edgefleet_expiry_level", "registry", "root")] == 1
    assert got[("edgefleet_expiry_level", "registry", "timestamp")] == 2  # never re-signed
    # the keeper re-signs what it can and refreshes the file: only root still warns
    keeper_file = tmp_path / "keeper.prom"
    tick = metadata_keeper(repo, textfile=keeper_file)
    assert "timestamp" in tick(now)
    got = _samples(keeper_file)
    assert got[("edgefleet_expiry_level", "registry", "timestamp")] == 0
    assert got[("edgefleet_expiry_level", "registry", "root")] == 1
    assert got[("edgefleet_expiry_timestamp_seconds", "registry", "timestamp")] > now.timestamp()
    capsys.readouterr()
