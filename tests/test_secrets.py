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
