"""Pure: the telemetry and inference-event messages of the wire contract.

* ``…/devices/D/telemetry`` (device→cloud, QoS 1, not retained) carries a ``Telemetry``: every
  ``interval_s`` seconds, per pipeline fps in/out, counters and per-stage latency percentiles,
  plus device CPU/memory/disk/temperature/GPU/power and the outbox depth.
* ``…/devices/D/events`` (device→cloud, QoS 1, not retained, rate-limited) carries an
  ``InferenceEvent``: what one frame's inference found, in the shape of
  ``agent.pipeline.postprocess.Result.to_dict()`` plus the frame and model it came from, the
  track id of each tracked detection and the frame's object events (``agent.protocol.analytics``).

Both are parsed from untrusted bytes by ``decode`` and fail with ``BadMessage`` only. Floats are
finite (``NaN``/``Infinity`` are refused) so that every payload is strict JSON for dashboards.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SerializerFunctionWrapHandler,
    StringConstraints,
    field_validator,
    model_serializer,
    model_validator,
)

from agent.protocol import CONTRACT_VERSION
from agent.protocol.analytics import MAX_TRACK_ID, LineCount, ObjectEvent, ZoneCount
from agent.protocol.card import Precision, Task
from agent.protocol.state import (
    MAX_PIPELINES,
    MAX_REVISION,
    Contract,
    DeviceId,
    ModelName,
    PipelineName,
    Version,
    _utc,
)
from agent.protocol.wire import WireMessage

__all__ = [
    "CLIP_ID_PATTERN",
    "Classification",
    "Detection",
    "DeviceStats",
    "InferenceEvent",
    "OutboxStats",
    "PipelineTelemetry",
    "Snapshot",
    "SourceState",
    "StageLatency",
    "Telemetry",
    "pipeline_telemetry_from_status",
]

MAX_MS = 3_600_000.0  # an hour: a latency above that is a stuck pipeline, not a measurement
MAX_FPS = 100_000.0
MAX_COUNT = MAX_REVISION  # counters stay exact in every JSON implementation
MAX_STAGES = 16
MAX_SENSORS = 64
MAX_RESULTS = 1000  # PostprocessSpec.top_k / max_detections bounds of a sane card
MAX_COORD = 1e6  # source-frame pixels; far above any camera

# sysfs thermal zones and INA3221 rails ("CPU-therm", "VDD_IN", "thermal_zone0"…)
SensorName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:+-]{0,63}$")]
StageName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,31}$")]
Label = Annotated[str, StringConstraints(max_length=128)]
SourceState = Literal["connecting", "streaming", "waiting", "ended", "stopped"]
SkipReason = Literal["max_fps", "no_motion"]  # agent.pipeline.gating.SkipReason
MAX_REGION_ROWS = 256  # zone/line x class rows of one pipeline (~90 bytes each)
# PIPELINE.MILLISECONDS (the clip's first event, ms since the epoch): path- and topic-safe
CLIP_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}\.[0-9]{10,16}$"
ClipId = Annotated[str, StringConstraints(pattern=CLIP_ID_PATTERN)]

_FINITE = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Part(BaseModel):
    """Base of the nested parts: strict, frozen, finite floats."""

    model_config = _FINITE


# --- telemetry -------------------------------------------------------------------------------


class StageLatency(_Part):
    """Latency percentiles of one pipeline stage over the recent samples, in milliseconds."""

    p50: float = Field(ge=0, le=MAX_MS, description="Median latency (ms)")
    p95: float = Field(ge=0, le=MAX_MS, description="95th percentile latency (ms)")
    p99: float = Field(ge=0, le=MAX_MS, description="99th percentile latency (ms)")
    count: int | None = Field(
        None, ge=0, le=MAX_COUNT, description="Samples since the start (contract 1.1)"
    )
    sum_ms: float | None = Field(
        None, ge=0, le=float(MAX_COUNT), description="Their total (ms) (contract 1.1)"
    )


class PipelineTelemetry(_Part):
    """One pipeline's throughput, counters and latency since start (counters) or recently."""

    name: PipelineName = Field(description="Pipeline name from the agent config")
    model: ModelName | None = Field(None, description="Model running now (None: none loaded)")
    version: Version | None = Field(None, description="Its version")
    backend: str | None = Field(
        None, max_length=64, description="Inference backend, e.g. onnxruntime, tensorrt"
    )
    precision: Precision | None = Field(None, description="fp32, fp16 or int8")
    source_state: SourceState = Field(description="Frame source state")
    fps_in: float = Field(ge=0, le=MAX_FPS, description="Frames read per second, last interval")
    fps_out: float = Field(
        ge=0, le=MAX_FPS, description="Frames inferred per second, last interval"
    )
    frames_read: int = Field(ge=0, le=MAX_COUNT, description="Frames read since start")
    frames_inferred: int = Field(ge=0, le=MAX_COUNT, description="Frames inferred since start")
    frames_dropped: int = Field(
        ge=0, le=MAX_COUNT, description="Frames overwritten in the latest-frame slot since start"
    )
    reconnects: int = Field(ge=0, le=MAX_COUNT, description="Source reconnects since start")
    errors: int = Field(ge=0, le=MAX_COUNT, description="Inference and sink errors since start")
    latency_ms: dict[StageName, StageLatency] = Field(
        default_factory=dict,
        max_length=MAX_STAGES,
        description="Stage (capture_wait, preprocess, infer, postprocess, track, sink, overhead,"
        " age) → percentiles",
    )
    frames_skipped: dict[SkipReason, Annotated[int, Field(ge=0, le=MAX_COUNT)]] = Field(
        default_factory=dict,
        description="Frames not inferred since start, by why: max_fps, no_motion (rate control"
        " on; contract 1.1)",
    )
    tracks_active: int | None = Field(
        None, ge=0, le=MAX_COUNT, description="Tracks alive now (None: tracking off)"
    )
    tracks_started: int | None = Field(
        None, ge=0, le=MAX_TRACK_ID, description="Track ids issued since start"
    )
    zones: list[ZoneCount] = Field(
        default_factory=list, max_length=MAX_REGION_ROWS, description="Counts per zone and class"
    )
    lines: list[LineCount] = Field(
        default_factory=list, max_length=MAX_REGION_ROWS, description="Counts per line and class"
    )

    @model_validator(mode="after")
    def _model_and_version(self) -> PipelineTelemetry:
        if (self.model is None) != (self.version is None):
            raise ValueError(
                f"model and version come together, got model={self.model!r}"
                f" version={self.version!r}"
            )
        return self


class DeviceStats(_Part):
    """Device-wide resource use; fields the hardware does not expose are None or empty."""

    cpu_percent: float = Field(ge=0, le=100, description="CPU use over all cores (%)")
    load1: float = Field(ge=0, le=1e6, description="1-minute load average")
    mem_used_mb: float = Field(ge=0, le=1e9, description="Memory in use (MiB)")
    mem_total_mb: float = Field(ge=0, le=1e9, description="Memory installed (MiB)")
    disk_used_pct: float = Field(ge=0, le=100, description="Data-dir filesystem use (%)")
    temperatures_c: dict[SensorName, float] = Field(
        default_factory=dict,
        max_length=MAX_SENSORS,
        description="Thermal zone → temperature (°C)",
    )
    gpu_load_pct: float | None = Field(
        None, ge=0, le=100, description="GPU load (%), None where not exposed"
    )
    emc_load_pct: float | None = Field(
        None, ge=0, le=100, description="Jetson memory-controller (EMC) load (%), None elsewhere"
    )
    power_mw: dict[SensorName, float] = Field(
        default_factory=dict, max_length=MAX_SENSORS, description="Power rail → power (mW)"
    )

    @field_validator("temperatures_c")
    @classmethod
    def _temps(cls, v: dict[str, float]) -> dict[str, float]:
        for k, t in v.items():
            if not -273.15 <= t <= 1000.0:
                raise ValueError(f"temperature {k!r} is {t} °C, expected -273.15..1000")
        return v

    @field_validator("power_mw")
    @classmethod
    def _power(cls, v: dict[str, float]) -> dict[str, float]:
        for k, p in v.items():
            if not 0.0 <= p <= 1e7:
                raise ValueError(f"power rail {k!r} reads {p} mW, expected 0..1e7")
        return v


class OutboxStats(_Part):
    """The on-disk outbox of messages waiting for the broker."""

    depth: int = Field(ge=0, le=MAX_COUNT, description="Messages waiting")
    bytes: int = Field(ge=0, le=MAX_COUNT, description="Their total payload size")
    dropped: int = Field(
        ge=0, le=MAX_COUNT, description="Messages dropped because the outbox was full, ever"
    )


class Telemetry(WireMessage):
    """The periodic metrics message on ``…/devices/D/telemetry``."""

    model_config = _FINITE

    type: Literal["telemetry"] = Field("telemetry", description="Message kind, always 'telemetry'")
    device_id: DeviceId = Field(description="Reporting device")
    ts: datetime = Field(description="When the snapshot was taken (UTC)")
    interval_s: float = Field(gt=0, le=86400, description="Seconds between telemetry messages")
    pipelines: list[PipelineTelemetry] = Field(
        default_factory=list, max_length=MAX_PIPELINES, description="One entry per pipeline"
    )
    device: DeviceStats = Field(description="Device resource use")
    outbox: OutboxStats = Field(description="On-disk outbox state")
    contract: Contract = Field(CONTRACT_VERSION, description="Wire contract version")

    @field_validator("ts")
    @classmethod
    def _ts_utc(cls, v: datetime) -> datetime:
        return _utc(v)

    @model_validator(mode="after")
    def _unique(self) -> Telemetry:
        names = [p.name for p in self.pipelines]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline names repeat: {sorted(names)}")
        return self


# --- events ----------------------------------------------------------------------------------


class Classification(_Part):
    """One class of a classification result (``Result.to_dict()['classifications'][i]``)."""

    label_id: int = Field(ge=0, le=1_000_000, description="Class index")
    label: Label = Field(description="Class name from labels.txt (or the index as text)")
    score: float = Field(
        ge=-1e9, le=1e9, description="Score: a probability, or a logit when softmax is off"
    )


class Detection(_Part):
    """One detected object (``Result.to_dict()['detections'][i]``)."""

    box: tuple[float, float, float, float] = Field(
        description="x1, y1, x2, y2 in source-frame pixels"
    )
    score: float = Field(ge=0, le=1, description="Confidence")
    label_id: int = Field(ge=0, le=1_000_000, description="Class index")
    label: Label = Field(description="Class name")
    track_id: int | None = Field(
        None, ge=1, le=MAX_TRACK_ID, description="Id of the object's track (tracking on)"
    )

    @field_validator("box")
    @classmethod
    def _box(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = v
        if any(abs(c) > MAX_COORD for c in v) or x2 < x1 or y2 < y1:
            raise ValueError(f"box {v} is not x1 <= x2, y1 <= y2 within ±{MAX_COORD:g} px")
        return v


class InferenceEvent(WireMessage):
    """One frame's inference result on ``…/devices/D/events``."""

    model_config = _FINITE

    type: Literal["event"] = Field("event", description="Message kind, always 'event'")
    device_id: DeviceId = Field(description="Device that ran the inference")
    pipeline: PipelineName = Field(description="Pipeline that produced the frame")
    model: ModelName = Field(description="Model that ran")
    version: Version = Field(description="Its version")
    task: Task = Field(description="Model task from its card")
    frame_seq: int = Field(ge=0, le=MAX_COUNT, description="Frame number within the source")
    frame_time: float = Field(
        ge=0, le=1e11, description="Capture time, seconds since the Unix epoch (UTC)"
    )
    latency_ms: float = Field(
        ge=0, le=MAX_MS, description="Preprocess + inference + postprocess time (ms)"
    )
    classifications: list[Classification] = Field(
        default_factory=list, max_length=MAX_RESULTS, description="Top-k classes, best first"
    )
    detections: list[Detection] = Field(
        default_factory=list, max_length=MAX_RESULTS, description="Detected objects, best first"
    )
    summary: dict[Annotated[str, StringConstraints(max_length=64)], JsonValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Task-specific summary, e.g. {'count': 3} or raw output statistics",
    )
    objects: list[ObjectEvent] = Field(
        default_factory=list,
        max_length=MAX_RESULTS,
        description="Object events of this frame at zones and lines (contract 1.1)",
    )
    clip: ClipId | None = Field(
        None,
        description="Id of the MP4 clip around this frame's object events (pipelines with "
        "[clips]; fetch it on clips/req or GET /v1/clips/ID once its post roll has passed; "
        "contract 1.2)",
    )
    contract: Contract = Field(CONTRACT_VERSION, description="Wire contract version")

    @field_validator("summary")
    @classmethod
    def _finite_summary(cls, v: dict[str, Any]) -> dict[str, Any]:
        # JsonValue lets Infinity/NaN through (allow_inf_nan does not reach into it), and JSON
        # has no such numbers: they would be re-encoded as null. Refuse them instead.
        def check(x: Any) -> None:
            if isinstance(x, float) and not math.isfinite(x):
                raise ValueError("summary values must be finite numbers")
            if isinstance(x, dict):
                for y in x.values():
                    check(y)
            elif isinstance(x, list):
                for y in x:
                    check(y)

        check(v)
        return v

    @model_serializer(mode="wrap")
    def _omit_no_clip(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """``clip`` is written only when set: an event without a clip is byte for byte what a
        1.1 receiver (which forbids unknown fields) accepts."""
        out: dict[str, Any] = handler(self)
        if out.get("clip", 0) is None:
            del out["clip"]
        return out

    @classmethod
    def from_pipeline_event(cls, device_id: str, event: Mapping[str, Any]) -> InferenceEvent:
        """Pure: the message for one event dict built by ``Pipeline._infer_one``.

        Raises:
            pydantic.ValidationError: the event does not fit the contract.
        """
        return cls.model_validate({**event, "device_id": device_id})


MAX_SNAPSHOT_BYTES = 2 << 20  # a JPEG of a 4K frame at quality 80 fits with room to spare
_B64 = r"^[A-Za-z0-9+/]*={0,2}$"


class Snapshot(WireMessage):
    """One camera frame as JPEG on ``…/devices/D/snapshots``.

    Sent only by pipelines that enable ``[pipelines.snapshots]`` (frames never leave the device
    otherwise), at most one per ``every_s``.
    """

    model_config = _FINITE
    max_bytes: ClassVar[int] = (MAX_SNAPSHOT_BYTES + 2) // 3 * 4 + 4096  # base64 + the fields

    type: Literal["snapshot"] = Field("snapshot", description="Message kind, always 'snapshot'")
    device_id: DeviceId = Field(description="Device whose camera took the frame")
    pipeline: PipelineName = Field(description="Pipeline that read the frame")
    model: ModelName | None = Field(None, description="Model running on the frame, if any")
    version: Version | None = Field(None, description="Its version")
    frame_seq: int = Field(ge=0, le=MAX_COUNT, description="Frame number within the source")
    frame_time: float = Field(
        ge=0, le=1e11, description="Capture time, seconds since the Unix epoch (UTC)"
    )
    width: int = Field(ge=1, le=16384, description="JPEG width (px), after any downscaling")
    height: int = Field(ge=1, le=16384, description="JPEG height (px)")
    jpeg_b64: str = Field(
        max_length=(MAX_SNAPSHOT_BYTES + 2) // 3 * 4,
        pattern=_B64,
        description="The JPEG file, base64 (standard alphabet, padded)",
    )
    contract: Contract = Field(CONTRACT_VERSION, description="Wire contract version")

    @field_validator("jpeg_b64")
    @classmethod
    def _is_jpeg(cls, v: str) -> str:
        try:
            head = base64.b64decode(v[:8], validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"not base64: {e}") from None
        if not head.startswith(b"\xff\xd8"):
            raise ValueError("not a JPEG (no SOI marker)")
        return v

    def jpeg(self) -> bytes:
        """The JPEG bytes."""
        return base64.b64decode(self.jpeg_b64)


# --- mapping from the pipeline ---------------------------------------------------------------


def pipeline_telemetry_from_status(status: Mapping[str, Any]) -> PipelineTelemetry:
    """Pure: the telemetry entry for one ``Pipeline.status(now)`` dict.

    ``model`` arrives as ``name@version`` and is split; stages whose ring is still empty (an
    empty dict from ``LatencyRing.percentiles``) are left out; keys the contract does not carry
    (``source``, which may hold camera credentials, ``last_error``, ``source_failures``, the
    ``max``/``mean``/``n`` of a stage) are dropped; a stage's ``count``/``sum`` become
    ``count``/``sum_ms``.

    Raises:
        pydantic.ValidationError: a value is out of the contract's bounds.
    """
    ref = status.get("model")
    model = version = None
    if ref:
        model, _, version = str(ref).rpartition("@")
    latency = {
        stage: {
            **{q: p[q] for q in ("p50", "p95", "p99")},
            "count": p.get("count"),
            "sum_ms": p.get("sum"),
        }
        for stage, p in (status.get("latency_ms") or {}).items()
        if p
    }
    skipped = {r: status.get(f"frames_skipped_{r}", 0) for r in ("max_fps", "no_motion")}
    return PipelineTelemetry.model_validate(
        {
            "name": status["name"],
            "model": model or None,
            "version": version or None,
            "backend": status.get("backend"),
            "precision": status.get("precision"),
            "source_state": status["source_state"],
            "fps_in": status["fps_in"],
            "fps_out": status["fps_out"],
            "frames_read": status["frames_read"],
            "frames_inferred": status["frames_inferred"],
            "frames_dropped": status["frames_dropped"],
            "reconnects": status["reconnects"],
            "errors": status["errors"],
            "latency_ms": latency,
            "frames_skipped": skipped,
            "tracks_active": status.get("tracks_active"),
            "tracks_started": status.get("tracks_started"),
            # beyond the bound, rows are left out here (Prometheus has them all): a device
            # counting 80 classes in 32 zones still sends its telemetry
            "zones": (status.get("zones") or [])[:MAX_REGION_ROWS],
            "lines": (status.get("lines") or [])[:MAX_REGION_ROWS],
        }
    )
