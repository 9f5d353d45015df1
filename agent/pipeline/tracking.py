"""Pure: multi-object tracking by detection — ByteTrack's association on a Kalman motion model.

Each ``Tracker.update(detections, now)`` predicts every track with a constant-velocity Kalman
filter over (cx, cy, w, h) (``agent.pipeline.kalman``), then associates as ByteTrack does
(Zhang et al., ECCV 2022), each stage one optimal assignment (``agent.pipeline.assign``):

1. detections scoring at least ``high_score`` against tracked and lost tracks, by IoU;
2. the leftover low-score detections (``low_score`` up to ``high_score``: the occluded, the
   blurred) against the tracks still unmatched, at IoU >= 0.5, so a partly hidden object
   keeps its id (ByteTrack tries only the tracks seen last frame; lost ones too here);
3. leftover high-score detections against tentative tracks; the rest start new tentative
   tracks from ``new_track_score``. A tentative track gets an id after ``min_hits``
   consecutive matches; a confirmed one that goes unseen is *lost*, still predicted and
   matched for ``lost_frames`` inferred frames, then *ends*.

Two additions for objects that go behind something, found on the scripted scene
(``agent.pipeline.scene``) with a real detector, which reports the visible part of a
half-hidden object confidently: a box whose area jumps off the track's (a partial view, or two
objects in one box as they cross) keeps the track alive without moving its filter, unless the
new size lasts ``_SIZE_JUMP_FRAMES`` matches; low-score boxes never move the filter either (a
half-hidden box reads as the object slowing and shrinking, and the prediction through the
occlusion then lags behind it); and between stages 2 and 3, a box well inside a lost track's
prediction and much smaller than it is that object coming out (stage 2b). Without them the
object behind the pillar came back with a new id.

Association is class-aware (a track never changes class) and thresholds can differ per class.
Time is explicit: ``now`` (seconds, monotonic) drives the motion model, so tracking stays right
when frames are skipped by ``max_fps`` or motion gating; ``lost_frames`` counts inferred frames
only, so a still scene that is inferred once every few seconds does not end its tracks.

Why written here and not taken from a library (checked 2026-12, from the wheels' metadata):

* ``trackers`` (Roboflow: ByteTrack, SORT, OC-SORT) requires ``opencv-python``, which would
  overwrite ``opencv-python-headless`` here and shadow JetPack's GStreamer-enabled OpenCV on a
  Jetson, plus ``supervision`` (matplotlib, PyAV with its own FFmpeg, pillow, requests);
  importing it imports all of supervision.
* ``supervision`` 0.31 no longer ships a tracker (it moved to ``trackers``).
* ``norfair`` 2.3 pins ``numpy<2`` (this project runs NumPy 2) and has no low-score second
  association; its fork ``norfair-enough`` is months old.
* ``bytetracker``/``ocsort`` wheels are unmaintained copies of research code (2022-23).

What is reused: ``lap`` (LAPJV, the solver ByteTrack's reference code calls; it depends on
NumPy only, 1.7 MB wheels for x86-64 and aarch64/cp310). What is written: ~500 lines of
NumPy over three modules, the filter element-wise over all tracks at once, so tracking and
zones at 50 objects cost about what decoding one frame's detections does
(``scripts/bench_tracking.py``).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from agent.pipeline.assign import assign, iou_matrix, overlap
from agent.pipeline.kalman import BoxFilter, xyxy_to_z
from agent.pipeline.postprocess import Detection

if TYPE_CHECKING:
    from agent.pipeline.config import TrackingConfig

__all__ = [
    "Track",
    "TrackParams",
    "TrackState",
    "TrackUpdate",
    "Tracker",
    "tracker_from_config",
]

F64 = npt.NDArray[np.float64]

# Kalman noise as fractions of the box size, from ByteTrack's per-frame values at 30 fps.
MAX_DT = 10.0  # seconds; a longer gap (a stalled source) predicts no further than this
_MISMATCH = 2.0  # cost of pairing different classes: above every cost limit
_LOW_MATCH_IOU = 0.5  # ByteTrack's second association
_TENTATIVE_MATCH_IOU = 0.3  # ByteTrack's unconfirmed-track association
_PARTIAL_INSIDE = 0.8  # a box this much inside a lost track's prediction ...
_PARTIAL_AREA = 0.7  # ... and at most this share of its area is a partial view of it
_SIZE_JUMP = 0.8  # a box whose area is off the track's by more than this factor either way
_SIZE_JUMP_FRAMES = 10  # is a partial or merged view, unless it stays so this many matches


@dataclass(frozen=True)
class TrackParams:
    """Thresholds of one class (``Tracker`` takes defaults plus per-class overrides)."""

    high_score: float = 0.5
    low_score: float = 0.1
    new_track_score: float = 0.6
    match_iou: float = 0.2
    min_hits: int = 2
    lost_frames: int = 30


class TrackState(enum.Enum):
    TENTATIVE = "tentative"  # not yet ``min_hits`` matches: no id, not reported
    TRACKED = "tracked"  # matched on the last update
    LOST = "lost"  # unmatched for 1..lost_frames updates: predicted, can be matched again
    ENDED = "ended"


@dataclass(eq=False)
class Track:
    """One object over time. ``box`` is its estimated box now (source pixels): the filter's,
    corrected by the detection matched to it, or predicted when none was (or a low-score one)."""

    label_id: int
    label: str
    box: tuple[float, float, float, float]
    score: float
    first_seen: float
    last_seen: float
    params: TrackParams
    track_id: int = 0  # 0 while tentative
    best_score: float = 0.0
    hits: int = 1
    misses: int = 0
    state: TrackState = TrackState.TENTATIVE
    area: float = 0.0  # smoothed area of the boxes that corrected the filter
    odd: int = 0  # consecutive matches whose box was far off that area

    def __post_init__(self) -> None:
        self.best_score = max(self.best_score, self.score)
        x1, y1, x2, y2 = self.box
        self.area = self.area or (x2 - x1) * (y2 - y1)


@dataclass
class TrackUpdate:
    """What one update found.

    Attributes:
        ids: per input detection, the id of the confirmed track it belongs to, else None.
        visible: confirmed tracks matched this update (their ``box`` is this frame's).
        lost: confirmed tracks not seen this update but still alive.
        ended: tracks that ended this update (lost too long, or over ``max_tracks``).
        started: tracks that got their id this update.
    """

    ids: list[int | None]
    visible: list[Track] = field(default_factory=list)
    lost: list[Track] = field(default_factory=list)
    ended: list[Track] = field(default_factory=list)
    started: list[Track] = field(default_factory=list)


class Tracker:
    """ByteTrack over one stream. Not thread-safe: one update at a time.

    The filter state of all tracks lives in two arrays (``[N,8]`` means, ``[N,8,8]``
    covariances), row i for ``tracks[i]``, so prediction and correction are one NumPy call
    each whatever the number of objects.
    """

    def __init__(
        self,
        params: TrackParams | None = None,
        *,
        per_class: Mapping[str, TrackParams] | None = None,
        classes: Sequence[str] | None = None,
        max_tracks: int = 512,
    ) -> None:
        self.params = params or TrackParams()
        self.per_class = dict(per_class or {})
        self.classes = frozenset(classes) if classes is not None else None
        self.max_tracks = max_tracks
        self.tracks: list[Track] = []
        self._kf = BoxFilter()
        self._ids = itertools.count(1)
        self._t: float | None = None
        self.started = 0  # ids issued

    def params_for(self, label: str) -> TrackParams:
        return self.per_class.get(label, self.params)

    @property
    def active(self) -> int:
        """Confirmed tracks alive (seen now or lost for a while)."""
        return sum(1 for t in self.tracks if t.track_id)

    def update(self, detections: Sequence[Detection], now: float) -> TrackUpdate:
        """Advance every track to ``now`` and associate this frame's detections.

        Args:
            detections: this frame's detections (source pixels), any order.
            now: capture time of the frame, seconds on a monotonic clock.

        Returns:
            Ids per detection and the tracks seen, lost, ended and started.
        """
        dt = 0.0 if self._t is None else min(max(now - self._t, 0.0), MAX_DT)
        self._t = now
        out = TrackUpdate(ids=[None] * len(detections))
        if self.tracks:
            lost = np.array([t.state is TrackState.LOST for t in self.tracks])
            self._kf.predict(dt, lost)
        step = _Step(self, detections, now, out)
        step.associate()
        self._add(step.new)
        self._correct(step.corrections)
        self._retire(out)
        return out

    def _add(self, new: list[Track]) -> None:
        if new:
            self.tracks += new
            self._kf.append(xyxy_to_z(np.array([t.box for t in new], dtype=np.float64)))

    def _correct(self, corrections: list[tuple[int, tuple[float, float, float, float]]]) -> None:
        """One batched Kalman update of the rows matched to a high-score box; then every
        track's ``box`` is its estimate (corrected, or predicted)."""
        if corrections:
            rows = np.array([r for r, _ in corrections], dtype=np.intp)
            z = xyxy_to_z(np.array([b for _, b in corrections], dtype=np.float64))
            self._kf.correct(rows, z)
        for t, b in zip(self.tracks, self._kf.boxes().tolist(), strict=True):
            t.box = (b[0], b[1], b[2], b[3])

    def _retire(self, out: TrackUpdate) -> None:
        """End tracks lost too long (and the surplus over ``max_tracks``); drop their rows."""
        for t in self.tracks:
            if t.state is TrackState.LOST and t.misses > t.params.lost_frames:
                t.state = TrackState.ENDED
        rows = [i for i, t in enumerate(self.tracks) if t.state is not TrackState.ENDED]
        if len(rows) > self.max_tracks:  # a flood of detections: drop the longest lost first
            rows.sort(key=lambda i: (self.tracks[i].state is TrackState.TRACKED,
                                     self.tracks[i].last_seen), reverse=True)  # fmt: skip
            for i in rows[self.max_tracks :]:
                self.tracks[i].state = TrackState.ENDED
            rows = sorted(rows[: self.max_tracks])
        out.ended = [t for t in self.tracks if t.state is TrackState.ENDED and t.track_id]
        if len(rows) != len(self.tracks):
            self.tracks = [self.tracks[i] for i in rows]
            self._kf.keep(rows)
        out.lost = [t for t in self.tracks if t.state is TrackState.LOST and t.track_id]

    def _confirm(self, t: Track, out: TrackUpdate) -> None:
        t.track_id = next(self._ids)
        self.started += 1
        out.started.append(t)


class _Step:
    """The association of one update (ByteTrack's three stages); the tracker applies it."""

    def __init__(
        self, tracker: Tracker, dets: Sequence[Detection], now: float, out: TrackUpdate
    ) -> None:
        self.tr, self.dets, self.now, self.out = tracker, dets, now, out
        self.corrections: list[tuple[int, tuple[float, float, float, float]]] = []
        self.new: list[Track] = []
        tracks = tracker.tracks
        self.pred = tracker._kf.boxes()
        self.t_label = np.array([t.label_id for t in tracks], dtype=np.int64)
        self.boxes = np.array([d.box for d in dets], dtype=np.float64).reshape(-1, 4)
        self.d_label = np.array([d.label_id for d in dets], dtype=np.int64)
        labels = np.concatenate([self.t_label, self.d_label])
        self.one_class = labels.size == 0 or bool((labels == labels[0]).all())
        self._cost: F64 | None = None
        b = self.boxes
        self.areas: list[float] = ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).tolist()

    def _split(self) -> tuple[list[int], list[int]]:
        """Indices of the high- and low-score detections of the classes tracked."""
        tr, dets = self.tr, self.dets
        if tr.classes is None and not tr.per_class:  # one threshold for all: vectorised
            scores = np.array([d.score for d in dets], dtype=np.float64)
            hs, ls = tr.params.high_score, tr.params.low_score
            high_mask = scores >= hs
            low_mask = (scores >= ls) & ~high_mask
            return np.flatnonzero(high_mask).tolist(), np.flatnonzero(low_mask).tolist()
        high: list[int] = []
        low: list[int] = []
        for i, d in enumerate(dets):
            if tr.classes is not None and d.label not in tr.classes:
                continue
            p = tr.params_for(d.label)
            if d.score >= p.high_score:
                high.append(i)
            elif d.score >= p.low_score:
                low.append(i)
        return high, low

    def associate(self) -> None:
        tr, dets = self.tr, self.dets
        high, low = self._split()
        confirmed = [r for r, t in enumerate(tr.tracks) if t.track_id]
        tentative = [r for r, t in enumerate(tr.tracks) if not t.track_id]
        # 1. high-score detections vs confirmed tracks (seen and lost)
        pairs, rest_t, rest_d = self._match(confirmed, high, 1.0 - tr.params.match_iou)
        self._hits(pairs)
        high = [high[j] for j in rest_d]
        # 2. low-score detections vs the confirmed tracks still unmatched (ByteTrack takes only
        # those seen last frame; lost ones too here: an object coming out from behind a pillar
        # is first a partial, low-score box, and at IoU >= 0.5 with the prediction it is not
        # a stray one)
        second = [confirmed[k] for k in rest_t]
        pairs, rest_t, rest_d = self._match(second, low, 1.0 - _LOW_MATCH_IOU)
        self._hits(pairs, low=True)
        low = [low[j] for j in rest_d]
        # 2b. (not in ByteTrack) a box well inside a still-unmatched track's prediction and much
        # smaller is that object half-hidden, as a detector reports it confidently when it
        # comes out from behind something: it keeps the track, without moving the filter
        third = [second[k] for k in rest_t]
        pairs, rest_t, rest_d = self._match(third, high + low, 1.0 - _PARTIAL_INSIDE, inside=True)
        self._hits(pairs, low=True)
        taken = {i for _, i in pairs}
        high = [i for i in high if i not in taken]
        for k in rest_t:
            t = tr.tracks[third[k]]
            t.state = TrackState.LOST
            t.misses += 1
        # 3. leftover high-score detections vs tentative tracks; 4. new tentative tracks
        pairs, rest_t, rest_d = self._match(tentative, high, 1.0 - _TENTATIVE_MATCH_IOU)
        self._hits(pairs)
        for k in rest_t:
            tr.tracks[tentative[k]].state = TrackState.ENDED  # never shown: no event
        for j in rest_d:
            d = dets[high[j]]
            if d.score >= tr.params_for(d.label).new_track_score:
                self._start(high[j])

    def _match(
        self, rows: list[int], which: list[int], limit: float, *, inside: bool = False
    ) -> tuple[list[tuple[int, int]], list[int], list[int]]:
        """Pairs (track row, detection index) at cost 1 - IoU <= ``limit``, same class only;
        and the positions in ``rows`` and ``which`` left unmatched. ``inside``: the cost is
        1 - the share of the box inside the prediction, for boxes at most ``_PARTIAL_AREA`` of
        its area."""
        if not rows or not which:
            return [], list(range(len(rows))), list(range(len(which)))
        if inside:  # the prediction grown by a quarter each side: it has drifted while unseen
            pred = self.pred[rows]
            grow = np.tile(pred[:, 2:] - pred[:, :2], 2) * 0.25  # w, h, w, h
            inter, _, area_d = overlap(pred + grow * [-1, -1, 1, 1], self.boxes[which])
            area_t = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
            cost = 1.0 - inter / np.maximum(area_d[None, :], 1e-12)
            cost[area_d[None, :] > _PARTIAL_AREA * area_t[:, None]] = _MISMATCH
            if not self.one_class:
                cost[self.t_label[rows][:, None] != self.d_label[which][None, :]] = _MISMATCH
        else:  # every stage reads the one cost matrix of all tracks and detections
            if self._cost is None:
                self._cost = 1.0 - iou_matrix(self.pred, self.boxes)
                if not self.one_class:
                    self._cost[self.t_label[:, None] != self.d_label[None, :]] = _MISMATCH
            cost = self._cost[rows][:, which]
        pairs, rest_r, rest_c = assign(cost, limit)
        return [(rows[a], which[b]) for a, b in pairs], rest_r, rest_c

    def _hits(self, pairs: list[tuple[int, int]], *, low: bool = False) -> None:
        """Apply matches (track row, detection index); one loop, as it runs per object.

        A low-score box is a partial or blurred view: it keeps the track alive but does not
        move the filter (a half-hidden box would read as the object slowing and shrinking, and
        the prediction through the occlusion that follows would lag behind it). Same for a
        confident box whose area jumps: part of the object (hidden behind something), or two
        objects in one box as they cross; trusted only if it lasts.
        """
        tracks, dets, areas, now = self.tr.tracks, self.dets, self.areas, self.now
        out, corrections = self.out, self.corrections
        for row, i in pairs:
            t, d, area = tracks[row], dets[i], areas[i]
            correct = not low
            if correct and t.track_id and not _SIZE_JUMP * t.area <= area <= t.area / _SIZE_JUMP:
                t.odd += 1
                correct = t.odd >= _SIZE_JUMP_FRAMES
            if correct:
                corrections.append((row, d.box))
                t.area = area if t.odd else 0.9 * t.area + 0.1 * area
                t.odd = 0
            t.score = d.score
            t.last_seen = now
            if d.score > t.best_score:
                t.best_score = d.score
            t.misses = 0
            t.hits += 1
            if t.track_id or t.hits >= t.params.min_hits:
                if not t.track_id:
                    self.tr._confirm(t, out)
                t.state = TrackState.TRACKED
                out.ids[i] = t.track_id
                out.visible.append(t)

    def _start(self, i: int) -> None:
        d = self.dets[i]
        params = self.tr.params_for(d.label)
        t = Track(d.label_id, d.label, d.box, d.score, self.now, self.now, params)
        self.new.append(t)
        if params.min_hits <= 1:
            self._show(t, i)

    def _show(self, t: Track, i: int) -> None:
        if not t.track_id:
            self.tr._confirm(t, self.out)
        t.state = TrackState.TRACKED
        self.out.ids[i] = t.track_id
        self.out.visible.append(t)


def tracker_from_config(cfg: TrackingConfig) -> Tracker:
    """A ``Tracker`` for a pipeline's ``[pipelines.tracking]``."""
    base = TrackParams(
        high_score=cfg.high_score,
        low_score=cfg.low_score,
        new_track_score=cfg.new_track_score,
        match_iou=cfg.match_iou,
        min_hits=cfg.min_hits,
        lost_frames=cfg.lost_frames,
    )
    per_class = {
        name: TrackParams(
            high_score=o.high_score if o.high_score is not None else base.high_score,
            low_score=min(base.low_score, o.high_score if o.high_score is not None else 1.0),
            new_track_score=(
                o.new_track_score if o.new_track_score is not None else base.new_track_score
            ),
            match_iou=base.match_iou,
            min_hits=base.min_hits,
            lost_frames=o.lost_frames if o.lost_frames is not None else base.lost_frames,
        )
        for name, o in cfg.per_class.items()
    }
    return Tracker(base, per_class=per_class, classes=cfg.classes, max_tracks=cfg.max_tracks)
