"""Adapter: the ingest database itself — engine, tables, versioned migrations, error mapping.

The tables are defined as they are at each schema version (``_define``), so a migration creates
exactly what that version had; ``migrate`` applies the missing ones in one transaction.
``guard`` maps driver errors to the project's two roots (bad data, or a store that may come
back); the store (``store.py``) and the rollout adapters write through it.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from agent.common.errors import BadDataError, TransportError

log = logging.getLogger(__name__)

PG_MIGRATION_LOCK = 0x6564_6765_666C  # pg_advisory_xact_lock key: one migrator at a time
SQLITE_BUSY_TIMEOUT_S = 30.0  # a writer waits this long for SQLite's lock (URL ?timeout=S)


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
    dead_v6: list[sa.Column[Any]] = [
        sa.Column("payload_bytes", sa.BigInteger),  # the whole payload's length
        sa.Column("payload_sha256", sa.String(64)),
    ]
    sa.Table(
        "dead_letters", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("received_at", ts, nullable=False, index=True),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary),  # v6: the first bytes only (store.py)
        sa.Column("reason", sa.Text, nullable=False),
        *(dead_v6 if version >= 6 else []),
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


def _migration_6(conn: Connection) -> None:
    """Dead letters keep a bounded prefix of the payload, its whole length and its SHA-256.

    Rows from before hold their whole payload: measured and hashed here, one row at a time so
    that a table of large payloads does not have to fit in memory.
    """
    conn.execute(sa.text("ALTER TABLE dead_letters ADD COLUMN payload_bytes BIGINT"))
    conn.execute(sa.text("ALTER TABLE dead_letters ADD COLUMN payload_sha256 VARCHAR(64)"))
    dl = _define(sa.MetaData(), 6).tables["dead_letters"]
    ids = conn.execute(sa.select(dl.c.id).order_by(dl.c.id)).scalars().all()
    for row_id in ids:
        payload = conn.execute(sa.select(dl.c.payload).where(dl.c.id == row_id)).scalar() or b""
        conn.execute(
            sa.update(dl)
            .where(dl.c.id == row_id)
            .values(payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
        )


# Ordered: MIGRATIONS[i] takes the schema from version i to i + 1. Append only.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5, _migration_6,
]  # fmt: skip
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
    """An engine for ``sqlite:///path`` (WAL, foreign keys, real transactions) or PostgreSQL.

    A SQLite writer waits ``SQLITE_BUSY_TIMEOUT_S`` for another writer's lock, or what the URL
    says (``sqlite:///path?timeout=2``), then fails as ``StoreUnavailable``.
    """
    if url.startswith("sqlite"):
        given = sa.engine.make_url(url).query.get("timeout", str(SQLITE_BUSY_TIMEOUT_S))
        timeout = float(given if isinstance(given, str) else given[-1])
        engine = sa.create_engine(url, connect_args={"timeout": timeout})

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
    """Wrap driver errors into the two roots: bad data or a store that may come back.

    Besides the driver's own errors: a pool that hands out no connection in time is a store
    that may come back; a value the driver cannot bind (a StatementError, or sqlite3's bare
    OverflowError for an integer beyond 64 bits) is bad data.
    """
    try:
        yield
    except (sa_exc.IntegrityError, sa_exc.DataError, sa_exc.ProgrammingError) as e:
        raise BadDataError(f"{what} rejected by the database: {str(e.orig)[:300]}") from e
    except sa_exc.DBAPIError as e:
        raise StoreUnavailable(f"{what} failed, database unavailable: {str(e.orig)[:300]}") from e
    except (sa_exc.TimeoutError, sa_exc.DisconnectionError) as e:
        raise StoreUnavailable(f"{what} failed, no database connection: {e}") from e
    except sa_exc.StatementError as e:
        raise BadDataError(f"{what} rejected by the driver: {str(e.orig)[:300]}") from e
    except OverflowError as e:  # sqlite3 raises it as is; SQLAlchemy does not wrap it
        raise BadDataError(f"{what} rejected by the driver: {e}") from e


guard = _guard  # for other adapters on this database (rollouts)
