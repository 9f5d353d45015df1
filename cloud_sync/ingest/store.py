"""Adapter: the ingest store, SQLAlchemy Core over SQLite (default) or PostgreSQL (at scale).

Takes plain dicts (a validated wire message's ``model_dump(mode="json")``), so it does not
depend on the message models. Telemetry and events are written with ``ON CONFLICT DO NOTHING``
on their natural key, so a message MQTT delivers twice (QoS 1 is at-least-once) is stored once.
The tables and their migrations are in ``schema.py``; ``open_store`` applies the missing ones.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from agent.common.errors import BadDataError
from cloud_sync.ingest.schema import (
    DEAD_LETTERS,
    DEVICE_TELEMETRY,
    DEVICES,
    EVENTS,
    LATEST,
    MIGRATIONS,
    PIPELINE_STATE,
    ROLLOUTS,
    SNAPSHOTS,
    TABLES,
    TELEMETRY,
    StoreUnavailable,
    UtcDateTime,
    guard,
    make_engine,
    migrate,
    schema_version,
)

log = logging.getLogger(__name__)
_guard = guard

MAX_REASON = 1000  # characters of a dead letter's reason kept
MAX_TOPIC = 512  # characters of a dead letter's topic kept (a topic may be 64 KiB)
DEAD_LETTER_KEEP = 4096  # bytes of a dead letter's payload kept (with its length and SHA-256)


class BadRecord(BadDataError):
    """A message dict the store cannot take as is (missing field, wrong type, bad time).

    Attributes:
        kind: ``"state"``, ``"reported"``, ``"telemetry"`` or ``"event"``.
        field: the offending key, when known.
    """

    def __init__(self, message: str, *, kind: str, field: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.field = field


# --- dict → rows (pure) ----------------------------------------------------------------------


def _get(msg: Mapping[str, Any], key: str, kind: str) -> Any:
    try:
        return msg[key]
    except (KeyError, TypeError):
        raise BadRecord(
            f"{kind} message has no '{key}'; not stored", kind=kind, field=key
        ) from None


def _time(value: Any, kind: str, field: str) -> datetime:
    """An aware UTC datetime from a datetime, an ISO 8601 string or epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:  # InferenceEvent.frame_time: seconds since the Unix epoch
            return datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise BadRecord(
                f"{kind} '{field}' is {value!r}, not a time in range", kind=kind, field=field
            ) from None
    if isinstance(value, str):
        try:  # Python 3.10's fromisoformat does not take the 'Z' pydantic writes
            value = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
        except ValueError:
            raise BadRecord(
                f"{kind} '{field}' is {value[:40]!r}, expected an ISO 8601 time",
                kind=kind,
                field=field,
            ) from None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise BadRecord(
            f"{kind} '{field}' must be a time with a zone, got {value!r}", kind=kind, field=field
        )
    return value.astimezone(timezone.utc)


# The stages of one frame's own processing (agent.protocol.telemetry names them); capture_wait,
# sink, overhead and age are left out: they measure the source and the frame's age, not the model.
FRAME_STAGES = ("preprocess", "infer", "postprocess")


def _latency(p: Mapping[str, Any]) -> dict[str, float | None]:
    """p50/p95/p99 of one frame: a 'total' stage if sent, else the sum over FRAME_STAGES.

    Percentiles do not add exactly; the sum is the conservative figure a dashboard and a
    latency-regression gate want, and it is what ``InferenceEvent.latency_ms`` measures.
    """
    stages: Mapping[str, Mapping[str, float]] = p.get("latency_ms") or {}
    if "total" in stages:
        return {q: stages["total"].get(q) for q in ("p50", "p95", "p99")}
    out: dict[str, float | None] = {}
    for q in ("p50", "p95", "p99"):
        vals = [stages[s][q] for s in FRAME_STAGES if stages.get(s, {}).get(q) is not None]
        out[q] = sum(vals) if vals else None
    return out


def telemetry_rows(msg: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One telemetry message → (a row per pipeline, the device row)."""
    device_id, ts = (
        _get(msg, "device_id", "telemetry"),
        _time(_get(msg, "ts", "telemetry"), "telemetry", "ts"),
    )
    rows = []
    for p in msg.get("pipelines") or []:
        lat = _latency(p)
        rows.append({
            "device_id": device_id, "ts": ts, "pipeline": _get(p, "name", "telemetry"),
            "fps_in": p.get("fps_in"), "fps_out": p.get("fps_out"),
            "frames_dropped": p.get("frames_dropped"), "errors": p.get("errors"),
            "p50_ms": lat["p50"], "p95_ms": lat["p95"], "p99_ms": lat["p99"],
            "model": p.get("model"), "version": p.get("version"),
            "backend": p.get("backend"), "precision": p.get("precision"),
        })  # fmt: skip
    dev = msg.get("device") or {}
    outbox = msg.get("outbox") or {}
    device = {
        "device_id": device_id, "ts": ts,
        "cpu_percent": dev.get("cpu_percent"), "mem_used_mb": dev.get("mem_used_mb"),
        "mem_total_mb": dev.get("mem_total_mb"), "disk_used_pct": dev.get("disk_used_pct"),
        "gpu_load_pct": dev.get("gpu_load_pct"),
        "temperatures": dev.get("temperatures_c"),
        "power": dev.get("power_mw"),
        "outbox_depth": outbox.get("depth"), "outbox_dropped": outbox.get("dropped"),
    }  # fmt: skip
    return rows, device


def event_row(msg: Mapping[str, Any]) -> dict[str, Any]:
    """One inference event → its row; the top label is the best-scoring class or detection."""
    when = msg.get("ts", msg.get("frame_time"))
    if when is None:
        raise BadRecord("event has neither 'ts' nor 'frame_time'; not stored", kind="event",
                        field="frame_time")  # fmt: skip
    detections = msg.get("detections") or []
    scored = [c for c in [*(msg.get("classifications") or []), *detections] if "score" in c]
    top = max(scored, key=lambda c: c["score"], default=None)
    return {
        "device_id": _get(msg, "device_id", "event"), "ts": _time(when, "event", "frame_time"),
        "pipeline": _get(msg, "pipeline", "event"), "model": msg.get("model"),
        "version": msg.get("version"), "frame_seq": _get(msg, "frame_seq", "event"),
        "top_label": None if top is None else top.get("label"),
        "top_score": None if top is None else top["score"],
        "n_detections": len(detections), "payload": dict(msg),
    }  # fmt: skip


def _text(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, storable in any text column: PostgreSQL text
    holds no U+0000 and neither backend takes lone surrogates (a reason may quote bad input)."""
    value = value[:limit].replace("\x00", "\\x00")
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def dead_letter_row(
    topic: str, payload: bytes, reason: str, *, now: datetime, keep: int = DEAD_LETTER_KEEP
) -> dict[str, Any]:
    """Pure: the ``dead_letters`` row of a message that could not be stored.

    Keeps the first ``keep`` bytes of the payload with its whole length and SHA-256, so a
    20 MB payload costs a few KiB and can still be matched against what a device sent.
    """
    return {
        "received_at": now, "topic": _text(topic, MAX_TOPIC),
        "payload": bytes(payload[:keep]), "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "reason": _text(reason, MAX_REASON),
    }  # fmt: skip


# --- the store -------------------------------------------------------------------------------


def snapshot_row(msg: Mapping[str, Any]) -> dict[str, Any]:
    """Pure: the ``snapshots`` row of one ``Snapshot`` dict.

    Raises:
        BadRecord: a key field is missing or the JPEG is not base64.
    """
    try:
        jpeg = base64.b64decode(_get(msg, "jpeg_b64", "snapshot"), validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise BadRecord(f"snapshot: jpeg_b64 is not base64: {e}", kind="snapshot",
                        field="jpeg_b64") from None  # fmt: skip
    return {
        "device_id": _get(msg, "device_id", "snapshot"),
        "ts": _time(_get(msg, "frame_time", "snapshot"), "snapshot", "frame_time"),
        "pipeline": _get(msg, "pipeline", "snapshot"),
        "model": msg.get("model"), "version": msg.get("version"),
        "frame_seq": _get(msg, "frame_seq", "snapshot"),
        "width": _get(msg, "width", "snapshot"), "height": _get(msg, "height", "snapshot"),
        "jpeg": jpeg,
    }  # fmt: skip


class Store:
    """Writes and reads of the ingest database; one per process, thread-safe (engine pool)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = postgresql if engine.dialect.name == "postgresql" else sqlite

    def close(self) -> None:
        """Close pooled connections."""
        self.engine.dispose()

    def _touch(self, conn: Connection, device_ids: set[str], now: datetime) -> None:
        """Make sure the devices exist (FK of pipeline_state, fleet view) and mark them seen."""
        if not device_ids:
            return
        ins = self._dialect.insert(DEVICES)
        conn.execute(
            ins.on_conflict_do_update(
                index_elements=["device_id"], set_={"last_seen": ins.excluded.last_seen}
            ),
            [{"device_id": d, "first_seen": now, "last_seen": now} for d in sorted(device_ids)],
        )

    def upsert_state(self, msg: Mapping[str, Any], *, now: datetime | None = None) -> None:
        """Store a birth message or last will (``DeviceState``)."""
        now = now or datetime.now(timezone.utc)
        row = {
            "device_id": _get(msg, "device_id", "state"), "online": _get(msg, "online", "state"),
            "agent_version": msg.get("agent_version"), "profile": msg.get("profile"),
            "contract": msg.get("contract"), "tags": dict(msg.get("tags") or {}),
            "groups": list(msg.get("groups") or []),
            "pipelines": list(msg.get("pipelines") or []), "first_seen": now, "last_seen": now,
        }  # fmt: skip
        ins = self._dialect.insert(DEVICES).values(row)
        keep = {"device_id", "first_seen"}
        stmt = ins.on_conflict_do_update(
            index_elements=["device_id"],
            set_={k: ins.excluded[k] for k in row if k not in keep},
        )
        with _guard(f"state of {row['device_id']}"), self.engine.begin() as conn:
            conn.execute(stmt)

    def upsert_reported(self, msg: Mapping[str, Any], *, now: datetime | None = None) -> None:
        """Store a ``ReportedState``: it is a full snapshot, so pipelines absent from it go."""
        self.upsert_reported_batch([msg], now=now)

    def upsert_reported_batch(
        self, msgs: Sequence[Mapping[str, Any]], *, now: datetime | None = None
    ) -> None:
        """Store many ``ReportedState``s in one transaction; per device, the last one wins
        (each is a full snapshot, and one device's messages arrive in order).

        Raises:
            BadRecord: a message lacks a key field; nothing of the batch is stored.
        """
        now = now or datetime.now(timezone.utc)
        latest: dict[str, Mapping[str, Any]] = {}
        for msg in msgs:
            latest[_get(msg, "device_id", "reported")] = msg
        rows = [
            {
                "device_id": device_id, "pipeline": _get(p, "name", "reported"),
                "phase": _get(p, "phase", "reported"),
                **{k: p.get(k) for k in ("active_model", "active_version", "target_model",
                                         "target_version", "backend", "precision", "last_error")},
                "desired_revision": msg.get("desired_revision"),
                "updated_at": _time(_get(p, "updated_at", "reported"), "reported", "updated_at"),
            }
            for device_id, msg in latest.items()
            for p in msg.get("pipelines") or []
        ]  # fmt: skip
        if not latest:
            return
        what = f"reported state of {next(iter(latest))}" + (
            f" and {len(latest) - 1} more devices" if len(latest) > 1 else ""
        )
        with _guard(what), self.engine.begin() as conn:
            self._touch(conn, set(latest), now)
            conn.execute(
                sa.delete(PIPELINE_STATE).where(PIPELINE_STATE.c.device_id.in_(sorted(latest)))
            )
            if rows:
                conn.execute(sa.insert(PIPELINE_STATE), rows)

    def add_telemetry(self, msg: Mapping[str, Any], *, now: datetime | None = None) -> int:
        """Store one telemetry message; returns the pipeline rows added (0 for a redelivery)."""
        return self.add_telemetry_batch([msg], now=now)

    def add_telemetry_batch(
        self, msgs: Sequence[Mapping[str, Any]], *, now: datetime | None = None
    ) -> int:
        """Store many telemetry messages in one transaction (one executemany per table).

        Returns:
            Pipeline rows added; rows already stored (redelivered messages) are not counted.

        Raises:
            BadRecord: a message lacks a key field; nothing of the batch is stored.
        """
        now = now or datetime.now(timezone.utc)
        rows: list[dict[str, Any]] = []
        devices: list[dict[str, Any]] = []
        for m in msgs:
            r, d = telemetry_rows(m)
            rows += r
            devices.append(d)

        def insert_new_sqlite(conn: Connection, table: sa.Table, recs: list[dict[str, Any]]) -> int:
            # The volume path on SQLite: one plain executemany of bound tuples. SQLAlchemy's
            # per-row compile and parameter building cost more CPU than SQLite's own insert;
            # the columns' bind processors (UtcDateTime, JSON) still make every value, so the
            # rows are the same as the Core path writes. sqlite3's executemany rowcount sums
            # the rows inserted; ON CONFLICT DO NOTHING skips redeliveries, not NULLs.
            cols, dialect = list(recs[0]), conn.dialect  # telemetry_rows: same keys in each
            types = [table.c[c].type.dialect_impl(dialect) for c in cols]
            procs = [(i, p) for i, t in enumerate(types)
                     if (p := t.bind_processor(dialect)) is not None]  # fmt: skip
            params = []
            for r in recs:
                vals = [r[c] for c in cols]
                for i, p in procs:
                    vals[i] = p(vals[i])
                params.append(tuple(vals))
            names = ", ".join('"' + c + '"' for c in cols)
            marks = ", ".join("?" * len(cols))
            sql = f"INSERT INTO {table.name} ({names}) VALUES ({marks}) ON CONFLICT DO NOTHING"
            return int(conn.exec_driver_sql(sql, params).rowcount)

        with _guard("telemetry batch"), self.engine.begin() as conn:
            self._touch(conn, {d["device_id"] for d in devices}, now)
            added = 0
            if self._dialect is sqlite:
                if rows:
                    added = insert_new_sqlite(conn, TELEMETRY, rows)
                if devices:
                    insert_new_sqlite(conn, DEVICE_TELEMETRY, devices)
                return added
            if rows:
                added = _insert_new(conn, self._dialect.insert(TELEMETRY), rows)
            conn.execute(self._dialect.insert(DEVICE_TELEMETRY).on_conflict_do_nothing(), devices)
            return added

    def add_events(self, msgs: Sequence[Mapping[str, Any]], *, now: datetime | None = None) -> int:
        """Store a batch of ``InferenceEvent`` dicts in one transaction; returns rows added.

        Raises:
            BadRecord: an event lacks a key field; nothing of the batch is stored.
        """
        now = now or datetime.now(timezone.utc)
        rows = [event_row(m) for m in msgs]
        if not rows:
            return 0
        with _guard("event batch"), self.engine.begin() as conn:
            self._touch(conn, {r["device_id"] for r in rows}, now)
            return _insert_new(conn, self._dialect.insert(EVENTS), rows)

    def add_snapshots(
        self, msgs: Sequence[Mapping[str, Any]], *, now: datetime | None = None
    ) -> int:
        """Store ``Snapshot`` dicts (``jpeg_b64`` decoded) in one transaction; returns rows added.

        Raises:
            BadRecord: a snapshot lacks a key field or its JPEG is not base64.
        """
        now = now or datetime.now(timezone.utc)
        rows = [snapshot_row(m) for m in msgs]
        if not rows:
            return 0
        with _guard("snapshot batch"), self.engine.begin() as conn:
            self._touch(conn, {r["device_id"] for r in rows}, now)
            return _insert_new(conn, self._dialect.insert(SNAPSHOTS), rows)

    def latest_snapshot(self, device_id: str, pipeline: str | None = None) -> dict[str, Any] | None:
        """The newest snapshot of a device (of one pipeline if given), or None."""
        q = sa.select(SNAPSHOTS).where(SNAPSHOTS.c.device_id == device_id)
        if pipeline is not None:
            q = q.where(SNAPSHOTS.c.pipeline == pipeline)
        q = q.order_by(SNAPSHOTS.c.ts.desc(), SNAPSHOTS.c.id.desc()).limit(1)
        with _guard("latest snapshot"), self.engine.connect() as conn:
            row = conn.execute(q).first()
        return dict(row._mapping) if row is not None else None

    def dead_letter(
        self,
        topic: str,
        payload: bytes,
        reason: str,
        *,
        now: datetime | None = None,
        keep: int = DEAD_LETTER_KEEP,
    ) -> None:
        """Keep a message that could not be parsed or stored, with why, for a human to see.

        Only the first ``keep`` bytes of the payload are kept (``dead_letter_row``).
        """
        self.add_dead_letters([(topic, payload, reason)], now=now, keep=keep)

    def add_dead_letters(
        self,
        letters: Sequence[tuple[str, bytes, str]],
        *,
        now: datetime | None = None,
        keep: int = DEAD_LETTER_KEEP,
    ) -> None:
        """Store many ``(topic, payload, reason)`` dead letters in one transaction.

        Raises:
            StoreUnavailable: the database is unreachable; nothing was stored.
        """
        if not letters:
            return
        now = now or datetime.now(timezone.utc)
        rows = [dead_letter_row(t, p, r, now=now, keep=keep) for t, p, r in letters]
        with _guard(f"dead letter from {rows[0]['topic']}"), self.engine.begin() as conn:
            conn.execute(sa.insert(DEAD_LETTERS), rows)
        for r in rows:
            log.warning("dead letter topic=%s bytes=%s sha256=%s reason=%s", r["topic"],
                        r["payload_bytes"], r["payload_sha256"], r["reason"][:200])  # fmt: skip

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead letters first: ``payload`` is the first bytes of the message (all of it
        when ``len(payload) == payload_bytes``), ``payload_sha256`` the hash of the whole."""
        q = sa.select(DEAD_LETTERS).order_by(DEAD_LETTERS.c.id.desc()).limit(limit)
        with _guard("read dead letters"), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def fleet(self, tag_filter: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """One row per device with its pipelines' model, phase and latest telemetry.

        Args:
            tag_filter: keep only devices whose tags hold all of these key/value pairs.
        """
        t = TELEMETRY
        latest = (
            sa.select(t.c.device_id, t.c.pipeline, sa.func.max(t.c.ts).label("ts"))
            .group_by(t.c.device_id, t.c.pipeline)
            .subquery()
        )
        tq = sa.select(t).join(
            latest,
            (t.c.device_id == latest.c.device_id)
            & (t.c.pipeline == latest.c.pipeline)
            & (t.c.ts == latest.c.ts),
        )
        with _guard("fleet view"), self.engine.connect() as conn:
            devices = conn.execute(sa.select(DEVICES).order_by(DEVICES.c.device_id)).all()
            states = conn.execute(sa.select(PIPELINE_STATE)).all()
            tele = conn.execute(tq).all()
        state_of = {(s.device_id, s.pipeline): s for s in states}
        tele_of = {(r.device_id, r.pipeline): r for r in tele}
        out = []
        for d in devices:
            tags = d.tags or {}
            if tag_filter and any(tags.get(k) != v for k, v in tag_filter.items()):
                continue
            names = dict.fromkeys(d.pipelines or [])
            names.update(dict.fromkeys(sorted(p for dev, p in state_of if dev == d.device_id)))
            names.update(dict.fromkeys(sorted(p for dev, p in tele_of if dev == d.device_id)))
            out.append({
                "device_id": d.device_id, "online": d.online, "last_seen": d.last_seen,
                "agent_version": d.agent_version, "profile": d.profile, "tags": tags,
                "groups": d.groups or [],
                "pipelines": [_pipeline_view(n, state_of.get((d.device_id, n)),
                                             tele_of.get((d.device_id, n))) for n in names],
            })  # fmt: skip
        return out

    def series(
        self, device_id: str, since: datetime, *, limit: int = 10_000
    ) -> dict[str, Any] | None:
        """One device's telemetry since ``since``, per pipeline and for the device, oldest first.

        Args:
            device_id: the device.
            since: keep rows with ``ts >= since`` (an aware datetime).
            limit: at most this many of the newest rows per table, so a chatty device cannot
                make one answer unbounded.

        Returns:
            ``{"pipelines": {name: [{ts, fps_out, p95_ms, errors}, …]}, "device": [{ts,
            cpu_percent, mem_used_mb, temperatures}, …], "truncated": bool}``, or None when the
            device is unknown.
        """
        cut = _time(since, "series", "since")
        t, dt = TELEMETRY, DEVICE_TELEMETRY
        tq = (
            sa.select(t.c.ts, t.c.pipeline, t.c.fps_out, t.c.p95_ms, t.c.errors)
            .where(t.c.device_id == device_id, t.c.ts >= cut)
            .order_by(t.c.ts.desc(), t.c.pipeline)
            .limit(limit)
        )
        dq = (
            sa.select(dt.c.ts, dt.c.cpu_percent, dt.c.mem_used_mb, dt.c.temperatures)
            .where(dt.c.device_id == device_id, dt.c.ts >= cut)
            .order_by(dt.c.ts.desc())
            .limit(limit)
        )
        known = sa.select(DEVICES.c.device_id).where(DEVICES.c.device_id == device_id)
        with _guard(f"series of {device_id}"), self.engine.connect() as conn:
            if conn.execute(known).first() is None:
                return None
            tele = conn.execute(tq).all()[::-1]  # newest `limit` rows, handed out oldest first
            dev = conn.execute(dq).all()[::-1]
        pipelines: dict[str, list[dict[str, Any]]] = {}
        for r in tele:
            pipelines.setdefault(r.pipeline, []).append(
                {"ts": r.ts, "fps_out": r.fps_out, "p95_ms": r.p95_ms, "errors": r.errors}
            )
        return {
            "pipelines": dict(sorted(pipelines.items())),
            "device": [dict(r._mapping) for r in dev],
            "truncated": len(tele) == limit or len(dev) == limit,
        }

    def retention(self, older_than: datetime) -> dict[str, int]:
        """Delete time series rows and dead letters older than ``older_than``; returns counts.

        Devices and pipeline state are current state, not history: they stay.
        """
        cut = _time(older_than, "retention", "older_than")
        with _guard("retention"), self.engine.begin() as conn:
            counts = {
                tbl.name: conn.execute(sa.delete(tbl).where(tbl.c.ts < cut)).rowcount
                for tbl in (TELEMETRY, DEVICE_TELEMETRY, EVENTS, SNAPSHOTS)
            }
            dl = sa.delete(DEAD_LETTERS).where(DEAD_LETTERS.c.received_at < cut)
            counts["dead_letters"] = conn.execute(dl).rowcount
        log.info("retention before %s deleted %s", cut.isoformat(), counts)
        return counts

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        with _guard("counts"), self.engine.connect() as conn:
            return {
                name: int(conn.execute(sa.select(sa.func.count()).select_from(tbl)).scalar() or 0)
                for name, tbl in TABLES.items()
            }

    def version(self) -> int:
        """The schema version of the database."""
        with _guard("schema version"), self.engine.connect() as conn:
            return schema_version(conn)


def _insert_new(conn: Connection, ins: Any, rows: list[dict[str, Any]]) -> int:
    """INSERT … ON CONFLICT DO NOTHING for many rows; returns how many were new.

    RETURNING counts them on both backends (psycopg's executemany rowcount does not) and lets
    SQLAlchemy batch the rows into multi-row VALUES statements ("insertmanyvalues").
    """
    res = conn.execute(ins.on_conflict_do_nothing().returning(ins.table.c.id), rows)
    return len(res.all())


def _pipeline_view(name: str, state: Any, tele: Any) -> dict[str, Any]:
    return {
        "name": name,
        "model": (state and state.active_model) or (tele and tele.model),
        "version": (state and state.active_version) or (tele and tele.version),
        "phase": state.phase if state else None,
        "last_error": state.last_error if state else None,
        "fps": tele.fps_out if tele else None,
        "p95_ms": tele.p95_ms if tele else None,
        "errors": tele.errors if tele else None,
        "telemetry_ts": tele.ts if tele else None,
    }


def open_store(url: str) -> Store:
    """Open (and migrate to ``LATEST``) the store at ``sqlite:///path`` or
    ``postgresql+psycopg://user@host:port/db``.

    Raises:
        StoreUnavailable: the database cannot be reached.
        BadDataError: its schema is newer than this code.
    """
    engine = make_engine(url)
    try:
        migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return Store(engine)


__all__ = [
    "DEAD_LETTERS",
    "DEAD_LETTER_KEEP",
    "DEVICES",
    "DEVICE_TELEMETRY",
    "EVENTS",
    "LATEST",
    "MIGRATIONS",
    "PIPELINE_STATE",
    "ROLLOUTS",
    "SNAPSHOTS",
    "TABLES",
    "TELEMETRY",
    "BadRecord",
    "Store",
    "StoreUnavailable",
    "UtcDateTime",
    "dead_letter_row",
    "event_row",
    "guard",
    "make_engine",
    "migrate",
    "open_store",
    "schema_version",
    "telemetry_rows",
]
