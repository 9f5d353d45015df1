"""Rollouts in the ingest database: the ``rollouts`` table and the fleet snapshot adapter, on a
real SQLite file and a real PostgreSQL server (same tests, both), with hand-built data."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa

from agent.protocol.state import UpdatePhase
from cloud_sync.ingest.store import Store
from cloud_sync.rollout import RolloutSpec, db, start
from cloud_sync.rollout.commands import pause
from cloud_sync.rollout.snapshot import SnapshotReader

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


def spec(rid: str = "r1", **kw: Any) -> RolloutSpec:
    base: dict[str, Any] = {"id": rid, "model": "det", "version": "2.0.0", "target": "*"}
    return RolloutSpec(**{**base, **kw})


# --- rollouts table ----------------------------------------------------------------------------


def test_create_get_list_save(store: Store) -> None:
    a = db.create(store, spec("a", stages=["10%"]), start(spec("a"), T0), T0)
    b = db.create(store, spec("b", pipeline="front"), start(spec("b"), T0), T0 + timedelta(1))
    c = db.create(store, spec("c"), start(spec("c"), T0), T0 + timedelta(2))
    assert a.rev == b.rev == 1
    got = db.get(store, "a")
    assert got.spec == a.spec and got.state == a.state and got.created_at == T0
    assert [str(s) for s in got.spec.stages] == ["10%", "100%"]
    # c finishes: active ones (newest first) come before it
    done = c.state.model_copy(update={"status": "completed"})
    c2 = db.save(store, c, done, T0 + timedelta(3))
    assert c2.rev == 2 and db.get(store, "c").state.status == "completed"
    assert [r.id for r in db.list_rollouts(store)] == ["b", "a", "c"]
    assert [r.id for r in db.list_rollouts(store, active_only=True)] == ["b", "a"]


def test_save_refuses_a_stale_revision(store: Store) -> None:
    row = db.create(store, spec(), start(spec(), T0), T0)
    first = db.save(store, row, pause(row.state, T0).new_state, T0)
    assert first.rev == 2
    with pytest.raises(db.ConcurrentUpdate, match=r"read revision 1, database has 2") as e:
        db.save(store, row, row.state, T0)  # a second writer that read rev 1
    assert (e.value.expected_rev, e.value.actual_rev) == (1, 2)
    assert db.get(store, "r1").state.status == "paused"


def test_list_reuses_known_rows_of_the_same_revision(store: Store) -> None:
    """The controller's tick: rows it already holds are not read and parsed again, rows that
    someone else saved (an operator's pause) are, and finished ones drop out."""
    a = db.create(store, spec("a"), start(spec("a"), T0), T0)
    b = db.create(store, spec("b"), start(spec("b"), T0), T0 + timedelta(1))
    c = db.create(store, spec("c"), start(spec("c"), T0), T0 + timedelta(2))
    known = {r.id: r for r in db.list_rollouts(store, active_only=True)}
    assert db.head(store, "a") == (1, "running")
    b2 = db.save(store, b, pause(b.state, T0).new_state, T0)  # another writer
    db.save(store, c, c.state.model_copy(update={"status": "completed"}), T0)
    got = db.list_rollouts(store, active_only=True, known=known)
    assert [r.id for r in got] == ["b", "a"]
    assert got[1] is known["a"]  # same revision: the object held
    assert got[0] is not known["b"] and got[0].rev == b2.rev == 2
    assert got[0].state.status == "paused" and db.head(store, "b") == (2, "paused")
    assert [r.id for r in db.list_rollouts(store, known={"a": a})] == ["b", "a", "c"]


def test_unknown_and_duplicate_ids(store: Store) -> None:
    with pytest.raises(db.RolloutNotFound, match="no rollout 'nope'"):
        db.get(store, "nope")
    with pytest.raises(db.RolloutNotFound, match="no rollout 'nope'"):
        db.head(store, "nope")
    db.create(store, spec(), start(spec(), T0), T0)
    with pytest.raises(db.RolloutExists, match="'r1' is taken"):
        db.create(store, spec(), start(spec(), T0), T0)


# --- snapshot ----------------------------------------------------------------------------------


def state(store: Store, device: str, *, online: bool = True, **kw: Any) -> None:
    store.upsert_state(
        {"device_id": device, "online": online, "pipelines": ["front"], **kw}, now=T0
    )


def reported(store: Store, device: str, *pipelines: dict[str, Any]) -> None:
    rows = [{"updated_at": T0.isoformat(), "last_error": None, **p} for p in pipelines]
    store.upsert_reported({"device_id": device, "desired_revision": 3, "pipelines": rows}, now=T0)


def tele(
    device: str, at: float, version: str, fps: float, errors: int, p95: float | None = None,
    pipeline: str = "front",
) -> dict[str, Any]:  # fmt: skip
    p: dict[str, Any] = {"name": pipeline, "fps_out": fps, "errors": errors,
                         "model": "det", "version": version}  # fmt: skip
    if p95 is not None:
        p["latency_ms"] = {"total": {"p50": p95 / 2, "p95": p95, "p99": p95 * 2}}
    return {"device_id": device, "ts": (T0 + timedelta(seconds=at)).isoformat(), "pipelines": [p]}


def event(device: str, at: float, seq: int, version: str, label: str | None) -> dict[str, Any]:
    cls = [{"label": label, "score": 0.9}] if label else []
    return {"device_id": device, "pipeline": "front", "model": "det", "version": version,
            "frame_seq": seq, "frame_time": (T0 + timedelta(seconds=at)).timestamp(),
            "classifications": cls}  # fmt: skip


def fill(store: Store) -> None:
    state(store, "cam-1", tags={"site": "berlin"}, groups=["lobby"])
    state(store, "cam-2")
    state(store, "cam-3")
    state(store, "cam-4", online=False)
    reported(store, "cam-1", {"name": "front", "phase": "committed", "active_model": "det",
                              "active_version": "2.0.0", "target_model": "det",
                              "target_version": "2.0.0"})  # fmt: skip
    reported(store, "cam-2", {"name": "front", "phase": "rejected", "active_model": "det",
                              "active_version": "1.0.0", "target_model": "det",
                              "target_version": "2.0.0", "last_error": "boom"})  # fmt: skip
    store.add_telemetry_batch([
        tele("cam-1", -70, "1.0.0", 10, 1),     # before the look-back: ignored
        tele("cam-1", -10, "1.0.0", 10, 5),     # predecessor of the first row in the window
        tele("cam-1", 0, "1.0.0", 10, 7, 20),   # 10 s x 10 fps, +2 errors
        tele("cam-1", 10, "1.0.0", 12, 7, 22),  # 120 frames, +0
        tele("cam-1", 20, "2.0.0", 8, 3, 30),   # counter reset (restart): +3; 80 frames
        tele("cam-1", 30, "2.0.0", 9, 4, 34),   # +1; 90
        tele("cam-1", 40, "2.0.0", 10, 10, 50), # +6; 100
        tele("cam-1", 70, "2.0.0", 99, 99, 99), # after the window: ignored
        tele("cam-2", 5, "1.0.0", 5, 100),      # lone row: default interval 10 s, +0
        tele("cam-3", 0, "1.0.0", 2, 1),        # median gap 10 s: 20 frames
        tele("cam-3", 10, "1.0.0", 2, 2),       # 20, +1
        tele("cam-3", 55, "1.0.0", 2, 10),      # 45 s gap > max_gap 30 s: 20 frames, +0
    ])  # fmt: skip
    store.add_events([
        event("cam-1", -30, 1, "2.0.0", "cat"),  # before the window
        event("cam-1", 21, 2, "2.0.0", "cat"), event("cam-1", 22, 3, "2.0.0", "cat"),
        event("cam-1", 23, 4, "2.0.0", "cat"), event("cam-1", 24, 5, "2.0.0", "dog"),
        event("cam-1", 25, 6, "2.0.0", None),    # no label: not counted
        event("cam-1", 5, 7, "1.0.0", "dog"),    # other version
    ])  # fmt: skip


def test_snapshot_exact_numbers(store: Store) -> None:
    fill(store)
    fleet = SnapshotReader(store, max_gap_s=30).read(T0, T0 + timedelta(seconds=60))
    assert [d.device_id for d in fleet] == ["cam-1", "cam-2", "cam-3", "cam-4"]
    c1 = fleet.get("cam-1")
    assert c1 is not None and c1.online and c1.groups == {"lobby"} and c1.tags == {"site": "berlin"}
    front = c1.pipelines["front"]
    assert (front.phase, str(front.active)) == (UpdatePhase.COMMITTED, "det@2.0.0")
    m = front.metrics
    assert m is not None and str(m.ref) == "det@2.0.0"
    assert (m.frames, m.errors, m.fps, m.p95_ms) == (270, 10, 9.0, 34.0)
    assert dict(m.top1) == {"cat": 3, "dog": 1}
    c2 = fleet.get("cam-2")
    assert c2 is not None
    p2 = c2.pipelines["front"]
    assert (p2.phase, p2.last_error, p2.target_version) == (UpdatePhase.REJECTED, "boom", "2.0.0")
    assert p2.metrics is not None
    assert (p2.metrics.frames, p2.metrics.errors, p2.metrics.p95_ms) == (50, 0, None)
    c3 = fleet.get("cam-3")
    assert c3 is not None and c3.pipelines["front"].metrics is not None
    m3 = c3.pipelines["front"].metrics
    assert (m3.frames, m3.errors, m3.fps) == (60, 1, 2.0)
    assert c3.pipelines["front"].phase is None  # never reported
    c4 = fleet.get("cam-4")
    assert c4 is not None and not c4.online and c4.pipelines["front"].metrics is None


def test_snapshot_without_metrics_keeps_devices_and_phases(store: Store) -> None:
    """What the controller reads while a stage installs (``plan.needs_metrics`` False)."""
    fill(store)
    reader = SnapshotReader(store, max_gap_s=30)
    full = reader.read(T0, T0 + timedelta(seconds=60))
    bare = reader.read(T0, T0 + timedelta(seconds=60), metrics=False)
    assert [d.device_id for d in bare] == [d.device_id for d in full]
    for d in full:
        b = bare.get(d.device_id)
        assert b is not None and (b.online, b.groups, b.tags) == (d.online, d.groups, d.tags)
        assert set(b.pipelines) <= set(d.pipelines)
        for name, p in b.pipelines.items():
            assert p.metrics is None
            assert replace(d.pipelines[name], metrics=None) == p
    c1 = bare.get("cam-1")
    assert c1 is not None and str(c1.pipelines["front"].active) == "det@2.0.0"


def test_snapshot_of_an_older_version_in_the_window(store: Store) -> None:
    """A window that ends before the switch shows the version that was running then."""
    fill(store)
    fleet = SnapshotReader(store, max_gap_s=30).read(T0, T0 + timedelta(seconds=15))
    d = fleet.get("cam-1")
    assert d is not None
    m = d.pipelines["front"].metrics
    assert m is not None and str(m.ref) == "det@1.0.0"
    assert (m.frames, m.errors, m.fps, m.p95_ms, dict(m.top1)) == (220, 2, 11.0, 21.0, {"dog": 1})


def test_snapshot_of_1000_devices_takes_a_few_queries(store: Store) -> None:
    """1,000 devices x 2 pipelines, 10 telemetry rows each (20,000 rows): a few queries for the
    whole fleet, never one per device (what keeps it quick; its time is a benchmark's job)."""
    for i in range(1000):
        state(store, f"d{i:04d}", tags={"n": str(i % 7)})
    msgs = [
        {"device_id": f"d{i:04d}", "ts": (T0 + timedelta(seconds=10 * k)).isoformat(),
         "pipelines": [{"name": p, "fps_out": 10.0, "errors": k, "model": "det",
                        "version": "1.0.0", "latency_ms": {"total": {"p95": 20.0}}}
                       for p in ("front", "rear")]}
        for k in range(10) for i in range(1000)
    ]  # fmt: skip
    for i in range(0, len(msgs), 2000):
        store.add_telemetry_batch(msgs[i : i + 2000], now=T0)
    statements: list[str] = []

    def count(conn: Any, cursor: Any, sql: str, *_a: Any) -> None:
        statements.append(sql)

    sa.event.listen(store.engine, "before_cursor_execute", count)
    try:
        fleet = SnapshotReader(store).read(T0, T0 + timedelta(seconds=100))
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", count)
    assert len(fleet) == 1000
    d = fleet.get("d0999")
    assert d is not None
    m = d.pipelines["rear"].metrics
    assert m is not None and (m.frames, m.errors, m.p95_ms) == (1000, 9, 20.0)
    assert 1 <= len(statements) <= 10, statements  # 6 today; one per device would be 1,000+


def test_spec_json_round_trip() -> None:
    """Fixed bug: RolloutSpec's stage validator took only text, so a stored spec (stages as
    JSON objects) could not be read back."""
    s = spec(stages=["10", "25%"], gates=["failures<2%", "p95_latency<+20%"], pipeline="front")
    assert RolloutSpec.model_validate(s.model_dump(mode="json")) == s
    assert RolloutSpec.model_validate_json(s.model_dump_json()) == s
