"""Adapter: wiring — config → profile → models → pipelines; the run loop; status and check.

Everything here is glue around the pure modules: it picks the backend from the device profile,
opens models (through the engine cache and a child-process build), starts one ``Pipeline``
per configured camera (one shared backend per model), writes ``status.json`` atomically for
``edgefleet-agent status``, and stops cleanly on SIGTERM/SIGINT.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent import __version__
from agent.common.errors import ConfigError, EdgefleetError, ModelError
from agent.common.fsutil import atomic_write_json, remove_stale_temps
from agent.config import (
    AgentConfig,
    BrokerConfig,
    EngineConfig,
    OnnxRuntimeEngine,
    PipelineConfig,
    TensorRTEngine,
    TrustConfig,
    load_config,
)
from agent.engine.base import Backend
from agent.pipeline.analytics import pipeline_options
from agent.pipeline.model import (
    RunnableModel,
    card_for_local_model,
    card_input_size,
    load_golden,
    parse_size,
)
from agent.pipeline.preprocess import constant_feeds, image_input_name
from agent.pipeline.runner import Pipeline
from agent.pipeline.sinks import JsonlSink, Sink
from agent.pipeline.sources import gstreamer_support, parse_source
from agent.profiles import DeviceProfile, detect_profile, get_profile

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
TASKS = ("classification", "detection", "heatmap", "raw")


def resolve_profile(setting: str) -> tuple[str, DeviceProfile, str]:
    """The device profile: detected (``"auto"``) or named/pathed in config.

    Raises:
        ConfigError: an unknown profile name or a bad profile file.
    """
    if setting == "auto":
        return detect_profile()
    prof = get_profile(setting)
    return prof.name, prof, f"set in config: {setting}"


def backend_availability() -> dict[str, dict[str, Any]]:
    """Which backends this machine can run, and why not."""
    from agent.engine.onnxrt import available_providers
    from agent.engine.tensorrt import tensorrt_available

    out: dict[str, dict[str, Any]] = {}
    try:
        import onnxruntime as ort

        provs = available_providers()
        out["onnxruntime"] = {
            "available": True,
            "detail": f"onnxruntime {ort.__version__}, providers {provs}",
        }
    except ImportError as e:  # pragma: no cover - onnxruntime is a hard dependency
        out["onnxruntime"] = {"available": False, "detail": f"cannot import onnxruntime: {e}"}
    ok, why = tensorrt_available()
    out["tensorrt"] = {"available": ok, "detail": why}
    return out


def choose_backend(engine: EngineConfig | str, profile: DeviceProfile | None) -> str:
    """The backend to use: the configured one, or the profile's first available.

    Raises:
        ConfigError: the configured backend is not available here.
    """
    kind = engine if isinstance(engine, str) else engine.type
    avail = backend_availability()
    if kind != "auto":
        if not avail[kind]["available"]:
            raise ConfigError(
                f"backend {kind} is configured but not available: {avail[kind]['detail']}",
                field="engine.type",
            )
        return kind
    prefs = list(profile.backends) if profile is not None else ["tensorrt", "onnxruntime"]
    for name in prefs:
        if avail.get(name, {}).get("available"):
            return name
    return "onnxruntime"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgefleet" / "engines"


def _trt_fp16_flag(backend: str) -> bool:
    """TensorRT can build fp16 from an fp32 file (it has ``BuilderFlag.FP16``; 11 has not)."""
    if backend != "tensorrt":
        return False
    try:
        import tensorrt as trt
    except Exception:  # the build will say why TensorRT is unusable
        return True
    from agent.engine.tensorrt import weak_typing

    return weak_typing(trt)


def open_local_model(
    path: Path,
    *,
    task: str | None = None,
    input_size: str | None = None,
    engine: EngineConfig | str = "auto",
    profile: DeviceProfile | None = None,
    cache_dir: Path | None = None,
    build_timeout_s: float = 1800,
    progress: Callable[[str], None] = lambda s: None,
    build_test_opts: Mapping[str, Any] | None = None,
) -> RunnableModel:
    """Open a local ONNX model ready to serve frames.

    Where the model's card lists several precision variants that the profile allows, each is
    built, measured on this device and checked against ``golden.npz``; the fastest that passes
    is kept (``agent.engine.precision``).

    Raises:
        ModelError: the model cannot be loaded or built, no variant passes, or its card is
            invalid.
        ConfigError: the configured backend is unavailable.
    """
    from agent.engine.build import load_backend
    from agent.engine.precision import (
        Measurement,
        candidate_precisions,
        choose_precision,
        measure_variant,
        variant_file,
    )

    if not path.is_file():
        raise ModelError(f"model file {path} does not exist", model=str(path), reason="load")
    if task is not None and task not in TASKS:
        raise ModelError(f"task {task!r} is not one of {TASKS}", model=str(path), reason="card")
    backend_name = choose_backend(engine, profile)
    threads = engine.threads if isinstance(engine, OnnxRuntimeEngine) else 0
    if not threads and profile is not None:
        threads = profile.cpu_threads
    providers = engine.providers if isinstance(engine, OnnxRuntimeEngine) else None
    workspace = (profile.tensorrt.workspace_mb << 20) if profile and profile.tensorrt else 1 << 30
    trt_opts: dict[str, Any] = {}
    if backend_name == "tensorrt":
        from agent.engine.shapes import fixed_profiles, onnx_input_shapes

        trt_engine = engine if isinstance(engine, TensorRTEngine) else None
        if trt_engine is not None and trt_engine.workspace_mb:
            workspace = trt_engine.workspace_mb << 20
        try:
            shapes = onnx_input_shapes(str(path))
        except Exception as e:  # a file onnx cannot read: the build says why, in full
            log.warning("model=%s input shapes unreadable: %s", path, e)
            shapes = {}
        trt_opts = {
            "dla_core": trt_engine.dla_core if trt_engine is not None else None,
            "profiles": fixed_profiles(
                shapes, parse_size(input_size) or card_input_size(path), model=str(path)
            )
            or None,
        }

    def load(file: Path, precision: str) -> Backend:
        progress(f"opening {file.name} ({precision}) on {backend_name}")
        return load_backend(
            file,
            backend=backend_name,
            precision=precision,
            cache_dir=cache_dir or default_cache_dir(),
            timeout_s=build_timeout_s,
            progress=lambda phase, frac: progress(f"build {phase} {frac:.0%}"),
            threads=threads,
            providers=providers,
            workspace_bytes=workspace,
            **trt_opts,
            **(build_test_opts or {}),
        )

    # DLA runs fp16 or int8 only: the first engine of a DLA pipeline is fp16
    first_prec = "fp16" if trt_opts.get("dla_core") is not None else "fp32"
    first = load(path, first_prec)
    try:
        card = card_for_local_model(
            path,
            first,
            task=task,  # type: ignore[arg-type]  # checked against TASKS above
            input_size=parse_size(input_size),
        )
    except BaseException:
        first.close()
        raise
    variants: dict[str, str] = {
        v.precision: v.file for v in card.variants if (path.parent / v.file).is_file()
    }
    golden = path.parent / "golden.npz"
    allowed = list(profile.precisions) if profile is not None else [first_prec]
    if first_prec != "fp32":
        allowed = [p for p in allowed if p != "fp32"]
    cands = (
        candidate_precisions(
            allowed, variants, backend_name, fp16_from_fp32=_trt_fp16_flag(backend_name)
        )
        if variants
        else []
    )
    if len(cands) <= 1 or not golden.is_file():
        return RunnableModel(card, first)
    # Several variants: measure each on this device, on the golden inputs.
    ins, outs = load_golden(golden)
    image = image_input_name(card.input, tuple(i.name for i in first.inputs))
    feeds = {**constant_feeds(card.input), image: ins[0]}
    backends: dict[str, Backend] = {}
    measurements = []
    try:
        for prec in cands:
            try:
                file = variant_file(prec, variants)
                b = (
                    first
                    if file == path.name and prec == first_prec
                    else load(path.parent / file, prec)
                )
            except EdgefleetError as e:
                measurements.append(Measurement(prec, None, None, error=str(e)))
                continue
            backends[prec] = b
            atol = card.golden_atol.get(prec, 1e-1)
            measurements.append(measure_variant(b, feeds, outs[:1], atol=atol))
        choice = choose_precision(measurements)
    except BaseException:
        for b in {id(b): b for b in [first, *backends.values()]}.values():
            b.close()
        raise
    progress(f"precision {choice.precision}: {choice.reason}")
    keep = backends[choice.precision]
    for b in {id(b): b for b in [first, *backends.values()]}.values():
        if b is not keep:
            b.close()
    return RunnableModel(card, keep)


class Agent:
    """The daemon: pipelines from config, status file, signal handling."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        # the wall clock for signed-metadata expiry and update records (scripts/year_sim.py
        # runs devices on a simulated year through it)
        self.wall = wall
        self.profile_name, self.profile, self.profile_reason = resolve_profile(cfg.profile)
        self.pipelines: list[Pipeline] = []
        self.models: dict[str, RunnableModel] = {}
        self._stop = threading.Event()
        # Test-only: EDGEFLEET_TEST_BUILD_SLEEP_S makes every engine build sleep in its child
        # process first, so fault tests can kill the agent while it builds. Read once, here.
        sleep = os.environ.get("EDGEFLEET_TEST_BUILD_SLEEP_S")
        self.build_test_opts: dict[str, Any] = {"_test_sleep_s": float(sleep)} if sleep else {}
        self.clock_problem: str | None = None  # the wall clock is implausible (start-up check)
        self.session: Any = None  # DeviceSession when [broker] is configured
        self.outbox: Any = None  # Outbox, OutboxSender, TelemetryReporter with [broker]
        self.outbox_sender: Any = None
        self.telemetry: Any = None
        self.metrics_server: Any = None  # the local Prometheus endpoint, when configured
        self.updates: Any = None  # UpdateManager when [broker] and [trust] are configured
        self.api: Any = None  # [api]: the local inference API server (agent.api.ApiServer)

    def _model_for(self, p: PipelineConfig) -> RunnableModel | None:
        path = Path(p.model)
        if path.suffix != ".onnx":
            log.warning(
                "pipeline=%s model=%s is a registry name; waiting for delivery", p.name, p.model
            )
            return None
        key = f"{path.resolve()}|{p.task}|{p.input_size}"
        if key not in self.models:
            self.models[key] = open_local_model(
                path,
                task=p.task,
                input_size=p.input_size,
                engine=self.cfg.engine,
                profile=self.profile,
                cache_dir=self.cfg.data_dir / "engines",
                build_timeout_s=self.cfg.build_timeout_s,
                progress=lambda s: log.info("pipeline=%s %s", p.name, s),
            )
        return self.models[key]

    def _check_clock(self) -> str | None:
        from agent.clock import clock_problem, last_seen_time

        d = self.cfg.data_dir
        seen = last_seen_time([d / "status.json", d / "models" / "state.json"])
        problem = clock_problem(self.wall(), seen)
        if problem:
            log.error("device=%s %s", self.cfg.device_id, problem)
        return problem

    def start(self) -> None:
        """Open every model and start every pipeline.

        Raises:
            EdgefleetError: a model or source is unusable (nothing is left running).
        """
        self.cfg.data_dir.mkdir(parents=True, exist_ok=True)
        # status.json's temp file when the last run was killed mid-write (the model store and
        # the TUF client sweep their own folders)
        for stale in remove_stale_temps(self.cfg.data_dir):
            log.info("removed %s left by an interrupted write", stale.name)
        self.clock_problem = self._check_clock()
        try:
            for p in self.cfg.pipelines:
                sinks: list[Sink] = []
                if p.sink.jsonl is not None:
                    sinks.append(JsonlSink(p.sink.jsonl, max_bytes=p.sink.jsonl_max_mb << 20))
                pipe = Pipeline(
                    p.name,
                    parse_source(p.source),
                    self._model_for(p),
                    sinks,
                    loop=p.loop,
                    pace=p.pace,
                    open_timeout_s=p.open_timeout_s,
                    **pipeline_options(p),  # rate control, tracking, zones and lines
                )
                self.pipelines.append(pipe)
            if self.cfg.broker is not None:
                self._start_cloud()
            if self.cfg.telemetry.prometheus_port is not None:
                self._start_metrics(self.cfg.telemetry.prometheus_port)
            for pipe in self.pipelines:
                pipe.start()
            # --- [api] local inference API (issue 7): after the pipelines exist ---
            if self.cfg.api is not None:
                from agent.api.server import ApiServer

                self.api = ApiServer.from_config(self.cfg.api, self.pipelines)
                self.api.start()
        except BaseException:
            self.stop()
            raise
        log.info(
            "device=%s profile=%s (%s) pipelines=%d started",
            self.cfg.device_id,
            self.profile_name,
            self.profile_reason,
            len(self.pipelines),
        )

    def _start_metrics(self, port: int) -> None:
        """The device's Prometheus endpoint: the telemetry snapshot, scraped locally."""
        from agent.telemetry.prometheus import serve_device_metrics
        from agent.telemetry.reporter import TelemetrySnapshot

        tel = self.cfg.telemetry
        snap = TelemetrySnapshot(self.cfg.device_id, self.pipelines, self.outbox,
                                 interval_s=tel.interval_s, data_dir=self.cfg.data_dir,
                                 reader="prometheus")  # fmt: skip
        try:
            self.metrics_server = serve_device_metrics(snap, port, tel.prometheus_addr)
        except OSError as e:
            raise EdgefleetError(
                f"[telemetry] prometheus_port {port} on {tel.prometheus_addr}: {e}"
            ) from e
        log.info("metrics on http://%s:%d/metrics", tel.prometheus_addr, port)

    def _on_desired(self, payload: bytes) -> None:
        if self.updates is not None:
            self.updates.submit_desired(payload)
        else:
            log.warning(
                "device=%s desired state ignored: no [trust] root configured", self.cfg.device_id
            )

    def _start_cloud(self) -> None:
        """MQTT session and telemetry; with [trust] also model delivery (TUF client over MQTT,
        model store and update manager)."""
        from agent.protocol.state import DeviceState
        from agent.sync.session import DeviceSession
        from agent.telemetry.outbox import Outbox, OutboxSender
        from agent.telemetry.reporter import TelemetryReporter

        cfg, broker, trust = self.cfg, self.cfg.broker, self.cfg.trust
        if broker is None:
            return
        birth = DeviceState(
            device_id=cfg.device_id,
            online=True,
            agent_version=__version__,
            profile=self.profile_name,
            pipelines=[p.name for p in cfg.pipelines],
            tags=cfg.tags,
            groups=cfg.groups,
        )
        self.session = DeviceSession(broker, cfg.device_id, birth, self._on_desired)
        tel = cfg.telemetry
        self.outbox = Outbox(
            cfg.data_dir / "outbox.db",
            max_rows=tel.outbox_max_rows,
            max_bytes=tel.outbox_max_mb << 20,
        )
        self.outbox_sender = OutboxSender(self.outbox, self.session.client)
        self.telemetry = TelemetryReporter(
            cfg.device_id,
            self.pipelines,
            self.outbox,
            self.session.topics.device(cfg.device_id, "telemetry"),
            interval_s=tel.interval_s,
            data_dir=cfg.data_dir,
        )
        from agent.telemetry.events import EventPolicy, MqttEventSink

        events_topic = self.session.topics.device(cfg.device_id, "events")
        for pipe, pcfg in zip(self.pipelines, cfg.pipelines, strict=True):
            if pcfg.events.policy != "off":
                policy = EventPolicy(pcfg.events.policy, pcfg.events.max_per_s)
                pipe.sinks.append(MqttEventSink(cfg.device_id, self.outbox, events_topic, policy))
            if pcfg.snapshots is not None:
                from agent.telemetry.snapshots import SnapshotSink

                snap = pcfg.snapshots
                pipe.sinks.append(SnapshotSink(
                    cfg.device_id, self.outbox,
                    self.session.topics.device(cfg.device_id, "snapshots"),
                    every_s=snap.every_s, jpeg_quality=snap.jpeg_quality, max_width=snap.max_width,
                ))  # fmt: skip
        if trust is not None:
            self._start_delivery(broker, trust)
        self.outbox_sender.start()
        self.telemetry.start()
        self.session.start()

    def _start_delivery(self, broker: BrokerConfig, trust: TrustConfig) -> None:
        from agent.update.fetcher import ChunkClient, MqttFetcher
        from agent.update.machine import HealthWindow
        from agent.update.manager import UpdateManager
        from agent.update.store import ModelStore
        from agent.update.tuf_client import TufClient

        cfg, upd = self.cfg, self.cfg.update
        stop_updates = threading.Event()
        chunks = ChunkClient(
            self.session.client,
            cfg.device_id,
            root=broker.topic_root,
            chunk_size=upd.chunk_kb * 1024,
            window=upd.window,
            request_timeout_s=upd.request_timeout_s,
            stop_event=stop_updates,
        )
        self.session.on_connected.append(chunks.resubscribe)
        fetcher = MqttFetcher(chunks, resume_dir=cfg.data_dir / "tuf" / "partial")
        tuf = TufClient(cfg.data_dir, trust.root, fetcher, clock=self.wall)

        def open_model(path: Path, progress: Callable[[str], None]) -> RunnableModel:
            return open_local_model(
                path,
                engine=cfg.engine,
                profile=self.profile,
                cache_dir=cfg.data_dir / "engines",
                build_timeout_s=cfg.build_timeout_s,
                progress=progress,
                build_test_opts=self.build_test_opts,
            )

        engines_dir = cfg.data_dir / "engines"

        def prune_engines() -> int:
            from agent.engine.cache import EngineCache

            removed = EngineCache(engines_dir).prune(
                keep=cfg.storage.keep_engines, temp_max_age_s=3600.0
            )
            return len(removed)

        self.updates = UpdateManager(
            device_id=cfg.device_id,
            profile=self.profile,
            pipelines={p.name: p for p in self.pipelines},
            store=ModelStore(cfg.data_dir),
            tuf=tuf,
            open_model=open_model,
            publish_reported=self.session.publish_reported,
            retry_s=upd.retry_s,
            max_tries=upd.max_tries,
            wall=self.wall,
            prune_engines=prune_engines,
            storage_budget_mb=cfg.storage.max_mb,
            stop_event=stop_updates,
            # test-only, as EDGEFLEET_TEST_BUILD_SLEEP_S above
            trial_sleep_s=float(os.environ.get("EDGEFLEET_TEST_TRIAL_SLEEP_S") or 0.0),
            health=lambda: HealthWindow(
                duration_s=upd.health_window_s,
                min_frames=upd.health_min_frames,
                max_error_rate=upd.max_error_rate,
                max_latency_ratio=upd.max_latency_ratio,
            ),
        )
        self.updates.recover()
        if self.clock_problem:
            self.updates.errors["clock"] = self.clock_problem  # in the reported state
        self.updates.start()

    def stop(self) -> None:
        """Stop in dependency order: the local API, updates, pipelines (they write events into
        the outbox), telemetry, the outbox sender and the session, then the outbox and models."""
        self._stop.set()
        # --- [api] first: no new requests; those in flight finish on their leased models ---
        if self.api is not None:
            self.api.stop()
            self.api = None
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
            self.metrics_server = None
        if self.updates is not None:
            self.updates.stop()
        for pipe in self.pipelines:
            pipe.stop()
        if self.telemetry is not None:
            self.telemetry.stop()
            self.telemetry.tick()  # a last snapshot, sent if the broker is still there
        if self.outbox_sender is not None:
            self.outbox_sender.stop()
        if self.session is not None:
            self.session.stop()
        if self.outbox is not None:
            self.outbox.close()
        # local models (shared) and delivered ones (per pipeline); close() is idempotent
        for m in [*self.models.values(), *(p.model for p in self.pipelines if p.model)]:
            m.close()
        self.models.clear()

    def status(self) -> dict[str, Any]:
        now = self.clock()
        extra: dict[str, Any] = {}
        if self.session is not None:
            extra["broker"] = {
                "connected": self.session.connected.is_set(),
                "last_error": self.session.last_error or None,
            }
        if self.updates is not None:
            extra["reported"] = self.updates.reported().model_dump(mode="json")
        return {
            **extra,
            "device_id": self.cfg.device_id,
            "agent_version": __version__,
            "profile": self.profile_name,
            "tags": self.cfg.tags,
            "time": round(time.time(), 3),
            "pipelines": [p.status(now) for p in self.pipelines],
        }

    def write_status(self) -> None:
        atomic_write_json(self.cfg.data_dir / STATUS_FILE, self.status())


def read_status(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / STATUS_FILE
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def check_report(config_path: str | None, env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Everything ``edgefleet-agent check`` shows; ``ok`` is False on any hard failure."""
    report: dict[str, Any] = {"agent_version": __version__, "ok": True}
    cfg: AgentConfig | None = None
    if config_path is None:
        report["config"] = {
            "ok": True,
            "path": None,
            "detail": "no config given (profile auto-detected)",
        }
    else:
        try:
            cfg = load_config(config_path, env=env)
            report["config"] = {
                "ok": True,
                "path": config_path,
                "detail": f"device {cfg.device_id}, {len(cfg.pipelines)} pipeline(s)",
            }
        except ConfigError as e:
            report["config"] = {"ok": False, "path": config_path, "detail": str(e)}
            report["ok"] = False
    try:
        name, prof, why = resolve_profile(cfg.profile if cfg else "auto")
        report["profile"] = {
            "ok": True,
            "name": name,
            "detail": why,
            "precisions": list(prof.precisions),
            "backends": list(prof.backends),
        }
    except EdgefleetError as e:
        report["profile"] = {"ok": False, "name": None, "detail": str(e)}
        report["ok"] = False
    report["backends"] = backend_availability()
    gst_ok, gst_why = gstreamer_support()
    report["gstreamer"] = {"available": gst_ok, "detail": gst_why}
    pipes = []
    can_deliver = cfg is not None and cfg.broker is not None and cfg.trust is not None
    for p in cfg.pipelines if cfg is not None else []:
        src = parse_source(p.source)
        problems = []
        if src.kind == "gstreamer" and not gst_ok:
            problems.append(f"GStreamer source but {gst_why}")
        if src.kind == "file" and not Path(str(src.target)).is_file():
            problems.append(f"video file {src.target} does not exist")
        if Path(p.model).suffix == ".onnx" and not Path(p.model).is_file():
            problems.append(f"model file {p.model} does not exist")
        if Path(p.model).suffix != ".onnx" and not can_deliver:
            problems.append(
                f"model {p.model!r} is a registry name, but there is no [broker] and [trust] "
                "section to deliver it: the pipeline would wait forever"
            )
        detail = "; ".join(problems) or f"{src.kind} source {src.display}, model {p.model}"
        pipes.append({"name": p.name, "ok": not problems, "detail": detail})
        if problems:
            report["ok"] = False
    report["pipelines"] = pipes
    return report
