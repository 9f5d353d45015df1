"""Pure: the agent's configuration (TOML validated by pydantic), with environment overrides.

Read once at start-up by ``load_config``; nothing reads the environment at import time.
Environment variables ``EDGEFLEET_DEVICE_ID``, ``EDGEFLEET_DATA_DIR`` and ``EDGEFLEET_PROFILE``
override the file (secrets added by later sections follow the same ``EDGEFLEET_`` scheme:
``EDGEFLEET_BROKER_USERNAME``/``_PASSWORD``, ``EDGEFLEET_API_TOKEN``). A ``[[pipelines]]``
table's own sections are in ``agent.pipeline.config``.
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
from agent.common.window import parse_windows
from agent.pipeline.config import PipelineConfig
from agent.protocol.topics import DEFAULT_ROOT

GroupName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack 6 ships Python 3.10
    import tomli as tomllib


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
        DEFAULT_ROOT, pattern=r"^[A-Za-z0-9_/-]{1,128}$", description="Topic prefix"
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
    maintenance_window: str | None = Field(
        None,
        max_length=200,
        description='Maintenance windows for activation, device local time: "02:00-05:00", '
        'across midnight "22:00-02:00", several "22:00-23:00,02:00-04:00" (download, verify '
        "and build any time; unset: activate at once)",
    )

    @field_validator("maintenance_window")
    @classmethod
    def _window_parses(cls, v: str | None) -> str | None:
        if v is not None:
            parse_windows(v)  # ValueError in words: pydantic names the field
        return v


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
    max_streams: int = Field(
        8, ge=1, le=256,
        description="Result streams (SSE) open at once, each holding one of max_connections "
        "(default 8, at most max_connections - 1); more get 429",
    )  # fmt: skip
    stream_queue: int = Field(
        32, ge=1, le=4096,
        description="Results held per stream client; a slower client loses its oldest (counted)",
    )  # fmt: skip

    @model_validator(mode="after")
    def _auth(self) -> ApiConfig:
        if "max_streams" not in self.model_fields_set:  # default: leave a connection free
            self.max_streams = max(1, min(self.max_streams, self.max_connections - 1))
        elif self.max_streams >= self.max_connections:
            raise ValueError(
                f"max_streams ({self.max_streams}) must be below max_connections "
                f"({self.max_connections}): streams hold their connections, and requests need "
                "some left"
            )
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
