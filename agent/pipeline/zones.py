"""Pure: zones and lines over tracks — per-object events and running counts.

``RegionCounter.update`` takes one ``TrackUpdate`` and the frame size, and returns the object
events of that frame:

* zone ``entered``: a track's anchor point (bottom centre of its box by default: where an
  object stands) is inside the polygon; ``left``: it was inside and is now seen outside, or
  its track ended; ``dwell``: it has been inside ``dwell_s`` since it entered.
* line ``crossed`` with ``direction`` ``in`` or ``out``: the anchor went from one side of the
  directed line to the other, across the segment itself (not its extension). A side counts
  only once the point is ``margin`` pixels beyond the line, so a box jittering on the line
  does not count, and the crossing is found between the last two positions where the side
  was certain — also after an occlusion, when the track comes back on the other side.

Each event happens at most once per track and region: a track that walks in, out and in again
is one ``entered`` and one ``left``. Counting starts when a track qualifies: its class is one
the region counts, and its best score so far reaches ``min_score``. Counts run from the start
of the agent, per region and class; ``inside`` is how many tracks are in a zone now (a track
lost behind an occluder stays counted until it ends).

Why not supervision's ``LineZone``/``PolygonZone``: they come with supervision's dependencies
(see ``agent.pipeline.tracking``), count every side change (not once per track), and have no
dwell; the geometry here is a few vectorised lines of NumPy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from agent.pipeline.tracking import Track, TrackUpdate

if TYPE_CHECKING:
    from agent.pipeline.config import LineConfig, ZoneConfig

__all__ = ["RegionCounter", "points_in_polygon"]

F64 = npt.NDArray[np.float64]
Events = list[dict[str, Any]]


def points_in_polygon(points: F64, poly: F64) -> npt.NDArray[np.bool_]:
    """Which of ``points`` [N,2] lie inside ``poly`` [K,2] (even-odd rule, vectorised)."""
    return _inside(points, _edges(poly))


def _edges(poly: F64) -> F64:
    """[4,1,K]: x1, y1, x2, y2 of every edge of ``poly`` (ready to broadcast)."""
    nxt = np.roll(poly, -1, axis=0)
    return np.stack([poly[:, 0], poly[:, 1], nxt[:, 0], nxt[:, 1]])[:, None, :]


def _inside(points: F64, edges: F64) -> npt.NDArray[np.bool_]:
    if points.size == 0:
        return np.zeros(0, dtype=bool)
    x, y = points[:, 0:1], points[:, 1:2]
    x1, y1, x2, y2 = edges
    straddles = (y1 > y) != (y2 > y)
    with np.errstate(divide="ignore", invalid="ignore"):
        x_cross = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
    out: npt.NDArray[np.bool_] = (np.count_nonzero(straddles & (x < x_cross), axis=1) % 2) == 1
    return out


@dataclass
class _ZoneMark:
    label: str
    inside: bool = False
    entered_at: float | None = None
    left: bool = False
    dwelled: bool = False


@dataclass
class _LineMark:
    side: int  # -1 or +1: the side the track was last certain to be on
    point: F64  # where it was then
    crossed: bool = False


@dataclass
class _Region:
    cfg: Any  # ZoneConfig | LineConfig
    kind: str  # "zone" | "line"
    classes: frozenset[str] | None
    counts: dict[str, dict[str, int]] = field(default_factory=dict)  # class -> name -> n
    zone_marks: dict[int, _ZoneMark] = field(default_factory=dict)
    line_marks: dict[int, _LineMark] = field(default_factory=dict)
    resolved_for: tuple[int, int] | None = None
    edges: F64 = field(default_factory=lambda: np.zeros((4, 1, 0)))
    a: F64 = field(default_factory=lambda: np.zeros(2))
    b: F64 = field(default_factory=lambda: np.zeros(2))

    def counts_for(self, label: str) -> dict[str, int]:
        c = self.counts.get(label)
        if c is None:
            keys = ("entered", "left", "dwell") if self.kind == "zone" else ("in", "out")
            c = self.counts[label] = dict.fromkeys(keys, 0)
        return c

    def resolve(self, size: tuple[int, int]) -> None:
        """Points in pixels for a frame of ``size`` (width, height)."""
        if self.resolved_for == size:
            return
        scale = np.array(size, dtype=np.float64) if self.cfg.coords == "normalized" else 1.0
        if self.kind == "zone":
            self.edges = _edges(np.asarray(self.cfg.points, dtype=np.float64) * scale)
        else:
            self.a = np.asarray(self.cfg.start, dtype=np.float64) * scale
            self.b = np.asarray(self.cfg.end, dtype=np.float64) * scale
        self.resolved_for = size

    def qualifying(self, tracks: list[Track]) -> list[int]:
        """Positions of the tracks this region counts (class, best score so far)."""
        cls, low = self.classes, self.cfg.min_score
        if cls is None and low <= 0:
            return list(range(len(tracks)))
        return [
            k
            for k, t in enumerate(tracks)
            if (cls is None or t.label in cls) and t.best_score >= low
        ]


class RegionCounter:
    """Zones and lines of one pipeline. Not thread-safe: the pipeline's thread updates it;
    ``snapshot`` takes a copy for telemetry under the caller's lock."""

    def __init__(self, zones: Sequence[ZoneConfig] = (), lines: Sequence[LineConfig] = ()) -> None:
        def classes(c: Any) -> frozenset[str] | None:
            return frozenset(c.classes) if c.classes is not None else None

        self.regions = [_Region(z, "zone", classes(z)) for z in zones]
        self.regions += [_Region(ln, "line", classes(ln)) for ln in lines]
        for r in self.regions:
            for label in r.classes or ():
                r.counts_for(label)  # configured classes show up in counts from the start

    def update(self, tu: TrackUpdate, size: tuple[int, int], now: float) -> Events:
        """The object events of one frame (times as given: the caller's clock).

        Args:
            tu: the tracker's update for this frame.
            size: frame width and height (for normalized coordinates).
            now: the frame's time.
        """
        events: Events = []
        boxes = np.array([t.box for t in tu.visible], dtype=np.float64).reshape(-1, 4)
        anchors = {  # [N,2] points of tu.visible by anchor kind
            "bottom_center": np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, boxes[:, 3]], axis=1),
            "center": np.stack(
                [(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1
            ),
        }
        for r in self.regions:
            r.resolve(size)
            pts = anchors[r.cfg.anchor]
            keep = r.qualifying(tu.visible)
            seen = [tu.visible[k] for k in keep]
            if r.kind == "zone":
                self._zone(r, seen, pts[keep], tu.ended, now, events)
            else:
                self._line(r, seen, pts[keep], now, events)
                for t in tu.ended:
                    r.line_marks.pop(t.track_id, None)
        return events

    def _zone(
        self,
        r: _Region,
        seen: list[Track],
        pts: F64,
        ended: list[Track],
        now: float,
        events: Events,
    ) -> None:
        inside = _inside(pts, r.edges).tolist()
        marks = r.zone_marks
        for t, now_inside in zip(seen, inside, strict=True):
            m = marks.get(t.track_id)
            if m is None:
                if not now_inside:
                    continue  # never entered: nothing to remember
                m = marks[t.track_id] = _ZoneMark(t.label, True, now)
                r.counts_for(t.label)["entered"] += 1
                events.append(_event("entered", r, t, now))
            m.inside = now_inside
            if m.left or m.entered_at is None:
                continue
            if not now_inside:
                m.left = True
                r.counts_for(t.label)["left"] += 1
                events.append(_event("left", r, t, now, dwell_s=now - m.entered_at))
            elif (
                not m.dwelled and r.cfg.dwell_s is not None and now - m.entered_at >= r.cfg.dwell_s
            ):
                m.dwelled = True
                r.counts_for(t.label)["dwell"] += 1
                events.append(_event("dwell", r, t, now, dwell_s=now - m.entered_at))
        for t in ended:
            gone = marks.pop(t.track_id, None)
            if gone is not None and gone.entered_at is not None and not gone.left:
                r.counts_for(t.label)["left"] += 1
                events.append(_event("left", r, t, now, dwell_s=t.last_seen - gone.entered_at))

    def _line(self, r: _Region, seen: list[Track], pts: F64, now: float, events: Events) -> None:
        d = r.b - r.a
        normal = np.array([-d[1], d[0]]) / float(np.hypot(d[0], d[1]))  # right-hand side
        dist = (pts - r.a) @ normal
        sides = np.where(dist > r.cfg.margin, 1, np.where(dist < -r.cfg.margin, -1, 0)).tolist()
        marks = r.line_marks
        for k, (t, side) in enumerate(zip(seen, sides, strict=True)):
            if side == 0:
                continue  # within the margin: the side stays what it was
            m = marks.get(t.track_id)
            if m is None:
                marks[t.track_id] = _LineMark(side, pts[k])
                continue
            if m.side == -side and not m.crossed and _crosses(m.point, pts[k], r.a, d):
                m.crossed = True
                direction = "in" if side > 0 else "out"
                r.counts_for(t.label)[direction] += 1
                events.append(_event("crossed", r, t, now, direction=direction))
            m.side, m.point = side, pts[k]

    def snapshot(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Running counts: zone rows (zone, label, entered, left, dwell, inside) and line rows
        (line, label, crossed_in, crossed_out), in config order then by class."""
        zones, lines = [], []
        for r in self.regions:
            if r.kind == "line":
                lines += [
                    {"line": r.cfg.name, "label": label, "crossed_in": c["in"],
                     "crossed_out": c["out"]}
                    for label, c in sorted(r.counts.items())
                ]  # fmt: skip
                continue
            inside: dict[str, int] = {}
            for m in r.zone_marks.values():
                if m.inside:
                    inside[m.label] = inside.get(m.label, 0) + 1
                    r.counts_for(m.label)
            zones += [
                {"zone": r.cfg.name, "label": label, **c, "inside": inside.get(label, 0)}
                for label, c in sorted(r.counts.items())
            ]
        return zones, lines


def _crosses(p0: F64, p1: F64, a: F64, d: F64) -> bool:
    """Does the move p0 -> p1 (on opposite sides of the line) cross the segment a -> a + d?"""
    move = p1 - p0
    denom = _cross(d, move)
    if denom == 0:
        return False
    # p0 + s * move = a + u * d; crossing both sides with move: u = (p0 - a) x move / d x move
    u = _cross(p0 - a, move) / denom
    return bool(-1e-9 <= u <= 1 + 1e-9)


def _cross(v: F64, w: F64) -> float:
    return float(v[0] * w[1] - v[1] * w[0])


def _event(kind: str, r: _Region, t: Track, now: float, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "region": r.cfg.name,
        "track_id": t.track_id,
        "label_id": t.label_id,
        "label": t.label,
        "first_seen": t.first_seen,
        "last_seen": t.last_seen,
        "best_score": t.best_score,
        **extra,
    }
