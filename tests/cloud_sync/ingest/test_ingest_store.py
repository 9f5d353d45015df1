"""The ingest store on a real SQLite file and a real PostgreSQL server (same tests, both)."""

from __future__ import annotations

import base64
import hashlib
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from agent.common.errors import BadDataError
from cloud_sync.ingest.db import make_engine
from cloud_sync.ingest.rows import DEAD_LETTER_KEEP, BadRecord, dead_letter_row
from cloud_sync.ingest.schema import DEVICE_TELEMETRY, EVENTS, LATEST, migrate, schema_version
from cloud_sync.ingest.store import Store, open_store
from tests.harness.ingest_messages import (
    SNAPSHOT,
    T0,
    event,
    reported,
    snapshot,
    state,
    telemetry,
)


def test_state_and_reported_round_trip(store: Store) -> None:
    store.upsert_state(state(), now=T0)
    store.upsert_reported(reported(), now=T0 + timedelta(seconds=5))
    [dev] = store.fleet()
    assert dev["device_id"] == "cam-1" and dev["online"] is True
    assert dev["tags"] == {"site": "berlin"} and dev["profile"] == "jetson-orin-nano"
    assert dev["last_seen"] == T0 + timedelta(seconds=5)
    [p] = dev["pipelines"]
    assert (p["name"], p["model"], p["version"], p["phase"]) == ("front", "det", "1.4.0",
                                                                   "committed")  # fmt: skip
    # the last will flips online, keeps first_seen; a new report replaces the old one
    store.upsert_state(state(online=False), now=T0 + timedelta(minutes=1))
    store.upsert_reported(reported(phase="rolled_back"), now=T0 + timedelta(minutes=1))
    [dev] = store.fleet()
    assert dev["online"] is False and dev["pipelines"][0]["phase"] == "rolled_back"
    with store.engine.connect() as c:
        first = c.execute(sa.text("SELECT first_seen FROM devices")).scalar()
    assert str(first).startswith("2026-11-23 12:00:00")
    assert store.counts()["pipeline_state"] == 1


def test_reported_batch_last_report_per_device_wins(store: Store) -> None:
    """One transaction for many reported states (the worker's path): a device reported twice
    in one batch keeps its later report, and each device's old pipelines are replaced."""
    store.upsert_reported_batch([reported("cam-1"), reported("cam-2")], now=T0)
    later = reported("cam-1", phase="rolled_back")
    later["pipelines"][0]["name"] = "rear"
    store.upsert_reported_batch(
        [reported("cam-1", phase="trial"), reported("cam-3", phase="fetching"), later],
        now=T0 + timedelta(seconds=5),
    )
    got = {(d["device_id"], p["name"], p["phase"]) for d in store.fleet() for p in d["pipelines"]}
    assert got == {("cam-1", "rear", "rolled_back"), ("cam-2", "front", "committed"),
                   ("cam-3", "front", "fetching")}  # fmt: skip
    assert store.counts()["pipeline_state"] == 3


def test_reported_batch_with_a_bad_record_stores_nothing(store: Store) -> None:
    store.upsert_reported(reported("cam-1"), now=T0)
    bad = reported("cam-2")
    del bad["pipelines"][0]["phase"]
    with pytest.raises(BadRecord, match="phase"):
        store.upsert_reported_batch([reported("cam-1", phase="trial"), bad], now=T0)
    [dev] = store.fleet()
    assert dev["device_id"] == "cam-1" and dev["pipelines"][0]["phase"] == "committed"


def test_reported_before_state_creates_device(store: Store) -> None:
    store.upsert_reported(reported("cam-9"), now=T0)
    [dev] = store.fleet()
    assert dev["device_id"] == "cam-9" and dev["online"] is None
    assert dev["pipelines"][0]["phase"] == "committed"


def test_telemetry_round_trip_and_duplicate_ignored(store: Store) -> None:
    assert store.add_telemetry(telemetry(), now=T0) == 2
    assert store.add_telemetry(telemetry(), now=T0) == 0  # MQTT redelivery
    assert store.counts()["telemetry"] == 2 and store.counts()["device_telemetry"] == 1
    with store.engine.connect() as c:
        rows = {r.pipeline: r for r in c.execute(sa.text("SELECT * FROM telemetry"))}
        dev = c.execute(sa.text("SELECT outbox_depth, cpu_percent FROM device_telemetry")).one()
    assert rows["front"].p95_ms == 12.5  # the 'total' stage
    assert rows["rear"].p95_ms == 25.0  # no 'total': preprocess + infer, not 'age'
    with store.engine.connect() as c:
        power = c.execute(sa.select(DEVICE_TELEMETRY.c.power, DEVICE_TELEMETRY.c.temperatures))
        assert tuple(power.one()) == ({"VDD_IN": 5120.0}, {"cpu": 51.2, "gpu": 49.0})
    assert rows["front"].backend == "tensorrt" and rows["front"].precision == "fp16"
    assert tuple(dev) == (3, 41.5)


def test_events_batch_and_duplicates(store: Store) -> None:
    assert store.add_events([event(1), event(2), event(3, T0 + timedelta(seconds=1))]) == 3
    assert store.add_events([event(2), event(4)]) == 1
    assert store.counts()["events"] == 4
    with store.engine.connect() as c:
        r = c.execute(sa.text("SELECT top_label, top_score, n_detections FROM events")).first()
    assert r is not None and tuple(r) == ("person", 0.91, 2)
    with store.engine.connect() as c:
        times = c.execute(sa.select(EVENTS.c.ts).order_by(EVENTS.c.frame_seq)).scalars().all()
    assert times[:3] == [T0, T0, T0 + timedelta(seconds=1)]  # epoch seconds → aware UTC


def test_bad_records_are_typed_and_store_nothing(store: Store) -> None:
    bad = telemetry()
    del bad["ts"]
    with pytest.raises(BadRecord) as e:
        store.add_telemetry_batch([telemetry(), bad])
    assert e.value.field == "ts" and e.value.kind == "telemetry"
    with pytest.raises(BadRecord, match="zone"):
        store.add_events([{**event(1), "frame_time": "2026-11-23T12:00:00"}])
    assert store.counts()["telemetry"] == 0 and store.counts()["events"] == 0


def test_an_integer_beyond_64_bits_is_bad_data(store: Store) -> None:
    """sqlite3 raises a bare OverflowError, PostgreSQL 'bigint out of range': both BadDataError,
    so the ingest worker dead-letters the message instead of dying on it."""
    with pytest.raises(BadDataError):
        store.add_events([{**event(1, T0), "frame_seq": 2**70}])
    with pytest.raises(BadDataError):
        store.add_telemetry_batch([{**telemetry(), "outbox": {"depth": 2**70}}])
    assert store.counts()["events"] == store.counts()["telemetry"] == 0


def test_groups_are_stored_and_shown(store: Store) -> None:
    store.upsert_state({**state("cam-1"), "groups": ["lobby", "canary"]}, now=T0)
    store.upsert_state(state("cam-2"), now=T0)  # an agent without groups (older contract)
    fleet = {d["device_id"]: d for d in store.fleet()}
    assert fleet["cam-1"]["groups"] == ["lobby", "canary"]
    assert fleet["cam-2"]["groups"] == []


def test_fleet_view_latest_telemetry_and_tag_filter(store: Store) -> None:
    store.upsert_state(state("cam-1", site="berlin", tier="canary"), now=T0)
    store.upsert_state(state("cam-2", site="paris"), now=T0)
    store.upsert_reported(reported("cam-1"), now=T0)
    store.add_telemetry(telemetry("cam-1", T0, fps=20.0), now=T0)
    store.add_telemetry(telemetry("cam-1", T0 + timedelta(seconds=10), fps=24.0), now=T0)
    store.add_telemetry(telemetry("cam-3"), now=T0)  # telemetry only: still in the fleet
    fleet = {d["device_id"]: d for d in store.fleet()}
    assert set(fleet) == {"cam-1", "cam-2", "cam-3"}
    front, rear = fleet["cam-1"]["pipelines"]
    latest = (front["name"], front["fps"], front["p95_ms"], front["errors"])
    assert latest == ("front", 24.0, 12.5, 2)
    assert front["phase"] == "committed" and rear["phase"] is None and rear["model"] == "cls"
    assert fleet["cam-2"]["pipelines"] == [{
        "name": "front", "model": None, "version": None, "phase": None, "last_error": None,
        "waiting": None, "source_ended": False, "fps": None, "p95_ms": None, "errors": None,
        "telemetry_ts": None,
    }]  # fmt: skip
    assert [d["device_id"] for d in store.fleet({"site": "berlin"})] == ["cam-1"]
    assert [d["device_id"] for d in store.fleet({"site": "berlin", "tier": "ga"})] == []


def test_dead_letters(store: Store) -> None:
    store.dead_letter("edgefleet/v1/devices/x/telemetry", b"\xff{not json", "not JSON", now=T0)
    [dl] = store.dead_letters()
    assert dl["payload"] == b"\xff{not json" and dl["reason"] == "not JSON"
    assert dl["received_at"] == T0 and dl["topic"].endswith("/telemetry")
    assert dl["payload_bytes"] == 10
    assert dl["payload_sha256"] == hashlib.sha256(b"\xff{not json").hexdigest()


def test_a_dead_letter_keeps_a_bounded_prefix_and_storable_text(store: Store) -> None:
    """20 MB refused: 4 KiB kept, with the whole length and hash; a reason quoting a NUL or a
    lone surrogate (PostgreSQL text takes neither) is stored escaped."""
    big = bytes(range(256)) * (20 * 2**20 // 256)
    store.add_dead_letters([("edgefleet/v1/devices/x/snapshots", big, "too big\x00\udcff"),
                            ("t" * 70_000, b"x", "long topic")], now=T0)  # fmt: skip
    long_topic, dl = store.dead_letters()
    assert bytes(dl["payload"]) == big[:DEAD_LETTER_KEEP] and dl["payload_bytes"] == len(big)
    assert dl["payload_sha256"] == hashlib.sha256(big).hexdigest()
    assert dl["reason"] == "too big\\x00\\udcff"
    assert len(long_topic["topic"]) == 512 and long_topic["payload_bytes"] == 1
    store.dead_letter("t", big, "r", now=T0, keep=10)
    assert bytes(store.dead_letters(1)[0]["payload"]) == big[:10]
    row = dead_letter_row("t", b"", "r", now=T0)
    assert (row["payload"], row["payload_bytes"]) == (b"", 0)


def test_retention(store: Store) -> None:
    old, new = T0 - timedelta(days=40), T0
    store.add_telemetry(telemetry(at=old), now=old)
    store.add_telemetry(telemetry(at=new), now=new)
    store.add_events([event(1, old), event(2, new)])
    store.dead_letter("t", b"x", "r", now=old)
    store.add_snapshots([snapshot(1, old), snapshot(2, new)])
    counts = store.retention(T0 - timedelta(days=30))
    assert counts == {"telemetry": 2, "device_telemetry": 1, "events": 1, "snapshots": 1,
                      "region_counts": 0, "dead_letters": 1}  # fmt: skip
    c = store.counts()
    assert (c["telemetry"], c["events"], c["dead_letters"], c["devices"]) == (2, 1, 0, 1)
    assert c["snapshots"] == 1


def test_snapshots_round_trip_latest_and_bad_base64(store: Store) -> None:
    assert store.latest_snapshot("cam-1") is None
    later, rear = T0 + timedelta(seconds=60), T0 + timedelta(seconds=30)
    added = store.add_snapshots(
        [snapshot(1, T0), snapshot(2, later), snapshot(3, rear, pipeline="rear")]
    )
    assert added == 3
    assert store.add_snapshots([snapshot(1, T0)]) == 0  # a redelivery is not stored twice
    latest = store.latest_snapshot("cam-1")
    assert latest is not None and latest["frame_seq"] == 2
    assert bytes(latest["jpeg"]) == base64.b64decode(SNAPSHOT.jpeg_b64)
    assert (latest["width"], latest["height"], latest["ts"]) == (8, 8, T0 + timedelta(seconds=60))
    last_rear = store.latest_snapshot("cam-1", "rear")
    assert last_rear is not None and last_rear["frame_seq"] == 3
    with pytest.raises(BadRecord, match="not base64"):
        store.add_snapshots([{**snapshot(4, T0), "jpeg_b64": "***"}])


def test_migrations_fresh_and_reopen(db_url: str) -> None:
    s = open_store(db_url)
    assert s.version() == LATEST == 11
    s.add_telemetry(telemetry())
    s.close()
    s = open_store(db_url)  # reopen: nothing applied twice
    with s.engine.connect() as c:
        rows = c.execute(sa.text("SELECT version FROM schema_version ORDER BY version")).all()
    assert [r[0] for r in rows] == list(range(1, 12)) and s.counts()["telemetry"] == 2
    s.close()


def test_upgrade_from_v1(db_url: str) -> None:
    engine = make_engine(db_url)
    assert migrate(engine, upto=1) == 1
    with engine.begin() as c:
        assert "backend" not in {col["name"] for col in sa.inspect(c).get_columns("telemetry")}
        c.execute(
            sa.text(
                "INSERT INTO telemetry (device_id, ts, pipeline, fps_out)"
                " VALUES ('old', :ts, 'front', 5.0)"
            ),
            {"ts": T0.replace(tzinfo=None)},
        )
        assert schema_version(c) == 1
    engine.dispose()
    s = open_store(db_url)
    assert s.version() == LATEST
    with s.engine.connect() as c:
        cols = {col["name"] for col in sa.inspect(c).get_columns("telemetry")}
        assert {"backend", "precision"} <= cols
        assert c.execute(sa.text("SELECT fps_out FROM telemetry")).scalar() == 5.0
    assert s.add_telemetry(telemetry()) == 2
    s.close()


def test_upgrade_to_v6_measures_the_dead_letters_kept_whole(db_url: str) -> None:
    """Dead letters stored before v6 hold their whole payload: v6 adds its length and hash."""
    engine = make_engine(db_url)
    assert migrate(engine, upto=5) == 5
    with engine.begin() as c:
        for payload in (b"{oops", b"", None):
            c.execute(
                sa.text("INSERT INTO dead_letters (received_at, topic, payload, reason)"
                        " VALUES (:t, 'x', :p, 'r')"),
                {"t": T0.replace(tzinfo=None), "p": payload},
            )  # fmt: skip
    engine.dispose()
    s = open_store(db_url)
    got = [(d["payload_bytes"], d["payload_sha256"]) for d in s.dead_letters()][::-1]
    empty = (0, hashlib.sha256(b"").hexdigest())
    assert got == [(5, hashlib.sha256(b"{oops").hexdigest()), empty, empty]
    s.close()


def test_newer_schema_refused(db_url: str) -> None:
    s = open_store(db_url)
    with s.engine.begin() as c:
        c.execute(sa.text("INSERT INTO schema_version VALUES (99, :t)"), {"t": T0})
    s.close()
    with pytest.raises(Exception, match="version 99"):
        open_store(db_url)


def test_batch_throughput(store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    """10,000 telemetry rows (5,000 messages x 2 pipelines) in batches of 500 messages."""
    msgs = [telemetry(f"cam-{i % 50}", T0 + timedelta(seconds=i)) for i in range(5000)]
    start = time.perf_counter()
    added = sum(store.add_telemetry_batch(msgs[i : i + 500], now=T0) for i in range(0, 5000, 500))
    batched = time.perf_counter() - start
    one = [telemetry("cam-x", T0 + timedelta(seconds=i)) for i in range(200)]
    start = time.perf_counter()
    for m in one:
        store.add_telemetry(m, now=T0)
    single = time.perf_counter() - start
    assert added == 10_000 and store.counts()["telemetry"] == 10_400
    with capsys.disabled():
        print(f"\n[{store.engine.dialect.name}] telemetry rows/s: batched {10_000 / batched:,.0f},"
              f" one message per transaction {400 / single:,.0f}")  # fmt: skip
