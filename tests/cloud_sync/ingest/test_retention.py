"""Retention as an operator runs it: once (`fleet retention`), scheduled (`ingest --keep`)."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloud_sync.ingest.store import open_store
from cloud_sync.units import format_duration, parse_duration
from tests.harness.broker import Mosquitto
from tests.harness.ingest_messages import event, telemetry
from tests.harness.util import terminate, wait_for

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


@pytest.mark.parametrize(
    "text,seconds",
    [("90", 90.0), ("90s", 90.0), ("10m", 600.0), ("1.5h", 5400.0), ("30d", 2_592_000.0),
     ("2w", 1_209_600.0), (" 12h ", 43_200.0)],
)  # fmt: skip
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "10x", "-5m", "0s", "1e3", "10 minutes", "5m3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    "seconds,text", [(5400, "90m"), (86400, "1d"), (604800, "1w"), (45, "45s"), (0.5, "0.5s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def _fill(db: str) -> datetime:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    old = now - timedelta(days=40)
    store = open_store(db)
    try:
        store.add_telemetry(telemetry(at=old), now=old)
        store.add_telemetry(telemetry(at=now), now=now)
        store.add_events([event(1, old), event(2, now)])
        store.dead_letter("edgefleet/v1/devices/x/telemetry", b"x", "not JSON", now=old)
    finally:
        store.close()
    return now


def _counts(db: str) -> dict[str, int]:
    store = open_store(db)
    try:
        return store.counts()
    finally:
        store.close()


def test_fleet_retention_deletes_history_older_than_keep(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    _fill(db)
    before = _counts(db)
    r = subprocess.run([EDGEFLEET, "fleet", "retention", "--db", db, "--keep", "30d"],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "retention: deleted rows older than" in r.stdout
    after = _counts(db)
    # one old and one new telemetry message, each a pipeline row and a device row
    assert before["telemetry"] == 4 and after["telemetry"] == 2
    assert (after["events"], after["dead_letters"], after["devices"]) == (1, 0, 1)


def test_fleet_retention_bad_duration_is_a_usage_error(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    r = subprocess.run([EDGEFLEET, "fleet", "retention", "--db", db, "--keep", "30 days"],
                       capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert r.returncode == 2
    assert "bad duration '30 days'" in r.stderr
    assert not (tmp_path / "fleet.db").exists()


@pytest.mark.broker
def test_ingest_keep_applies_retention_while_running(tmp_path: Path, broker: Mosquitto) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    _fill(db)
    proc = subprocess.Popen(
        [EDGEFLEET, "ingest", "--broker", broker.url, "--db", db, "--keep", "30d"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert wait_for(lambda: _counts(db)["events"] == 1, 30)
    finally:
        terminate(proc)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.stdout:
        proc.stdout.close()
    assert "retention: deleted rows older than" in out
    after = _counts(db)
    assert (after["telemetry"], after["dead_letters"]) == (2, 0)
