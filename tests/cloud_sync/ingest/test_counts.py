"""Zone and line counts on the fleet side (issue 18 part B): row mapping, the store on SQLite and
PostgreSQL (latest counts, the increase over a window across agent restarts, retention, the
v6 → v7 migration), `edgefleet fleet counts`, the web API and the Prometheus endpoint."""

from __future__ import annotations

import itertools
import json
import random
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest

from agent.protocol.schema import EXAMPLES
from cloud_sync.ingest.counts_view import format_counts, merge_counts
from cloud_sync.ingest.db import make_engine
from cloud_sync.ingest.rows import BadRecord, region_count_rows
from cloud_sync.ingest.schema import LATEST, REGION_COUNTS, migrate
from cloud_sync.ingest.store import Store, open_store
from tests.harness.ingest_messages import T0, counts_msg, line, zone

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


# --- rows (pure) -----------------------------------------------------------------------------


def test_region_count_rows_map_zones_and_lines() -> None:
    msg = counts_msg(zones=[zone("door", "person", 5, 3, 1, 2)],
                     lines=[line("gate", "car", 7, 4), line("gate", "person", 0, 1)])  # fmt: skip
    rows = region_count_rows(msg)
    assert [(r["kind"], r["region"], r["label"]) for r in rows] == [
        ("zone", "door", "person"), ("line", "gate", "car"),
        ("line", "gate", "person")]  # fmt: skip
    z, car, _ = rows
    assert (z["entered"], z["exited"], z["dwell"], z["inside"]) == (5, 3, 1, 2)
    assert (z["crossed_in"], z["crossed_out"]) == (None, None)
    assert (car["crossed_in"], car["crossed_out"]) == (7, 4)
    assert (car["entered"], car["inside"]) == (None, None)
    assert {r["device_id"] for r in rows} == {"cam-1"} and {r["ts"] for r in rows} == {T0}
    assert all(list(r) == list(rows[0]) for r in rows)  # one executemany needs the same keys


def test_region_count_rows_of_a_1_0_message_and_bad_rows() -> None:
    old = EXAMPLES["telemetry"].model_dump(mode="json")
    for p in old["pipelines"]:
        del p["zones"], p["lines"]
    assert region_count_rows(old) == []
    bad = counts_msg(lines=[line("gate", "car", 1)])
    del bad["pipelines"][0]["lines"][0]["crossed_out"]
    with pytest.raises(BadRecord, match="no 'crossed_out'") as e:
        region_count_rows(bad)
    assert (e.value.kind, e.value.field) == ("telemetry", "crossed_out")


# --- presentation (pure) ---------------------------------------------------------------------


def test_merge_and_format_counts() -> None:
    at = T0 + timedelta(minutes=5)
    latest = [
        {"device_id": "cam-1", "pipeline": "front", "kind": "line", "region": "gate",
         "label": "car", "ts": at, "entered": None, "exited": None, "dwell": None, "inside": None,
         "crossed_in": 12, "crossed_out": 3},
        {"device_id": "cam-1", "pipeline": "front", "kind": "zone", "region": "door",
         "label": "person", "ts": at, "entered": 5, "exited": 4, "dwell": 1, "inside": 1,
         "crossed_in": None, "crossed_out": None},
    ]  # fmt: skip
    increase = [
        {"device_id": "cam-1", "pipeline": "front", "kind": "line", "region": "gate",
         "label": "car", "crossed_in": 20, "crossed_out": 3, "entered": None, "exited": None,
         "dwell": None, "resets": 1, "samples": 9, "first": T0, "last": at},
    ]  # fmt: skip
    rows = merge_counts(latest, increase)
    assert [r["region"] for r in rows] == ["gate", "door"]
    assert rows[0]["increase"] == {"crossed_in": 20, "crossed_out": 3} and rows[0]["resets"] == 1
    assert rows[1]["increase"] is None  # no samples in the window
    text = format_counts(rows, since="1h")
    head, gate, door = text.splitlines()
    assert head.split()[:5] == ["DEVICE", "PIPELINE", "REGION", "CLASS", "COUNTS"]
    assert "line gate" in gate and "in 12  out 3" in gate and "+20 in, +3 out in 1h" in gate
    assert "1 restart" in gate
    assert "zone door" in door and "entered 5  left 4  dwell 1  inside 1" in door
    assert format_counts([], since=None) == "no zone or line counts yet"


# --- the store on SQLite and PostgreSQL ------------------------------------------------------


def test_latest_counts_follow_the_latest_message(store: Store) -> None:
    store.add_telemetry(counts_msg(at=T0, zones=[zone("door", "person", 1)],
                                   lines=[line("gate", "car", 2)]), now=T0)  # fmt: skip
    later = T0 + timedelta(seconds=10)
    store.add_telemetry_batch([
        counts_msg(at=later, lines=[line("gate", "car", 3, 1), line("gate", "bike", 1)]),
        counts_msg("cam-2", at=T0, zones=[zone("door", "person", 4, 4, 0, 0)]),
    ], now=later)  # fmt: skip
    assert store.add_telemetry(counts_msg(at=later, lines=[line("gate", "car", 3, 1)])) == 0
    got = [(r["device_id"], r["kind"], r["region"], r["label"], r["crossed_in"], r["crossed_out"],
            r["entered"], r["ts"]) for r in store.latest_counts()]  # fmt: skip
    # cam-1's zone was configured away: the latest message has the line only
    assert got == [
        ("cam-1", "line", "gate", "bike", 1, 0, None, later),
        ("cam-1", "line", "gate", "car", 3, 1, None, later),
        ("cam-2", "zone", "door", "person", None, None, 4, T0),
    ]
    assert [r["device_id"] for r in store.latest_counts("cam-2")] == ["cam-2"]
    assert store.latest_counts("cam-9") == []
    assert store.counts()["region_counts"] == 5  # the redelivery is stored once


def test_increase_across_agent_restarts(store: Store) -> None:
    """Counters reset when the agent restarts: the increase counts on from zero, like
    Prometheus' increase(), and the baseline is the last sample before the window."""
    ins = [4, 6, 9, 2, 5, 0, 3]  # two restarts: 9 -> 2 and 5 -> 0
    for k, n in enumerate(ins):
        at = T0 + timedelta(minutes=k)
        msg = counts_msg(at=at, lines=[line("gate", "car", n, k)],
                         zones=[zone("door", "car", n, 0, 0, k % 2)])  # fmt: skip
        store.add_telemetry(msg, now=at)
    [line_inc] = [
        r for r in store.count_increase(T0 + timedelta(seconds=30)) if r["kind"] == "line"
    ]
    # baseline 4 (t0); +2, +3, restart +2, +3, restart +0, +3
    assert line_inc["crossed_in"] == 2 + 3 + 2 + 3 + 0 + 3
    assert line_inc["resets"] == 2 and line_inc["samples"] == 7
    assert line_inc["first"] == T0 and line_inc["last"] == T0 + timedelta(minutes=6)
    # crossed_out rose every minute (k) but the row restarted twice: it counts from zero there
    assert line_inc["crossed_out"] == 1 + 1 + 3 + 1 + 5 + 1
    assert (line_inc["entered"], line_inc["exited"]) == (None, None)
    [zone_inc] = [r for r in store.count_increase(T0 + timedelta(minutes=3)) if r["kind"] == "zone"]
    assert zone_inc["entered"] == 3 + 3 and zone_inc["resets"] == 1  # baseline 2 at minute 3
    assert (zone_inc["crossed_in"], zone_inc["exited"]) == (None, 0)
    # a window that holds only the baseline has no series; one past every sample neither
    assert store.count_increase(T0 + timedelta(minutes=6, seconds=1)) == []
    assert store.count_increase(T0 - timedelta(hours=1), device_id="cam-9") == []


def increase_reference(samples: list[tuple[int, int]]) -> tuple[int, int, int]:
    """(in, out, resets) of one line series by hand: a sample where either counter went down
    starts both from zero."""
    total_in = total_out = resets = 0
    for (pi, po), (ci, co) in itertools.pairwise(samples):
        if ci < pi or co < po:
            resets += 1
            total_in, total_out = total_in + ci, total_out + co
        else:
            total_in, total_out = total_in + ci - pi, total_out + co - po
    return total_in, total_out, resets


def test_increase_matches_a_reference_on_random_series(store: Store) -> None:
    rng = random.Random(18)
    want = {}
    msgs = []
    for dev in ("cam-1", "cam-2", "cam-3"):
        samples, cur = [], (0, 0)
        for k in range(40):
            if rng.random() < 0.1:
                cur = (rng.randint(0, 3), rng.randint(0, 3))  # restart
            else:
                cur = (cur[0] + rng.randint(0, 4), cur[1] + rng.randint(0, 2))
            samples.append(cur)
            msgs.append(counts_msg(dev, T0 + timedelta(seconds=10 * k),
                                   lines=[line("gate", "car", *cur)]))  # fmt: skip
        want[dev] = increase_reference(samples[10:])  # the window starts at sample 10
    rng.shuffle(msgs)  # arrival order does not matter, time order does
    store.add_telemetry_batch(msgs, now=T0)
    got = {r["device_id"]: (r["crossed_in"], r["crossed_out"], r["resets"])
           for r in store.count_increase(T0 + timedelta(seconds=100))}  # fmt: skip
    assert got == want


def test_retention_covers_counts(store: Store) -> None:
    old = T0 - timedelta(days=40)
    store.add_telemetry(counts_msg(at=old, lines=[line("gate", "car", 1)]), now=old)
    store.add_telemetry(counts_msg(at=T0, lines=[line("gate", "car", 2)]), now=T0)
    deleted = store.retention(T0 - timedelta(days=30))
    assert deleted["region_counts"] == 1 and deleted["telemetry"] == 1
    assert store.counts()["region_counts"] == 1


def test_upgrade_from_v6_keeps_the_data(db_url: str) -> None:
    engine = make_engine(db_url)
    assert migrate(engine, upto=6) == 6
    with engine.begin() as c:
        assert not sa.inspect(c).has_table("region_counts")
        c.execute(sa.text("INSERT INTO telemetry (device_id, ts, pipeline, fps_out)"
                          " VALUES ('old', :ts, 'front', 5.0)"),
                  {"ts": T0.replace(tzinfo=None)})  # fmt: skip
    engine.dispose()
    s = open_store(db_url)
    try:
        assert s.version() == LATEST == 11
        with s.engine.connect() as c:
            cols = {col["name"] for col in sa.inspect(c).get_columns("region_counts")}
            assert c.execute(sa.text("SELECT fps_out FROM telemetry")).scalar() == 5.0
        assert set(REGION_COUNTS.c.keys()) == cols
        s.add_telemetry(counts_msg(lines=[line("gate", "car", 1)]))
        assert [r["crossed_in"] for r in s.latest_counts()] == [1]
    finally:
        s.close()


def test_a_bad_count_row_stores_nothing_of_the_batch(store: Store) -> None:
    bad = counts_msg(zones=[zone("door", "person", 1)])
    del bad["pipelines"][0]["zones"][0]["inside"]
    with pytest.raises(BadRecord):
        store.add_telemetry_batch([counts_msg(lines=[line("gate", "car", 1)]), bad])
    c = store.counts()
    assert (c["telemetry"], c["region_counts"]) == (0, 0)


# --- `edgefleet fleet counts` ----------------------------------------------------------------


def fill_recent(db: str) -> datetime:
    """cam-1: a line and a zone over the last 30 minutes with a restart; cam-2: a line."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    s = open_store(db)
    try:
        for k, n in enumerate([10, 14, 3, 8]):  # 14 -> 3: the agent restarted
            at = now - timedelta(minutes=30 - 10 * k)
            s.add_telemetry_batch([
                counts_msg("cam-1", at, zones=[zone("door", "person", n, n - 1, 0, 1)],
                           lines=[line("gate", "car", n, 1)]),
                counts_msg("cam-2", at, lines=[line("exit", "person", 2 * k)]),
            ], now=at)  # fmt: skip
    finally:
        s.close()
    return now


def fleet_counts(db: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEFLEET, "fleet", "counts", "--db", db, *args],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def test_fleet_counts_command(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    fill_recent(db)
    r = fleet_counts(db)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["DEVICE", "PIPELINE", "REGION", "CLASS", "COUNTS"]
    gate = next(ln for ln in lines if "line gate" in ln)
    assert gate.split()[:2] == ["cam-1", "front"] and "in 8  out 1" in gate
    assert "+" not in gate  # no window asked for
    r = fleet_counts(db, "--device", "cam-1", "--since", "25m")
    assert r.returncode == 0, r.stderr
    # the window starts after the first sample: baseline 10 at -30 min, +4, restart +3, +5;
    # 'out' stayed 1, but after the restart that 1 is a new crossing
    gate = next(ln for ln in r.stdout.splitlines() if "line gate" in ln)
    assert "+12 in, +1 out in 25m (1 restart)" in gate, r.stdout
    assert "cam-2" not in r.stdout
    r = fleet_counts(db, "--since", "1h", "--json")
    rows = json.loads(r.stdout)
    by = {(x["device_id"], x["region"]): x for x in rows}
    assert by[("cam-2", "exit")]["increase"] == {"crossed_in": 6, "crossed_out": 0}
    door = by[("cam-1", "door")]
    assert (door["entered"], door["inside"], door["resets"]) == (8, 1, 1)
    assert door["increase"] == {"entered": 4 + 3 + 5, "exited": 4 + 2 + 5, "dwell": 0}
    bad = fleet_counts(db, "--since", "soon")
    assert bad.returncode == 2 and "bad duration 'soon'" in bad.stderr
    empty = fleet_counts(f"sqlite:///{tmp_path / 'empty.db'}")
    assert empty.returncode == 0 and empty.stdout.strip() == "no zone or line counts yet"


# --- web API and Prometheus ------------------------------------------------------------------


def test_web_counts_api(tmp_path: Path) -> None:
    from cloud_sync.ingest.web import FleetApp

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    now = fill_recent(db)
    s = open_store(db)
    try:
        app = FleetApp(s, clock=lambda: now)

        def get(query: str) -> tuple[str, Any]:
            seen: list[str] = []
            body = app({"PATH_INFO": "/api/counts", "QUERY_STRING": query},
                       lambda status, headers: seen.append(status))  # fmt: skip
            return seen[0], json.loads(b"".join(body))

        status, body = get("minutes=25")
        assert status == "200 OK" and body["minutes"] == 25
        gate = next(r for r in body["counts"] if r["region"] == "gate")
        assert gate["crossed_in"] == 8 and gate["increase"]["crossed_in"] == 12
        status, body = get("minutes=0")
        assert status == "400 Bad Request" and "minutes" in body["error"]
    finally:
        s.close()


def test_metrics_export_fleet_counts_and_pass_promtool(tmp_path: Path) -> None:
    from cloud_sync.ingest.metrics import IngestCollector
    from cloud_sync.ingest.worker import IngestWorker
    from tests.harness.util import promtool

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    fill_recent(db)
    s = open_store(db)
    try:
        registry = CollectorRegistry()
        registry.register(IngestCollector(IngestWorker("mqtt://127.0.0.1:1", s)))
        text = generate_latest(registry)
    finally:
        s.close()
    assert promtool(text) == ""
    key = b'device_id="cam-1",pipeline="front"'
    for sample in (
        b'edgefleet_fleet_zone_entered_total{class="person",' + key + b',zone="door"} 8.0',
        b'edgefleet_fleet_zone_left_total{class="person",' + key + b',zone="door"} 7.0',
        b'edgefleet_fleet_zone_objects{class="person",' + key + b',zone="door"} 1.0',
        b'edgefleet_fleet_line_crossed_total{class="car",device_id="cam-1",direction="in",'
        b'line="gate",pipeline="front"} 8.0',
        b'edgefleet_fleet_line_crossed_total{class="person",device_id="cam-2",direction="in",'
        b'line="exit",pipeline="front"} 6.0',
    ):
        assert sample in text, text.decode()
    assert b"# TYPE edgefleet_fleet_line_crossed_total counter" in text


def test_a_series_that_appears_in_the_window_counts_from_zero_when_its_pipeline_was_seen(
    store: Store,
) -> None:
    """The device adds a class's row at its first event: when the pipeline reported inside the
    window without the row, the row's first counts happened in the window."""
    at = [T0 + timedelta(seconds=10 * k) for k in range(4)]
    store.add_telemetry_batch([
        counts_msg(at=at[0], lines=[line("gate", "car", 5)]),
        counts_msg(at=at[1], lines=[line("gate", "car", 5)]),
        counts_msg(at=at[2], lines=[line("gate", "car", 6), line("gate", "bike", 2, 1)]),
        counts_msg(at=at[3], lines=[line("gate", "car", 6), line("gate", "bike", 3, 1)]),
        # another device whose first message in the window already has counts: unknown
        # since when, so counted from there (Prometheus' way)
        counts_msg("cam-2", at=at[2], lines=[line("gate", "bike", 4)]),
        counts_msg("cam-2", at=at[3], lines=[line("gate", "bike", 5)]),
    ], now=T0)  # fmt: skip
    got = {(r["device_id"], r["label"]): (r["crossed_in"], r["crossed_out"])
           for r in store.count_increase(T0 + timedelta(seconds=5))}  # fmt: skip
    assert got == {("cam-1", "bike"): (3, 1), ("cam-1", "car"): (1, 0),
                   ("cam-2", "bike"): (1, 0)}  # fmt: skip
    # a cut at bike's first sample makes that sample its baseline
    got = {r["label"]: r["crossed_in"] for r in store.count_increase(at[2], device_id="cam-1")}
    assert got == {"bike": 1, "car": 0}
