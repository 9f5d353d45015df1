"""The Grafana dashboard's zone and line counts panel on real PostgreSQL: its numbers are the
store's (``latest_counts``, ``count_increase``: restarts and new classes handled alike)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from cloud_sync.ingest.store import Store, open_store
from tests.cloud_sync.ingest.test_counts import counts_msg, line, zone
from tests.cloud_sync.ingest.test_grafana import Range, load_dashboard, panel, run_dashboard
from tests.harness.postgres import Postgres

TITLE = "Zone and line counts"
# the store's counters → the panel's columns
COLUMNS = [("crossed_in", "in"), ("crossed_out", "out"), ("entered", "entered"),
           ("exited", "left"), ("dwell", "dwell")]  # fmt: skip


@pytest.fixture
def counts_db(postgres: Postgres) -> Iterator[tuple[Store, datetime]]:
    """cam-1 (front: line gate, zone door) every 5 min for 2 h, restarting 40 min ago; a class
    'bike' first seen 20 min ago; cam-2 with a line. Returns (store, now)."""
    store = open_store(postgres.new_database())
    now = datetime.now(timezone.utc).replace(microsecond=0)
    try:
        msgs = []
        for k in range(25):  # k * 5 minutes before now
            at = now - timedelta(minutes=5 * k)
            run = 3 * (24 - k) if k > 8 else 2 * (8 - k)  # restarted 40 min ago
            lines = [line("gate", "car", run, run // 3)]
            if k <= 4:
                lines.append(line("gate", "bike", 5 - k))  # added by the device 20 min ago
            door = zone("door", "person", run, run // 2, run // 4, k % 3)
            msgs.append(counts_msg("cam-1", at, zones=[door], lines=lines))
            msgs.append(counts_msg("cam-2", at, lines=[line("exit", "person", 100 - k)]))
        store.add_telemetry_batch(msgs, now=now)
        yield store, now
    finally:
        store.close()


def by_series(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(r["device_id"], r["region"].split()[-1], r["label" if "label" in r else "class"]): r
            for r in rows}  # fmt: skip


@pytest.mark.parametrize("minutes", [60, 30, 125])
def test_counts_panel_equals_the_store(counts_db: tuple[Store, datetime], minutes: int) -> None:
    store, now = counts_db
    rng = Range(now - timedelta(minutes=minutes), now, "1m")
    _, res = run_dashboard(store, load_dashboard(), rng)
    got = by_series(res[TITLE])
    want = by_series(store.count_increase(rng.frm))
    latest = by_series(store.latest_counts())
    assert set(got) == set(want) == set(latest)
    for key, row in got.items():
        inc = want[key]
        assert row["restarts"] == inc["resets"], key
        assert row["last_sample"] == inc["last"], key
        for col, panel_col in COLUMNS:
            assert row[f"{panel_col} (range)"] == inc[col], (key, col)
            assert row[panel_col] == latest[key][col], (key, col)  # the range ends now
        assert row["inside"] == latest[key]["inside"], key
    gate = got[("cam-1", "gate", "car")]
    if minutes == 60:
        # baseline 36 at -60 min, +3 three times to -45, the restart at -40 (0), +2 eight times
        assert (gate["in (range)"], gate["restarts"]) == (3 * 3 + 2 * 8, 1)
        assert (gate["in"], gate["out"]) == (16, 5)
    # first seen at -20 min with 1, after reports of the pipeline without it: all 5 count
    assert got[("cam-1", "gate", "bike")]["in (range)"] == 5


def test_counts_panel_is_documented_and_tabled() -> None:
    p = panel(load_dashboard(), TITLE)
    assert p["type"] == "table" and p["targets"][0]["format"] == "table"
    assert "restart" in p["description"]
