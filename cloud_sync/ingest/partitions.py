"""Adapter: the PostgreSQL time-series tables partitioned by day — create ahead, convert, drop.

On PostgreSQL ``telemetry``, ``device_telemetry``, ``events`` and ``region_counts`` are
partitioned by range on ``ts`` (migration 11, ``convert``): one partition per UTC day, named
``<table>_pYYYYMMDD``, and a ``<table>_default`` partition for rows of a day that has none (a
device's clock far off, an ingest worker down for longer than ``DAYS_AHEAD``), so no write fails
for lack of a partition. The keys gain ``ts`` where PostgreSQL asks for it (the primary key is
``(id, ts)``; the unique keys already hold ``ts``). SQLite has no partitions: nothing here runs
on it.

``ensure`` creates the days ahead (the ingest process at start and every hour); a day whose rows
already sit in the default partition gets them moved into its new partition in the same
transaction. ``drop_before`` is retention: whole days go by ``DROP TABLE``, counted first. Both
take one advisory lock, so any number of ingest processes can run them at once.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from datetime import date, datetime, time, timedelta, timezone

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cloud_sync.ingest.db import guard

log = logging.getLogger(__name__)

PARTITIONED = ("telemetry", "device_telemetry", "events", "region_counts")
DAYS_AHEAD = 7  # partitions exist for today and this many days after (UTC)
BACKFILL_DAYS = 366  # migration 11: rows older than this many days go to the default partition
LOCK_TIMEOUT = "10s"  # DDL waits this long for readers and writers, then tries next round
PG_PARTITION_LOCK = 0x6564_6765_7061  # pg_advisory_xact_lock key: one maintainer at a time
_DAY = re.compile(r"_p(\d{8})$")


def day_partition(table: str, day: date) -> str:
    """``telemetry_p20261204``: the partition of ``table`` holding ``day`` (UTC)."""
    return f"{table}_p{day:%Y%m%d}"


def default_partition(table: str) -> str:
    """``telemetry_default``: the partition of rows of a day that has no partition."""
    return f"{table}_default"


def utc_day(t: datetime) -> date:
    """The UTC day of ``t`` (aware)."""
    return t.astimezone(timezone.utc).date()


def _range(day: date) -> dict[str, datetime]:
    lo = datetime.combine(day, time(), timezone.utc)
    return {"lo": lo, "hi": lo + timedelta(days=1)}


def _bounds(day: date) -> str:
    """``FROM ('…+00') TO ('…+00')``: explicit offsets, whatever the session's TimeZone."""
    r = _range(day)
    return f"FROM ('{r['lo'].isoformat(' ')}') TO ('{r['hi'].isoformat(' ')}')"


def is_partitioned(conn: Connection, table: str) -> bool:
    kind = conn.execute(
        sa.text("SELECT relkind FROM pg_class WHERE oid = to_regclass(:t)"), {"t": table}
    ).scalar()
    return kind == "p"


def day_partitions(conn: Connection, table: str) -> dict[date, str]:
    """The day partitions ``table`` has now (by name; the default partition is not one)."""
    names = conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": table},
    ).scalars()
    out = {}
    for name in names:
        m = _DAY.search(name)
        day = datetime.strptime(m[1], "%Y%m%d").date() if m else None
        if day is not None and name == day_partition(table, day):
            out[day] = name
    return out


def _lock(conn: Connection) -> None:
    conn.execute(sa.text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(PG_PARTITION_LOCK)))


def add_days(conn: Connection, table: str, days: Iterable[date]) -> list[str]:
    """Create the partitions of ``days`` that ``table`` lacks; returns the names created.

    A day whose rows are in the default partition (PostgreSQL refuses to create a partition
    then) is created detached, the rows moved into it and it attached, all in ``conn``'s
    transaction. Callers hold the advisory lock (``ensure``, migration 11).
    """
    have = day_partitions(conn, table)
    made = []
    dflt = default_partition(table)
    for day in sorted(set(days) - set(have)):
        name = day_partition(table, day)
        stray = conn.execute(
            sa.text(f"SELECT EXISTS (SELECT 1 FROM {dflt} WHERE ts >= :lo AND ts < :hi)"),
            _range(day),
        ).scalar()
        if not stray:
            conn.execute(
                sa.text(f"CREATE TABLE {name} PARTITION OF {table} FOR VALUES {_bounds(day)}")
            )
        else:
            conn.execute(sa.text(f"CREATE TABLE {name} (LIKE {table} INCLUDING DEFAULTS)"))
            moved = conn.execute(
                sa.text(
                    f"WITH moved AS (DELETE FROM {dflt} WHERE ts >= :lo AND ts < :hi RETURNING *)"
                    f" INSERT INTO {name} SELECT * FROM moved"
                ),
                _range(day),
            ).rowcount
            conn.execute(sa.text(f"ALTER TABLE {table} ATTACH PARTITION {name} FOR VALUES "
                                 f"{_bounds(day)}"))  # fmt: skip
            log.info("partition %s created; %s rows moved from %s", name, moved, dflt)
        made.append(name)
    return made


def ahead(now: datetime, days_ahead: int = DAYS_AHEAD) -> list[date]:
    """Today (UTC, from ``now``) and the ``days_ahead`` days after it."""
    today = utc_day(now)
    return [today + timedelta(days=i) for i in range(days_ahead + 1)]


def ensure(engine: Engine, now: datetime | None = None, days_ahead: int = DAYS_AHEAD) -> list[str]:
    """Create today's and the next ``days_ahead`` days' partitions where missing; returns the
    names created. Idempotent; safe from several processes at once (an advisory lock, one
    transaction per table). A no-op on SQLite and on tables not (yet) partitioned.

    Raises:
        StoreUnavailable: the database is gone, or a lock was not had in ``LOCK_TIMEOUT``.
    """
    if engine.dialect.name != "postgresql":
        return []
    days = ahead(now or datetime.now(timezone.utc), days_ahead)
    made: list[str] = []
    for table in PARTITIONED:
        with guard(f"partitions of {table}"), engine.begin() as conn:
            _lock(conn)
            if is_partitioned(conn, table):
                made += add_days(conn, table, days)
    if made:
        log.info("partitions created: %s", ", ".join(made))
    return made


def drop_before(conn: Connection, table: str, cut: datetime) -> int:
    """Drop the day partitions of ``table`` wholly before ``cut``; returns the rows they held.

    Each is counted, then dropped (``DROP TABLE`` locks the parent, then the partition: the
    order writers take them, so no deadlock; a brief ``ACCESS EXCLUSIVE`` on the parent). Not
    locked against writers while counted, which would stop ingest for as long: a row a device
    sends for that old day in between goes uncounted.
    """
    _lock(conn)
    rows = 0
    for day, name in sorted(day_partitions(conn, table).items()):
        if _range(day)["hi"] > cut:
            continue
        rows += int(conn.execute(sa.text(f"SELECT count(*) FROM {name}")).scalar() or 0)
        conn.execute(sa.text(f"DROP TABLE {name}"))
        log.info("retention dropped partition %s", name)
    return rows


def convert(conn: Connection, table: sa.Table, now: datetime) -> None:
    """Migration 11 for one table: the plain table becomes a partitioned one with its rows.

    Renamed aside, a partitioned table of the same columns (``LIKE``; the ``id`` sequence moves
    over) with ``PRIMARY KEY (id, ts)`` and the table's unique keys and indexes, a default
    partition, a partition per day that has rows (from ``BACKFILL_DAYS`` ago to ``DAYS_AHEAD``
    ahead) and for today, the rows copied, the old table dropped — in the caller's transaction.
    """
    name, old = table.name, f"{table.name}_v10"
    conn.execute(sa.text(f"ALTER TABLE {name} RENAME TO {old}"))
    seq = conn.execute(sa.text("SELECT pg_get_serial_sequence(:t, 'id')"), {"t": old}).scalar()
    # the new table's constraints and indexes take these names: drop the old ones first
    for con in conn.execute(sa.text("SELECT conname FROM pg_constraint WHERE conrelid ="
                                    " to_regclass(:t) AND contype IN ('p', 'u')"),
                            {"t": old}).scalars().all():  # fmt: skip
        conn.execute(sa.text(f'ALTER TABLE {old} DROP CONSTRAINT "{con}"'))
    for ix in conn.execute(sa.text("SELECT indexname FROM pg_indexes WHERE tablename = :t"),
                           {"t": old}).scalars().all():  # fmt: skip
        conn.execute(sa.text(f'DROP INDEX "{ix}"'))
    conn.execute(
        sa.text(f"CREATE TABLE {name} (LIKE {old} INCLUDING DEFAULTS) PARTITION BY RANGE (ts)")
    )
    if seq:
        conn.execute(sa.text(f"ALTER SEQUENCE {seq} OWNED BY {name}.id"))
    conn.execute(sa.text(f"ALTER TABLE {name} ADD CONSTRAINT {name}_pkey PRIMARY KEY (id, ts)"))
    for c in table.constraints:
        if isinstance(c, sa.UniqueConstraint):
            conn.execute(sa.schema.AddConstraint(c))
    for ix in table.indexes:
        conn.execute(sa.schema.CreateIndex(ix))
    conn.execute(sa.text(f"CREATE TABLE {default_partition(name)} PARTITION OF {name} DEFAULT"))
    since = utc_day(now) - timedelta(days=BACKFILL_DAYS)
    later = ahead(now)
    had = conn.execute(
        sa.text(
            f"SELECT DISTINCT (ts AT TIME ZONE 'UTC')::date FROM {old} WHERE ts >= :lo AND ts < :hi"
        ),
        {"lo": _range(since)["lo"], "hi": _range(later[-1])["hi"]},
    ).scalars()
    add_days(conn, name, {*had, utc_day(now)})  # the days ahead: ensure()
    cols = ", ".join(f'"{c}"' for c in table.c.keys())  # noqa: SIM118 - the names
    n = conn.execute(sa.text(f"INSERT INTO {name} ({cols}) SELECT {cols} FROM {old}")).rowcount
    conn.execute(sa.text(f"DROP TABLE {old}"))
    log.info("%s partitioned by day: %s rows moved", name, n)
