"""Database URLs: found without the command line, never printed with their password."""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud_sync.secrets import redact_url, resolve_db_url

DEFAULT = "sqlite:///fleet.db"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql+psycopg://fleet:s3cr%40t@db.example:5432/fleet",
         "postgresql+psycopg://fleet:***@db.example:5432/fleet"),
        ("postgresql://u:p@[::1]/x?sslmode=require", "postgresql://u:***@[::1]/x?sslmode=require"),
        ("postgresql://u@db/x", "postgresql://u@db/x"),
        ("sqlite:////var/lib/edgefleet-ingest/fleet.db", "sqlite:////var/lib/edgefleet-ingest/fleet.db"),
        ("not a url", "not a url"),
    ],
)  # fmt: skip
def test_redact(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "s3cr" not in redact_url(url)


def test_resolution_order(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db-url").write_text("postgresql://u:cred@db/x\n")
    env = {"CREDENTIALS_DIRECTORY": str(creds), "EDGEFLEET_DB": "postgresql://u:env@db/x"}
    assert resolve_db_url("sqlite:///arg.db", DEFAULT, env) == "sqlite:///arg.db"
    assert resolve_db_url(None, DEFAULT, env) == "postgresql://u:cred@db/x"
    (creds / "db-url").unlink()
    assert resolve_db_url(None, DEFAULT, env) == "postgresql://u:env@db/x"
    assert resolve_db_url(None, DEFAULT, {}) == DEFAULT


def test_ingest_unit_keeps_secrets_off_the_command_line() -> None:
    from tests.harness.util import ROOT

    text = (ROOT / "systemd" / "edgefleet-ingest.service").read_text()
    exec_start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert "--db" not in exec_start and "EDGEFLEET_DB" not in exec_start
    assert "LoadCredential=db-url:" in text
    assert "LoadCredential=tls-key:" in text and "EDGEFLEET_TLS_KEY=%d/tls-key" in text


def test_fleet_status_reads_the_credential_and_never_prints_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cloud_sync.cli import main

    creds = tmp_path / "creds"
    creds.mkdir()
    db = tmp_path / "fleet.db"
    (creds / "db-url").write_text(f"sqlite:///{db}\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.delenv("EDGEFLEET_DB", raising=False)
    assert main(["fleet", "status"]) == 0
    assert db.exists()  # the credential's database, not the default in the working dir
    assert "no devices yet" in capsys.readouterr().out


def test_fleet_status_warns_about_what_expires(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    from datetime import datetime, timedelta, timezone

    from cloud_sync.cli import main
    from cloud_sync.pki import FleetCA
    from cloud_sync.registry.repo import Repository

    now = datetime.now(timezone.utc)
    Repository.init(tmp_path / "repo", now=now - timedelta(days=340))  # root: 25 days left
    ca = FleetCA.init(tmp_path / "ca", now=now)
    ca.issue("device", "cam-1", tmp_path / "id", days=10, now=now)
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    argv = ["fleet", "status", "--db", db, "--repo", str(tmp_path / "repo"), "--ca", str(ca.dir)]
    assert main([*argv, "--json"]) == 0
    warnings = json.loads(capsys.readouterr().out)["warnings"]
    levels = {(w["component"], w["what"]): w["level"] for w in warnings}
    assert levels[("registry", "root")] == "warn"
    assert levels[("ca", "device:cam-1")] == "warn"
    assert ("ca", "crl") not in levels  # fresh: no warning
    # snapshot/timestamp signed 340 days ago and never re-signed: expired, listed first
    assert warnings[0]["level"] == "expired"
    main(argv)
    out = capsys.readouterr().out
    assert "WARN: registry root" in out and "renew-root" in out


def test_registry_unit_loads_only_online_keys_as_credentials() -> None:
    from tests.harness.util import ROOT

    text = (ROOT / "systemd" / "edgefleet-registry.service").read_text()
    creds = [ln.split("=", 1)[1].split(":", 1)[0] for ln in text.splitlines()
             if ln.startswith("LoadCredential=")]  # fmt: skip
    assert sorted(creds) == ["snapshot.pem", "targets.pem", "timestamp.pem", "tls-key"]
    exec_start = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    assert "--keys-dir %d" in exec_start
