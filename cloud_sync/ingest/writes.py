"""Adapter: the ingest store's writes — devices, pipeline state, time series, dead letters.

Telemetry, events and snapshots are written with ``ON CONFLICT DO NOTHING`` on their natural
key, so a message MQTT delivers twice (QoS 1 is at-least-once) is stored once. Each batch is
one transaction: a message that cannot be mapped (``rows.BadRecord``) stores nothing of it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, time, timezone
from types import ModuleType
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine import Connection, Engine

from cloud_sync.ingest.db import guard
from cloud_sync.ingest.partitions import drop_before, ensure, utc_day
from cloud_sync.ingest.rows import (
    DEAD_LETTER_KEEP,
    dead_letter_row,
    event_row,
    region_count_rows,
    reported_config_rows,
    reported_rows,
    snapshot_row,
    state_row,
    telemetry_rows,
    utc_time,
)
from cloud_sync.ingest.schema import (
    DEAD_LETTERS,
    DEVICE_CONFIG,
    DEVICE_TELEMETRY,
    DEVICES,
    EVENTS,
    PIPELINE_STATE,
    REGION_COUNTS,
    SNAPSHOTS,
    TELEMETRY,
)

log = logging.getLogger(__name__)


class StoreWrites:
    """The writing half of ``store.Store`` (which sets ``engine`` and ``_dialect``)."""

    engine: Engine
    _dialect: ModuleType  # sqlalchemy.dialects.postgresql or .sqlite: their insert()

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
        row = state_row(msg, now=now)
        ins = self._dialect.insert(DEVICES).values(row)
        keep = {"device_id", "first_seen"}
        stmt = ins.on_conflict_do_update(
            index_elements=["device_id"],
            set_={k: ins.excluded[k] for k in row if k not in keep},
        )
        with guard(f"state of {row['device_id']}"), self.engine.begin() as conn:
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
        devices, rows = reported_rows(msgs)
        configs = reported_config_rows(msgs)
        if not devices:
            return
        what = f"reported state of {devices[0]}" + (
            f" and {len(devices) - 1} more devices" if len(devices) > 1 else ""
        )
        with guard(what), self.engine.begin() as conn:
            self._touch(conn, set(devices), now)
            conn.execute(
                sa.delete(PIPELINE_STATE).where(PIPELINE_STATE.c.device_id.in_(sorted(devices)))
            )
            if rows:
                conn.execute(sa.insert(PIPELINE_STATE), rows)
            conn.execute(
                sa.delete(DEVICE_CONFIG).where(DEVICE_CONFIG.c.device_id.in_(sorted(devices)))
            )
            if configs:
                conn.execute(sa.insert(DEVICE_CONFIG), configs)

    def add_telemetry(self, msg: Mapping[str, Any], *, now: datetime | None = None) -> int:
        """Store one telemetry message; returns the pipeline rows added (0 for a redelivery)."""
        return self.add_telemetry_batch([msg], now=now)

    def add_telemetry_batch(
        self, msgs: Sequence[Mapping[str, Any]], *, now: datetime | None = None
    ) -> int:
        """Store many telemetry messages in one transaction (one executemany per table): the
        pipeline rows, the device rows and the zone/line count rows (``region_counts``).

        Returns:
            Pipeline rows added; rows already stored (redelivered messages) are not counted.

        Raises:
            BadRecord: a message lacks a key field; nothing of the batch is stored.
        """
        now = now or datetime.now(timezone.utc)
        rows: list[dict[str, Any]] = []
        devices: list[dict[str, Any]] = []
        counts: list[dict[str, Any]] = []
        for m in msgs:
            r, d = telemetry_rows(m)
            rows += r
            devices.append(d)
            counts += region_count_rows(m)
        with guard("telemetry batch"), self.engine.begin() as conn:
            self._touch(conn, {d["device_id"] for d in devices}, now)
            added = 0
            if self._dialect is sqlite:
                if rows:
                    added = _insert_new_sqlite(conn, TELEMETRY, rows)
                if devices:
                    _insert_new_sqlite(conn, DEVICE_TELEMETRY, devices)
                if counts:
                    _insert_new_sqlite(conn, REGION_COUNTS, counts)
                return added
            if rows:
                added = _insert_new(conn, self._dialect.insert(TELEMETRY), rows)
            conn.execute(self._dialect.insert(DEVICE_TELEMETRY).on_conflict_do_nothing(), devices)
            if counts:
                conn.execute(self._dialect.insert(REGION_COUNTS).on_conflict_do_nothing(), counts)
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
        with guard("event batch"), self.engine.begin() as conn:
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
        with guard("snapshot batch"), self.engine.begin() as conn:
            self._touch(conn, {r["device_id"] for r in rows}, now)
            return _insert_new(conn, self._dialect.insert(SNAPSHOTS), rows)

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

        Only the first ``keep`` bytes of the payload are kept (``rows.dead_letter_row``).
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
        with guard(f"dead letter from {rows[0]['topic']}"), self.engine.begin() as conn:
            conn.execute(sa.insert(DEAD_LETTERS), rows)
        for r in rows:
            log.warning("dead letter topic=%s bytes=%s sha256=%s reason=%s", r["topic"],
                        r["payload_bytes"], r["payload_sha256"], r["reason"][:200])  # fmt: skip

    def retention(self, older_than: datetime, *, exact: bool = False) -> dict[str, int]:
        """Delete time series rows and dead letters older than ``older_than``; returns counts
        (rows per table).

        Devices and pipeline state are current state, not history: they stay. On PostgreSQL
        the day-partitioned tables (``partitions.py``) lose whole days by ``DROP TABLE``, and
        rows of the day ``older_than`` falls in stay until that day is wholly past (keep is at
        most a day longer): deleting the part of a day hour by hour would delete every row
        one by one before its partition is dropped. ``exact`` deletes those rows too, and
        ``DELETE`` is what SQLite always does.
        """
        cut = utc_time(older_than, "retention", "older_than")
        counts: dict[str, int] = {}
        plain: tuple[sa.Table, ...]
        if self._dialect is sqlite:
            plain = (TELEMETRY, DEVICE_TELEMETRY, EVENTS, SNAPSHOTS, REGION_COUNTS)
        else:
            plain = (SNAPSHOTS,)
            counts = self._retention_by_day(cut, exact)
        with guard("retention"), self.engine.begin() as conn:
            for tbl in plain:
                counts[tbl.name] = conn.execute(sa.delete(tbl).where(tbl.c.ts < cut)).rowcount
            dl = sa.delete(DEAD_LETTERS).where(DEAD_LETTERS.c.received_at < cut)
            counts["dead_letters"] = conn.execute(dl).rowcount
        log.info("retention before %s deleted %s", cut.isoformat(), counts)
        return counts

    def _retention_by_day(self, cut: datetime, exact: bool) -> dict[str, int]:
        """PostgreSQL's partitioned tables: drop the days before ``cut``, then delete what is
        older than the day ``cut`` falls in (``exact``: than ``cut``) — the default partition's
        rows. Two transactions a table: the drops hold the table's lock for a moment only."""
        day_cut = cut if exact else datetime.combine(utc_day(cut), time(), timezone.utc)
        counts = {}
        for tbl in (TELEMETRY, DEVICE_TELEMETRY, EVENTS, REGION_COUNTS):
            with guard(f"retention of {tbl.name}"), self.engine.begin() as conn:
                counts[tbl.name] = drop_before(conn, tbl.name, cut)
            with guard(f"retention of {tbl.name}"), self.engine.begin() as conn:
                counts[tbl.name] += conn.execute(sa.delete(tbl).where(tbl.c.ts < day_cut)).rowcount
        return counts

    def maintain_partitions(self, now: datetime | None = None) -> list[str]:
        """PostgreSQL: create the day partitions from today to ``DAYS_AHEAD`` days ahead
        where missing (``partitions.ensure``); returns their names. SQLite: nothing to do."""
        return ensure(self.engine, now)


def _insert_new(conn: Connection, ins: Any, rows: list[dict[str, Any]]) -> int:
    """INSERT … ON CONFLICT DO NOTHING for many rows; returns how many were new.

    RETURNING counts them on both backends (psycopg's executemany rowcount does not) and lets
    SQLAlchemy batch the rows into multi-row VALUES statements ("insertmanyvalues").
    """
    res = conn.execute(ins.on_conflict_do_nothing().returning(ins.table.c.id), rows)
    return len(res.all())


def _insert_new_sqlite(conn: Connection, table: sa.Table, recs: list[dict[str, Any]]) -> int:
    """INSERT … ON CONFLICT DO NOTHING of rows with the same keys on SQLite; returns rows added.

    The volume path on SQLite: one plain executemany of bound tuples. SQLAlchemy's per-row
    compile and parameter building cost more CPU than SQLite's own insert; the columns' bind
    processors (UtcDateTime, JSON) still make every value, so the rows are the same as the Core
    path writes. sqlite3's executemany rowcount sums the rows inserted; ON CONFLICT DO NOTHING
    skips redeliveries, not NULLs.
    """
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
