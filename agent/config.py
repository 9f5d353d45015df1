"""Pure: the agent's configuration (TOML validated by pydantic), with environment overrides.

Read once at start-up by ``load_config``; nothing reads the environment at import time.
Environment variables ``EDGEFLEET_DEVICE_ID``, ``EDGEFLEET_DATA_DIR`` and ``EDGEFLEET_PROFILE``
override the file (secrets added by later sections follow the same ``EDGEFLEET_`` scheme:
``EDGEFLEET_BROKER_USERNAME``/``_PASSWORD``, ``EDGEFLEET_API_TOKEN``).
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from agent.common.errors import ConfigError

GroupName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib

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
        return self

    def longest_inference_gap_s(self) -> float:
        """The longest a streaming pipeline may go without inferring, by its rate settings."""
        gap = 1.0 / self.max_fps if self.max_fps else 0.0
        return max(gap, self.motion.max_skip_s if self.motion else 0.0)


class OnnxRuntimeEngine(_Strict):
    """ONNX Runtime with the best execution provider available."""

    type: Literal["onnxruntime"] = "onnxruntime"
    providers: list[str] | None = Field(None, description="Execution providers, preferred first")
    threads: int = Field(0, ge=0, le=256, description="Intra-op threads, 0 = one per core")


class TensorRTEngine(_Strict):
    """Native TensorRT 10 engines built on the device."""

    type: Literal["tensorrt"] = "tensorrt"
    workspace_mb: int | None = Field(
        None, ge=16, le=65536, description="Builder workspace; None = profile's"
    )
    dla_core: int | None = Field(
        None, ge=0, le=7, description="Run on this DLA core (GPU fallback on)"
    )


class AutoEngine(_Strict):
    """The first backend of the device profile's preference list that is available."""

    type: Literal["auto"] = "auto"


EngineConfig = Annotated[
    AutoEngine | OnnxRuntimeEngine | TensorRTEngine, Field(discriminator="type")
]


class BrokerConfig(_Strict):
    """The MQTT broker the agent talks to."""

    url: str = Field(
        pattern=r"^mqtts?://[^/:]+(:\d{1,5})?/?$",
        description="mqtt://host:port or mqtts://host:port",
    )
    topic_root: str = Field(
        "edgefleet/v1", pattern=r"^[A-Za-z0-9_/-]{1,128}$", description="Topic prefix"
    )
    username: str | None = Field(None, max_length=256, description="MQTT user (or env)")
    password: str | None = Field(
        None, max_length=1024, description="MQTT password; prefer EDGEFLEET_BROKER_PASSWORD"
    )
    ca_file: Path | None = Field(None, description="CA bundle for mqtts://")
    cert_file: Path | None = Field(None, description="Client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="Client private key (mutual TLS)")
    keepalive_s: int = Field(30, ge=5, le=1200, description="MQTT keepalive")

    @model_validator(mode="after")
    def _tls(self) -> BrokerConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class TrustConfig(_Strict):
    """The TUF trust root the device was provisioned with."""

    root: Path = Field(
        description="root.json from `edgefleet registry init` (copied at first start)"
    )


class UpdateConfig(_Strict):
    """How model updates are fetched, tried and committed."""

    chunk_kb: int = Field(
        64, ge=1, le=256, description="Transfer window size (AWS IoT caps at 128)"
    )
    window: int = Field(
        32, ge=1, le=64, description="Chunks in flight (32 x 64 KiB: 0.51 of raw pub/sub here)"
    )
    request_timeout_s: float = Field(5.0, gt=0, le=120, description="Per-chunk timeout")
    retry_s: float = Field(
        10.0, gt=0, le=3600, description="Retry interval after the registry was unreachable"
    )
    max_tries: int = Field(
        3,
        ge=1,
        le=100,
        description="Starts of one version that a restart may cut short (power cut, watchdog) "
        "before it is rejected; downloads always resume",
    )
    health_window_s: float = Field(30.0, ge=0, le=86400, description="Watch time before commit")
    health_min_frames: int = Field(20, ge=0, le=1_000_000, description="Frames needed to commit")
    max_error_rate: float = Field(0.05, ge=0, le=1, description="Errors/frames allowed in window")
    max_latency_ratio: float = Field(
        2.0, ge=1, le=100, description="p95 latency allowed vs the previous version"
    )


class StorageConfig(_Strict):
    """What the device keeps on disk: models that can still run, and a few engines."""

    keep_engines: int = Field(
        6,
        ge=1,
        le=1000,
        description="Engine cache entries kept after each settled update (most recently used; "
        "the running engines are always the most recent)",
    )
    max_mb: int | None = Field(
        None,
        ge=64,
        le=10_000_000,
        description="Budget for models + engines under data_dir; above it after clean-up the "
        "device reports a warning (none: no budget)",
    )


class TelemetryConfig(_Strict):
    """Periodic telemetry and the on-disk outbox that carries it across outages."""

    interval_s: float = Field(10.0, ge=0.1, le=3600, description="Seconds between messages")
    outbox_max_rows: int = Field(100_000, ge=10, le=10_000_000, description="Outbox row bound")
    outbox_max_mb: int = Field(64, ge=1, le=100_000, description="Outbox size bound (MiB)")
    prometheus_port: int | None = Field(
        None, ge=1, le=65535, description="Serve the same metrics for Prometheus here (off: unset)"
    )
    prometheus_addr: str = Field(
        "127.0.0.1", min_length=1, description="Address of the Prometheus endpoint (loopback)"
    )


def is_loopback(addr: str) -> bool:
    """True for ``localhost`` and loopback IP literals (127.0.0.0/8, ::1)."""
    if addr.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(addr.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve anywhere


class ApiConfig(_Strict):
    """The local inference API (``[api]``; off unless the section is present)."""

    port: int = Field(ge=0, le=65535, description="TCP port; 0 = any free port")
    addr: str = Field(
        "127.0.0.1", min_length=1, max_length=255, description="Bind address (loopback default)"
    )
    token: str | None = Field(
        None,
        min_length=16,
        max_length=4096,
        description="Bearer token clients must send; prefer EDGEFLEET_API_TOKEN or token_file",
    )
    token_file: Path | None = Field(None, description="File holding the bearer token")
    max_concurrent: int = Field(2, ge=1, le=64, description="Inferences running at once")
    max_queue: int = Field(8, ge=0, le=4096, description="Requests waiting beyond those; then 429")
    max_body_mb: float = Field(8.0, gt=0, le=1024, description="Largest request body (MiB); 413")
    max_image_mpix: float = Field(
        40.0, gt=0, le=1000, description="Largest decoded image (megapixels); larger is 413"
    )
    max_connections: int = Field(
        64, ge=1, le=512, description="Open connections at once; more get 503 and are closed"
    )
    header_timeout_s: float = Field(
        10.0, gt=0, le=300, description="A request's line and headers must arrive within this"
    )
    body_timeout_s: float = Field(
        30.0, gt=0, le=3600, description="A request's body must arrive within this after headers"
    )

    @model_validator(mode="after")
    def _auth(self) -> ApiConfig:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        if not is_loopback(self.addr) and self.token is None and self.token_file is None:
            raise ValueError(
                f"addr {self.addr!r} is not loopback: a bearer token is required "
                "(token, token_file or EDGEFLEET_API_TOKEN); refusing to serve inference "
                "unauthenticated on the network"
            )
        return self


class ServiceConfig(_Strict):
    """How the agent runs as a service (systemd watchdog)."""

    stall_s: float = Field(
        30.0, ge=1, le=3600,
        description="A pipeline that streams but infers nothing this long stops the watchdog",
    )  # fmt: skip


class AgentConfig(_Strict):
    """The device agent's whole configuration."""

    device_id: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Unique device id"
    )
    data_dir: Path = Field(Path("/var/lib/edgefleet"), description="The one writable state dir")
    profile: str = Field("auto", description="'auto', a builtin profile name or a .toml path")
    tags: dict[str, str] = Field(default_factory=dict, description="Free-form tags for targeting")
    groups: list[GroupName] = Field(
        default_factory=list, max_length=64, description="Groups, e.g. lobby (target group:lobby)"
    )
    engine: EngineConfig = Field(default_factory=AutoEngine, description="Inference backend choice")
    build_timeout_s: float = Field(
        1800, gt=0, le=86400, description="Kill an engine build after this"
    )
    pipelines: list[PipelineConfig] = Field(default_factory=list, description="Cameras/streams")
    broker: BrokerConfig | None = Field(None, description="Cloud connection (none = local only)")
    trust: TrustConfig | None = Field(None, description="TUF trust root for model delivery")
    update: UpdateConfig = Field(default_factory=UpdateConfig, description="Update behaviour")
    storage: StorageConfig = Field(
        default_factory=StorageConfig, description="On-disk bounds for models and engines"
    )
    telemetry: TelemetryConfig = Field(
        default_factory=TelemetryConfig, description="Telemetry sent when [broker] is set"
    )
    api: ApiConfig | None = Field(None, description="Local inference API (off when absent)")
    service: ServiceConfig = Field(default_factory=ServiceConfig, description="As a service")

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not k or not all(c.isalnum() or c in "_-." for c in k):
                raise ValueError(f"tag key {k!r} may hold only letters, digits, '_', '-', '.'")
        return v

    def remote_pipelines(self) -> list[str]:
        """Pipelines whose model is a registry name (delivered over MQTT)."""
        return [p.name for p in self.pipelines if not p.model.endswith(".onnx")]

    @model_validator(mode="after")
    def _unique(self) -> AgentConfig:
        names = [p.name for p in self.pipelines]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"pipeline names must be unique; repeated: {sorted(dup)}")
        for p in self.pipelines:
            # the watchdog takes a pipeline that infers nothing for stall_s as hung
            if p.longest_inference_gap_s() >= self.service.stall_s:
                raise ValueError(
                    f"pipeline {p.name}: max_fps/motion.max_skip_s let it go "
                    f"{p.longest_inference_gap_s():g} s without inferring, not below "
                    f"[service] stall_s {self.service.stall_s:g} s: the watchdog would restart it"
                )
        return self


ENV_OVERRIDES = {
    "EDGEFLEET_DEVICE_ID": "device_id",
    "EDGEFLEET_DATA_DIR": "data_dir",
    "EDGEFLEET_PROFILE": "profile",
}
SECRET_OVERRIDES = {
    "EDGEFLEET_BROKER_USERNAME": "username",
    "EDGEFLEET_BROKER_PASSWORD": "password",
}


def _format_error(e: ValidationError) -> str:
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<root>"
        parts.append(f"field '{loc}': {err['msg']}")
    return "; ".join(parts)


def parse_config(
    data: Mapping[str, Any], *, path: str = "<memory>", env: Mapping[str, str] | None = None
) -> AgentConfig:
    """Validate a config mapping, applying environment overrides.

    Raises:
        ConfigError: naming the file and the first offending field.
    """
    merged = dict(data)
    for var, key in ENV_OVERRIDES.items():
        if env and env.get(var):
            merged[key] = env[var]
    if isinstance(merged.get("broker"), dict):
        broker = dict(merged["broker"])
        for var, key in SECRET_OVERRIDES.items():
            if env and env.get(var):
                broker[key] = env[var]
        merged["broker"] = broker
    if isinstance(merged.get("api"), dict) and env and env.get("EDGEFLEET_API_TOKEN"):
        # the environment's token replaces the file's token or token_file
        api = {k: v for k, v in merged["api"].items() if k != "token_file"}
        api["token"] = env["EDGEFLEET_API_TOKEN"]
        merged["api"] = api
    try:
        return AgentConfig.model_validate(merged)
    except ValidationError as e:
        first = e.errors()[0]["loc"] if e.errors() else ()
        raise ConfigError(
            f"{path}: {_format_error(e)}", path=path, field=".".join(map(str, first))
        ) from e


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> AgentConfig:
    """Read and validate an agent TOML file.

    Raises:
        ConfigError: the file is missing, not TOML, or does not validate.
    """
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ConfigError(f"config file {p} does not exist", path=str(p)) from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}", path=str(p)) from e
    except UnicodeDecodeError as e:  # found by scripts/fuzz_parsers.py
        raise ConfigError(f"{p}: not UTF-8 text: {e}", path=str(p)) from e
    return parse_config(data, path=str(p), env=env)
