"""Adapter: the ingest store's reads — fleet view, one device's series, snapshots, zone and line
counts (latest, and their increase over a window), row counts.

Every read is bounded (a ``limit``, or one row per device and pipeline or per counted series)
and goes through ``db.guard``, so an unreachable database is ``StoreUnavailable``.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from agent.protocol.state import contract_at_least
from cloud_sync.ingest.db import guard
from cloud_sync.ingest.rows import COUNT_COLUMNS, utc_time
from cloud_sync.ingest.schema import (
    DEAD_LETTERS,
    DEVICE_CONFIG,
    DEVICE_TELEMETRY,
    DEVICES,
    PIPELINE_STATE,
    REGION_COUNTS,
    SNAPSHOTS,
    TABLES,
    TELEMETRY,
    schema_version,
)


class StoreReads:
    """The reading half of ``store.Store`` (which sets ``engine``)."""

    engine: Engine

    def latest_snapshot(self, device_id: str, pipeline: str | None = None) -> dict[str, Any] | None:
        """The newest snapshot of a device (of one pipeline if given), or None."""
        q = sa.select(SNAPSHOTS).where(SNAPSHOTS.c.device_id == device_id)
        if pipeline is not None:
            q = q.where(SNAPSHOTS.c.pipeline == pipeline)
        q = q.order_by(SNAPSHOTS.c.ts.desc(), SNAPSHOTS.c.id.desc()).limit(1)
        with guard("latest snapshot"), self.engine.connect() as conn:
            row = conn.execute(q).first()
        return dict(row._mapping) if row is not None else None

    def dead_letters(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest dead letters first: ``payload`` is the first bytes of the message (all of it
        when ``len(payload) == payload_bytes``), ``payload_sha256`` the hash of the whole."""
        q = sa.select(DEAD_LETTERS).order_by(DEAD_LETTERS.c.id.desc()).limit(limit)
        with guard("read dead letters"), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def fleet(self, tag_filter: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """One row per device with its pipelines' model, phase and latest telemetry, and the
        pipeline configuration it reported (``config``: hashes and the last outcome, never the
        document; None when it reported none).

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
        with guard("fleet view"), self.engine.connect() as conn:
            devices = conn.execute(sa.select(DEVICES).order_by(DEVICES.c.device_id)).all()
            states = conn.execute(sa.select(PIPELINE_STATE)).all()
            tele = conn.execute(tq).all()
            configs = {c.device_id: c for c in conn.execute(sa.select(DEVICE_CONFIG))}
        state_of = {(s.device_id, s.pipeline): s for s in states}
        tele_of = {(r.device_id, r.pipeline): r for r in tele}
        out = []
        for d in devices:
            tags = d.tags or {}
            if tag_filter and any(tags.get(k) != v for k, v in tag_filter.items()):
                continue
            names = _pipeline_names(d, state_of, tele_of)
            out.append({
                "device_id": d.device_id, "online": d.online, "last_seen": d.last_seen,
                "agent_version": d.agent_version, "profile": d.profile, "tags": tags,
                "groups": d.groups or [], "config": _config_view(configs.get(d.device_id)),
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
        cut = utc_time(since, "series", "since")
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
        with guard(f"series of {device_id}"), self.engine.connect() as conn:
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

    def latest_counts(self, device_id: str | None = None) -> list[dict[str, Any]]:
        """The zone and line counts of each pipeline's latest telemetry message: one row per
        device, pipeline, zone or line and class, each with ``ts``, ``kind``, ``region``,
        ``label`` and the ``COUNT_COLUMNS`` (running since the agent started).

        A zone or line no longer in the latest message (configured away) is not listed.
        """
        t, rc = TELEMETRY, REGION_COUNTS
        latest = sa.select(t.c.device_id, t.c.pipeline, sa.func.max(t.c.ts).label("ts"))
        if device_id is not None:
            latest = latest.where(t.c.device_id == device_id)
        lt = latest.group_by(t.c.device_id, t.c.pipeline).subquery()
        q = (
            sa.select(rc.c.device_id, rc.c.pipeline, rc.c.kind, rc.c.region, rc.c.label, rc.c.ts,
                      *(rc.c[c] for c in COUNT_COLUMNS))
            .join(lt, (rc.c.device_id == lt.c.device_id) & (rc.c.pipeline == lt.c.pipeline)
                  & (rc.c.ts == lt.c.ts))
            .order_by(*_SERIES)
        )  # fmt: skip
        with guard("latest counts"), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def count_increase(self, since: datetime, device_id: str | None = None) -> list[dict[str, Any]]:
        """How much each zone/line counter grew since ``since``, like Prometheus' ``increase``
        without its extrapolation: per series (device, pipeline, zone or line, class) the sum of
        the rises between consecutive samples, from the last sample at or before ``since``.

        * A sample where any counter of the series went down is a restart of the agent (or a
          reload of its config): its counters count from zero.
        * A series without a sample at or before ``since`` starts from its first sample, like
          Prometheus; except that when the same pipeline's telemetry came in after ``since``
          and before that sample without the series (a class seen for the first time: the
          device adds its row then), the series was zero there, so its first counts are in.

        Returns:
            One row per series with samples since ``since``: its key, ``first``/``last`` (the
            samples' times), ``samples``, ``resets`` and the increase of ``entered``,
            ``exited``, ``dwell`` (zones) or ``crossed_in``, ``crossed_out`` (lines; the
            other kind's are None). ``inside`` is a gauge: see ``latest_counts``.
        """
        cut = utc_time(since, "count increase", "since")
        with guard("count increase"), self.engine.connect() as conn:
            rows = [dict(r._mapping) for r in conn.execute(_increase_query(cut, device_id))]
        for r in rows:  # PostgreSQL sums bigints as NUMERIC
            for c in (*_COUNTERS, "resets", "samples"):
                r[c] = None if r[c] is None else int(r[c])
        return rows

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        with guard("counts"), self.engine.connect() as conn:
            return {
                name: int(conn.execute(sa.select(sa.func.count()).select_from(tbl)).scalar() or 0)
                for name, tbl in TABLES.items()
            }

    def version(self) -> int:
        """The schema version of the database."""
        with guard("schema version"), self.engine.connect() as conn:
            return schema_version(conn)


_KEYS = ("device_id", "pipeline", "kind", "region", "label")  # one counter series
_SERIES = [REGION_COUNTS.c[k] for k in _KEYS]
_COUNTERS = [c for c in COUNT_COLUMNS if c != "inside"]  # "inside" is a gauge


def _increase_query(cut: datetime, device_id: str | None) -> sa.Select[Any]:
    """``count_increase`` in SQL (window functions: SQLite 3.25+, PostgreSQL), a row a series."""
    rc, keys = REGION_COUNTS, _SERIES
    base = sa.select(*keys, sa.func.max(rc.c.ts).label("ts")).where(rc.c.ts <= cut)
    if device_id is not None:
        base = base.where(rc.c.device_id == device_id)
    b = base.group_by(*keys).subquery()

    def lag(col: Any) -> Any:
        return sa.func.lag(col).over(partition_by=keys, order_by=rc.c.ts)

    # the series' first sample, no baseline, and its pipeline reported since the cut without it
    t = TELEMETRY.alias("earlier")
    seen_without = sa.exists().where(t.c.device_id == rc.c.device_id,
                                     t.c.pipeline == rc.c.pipeline, t.c.ts >= cut,
                                     t.c.ts < rc.c.ts)  # fmt: skip
    # nested CASE: the EXISTS runs for the first sample only (AND may evaluate both sides)
    first = sa.and_(lag(rc.c.ts).is_(None), b.c.ts.is_(None))
    born = sa.case((first, sa.case((seen_without, 1), else_=0)), else_=0)
    w = (
        sa.select(*keys, rc.c.ts, *(rc.c[c] for c in _COUNTERS),
                  *(lag(rc.c[c]).label(f"prev_{c}") for c in _COUNTERS),
                  born.label("born"))
        .select_from(rc.outerjoin(b, sa.and_(*(rc.c[k] == b.c[k] for k in _KEYS))))
        .where(rc.c.ts >= sa.func.coalesce(b.c.ts, cut))
    )  # fmt: skip
    if device_id is not None:
        w = w.where(rc.c.device_id == device_id)
    s = w.subquery()
    reset = sa.or_(*(s.c[c] < s.c[f"prev_{c}"] for c in _COUNTERS))
    rises = [
        sa.func.sum(
            sa.case((s.c[c].is_(None), sa.null()),
                    (s.c[f"prev_{c}"].is_(None), sa.case((s.c.born == 1, s.c[c]), else_=0)),
                    (reset, s.c[c]), else_=s.c[c] - s.c[f"prev_{c}"])
        ).label(c)
        for c in _COUNTERS
    ]  # fmt: skip
    return (
        sa.select(*(s.c[k] for k in _KEYS), *rises,
                  sa.func.sum(sa.case((reset, 1), else_=0)).label("resets"),
                  sa.func.count().label("samples"),
                  sa.func.min(s.c.ts).label("first"), sa.func.max(s.c.ts).label("last"))
        .group_by(*(s.c[k] for k in _KEYS))
        .having(sa.func.max(s.c.ts) >= cut)
        .order_by(*(s.c[k] for k in _KEYS))
    )  # fmt: skip


def _pipeline_names(
    d: Any, state_of: Mapping[tuple[str, str], Any], tele_of: Mapping[tuple[str, str], Any]
) -> list[str]:
    """The pipelines to show for device row ``d``. A contract 1.3 agent republishes its birth
    state when a remote configuration adds or removes a pipeline, so its list is the running
    set (rows a removed pipeline left behind stay hidden); for older agents, whose list was
    fixed at start, also every pipeline they reported or sent telemetry for."""
    names = dict.fromkeys(d.pipelines or [])
    if names and d.contract is not None and contract_at_least(d.contract, (1, 3)):
        return list(names)
    names.update(dict.fromkeys(sorted(p for dev, p in state_of if dev == d.device_id)))
    names.update(dict.fromkeys(sorted(p for dev, p in tele_of if dev == d.device_id)))
    return list(names)


def _config_view(c: Any) -> dict[str, Any] | None:
    if c is None:
        return None
    keys = ("hash", "revision", "target_hash", "status", "reason", "updated_at")
    return {k: getattr(c, k) for k in keys}


def _pipeline_view(name: str, state: Any, tele: Any) -> dict[str, Any]:
    return {
        "name": name,
        "model": (state and state.active_model) or (tele and tele.model),
        "version": (state and state.active_version) or (tele and tele.version),
        "phase": state.phase if state else None,
        "last_error": state.last_error if state else None,
        "waiting": state.waiting if state else None,
        "source_ended": bool(state.source_ended) if state else False,
        "fps": tele.fps_out if tele else None,
        "p95_ms": tele.p95_ms if tele else None,
        "errors": tele.errors if tele else None,
        "telemetry_ts": tele.ts if tele else None,
    }
