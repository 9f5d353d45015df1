"""Adapter: build the rollout's ``FleetSnapshot`` from the ingest database.

Five queries, whatever the fleet size: devices, pipeline states, reported configurations,
the telemetry rows of the
window (plus one look-back interval, for the predecessors of its first rows), and top-1 label
counts of the window's events grouped in SQL. The per-version figures are then computed here,
per ``(device, pipeline, model@version)``:

* **frames** = Σ ``fps_out × gap`` over the window's rows, where ``gap`` is the time since the
  previous row of the same device/pipeline (the interval the agent's ``fps_out`` averages
  over). A row without a predecessor within ``max_gap_s`` (first row, or after an outage or a
  restart) counts the stream's median gap, or ``default_interval_s`` when the stream has none.
  The telemetry table has no frame counter, so this is the measure it allows; it is exact for
  a steady rate and off by at most one interval at a change.
* **errors** = Σ of the increases of the cumulative ``errors`` counter between consecutive
  rows; a counter that went down restarted from zero (agent restart), so its new value is the
  increase. The first row of a stream without a predecessor adds nothing (its count may
  predate the window). A row's frames and errors belong to the model@version it reports.
* **fps** = median ``fps_out``; **p95_ms** = median of the rows' ``p95_ms``.
* **top1** = events per ``top_label`` (events without a label are not counted).

When a pipeline ran two versions in the window, ``PipelineView.metrics`` holds the figures of
the version it reported last (the running one).
"""

from __future__ import annotations

import itertools
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from agent.protocol.state import UpdatePhase
from cloud_sync.ingest.db import guard
from cloud_sync.ingest.schema import DEVICE_CONFIG, DEVICES, EVENTS, PIPELINE_STATE, TELEMETRY
from cloud_sync.ingest.store import Store
from cloud_sync.rollout.fleet import (
    ConfigView,
    DeviceView,
    FleetSnapshot,
    PipelineMetrics,
    PipelineView,
)

Key = tuple[str, str]  # (device_id, pipeline)
VersionKey = tuple[str, str, str, str]  # (device_id, pipeline, model, version)


@dataclass
class _Acc:
    """Running figures of one (device, pipeline, model@version) in the window."""

    frames: float = 0.0
    errors: int = 0
    fps: list[float] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    last_ts: datetime | None = None


def _median_gap(ts: Sequence[datetime], max_gap_s: float) -> float | None:
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(ts)]
    gaps = [g for g in gaps if 0 < g <= max_gap_s]
    return statistics.median(gaps) if gaps else None


def _stream_metrics(
    rows: Sequence[Any],
    since: datetime,
    accs: dict[tuple[str, str], _Acc],
    *,
    max_gap_s: float,
    default_interval_s: float,
) -> None:
    """Fold one device/pipeline's rows (oldest first) into ``accs`` by (model, version)."""
    median = _median_gap([r.ts for r in rows], max_gap_s) or default_interval_s
    prev: Any = None
    for r in rows:
        linked = prev is not None and 0 < (r.ts - prev.ts).total_seconds() <= max_gap_s
        if r.ts >= since and r.model is not None and r.version is not None:
            acc = accs.setdefault((r.model, r.version), _Acc())
            gap = (r.ts - prev.ts).total_seconds() if linked else median
            if r.fps_out is not None:
                acc.frames += r.fps_out * gap
                acc.fps.append(r.fps_out)
            if r.p95_ms is not None:
                acc.p95.append(r.p95_ms)
            if linked and r.errors is not None and prev.errors is not None:
                acc.errors += r.errors - prev.errors if r.errors >= prev.errors else r.errors
            acc.last_ts = r.ts
        prev = r


def telemetry_metrics(
    rows: Iterable[Any],
    since: datetime,
    *,
    max_gap_s: float = 60.0,
    default_interval_s: float = 10.0,
) -> dict[Key, tuple[list[tuple[str, str, _Acc]], str | None]]:
    """Pure: per (device, pipeline), the accumulated figures of each model@version.

    Args:
        rows: telemetry rows with ``device_id, pipeline, ts, model, version, fps_out,
            errors, p95_ms``, ordered by device, pipeline, ts; rows before ``since`` serve only
            as predecessors.
        since: the window's start.
        max_gap_s: a longer gap between two rows breaks the stream (outage, restart).
        default_interval_s: a row's interval when its stream shows none.

    Returns:
        (device, pipeline) → ([(model, version, figures)], the last row's version).
    """
    streams: dict[Key, list[Any]] = defaultdict(list)
    for r in rows:
        streams[(r.device_id, r.pipeline)].append(r)
    out: dict[Key, tuple[list[tuple[str, str, _Acc]], str | None]] = {}
    for key, stream in streams.items():
        accs: dict[tuple[str, str], _Acc] = {}
        _stream_metrics(
            stream, since, accs, max_gap_s=max_gap_s, default_interval_s=default_interval_s
        )
        if accs:
            last = max(accs.items(), key=lambda kv: kv[1].last_ts or since)[0]
            out[key] = ([(m, v, a) for (m, v), a in accs.items()], f"{last[0]}@{last[1]}")
    return out


def _metrics(model: str, version: str, acc: _Acc, top1: Mapping[str, int]) -> PipelineMetrics:
    return PipelineMetrics(
        model=model,
        version=version,
        frames=round(acc.frames),
        errors=acc.errors,
        fps=statistics.median(acc.fps) if acc.fps else None,
        p95_ms=statistics.median(acc.p95) if acc.p95 else None,
        top1=dict(top1),
    )


def _phase(value: str | None) -> UpdatePhase | None:
    try:
        return UpdatePhase(value) if value is not None else None
    except ValueError:
        return None


class SnapshotReader:
    """Reads ``FleetSnapshot``s from one ingest store."""

    def __init__(
        self, store: Store, *, max_gap_s: float = 60.0, default_interval_s: float = 10.0
    ) -> None:
        """Args:
        store: the ingest store.
        max_gap_s: see ``telemetry_metrics``.
        default_interval_s: see ``telemetry_metrics``.
        """
        self.store = store
        self.max_gap_s = max_gap_s
        self.default_interval_s = default_interval_s

    def _query(
        self, since: datetime, until: datetime, metrics: bool
    ) -> tuple[Any, Any, Any, Any, Any]:
        t, e = TELEMETRY, EVENTS
        look_back = since - timedelta(seconds=self.max_gap_s)
        tq = (
            sa.select(t.c.device_id, t.c.pipeline, t.c.ts, t.c.model, t.c.version,
                      t.c.fps_out, t.c.errors, t.c.p95_ms)
            .where(t.c.ts >= look_back, t.c.ts <= until)
            .order_by(t.c.device_id, t.c.pipeline, t.c.ts)
        )  # fmt: skip
        eq = (
            sa.select(e.c.device_id, e.c.pipeline, e.c.model, e.c.version, e.c.top_label,
                      sa.func.count().label("n"))
            .where(e.c.ts >= since, e.c.ts <= until, e.c.top_label.is_not(None))
            .group_by(e.c.device_id, e.c.pipeline, e.c.model, e.c.version, e.c.top_label)
        )  # fmt: skip
        with guard("fleet snapshot"), self.store.engine.connect() as conn:
            devices = conn.execute(sa.select(DEVICES).order_by(DEVICES.c.device_id)).all()
            states = conn.execute(sa.select(PIPELINE_STATE)).all()
            configs = conn.execute(sa.select(DEVICE_CONFIG)).all()
            tele = conn.execute(tq).all() if metrics else []
            events = conn.execute(eq).all() if metrics else []
        return devices, states, configs, tele, events

    def read(self, since: datetime, until: datetime, *, metrics: bool = True) -> FleetSnapshot:
        """The fleet now, with metrics over ``[since, until]`` (none when ``metrics`` is
        False: two small queries instead of four, see ``plan.needs_metrics``).

        Raises:
            StoreUnavailable: the database cannot be reached.
        """
        devices, states, configs, tele, events = self._query(since, until, metrics)
        config_of = {
            c.device_id: ConfigView(c.hash, c.target_hash, c.status, c.reason) for c in configs
        }
        labels: dict[VersionKey, dict[str, int]] = defaultdict(dict)
        for ev in events:
            labels[(ev.device_id, ev.pipeline, ev.model, ev.version)][ev.top_label] = int(ev.n)
        figures = telemetry_metrics(
            tele, since, max_gap_s=self.max_gap_s, default_interval_s=self.default_interval_s
        )
        state_of: dict[str, dict[str, Any]] = defaultdict(dict)
        for s in states:
            state_of[s.device_id][s.pipeline] = s
        metrics_of: dict[str, dict[str, PipelineMetrics]] = defaultdict(dict)
        for (device_id, pipeline), (accs, last) in figures.items():
            for model, version, acc in accs:
                if f"{model}@{version}" == last:
                    top = labels.get((device_id, pipeline, model, version), {})
                    metrics_of[device_id][pipeline] = _metrics(model, version, acc, top)
        views = [
            _device(
                d,
                state_of.get(d.device_id, {}),
                metrics_of.get(d.device_id, {}),
                config_of.get(d.device_id),
            )
            for d in devices
        ]
        return FleetSnapshot(views)


def _device(
    d: Any,
    states: Mapping[str, Any],
    metrics: Mapping[str, PipelineMetrics],
    config: ConfigView | None = None,
) -> DeviceView:
    """One device's view from its ``devices`` row, pipeline states and window figures."""
    names = dict.fromkeys([*(d.pipelines or []), *sorted(states), *sorted(metrics)])
    pipelines = {}
    for name in names:
        s = states.get(name)
        pipelines[name] = PipelineView(
            active_model=s.active_model if s else None,
            active_version=s.active_version if s else None,
            phase=_phase(s.phase) if s else None,
            target_model=s.target_model if s else None,
            target_version=s.target_version if s else None,
            last_error=s.last_error if s else None,
            metrics=metrics.get(name),
        )
    return DeviceView(
        device_id=d.device_id,
        online=bool(d.online),
        groups=frozenset(d.groups or []),
        tags=dict(d.tags or {}),
        pipelines=pipelines,
        config=config,
        contract=d.contract,
    )


__all__ = ["SnapshotReader", "telemetry_metrics"]
