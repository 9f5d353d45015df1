"""Adapter: the ingest database's tables and their versioned migrations.

The tables are defined as they are at each schema version (``_define``), so a migration creates
exactly what that version had; ``migrate`` applies the missing ones in one transaction. The
engine and the driver-error mapping are in ``db.py``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from agent.common.errors import BadDataError
from cloud_sync.ingest import partitions
from cloud_sync.ingest.db import guard

log = logging.getLogger(__name__)

PG_MIGRATION_LOCK = 0x6564_6765_666C  # pg_advisory_xact_lock key: one migrator at a time


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
    _devices(md, version)
    _pipeline_state(md, version)
    _telemetry(md, version)
    _device_telemetry(md)
    _events(md)
    if version >= 3:
        _snapshots(md)
    if version >= 5:
        _rollouts(md)
    _dead_letters(md, version)
    if version >= 7:
        _region_counts(md)
    if version >= 8:
        _leases(md)
    if version >= 9:
        _device_config(md)
    return md


def _devices(md: sa.MetaData, version: int) -> sa.Table:
    return sa.Table(
        "devices", md,
        sa.Column("device_id", sa.String(64), primary_key=True),
        sa.Column("online", sa.Boolean),  # NULL: never sent a birth message or will
        sa.Column("agent_version", sa.String(64)),
        sa.Column("profile", sa.String(64)),
        sa.Column("contract", sa.String(16)),
        sa.Column("tags", JSON),
        sa.Column("pipelines", JSON),
        *([sa.Column("groups", JSON)] if version >= 4 else []),
        sa.Column("first_seen", UtcDateTime, nullable=False),
        sa.Column("last_seen", UtcDateTime, nullable=False),
    )  # fmt: skip


def _pipeline_state(md: sa.MetaData, version: int) -> sa.Table:
    v10: list[sa.Column[Any]] = (
        [sa.Column("waiting", sa.Text), sa.Column("source_ended", sa.Boolean)]
        if version >= 10
        else []
    )
    return sa.Table(
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
        sa.Column("updated_at", UtcDateTime, nullable=False),
        *v10,
    )  # fmt: skip


def _telemetry(md: sa.MetaData, version: int) -> sa.Table:
    v2 = (
        [sa.Column("backend", sa.String(64)), sa.Column("precision", sa.String(8))]
        if version >= 2
        else []
    )
    return sa.Table(
        "telemetry", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("ts", UtcDateTime, nullable=False),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("fps_in", sa.Float), sa.Column("fps_out", sa.Float),
        sa.Column("frames_dropped", sa.BigInteger), sa.Column("errors", sa.BigInteger),
        sa.Column("p50_ms", sa.Float), sa.Column("p95_ms", sa.Float), sa.Column("p99_ms", sa.Float),
        sa.Column("model", sa.String(128)), sa.Column("version", sa.String(64)),
        *v2,
        # also the index for "latest row of each pipeline" (fleet view)
        sa.UniqueConstraint("device_id", "pipeline", "ts", name="uq_telemetry_key"),
        sa.Index("ix_telemetry_device_ts", "device_id", "ts"),
    )  # fmt: skip


def _device_telemetry(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "device_telemetry", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("ts", UtcDateTime, nullable=False),
        sa.Column("cpu_percent", sa.Float), sa.Column("mem_used_mb", sa.Float),
        sa.Column("mem_total_mb", sa.Float), sa.Column("disk_used_pct", sa.Float),
        sa.Column("gpu_load_pct", sa.Float),
        sa.Column("temperatures", JSON), sa.Column("power", JSON),
        sa.Column("outbox_depth", sa.BigInteger), sa.Column("outbox_dropped", sa.BigInteger),
        # also serves as the (device_id, ts) index
        sa.UniqueConstraint("device_id", "ts", name="uq_device_telemetry_key"),
    )  # fmt: skip


def _events(md: sa.MetaData) -> sa.Table:
    return sa.Table(
        "events", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("ts", UtcDateTime, nullable=False),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("model", sa.String(128)), sa.Column("version", sa.String(64)),
        sa.Column("frame_seq", sa.BigInteger, nullable=False),
        sa.Column("top_label", sa.String(128)), sa.Column("top_score", sa.Float),
        sa.Column("n_detections", sa.Integer),
        sa.Column("payload", JSON),
        sa.UniqueConstraint("device_id", "pipeline", "ts", "frame_seq", name="uq_events_key"),
        sa.Index("ix_events_device_ts", "device_id", "ts"),
    )  # fmt: skip


def _snapshots(md: sa.MetaData) -> sa.Table:
    """Since version 3."""
    return sa.Table(
        "snapshots", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("ts", UtcDateTime, nullable=False),
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


def _rollouts(md: sa.MetaData) -> sa.Table:
    """Since version 5."""
    return sa.Table(
        "rollouts", md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(128), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("pipeline", sa.String(64)),  # NULL: every pipeline of each device
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("spec", JSON, nullable=False),  # RolloutSpec, JSON mode
        sa.Column("state", JSON, nullable=False),  # RolloutState, JSON mode
        sa.Column("created_at", UtcDateTime, nullable=False),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.Column("rev", sa.Integer, nullable=False),  # optimistic concurrency
        sa.Index("ix_rollouts_status", "status", "created_at"),
        sa.Index("ix_rollouts_model", "model", "version"),
    )  # fmt: skip


def _dead_letters(md: sa.MetaData, version: int) -> sa.Table:
    v6: list[sa.Column[Any]] = [
        sa.Column("payload_bytes", sa.BigInteger),  # the whole payload's length
        sa.Column("payload_sha256", sa.String(64)),
    ]
    return sa.Table(
        "dead_letters", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("received_at", UtcDateTime, nullable=False, index=True),
        sa.Column("topic", sa.Text, nullable=False),
        sa.Column("payload", sa.LargeBinary),  # v6: the first bytes only (rows.py)
        sa.Column("reason", sa.Text, nullable=False),
        *(v6 if version >= 6 else []),
    )  # fmt: skip


def _region_counts(md: sa.MetaData) -> sa.Table:
    """Since version 7: the zone and line counts of each telemetry message, one row per zone or
    line and class. Counters run from the start of the agent (a restart or a reload starts them
    from zero again; reads handle that like Prometheus' ``increase``). Zone rows fill
    ``entered``/``exited``/``dwell``/``inside`` (``exited`` is the contract's ``left``, a word
    SQL reserves), line rows ``crossed_in``/``crossed_out``; the other columns stay NULL."""
    return sa.Table(
        "region_counts", md,
        sa.Column("id", ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("device_id", sa.String(64), nullable=False),
        sa.Column("ts", UtcDateTime, nullable=False),
        sa.Column("pipeline", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),  # "zone" or "line"
        sa.Column("region", sa.String(64), nullable=False),
        sa.Column("label", sa.String(128), nullable=False),
        sa.Column("entered", sa.BigInteger), sa.Column("exited", sa.BigInteger),
        sa.Column("dwell", sa.BigInteger), sa.Column("inside", sa.BigInteger),
        sa.Column("crossed_in", sa.BigInteger), sa.Column("crossed_out", sa.BigInteger),
        # also the index of one series' samples in time order (latest, increase)
        sa.UniqueConstraint("device_id", "pipeline", "kind", "region", "label", "ts",
                            name="uq_region_counts_key"),
        sa.Index("ix_region_counts_ts", "ts"),  # retention, fleet-wide windows
    )  # fmt: skip


def _leases(md: sa.MetaData) -> sa.Table:
    """Since version 8: leases, so one process at a time acts as e.g. the rollout controller
    (``cloud_sync/rollout/lease.py``). Times are seconds since the epoch on the database's
    clock (``expires_at`` 0: free); ``fencing`` goes up by one with every new holder."""
    return sa.Table(
        "leases", md,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(200)),  # NULL: free (released or never taken)
        sa.Column("fencing", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
        sa.Column("acquired_at", sa.Float),
        sa.Column("renewed_at", sa.Float),
    )  # fmt: skip


def _device_config(md: sa.MetaData) -> sa.Table:
    """Since version 9: the pipeline configuration each device reports (``ReportedState.config``,
    contract 1.3): the hash running (NULL: its local file's) and the last remote attempt. One row
    per device that reported one, replaced by each reported state; never the document."""
    return sa.Table(
        "device_config", md,
        sa.Column("device_id", sa.String(64),
                  sa.ForeignKey("devices.device_id", ondelete="CASCADE"), primary_key=True),
        sa.Column("hash", sa.String(64)),
        sa.Column("revision", sa.BigInteger),
        sa.Column("target_hash", sa.String(64)),
        sa.Column("status", sa.String(16)),
        sa.Column("reason", sa.Text),
        sa.Column("updated_at", UtcDateTime, nullable=False),
    )  # fmt: skip


SCHEMA_VERSION = sa.Table(
    "schema_version",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("applied_at", UtcDateTime, nullable=False),
)


def _create_table(conn: Connection, version: int, table: str) -> None:
    """Create ``table`` as it is at ``version``."""
    _define(sa.MetaData(), version).tables[table].create(conn)


def _add_columns(conn: Connection, version: int, table: str, *columns: str) -> None:
    """``ALTER TABLE … ADD COLUMN`` for ``columns``, typed as ``version`` defines them."""
    tbl = _define(sa.MetaData(), version).tables[table]
    for name in columns:
        typ = tbl.c[name].type.compile(dialect=conn.dialect)  # e.g. JSON, or JSONB on PostgreSQL
        conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {name} {typ}"))


def _migration_1(conn: Connection) -> None:
    """Initial schema."""
    _define(sa.MetaData(), 1).create_all(conn)


def _migration_2(conn: Connection) -> None:
    """Telemetry rows keep the backend and precision, to tell fp16 from int8 on a dashboard."""
    _add_columns(conn, 2, "telemetry", "backend", "precision")


def _migration_3(conn: Connection) -> None:
    """Opt-in camera snapshots (JPEG), for pipelines that enable them."""
    _create_table(conn, 3, "snapshots")


def _migration_4(conn: Connection) -> None:
    """Devices report their groups, for rollout targets (``group:lobby``)."""
    _add_columns(conn, 4, "devices", "groups")


def _migration_5(conn: Connection) -> None:
    """Staged rollouts: spec and state of each, for the controller and ``edgefleet rollout``."""
    _create_table(conn, 5, "rollouts")


def _migration_6(conn: Connection) -> None:
    """Dead letters keep a bounded prefix of the payload, its whole length and its SHA-256.

    Rows from before hold their whole payload: measured and hashed here, one row at a time so
    that a table of large payloads does not have to fit in memory.
    """
    _add_columns(conn, 6, "dead_letters", "payload_bytes", "payload_sha256")
    dl = _define(sa.MetaData(), 6).tables["dead_letters"]
    ids = conn.execute(sa.select(dl.c.id).order_by(dl.c.id)).scalars().all()
    for row_id in ids:
        payload = conn.execute(sa.select(dl.c.payload).where(dl.c.id == row_id)).scalar() or b""
        conn.execute(
            sa.update(dl)
            .where(dl.c.id == row_id)
            .values(payload_bytes=len(payload), payload_sha256=hashlib.sha256(payload).hexdigest())
        )


def _migration_7(conn: Connection) -> None:
    """Zone and line counts per telemetry message (contract 1.1), for the fleet's counts."""
    _create_table(conn, 7, "region_counts")


def _migration_8(conn: Connection) -> None:
    """Leases: one active rollout controller at a time (issue 20)."""
    _create_table(conn, 8, "leases")


def _migration_9(conn: Connection) -> None:
    """The pipeline configuration each device runs and how its last remote one went (1.3)."""
    _create_table(conn, 9, "device_config")


def _migration_10(conn: Connection) -> None:
    """What each pipeline's update waits for (a maintenance window …) and whether its source
    has ended (contract 1.3), for ``fleet status`` and the fleet page."""
    _add_columns(conn, 10, "pipeline_state", "waiting", "source_ended")


def _migration_11(conn: Connection) -> None:
    """PostgreSQL: the time series with the volume (telemetry, device telemetry, events, zone
    and line counts) partitioned by day, so retention drops days instead of deleting rows
    (``partitions.py``; docs/scaling.md). SQLite: nothing changes."""
    if conn.dialect.name != "postgresql":
        return
    now = conn.execute(sa.select(sa.func.now())).scalar_one()  # the server's clock
    md = _define(sa.MetaData(), 11)
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(partitions.PG_PARTITION_LOCK)))
    for name in partitions.PARTITIONED:
        partitions.convert(conn, md.tables[name], now)


# Ordered: MIGRATIONS[i] takes the schema from version i to i + 1. Append only.
MIGRATIONS: list[Callable[[Connection], None]] = [
    _migration_1, _migration_2, _migration_3, _migration_4, _migration_5, _migration_6,
    _migration_7, _migration_8, _migration_9, _migration_10, _migration_11,
]  # fmt: skip
LATEST = len(MIGRATIONS)
TABLES = _define(sa.MetaData(), LATEST).tables
DEVICES, PIPELINE_STATE = TABLES["devices"], TABLES["pipeline_state"]
TELEMETRY, DEVICE_TELEMETRY = TABLES["telemetry"], TABLES["device_telemetry"]
EVENTS, DEAD_LETTERS = TABLES["events"], TABLES["dead_letters"]
SNAPSHOTS, ROLLOUTS = TABLES["snapshots"], TABLES["rollouts"]
REGION_COUNTS, LEASES = TABLES["region_counts"], TABLES["leases"]
DEVICE_CONFIG = TABLES["device_config"]


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
    with guard("migrate"), engine.begin() as conn:
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
