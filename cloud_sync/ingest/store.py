"""Adapter: the ingest store, SQLAlchemy Core over SQLite (default) or PostgreSQL (at scale).

Takes plain dicts (a validated wire message's ``model_dump(mode="json")``), so it does not
depend on the message models. Telemetry and events are written with ``ON CONFLICT DO NOTHING``
on their natural key, so a message MQTT delivers twice (QoS 1 is at-least-once) is stored once.
The schema is versioned: ``open_store`` applies the missing migrations in one transaction.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from agent.errors import BadDataError, TransportError

log = logging.getLogger(__name__)

MAX_REASON = 1000  # characters of a dead letter's reason kept
PG_MIGRATION_LOCK = 0x6564_6765_666C  # pg_advisory_xact_lock key: one migrator at a time


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


class StoreUnavailable(TransportError):
    """The database could not be reached or was busy; the write may be retried."""


# --- schema ----------------------------------------------------------------------------------


class UtcDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on both backends.

    SQLite has no time zone type: values are stored as naive UTC text (one fixed format, so the
    UNIQUE keys compare correctly) and read back with ``tzinfo=UTC``.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: sa.Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite rowid needs INTEGER


def _define(md: sa.MetaData, version: int) -> sa.MetaData:
    """The tables as they are at schema ``version`` (1 for migration 1, LATEST for queries)."""
    ts = UtcDateTime
    sa.Table(
        "devices", md,
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("online", sa.Boolean),  # NULL: never sent a birth message or will
        sa.Column("agent_version", sa.String(64)),
        sa.Column("profile", sa.String(64)),
        sa.Column("contract", sa.String(16)),
        sa.Column("tags", JSON),
        sa.Column("pipelines", JSON),
        *([sa.Column("groups", JSON)] if version >= 4 else []),
        sa.Column("first_seen", ts, nullable=False),
        sa.Column("last_seen", ts, nullable=False),
    )  # fmt: skip
    sa.Table(
        "pipeline_state", md,
        sa.Column("device_id", sa.String(64),
                  sa.ForeignKey("devices.device_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("pipeline", sa.String(64), primary_key=True),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("active_model", sa.String(128)),
        sa.Column("active_version", sa.String(64)),
        sa.Column("target_model", sa.String(128)),
        sa.Column("target_version", sa.String(64)),
        sa.Column("backend", sa.String(64)),
        sa.Column("precision", sa.String(8)),
        sa.Column("last_error", sa.Text),
        sa.Column("desired_revision", sa.BigInteger),
        sa.Column("updated_at", ts, nullable=False),
    )  # fmt: skip
    telemetry_v2 = (
        [sa.Column("backend", sa.String(64)), sa.Column("precision", sa.String(8))]
        if version >= 2
        else []
    )
    sa.Table(
        "telemetry", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("ts", ts, nullable=False),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("fps_in", sa.Float), sa.Column("fps_out", sa.Float),
        sa.Column("frames_dropped", sa.BigInteger), sa.Column("errors", sa.BigInteger),
        sa.Column("p50_ms", sa.Float), sa.Column("p95_ms", sa.Float), sa.Column("p99_ms", sa.Float),
        sa.Column("model", sa.String(128)), sa.Column("version", sa.String(64)),
        *telemetry_v2,
        # also the index for "latest row of each pipeline" (fleet view)
        sa.UniqueConstraint("device_id", "pipeline", "ts", name="uq_telemetry_key"),
        sa.Index("ix_telemetry_device_ts", "device_id", "ts"),
    )  # fmt: skip
    sa.Table(
        "device_telemetry", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("ts", ts, nullable=False),
        sa.Column("cpu_percent", sa.Float), sa.Column("mem_used_mb", sa.Float),
        sa.Column("mem_total_mb", sa.Float), sa.Column("disk_used_pct", sa.Float),
        sa.Column("gpu_load_pct", sa.Float),
        sa.Column("temperatures", JSON), sa.Column("power", JSON),
        sa.Column("outbox_depth", sa.BigInteger), sa.Column("outbox_dropped", sa.BigInteger),
        # also serves as the (device_id, ts) index
        sa.UniqueConstraint("device_id", "ts", name="uq_device_telemetry_key"),
    )  # fmt: skip
    sa.Table(
        "events", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("ts", ts, nullable=False),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128)), sa.Column("version", sa.String(64)),
        sa.Column("frame_seq", sa.BigInteger, nullable=False),
        sa.Column("top_label", sa.String(128)), sa.Column("top_score", sa.Float),
        sa.Column("n_detections", sa.Integer),
        sa.Column("payload", JSON),
        sa.UniqueConstraint("device_id", "pipeline", "ts", "frame_seq", name="uq_events_key"),
        sa.Index("ix_events_device_ts", "device_id", "ts"),
    )  # fmt: skip
    if version >= 3:
        sa.Table(
            "snapshots", md,
            sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
            sa.Column("device_id", sa.String(64), nullable=False),
            sa.Column("ts", ts, nullable=False),
            sa.Column("pipeline", sa.String(64), nullable=False),
            sa.Column("model", sa.String(128)), sa.Column("version", sa.String(64)),
            sa.Column("frame_seq", sa.BigInteger, nullable=False),
            sa.Column("width", sa.Integer, nullable=False),
            sa.Column("height", sa.Integer, nullable=False),
            sa.Column("jpeg", sa.LargeBinary, nullable=False),
            sa.UniqueConstraint("device_id", "pipeline", "ts", "frame_seq",
                                name="uq_snapshots_key"),
            sa.Index("ix_snapshots_device_ts", "device_id", "ts"),
        )  # fmt: skip
    if version >= 5:
        sa.Table(
            "rollouts", md,
            sa.Column("id", sa.String(64), primary_key=True),
            sa.Column("model", sa.String(128), nullable=False),
            sa.Column("version", sa.String(64), nullable=False),
            sa.Column("pipeline", sa.String(64)),  # NULL: every pipeline of each device
            sa.Column("status", sa.String(16), nullable=False),
            sa.Column("spec", JSON, nullable=False),  # RolloutSpec, JSON mode
            sa.Column("state", JSON, nullable=False),  # RolloutState, JSON mode
            sa.Column("created_at", ts, nullable=False),
            sa.Column("updated_at", ts, nullable=False),
            sa.Column("rev", sa.Integer, nullable=False),  # optimistic concurrency
            sa.Index("ix_rollouts_status", "status", "created_at"),
            sa.Index("ix_rollouts_model", "model", "version"),
        )  # fmt: skip
    sa.Table(
        "dead_letters", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("received_at", ts, nullable=False, index=True),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary),
        sa.Column("reason", sa.Text, nullable=False),
    )  # fmt: skip
    return md


SCHEMA_VERSION = sa.Table(
    "schema_version",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", UtcDateTime, nullable=False),
)


def _migration_1(conn: Connection) -> None:
    """Initial schema."""
    _define(sa.MetaData(), 1).create_all(conn)


def _migration_2(conn: Connection) -> None:
    """Telemetry rows keep the backend and precision, to tell fp16 from int8 on a dashboard."""
    conn.execute(sa.text("ALTER TABLE telemetry ADD COLUMN backend VARCHAR(64)"))
    conn.execute(sa.text("ALTER TABLE telemetry ADD COLUMN precision VARCHAR(8)"))


def _migration_3(conn: Connection) -> None:
    """Opt-in camera snapshots (JPEG), for pipelines that enable them."""
    _define(sa.MetaData(), 3).tables["snapshots"].create(conn)


def _migration_4(conn: Connection) -> None:
    """Devices report their groups, for rollout targets (``group:lobby``)."""
    typ = "JSONB" if conn.dialect.name == "postgresql" else "JSON"
    conn.execute(sa.text(f"ALTER TABLE devices ADD COLUMN groups {typ}"))


def _migration_5(conn: Connection) -> None:
    """Staged rollouts: spec and state of each, for the controller and ``edgefleet rollout``."""
    _define(sa.MetaData(), 5).tables["rollouts"].create(conn)


# Ordered: MIGRATIONS[i] takes the schema from version i to i + 1. Append only.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5,
]
LATEST = len(MIGRATIONS)
TABLES = _define(sa.MetaData(), LATEST).tables
DEVICES, PIPELINE_STATE = TABLES["devices"], TABLES["pipeline_state"]
TELEMETRY, DEVICE_TELEMETRY = TABLES["telemetry"], TABLES["device_telemetry"]
EVENTS, DEAD_LETTERS = TABLES["events"], TABLES["dead_letters"]
SNAPSHOTS, ROLLOUTS = TABLES["snapshots"], TABLES["rollouts"]


def schema_version(conn: Connection) -> int:
    """The version the database is at (0 for an empty database)."""
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    return int(conn.execute(sa.select(sa.func.max(SCHEMA_VERSION.c.version))).scalar() or 0)


def migrate(engine: Engine, upto: int = LATEST, *, now: datetime | None = None) -> int:
    """Apply the missing migrations up to ``upto`` in one transaction; returns the version.

    Safe to call from several workers at once: SQLite takes the write lock at BEGIN IMMEDIATE,
    PostgreSQL an advisory lock, so the second one finds the work done.

    Raises:
        BadDataError: the database is at a newer version than this code knows.
    """
    now = now or datetime.now(timezone.utc)
    with _guard("migrate"), engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_MIGRATION_LOCK)))
        SCHEMA_VERSION.create(conn, checkfirst=True)
        current = schema_version(conn)
        if current > LATEST:
            raise BadDataError(
                f"database schema is at version {current}, this edgefleet knows up to {LATEST};"
                " upgrade edgefleet, not opening the store"
            )
        for version in range(current + 1, upto + 1):
            MIGRATIONS[version - 1](conn)
            conn.execute(sa.insert(SCHEMA_VERSION).values(version=version, applied_at=now))
            log.info("ingest store migrated to schema version %s", version)
        return max(current, upto)


def make_engine(url: str) -> Engine:
    """An engine for ``sqlite:///path`` (WAL, foreign keys, real transactions) or PostgreSQL."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # The sqlite3 module's own transaction handling skips BEGIN before DDL, which would
            # make migrations non-atomic: take control of BEGIN ourselves (SQLAlchemy recipe).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoint, never corrupt
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            # IMMEDIATE: take the write lock up front, so a writer waits (busy timeout) instead
            # of failing when its read snapshot goes stale mid-transaction.
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True)


@contextmanager
def _guard(what: str) -> Iterator[None]:
    """Wrap driver errors into the two roots: bad data or a store that may come back."""
    try:
        yield
    except (sa_exc.IntegrityError, sa_exc.DataError, sa_exc.ProgrammingError) as e:
        raise BadDataError(f"{what} rejected by the database: {str(e.orig)[:300]}") from e
    except sa_exc.DBAPIError as e:
        raise StoreUnavailable(f"{what} failed, database unavailable: {str(e.orig)[:300]}") from e


guard = _guard  # for other adapters on this database (rollouts)


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
        self, topic: str, payload: bytes, reason: str, *, now: datetime | None = None
    ) -> None:
        """Keep a message that could not be parsed or stored, with why, for a human to see."""
        row = {
            "received_at": now or datetime.now(timezone.utc), "topic": topic,
            "payload": bytes(payload), "reason": reason[:MAX_REASON],
        }  # fmt: skip
        with _guard(f"dead letter from {topic}"), self.engine.begin() as conn:
            conn.execute(sa.insert(DEAD_LETTERS), [row])
        log.warning("dead letter topic=%s bytes=%s reason=%s", topic, len(payload), reason[:200])

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead letters first."""
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
    "DEVICES",
    "DEVICE_TELEMETRY",
    "EVENTS",
    "LATEST",
    "MIGRATIONS",
    "PIPELINE_STATE",
    "ROLLOUTS",
    "SNAPSHOTS",
    "TELEMETRY",
    "BadRecord",
    "Store",
    "StoreUnavailable",
    "event_row",
    "guard",
    "make_engine",
    "migrate",
    "open_store",
    "schema_version",
    "telemetry_rows",
]
