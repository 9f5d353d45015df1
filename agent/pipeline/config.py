"""Pure: one pipeline's configuration (a ``[[pipelines]]`` table of the agent's TOML).

The camera or stream, the model that watches it, where results and events go, snapshots,
motion gating, tracking, and the zones and lines analytics counts. ``agent.config`` holds the
rest of the file (device, broker, update, storage, telemetry, API, engine) and loads it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = [
    "MAX_REGIONS",
    "ClipsConfig",
    "EventsConfig",
    "LineConfig",
    "MotionConfig",
    "PipelineConfig",
    "SinkConfig",
    "SnapshotConfig",
    "Task",
    "TrackClassConfig",
    "TrackingConfig",
    "ZoneConfig",
]

Task = Literal["classification", "detection", "heatmap", "raw"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SinkConfig(_Strict):
    """Where a pipeline's results go."""

    jsonl: Path | None = Field(None, description="Append one JSON line per inferred frame here")
    jsonl_max_mb: int = Field(
        64, ge=1, le=100_000, description="Rotate the JSONL file past this size"
    )


class EventsConfig(_Strict):
    """Which inference results a pipeline sends to the cloud (with [broker]; never frames)."""

    policy: Literal["every", "change", "rate", "off"] = Field(
        "rate", description="every frame, on change of what is seen, at most max_per_s, or off"
    )
    max_per_s: float = Field(1.0, gt=0, le=1000, description="Events per second for 'rate'")


class SnapshotConfig(_Strict):
    """Opt-in: send a JPEG of the camera frame at most once per ``every_s`` (off when absent)."""

    every_s: float = Field(60.0, ge=1, le=86400, description="At most one snapshot per this")
    jpeg_quality: int = Field(80, ge=10, le=95, description="JPEG quality")
    max_width: int = Field(640, ge=32, le=4096, description="Downscale wider frames to this")


class ClipsConfig(_Strict):
    """Opt-in: MP4 clips around object events, cut from the source's own compressed stream
    (never re-encoded); kept on the device, fetched through the local API or by the cloud."""

    pre_s: float = Field(5.0, ge=0, le=120, description="Seconds before the event")
    post_s: float = Field(5.0, ge=0, le=120, description="Seconds after the (last) event")
    max_s: float = Field(
        60.0, ge=1, le=900,
        description="Longest clip: events while a clip waits for its post roll extend it "
        "up to this, later ones start another",
    )  # fmt: skip
    max_mb: float = Field(
        512, ge=1, le=1_000_000, description="Disk budget of the pipeline's clips (oldest go)"
    )
    segment_s: float = Field(
        1.0, ge=0.2, le=30,
        description="Recorder segment length; segments end at the next keyframe, so at or "
        "below the camera's GOP every segment is one GOP and a clip starts and ends at most "
        "one GOP beyond its roll",
    )  # fmt: skip

    @model_validator(mode="after")
    def _fits(self) -> ClipsConfig:
        if self.pre_s + self.post_s > self.max_s:
            raise ValueError(
                f"clips: pre_s + post_s = {self.pre_s + self.post_s:g} s exceeds max_s "
                f"{self.max_s:g} s"
            )
        return self


RegionName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")]
ClassName = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Coord = Annotated[float, Field(ge=0, le=100_000)]
Point = tuple[Coord, Coord]
Anchor = Literal["bottom_center", "center"]
MAX_REGIONS = 32  # zones + lines of one pipeline


class TrackClassConfig(_Strict):
    """Tracking thresholds for one class, overriding the pipeline's (unset: the pipeline's)."""

    high_score: float | None = Field(
        None, ge=0, le=1, description="Detections at or above this are matched first"
    )
    new_track_score: float | None = Field(
        None, ge=0, le=1, description="An unmatched detection starts a track from this score"
    )
    lost_frames: int | None = Field(
        None, ge=0, le=10_000, description="Inferred frames a track survives unseen"
    )


class TrackingConfig(_Strict):
    """Multi-object tracking of a detection pipeline (ByteTrack's two-stage association).

    Ids are stable through short occlusions and missed detections (``lost_frames``); tracks
    never change class. On whenever the pipeline has zones or lines.
    """

    classes: list[ClassName] | None = Field(
        None, max_length=1000, description="Track only these classes (unset: all)"
    )
    high_score: float = Field(
        0.5, ge=0, le=1, description="Detections at or above this are matched first"
    )
    low_score: float = Field(
        0.1, ge=0, le=1,
        description="Detections between this and high_score only keep existing tracks alive",
    )  # fmt: skip
    new_track_score: float = Field(
        0.6, ge=0, le=1, description="An unmatched detection starts a track from this score"
    )
    match_iou: float = Field(
        0.2, gt=0, le=1, description="Least overlap (IoU) of a detection with a track's prediction"
    )
    min_hits: int = Field(
        2, ge=1, le=100, description="Consecutive matches before a track gets its id"
    )
    lost_frames: int = Field(
        30, ge=0, le=10_000,
        description="Inferred frames a track survives unseen (occlusion) before it ends",
    )  # fmt: skip
    max_tracks: int = Field(512, ge=1, le=10_000, description="Tracks kept at most, lost included")
    per_class: dict[ClassName, TrackClassConfig] = Field(
        default_factory=dict, max_length=1000, description="Class name -> its own thresholds"
    )

    @model_validator(mode="after")
    def _scores(self) -> TrackingConfig:
        if self.low_score > self.high_score:
            raise ValueError(f"low_score {self.low_score} is above high_score {self.high_score}")
        return self


class _RegionConfig(_Strict):
    name: RegionName = Field(description="Zone or line name, unique within the pipeline")
    coords: Literal["pixels", "normalized"] = Field(
        "pixels", description="Points in source-frame pixels, or 0..1 of its width and height"
    )
    classes: list[ClassName] | None = Field(
        None, max_length=1000, description="Count only these classes (unset: all tracked)"
    )
    min_score: float = Field(
        0.0, ge=0, le=1, description="Count a track once its best score reaches this"
    )
    anchor: Anchor = Field(
        "bottom_center", description="The box's point that must be inside or cross: "
        "bottom_center (where an object stands) or center",
    )  # fmt: skip

    def _normalized_ok(self, points: list[tuple[float, float]]) -> None:
        if self.coords == "normalized" and any(not (0 <= c <= 1) for p in points for c in p):
            raise ValueError(f"{self.name}: normalized coordinates must lie in 0..1")


class ZoneConfig(_RegionConfig):
    """A polygon: events when a track enters it, leaves it, and stays in it ``dwell_s``."""

    points: list[Point] = Field(
        min_length=3, max_length=64, description="Polygon vertices [x, y], in order"
    )
    dwell_s: float | None = Field(
        None, gt=0, le=86400, description="Emit 'dwell' once a track stays inside this long"
    )

    @model_validator(mode="after")
    def _polygon(self) -> ZoneConfig:
        self._normalized_ok(list(self.points))
        xs, ys = [p[0] for p in self.points], [p[1] for p in self.points]
        area2 = sum(xs[i] * ys[i - 1] - xs[i - 1] * ys[i] for i in range(len(xs)))
        if area2 == 0:
            raise ValueError(f"zone {self.name}: the polygon has no area")
        return self


class LineConfig(_RegionConfig):
    """A directed line from ``start`` to ``end``: one 'crossed' event per track, with direction.

    'in' is a crossing toward the line's right-hand side as drawn on screen (y down): for a
    line drawn left to right, moving down the image is 'in', moving up is 'out'.
    """

    start: Point = Field(description="First point [x, y]")
    end: Point = Field(description="Second point [x, y]")
    margin: float = Field(
        4.0, ge=0, le=1000,
        description="Pixels beyond the line a point must reach to count as on that side "
        "(stops a box that jitters on the line from counting)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _segment(self) -> LineConfig:
        self._normalized_ok([self.start, self.end])
        if self.start == self.end:
            raise ValueError(f"line {self.name}: start and end are the same point")
        return self


class MotionConfig(_Strict):
    """Skip inference on frames that barely differ from the last inferred one."""

    pixel_threshold: int = Field(
        25, ge=1, le=255, description="A pixel changed when its grey level moved more than this"
    )
    min_changed: float = Field(
        0.002, gt=0, le=1, description="Infer when at least this fraction of pixels changed"
    )
    max_skip_s: float = Field(
        2.0, gt=0, le=3600, description="Infer at least this often even on a still scene"
    )
    width: int = Field(
        160, ge=16, le=1920, description="Compare frames at about this width (pixels)"
    )


class PipelineConfig(_Strict):
    """One camera or stream and the model that watches it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$", description="Pipeline name")
    source: str | int = Field(
        description="Camera index, /dev/videoN, file path, rtsp/udp/http URL or GStreamer pipeline"
    )
    model: str = Field(min_length=1, description="Registry model name, or a path to a local .onnx")
    task: Task | None = Field(None, description="Task when the model has no card")
    input_size: str | None = Field(
        None, pattern=r"^\d+x\d+$", description="WxH when the model's input is dynamic"
    )
    loop: bool = Field(False, description="Restart a file source at its end")
    pace: Literal["realtime", "none"] = Field(
        "realtime",
        description="File sources: 'realtime' plays at the file's fps and drops frames the model "
        "cannot keep up with; 'none' reads as fast as the model takes frames, dropping none",
    )
    open_timeout_s: float = Field(5.0, gt=0, le=300, description="Per-attempt open/read timeout")
    sink: SinkConfig = Field(default_factory=SinkConfig, description="Result destinations")
    events: EventsConfig = Field(default_factory=EventsConfig, description="Events to the cloud")
    snapshots: SnapshotConfig | None = Field(
        None, description="Camera frames to the cloud (with [broker]); off unless set"
    )
    max_fps: float | None = Field(
        None, ge=0.1, le=1000, description="Infer at most this many frames per second"
    )
    motion: MotionConfig | None = Field(
        None, description="Skip inference on still frames (off unless set)"
    )
    tracking: TrackingConfig | None = Field(
        None, description="Track detected objects (on with defaults when zones or lines are set)"
    )
    zones: list[ZoneConfig] = Field(
        default_factory=list, max_length=MAX_REGIONS, description="Polygons to watch"
    )
    lines: list[LineConfig] = Field(
        default_factory=list, max_length=MAX_REGIONS, description="Directed lines to count"
    )
    clips: ClipsConfig | None = Field(
        None,
        description="MP4 clips around object events from the compressed stream (file or "
        "network sources); off unless set",
    )

    @model_validator(mode="after")
    def _regions(self) -> PipelineConfig:
        names = [r.name for r in [*self.zones, *self.lines]]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"zone and line names must be unique in a pipeline; repeated: {dup}")
        if len(names) > MAX_REGIONS:
            raise ValueError(f"{len(names)} zones and lines, at most {MAX_REGIONS} per pipeline")
        if names and self.tracking is None:
            self.tracking = TrackingConfig()  # zones and lines count tracks
        if self.clips is not None:
            self._clips_possible(bool(names))
        return self

    def _clips_possible(self, has_regions: bool) -> None:
        from agent.pipeline.sources import parse_source  # OpenCV: only when clips are asked

        kind = parse_source(self.source).kind
        if kind in ("device", "gstreamer"):
            raise ValueError(
                f"pipeline {self.name}: clips need a compressed stream to copy, and "
                f"{kind} source {self.source!r} delivers decoded frames only (encoding them "
                "would cost the CPU the model needs). Use a file or rtsp/http source, or set "
                "[pipelines.snapshots] to send JPEG frames instead"
            )
        if self.pace == "none" and kind == "file":
            raise ValueError(
                f"pipeline {self.name}: clips follow the wall clock, and pace = 'none' reads "
                "the file faster than it plays; use pace = 'realtime' with clips"
            )
        if not has_regions:
            raise ValueError(
                f"pipeline {self.name}: clips are cut around object events; add zones or lines"
            )

    def longest_inference_gap_s(self) -> float:
        """The longest a streaming pipeline may go without inferring, by its rate settings."""
        gap = 1.0 / self.max_fps if self.max_fps else 0.0
        return max(gap, self.motion.max_skip_s if self.motion else 0.0)
