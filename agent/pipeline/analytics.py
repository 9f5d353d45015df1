"""Pure: a detection pipeline's analytics — tracks, then zones and lines — on its event dicts.

``FrameAnalytics.apply(event, result, size, now, wall)`` runs the tracker on the frame's
detections, writes each tracked detection's ``track_id`` into the event, and adds the
frame's object events (``entered``/``left``/``dwell``/``crossed``) as ``event["objects"]``,
with wall-clock times. ``status()`` gives what telemetry carries: active tracks, ids issued,
and the running counts per zone/line and class. ``pipeline_options(cfg)`` builds the analytics
and the frame gate (``agent.pipeline.gating``) of one configured pipeline, as keyword
arguments of ``Pipeline``.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agent.pipeline.gating import gate_from_config
from agent.pipeline.postprocess import Result
from agent.pipeline.tracking import Tracker, tracker_from_config
from agent.pipeline.zones import RegionCounter

if TYPE_CHECKING:
    from agent.pipeline.config import LineConfig, PipelineConfig, TrackingConfig, ZoneConfig

__all__ = ["FrameAnalytics", "pipeline_options"]


class FrameAnalytics:
    """The tracker and region counter of one pipeline; ``status`` may be called from any
    thread."""

    def __init__(
        self,
        tracker: Tracker,
        zones: Sequence[ZoneConfig] = (),
        lines: Sequence[LineConfig] = (),
    ) -> None:
        self.tracker = tracker
        self.regions = RegionCounter(zones, lines)
        self._lock = threading.Lock()

    def apply(
        self,
        event: dict[str, Any],
        result: Result,
        size: tuple[int, int],
        now: float,
        wall: float,
    ) -> None:
        """Track one frame's detections and add ids and object events to its event dict.

        Args:
            event: the frame's event (``result_event``); its ``detections`` list is in the
                order of ``result.detections``.
            result: the frame's result; other tasks than detection pass through untouched.
            size: frame width and height in pixels.
            now: the frame's capture time, monotonic seconds.
            wall: the same instant on the wall clock (seconds since the epoch).
        """
        if result.task != "detection":
            return
        with self._lock:
            tu = self.tracker.update(result.detections, now)
            objects = self.regions.update(tu, size, now)
        for det, track_id in zip(event.get("detections") or [], tu.ids, strict=False):
            if track_id is not None:
                det["track_id"] = track_id
        if objects:
            offset = wall - now
            for o in objects:
                o["first_seen"] = round(o["first_seen"] + offset, 3)
                o["last_seen"] = round(o["last_seen"] + offset, 3)
                o["best_score"] = round(float(o["best_score"]), 4)
                if "dwell_s" in o:
                    o["dwell_s"] = round(max(o["dwell_s"], 0.0), 3)
            event["objects"] = objects

    def retune(
        self,
        tracking: TrackingConfig,
        zones: Sequence[ZoneConfig] | None = None,
        lines: Sequence[LineConfig] = (),
    ) -> None:
        """New tracker thresholds (tracks already running keep theirs, new ones take these)
        and, when ``zones`` is given, new zones and lines (their counts start again); takes
        effect from the next frame (remote configuration, ``agent.running``)."""
        fresh = tracker_from_config(tracking)
        with self._lock:
            t = self.tracker
            t.params, t.per_class, t.classes = fresh.params, fresh.per_class, fresh.classes
            t.max_tracks = fresh.max_tracks
            if zones is not None:
                self.regions = RegionCounter(zones, lines)

    def status(self) -> dict[str, Any]:
        """``tracks_active``, ``tracks_started`` and the ``zones``/``lines`` count rows."""
        with self._lock:
            zones, lines = self.regions.snapshot()
            return {
                "tracks_active": self.tracker.active,
                "tracks_started": self.tracker.started,
                "zones": zones,
                "lines": lines,
            }


def pipeline_options(cfg: PipelineConfig) -> dict[str, Any]:
    """``Pipeline`` keyword arguments for a configured pipeline's rate control and analytics:
    ``gate`` (None without ``max_fps``/``[motion]``) and ``analytics`` (None without
    ``[tracking]``, zones or lines)."""
    analytics = None
    if cfg.tracking is not None:
        analytics = FrameAnalytics(tracker_from_config(cfg.tracking), cfg.zones, cfg.lines)
    return {"gate": gate_from_config(cfg), "analytics": analytics}
