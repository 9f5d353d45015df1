"""Adapter: wiring — config → profile → models → pipelines; cloud, delivery; status.

Everything here is glue around the pure modules: it opens the configured models
(``agent.models``), starts one ``Pipeline`` per configured camera (one shared backend per
model), connects to the broker with telemetry and model delivery (``agent.update.delivery``),
writes ``status.json`` atomically for ``edgefleet-agent status``, and stops cleanly on
SIGTERM/SIGINT. ``edgefleet-agent check`` lives in ``agent.check``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent import __version__
from agent.common.errors import EdgefleetError
from agent.common.fsutil import atomic_write_json, remove_stale_temps
from agent.config import AgentConfig, BrokerConfig, TrustConfig
from agent.models import open_local_model, resolve_profile
from agent.pipeline.config import PipelineConfig
from agent.pipeline.model import RunnableModel
from agent.pipeline.runner import Pipeline
from agent.remoteconfig.applier import ConfigHealth, RemoteConfig
from agent.running import CloudSinks, RunningPipelines
from agent.testhooks import NO_HOOKS, TestHooks

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"


class Agent:
    """The daemon: pipelines from config, status file, signal handling."""

    def __init__(
        self,
        cfg: AgentConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        hooks: TestHooks = NO_HOOKS,
    ) -> None:
        self.cfg = cfg
        self.clock = clock
        # the wall clock for signed-metadata expiry and update records (scripts/year_sim.py
        # runs devices on a simulated year through it)
        self.wall = wall
        self.profile_name, self.profile, self.profile_reason = resolve_profile(cfg.profile)
        # the running pipelines (shared list and name → pipeline dict) and their configs;
        # remote configuration restarts, adds and removes them
        self.running = RunningPipelines(cfg.data_dir)
        self.running.on_change.append(self._pipelines_changed)
        self.pipelines: list[Pipeline] = self.running.items
        self.models: dict[str, RunnableModel] = {}
        self._stop = threading.Event()
        self._started = False  # start() done: pipeline changes are remote configuration's
        up = cfg.update
        self.remote = RemoteConfig(
            self.running, cfg, open_model=self._model_for,
            shared=lambda m: any(m is x for x in self.models.values()),
            health=ConfigHealth(up.health_window_s, up.health_min_frames, up.max_error_rate),
            clock=clock, wall=wall, stop=self._stop,
        )  # fmt: skip
        # Test-only (agent.testhooks): stretch or break delivered models' engine builds and
        # trials, so fault tests can kill the agent mid-update. Read at each build.
        self.hooks = hooks
        self.clock_problem: str | None = None  # the wall clock is implausible (start-up check)
        self.session: Any = None  # DeviceSession when [broker] is configured
        self.outbox: Any = None  # Outbox, OutboxSender, TelemetryReporter with [broker]
        self.outbox_sender: Any = None
        self.telemetry: Any = None
        self.metrics_server: Any = None  # the local Prometheus endpoint, when configured
        self._metrics_snapshot: Any = None
        self.updates: Any = None  # UpdateManager when [broker] and [trust] are configured
        self.api: Any = None  # [api]: the local inference API server (agent.api.ApiServer)
        # --- signed commands (issue 15): agent.sync.commands, agent.sync.command_handlers ---
        self.config_path: Path | None = None  # the file `check` checks (set by `run`)
        self.commands: Any = None  # CommandService, with [broker] and [trust]
        self.uploads: Any = None  # UploadStore: DATA_DIR/uploads (log extracts, snapshots)
        self.restart_requested = threading.Event()  # restart_agent: the supervisor exits 75
        self.on_restart_request: list[Callable[[], None]] = []

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

    def clip_library(self) -> Any:
        """The clip library when any pipeline records clips (local API, cloud fetch)."""
        if not any(p.clips for p in self.running.configs.values()):
            return None
        from agent.pipeline.clips import ClipLibrary

        return ClipLibrary(self.cfg.data_dir / "clips")

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
            # the stored remote configuration's pipelines when there is one, else the file's
            for p in self.remote.startup_pipelines():
                self.running.add(p, self._model_for(p))
            if self.cfg.broker is not None:
                self._start_cloud()
            if self.cfg.telemetry.prometheus_port is not None:
                self._start_metrics(self.cfg.telemetry.prometheus_port)
            for pipe in self.pipelines:
                pipe.start()
            # --- [api] local inference API (issue 7): after the pipelines exist ---
            if self.cfg.api is not None:
                from agent.api.server import ApiServer

                self.api = ApiServer.from_config(self.cfg.api, self.pipelines, self.clip_library())
                self.api.start()
        except BaseException:
            self.stop()
            raise
        self._started = True
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
        self._metrics_snapshot = snap
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
        topics = self.session.topics
        self.running.attach_cloud(CloudSinks(
            cfg.device_id, self.outbox, topics.device(cfg.device_id, "events"),
            topics.device(cfg.device_id, "snapshots"),
        ))  # fmt: skip
        from agent.sync.clips import ClipResponder
        from agent.sync.uploads import UploadStore

        # the cloud fetches event clips and command uploads (logs, snapshots) on clips/req
        self.uploads = UploadStore(cfg.data_dir / "uploads")
        responder = ClipResponder(self.session.client, cfg.device_id, self.clip_library(),
                                  root=broker.topic_root, uploads=self.uploads)  # fmt: skip
        self.session.on_connected.append(responder.subscribe)
        if trust is not None:
            self._start_delivery(broker, trust)
            from agent.sync.commands import wire_commands

            self.commands = wire_commands(self)  # signed by the keys desired states are
        self.outbox_sender.start()
        self.telemetry.start()
        self.session.start()

    def _start_delivery(self, broker: BrokerConfig, trust: TrustConfig) -> None:
        from agent.update.delivery import wire_delivery
        from agent.update.report import BuildStep

        cfg = self.cfg

        def open_model(path: Path, progress: BuildStep) -> RunnableModel:
            return open_local_model(
                path,
                engine=cfg.engine,
                profile=self.profile,
                cache_dir=cfg.data_dir / "engines",
                build_timeout_s=cfg.build_timeout_s,
                on_build=progress,
                hooks=self.hooks,
            )

        self.updates = wire_delivery(
            self.session,
            device_id=cfg.device_id,
            topic_root=broker.topic_root,
            data_dir=cfg.data_dir,
            trust_root=trust.root,
            update=cfg.update,
            profile=self.profile,
            pipelines=self.running.by_name,  # the one dict: remote configuration changes it
            pipelines_lock=self.running.lock,  # model swaps and restarts, one at a time
            open_model=open_model,
            publish_reported=self.session.publish_reported,
            wall=self.wall,
            storage=cfg.storage,
            hooks=self.hooks,
            apply_config=self.remote.apply,
            config_report=self.remote.report,
        ).updates
        self.remote.publish = self.updates.report
        self.updates.recover()
        if self.clock_problem:
            self.updates.errors["clock"] = self.clock_problem  # in the reported state
        self.updates.start()

    def restart_pipeline(self, name: str) -> None:
        """Restart one pipeline with its current config, keeping the model it runs (the one
        current when it is rebuilt: model swaps take the same lock).

        Raises:
            EdgefleetError: no pipeline of that name.
        """
        with self.running.lock:
            pipe = self.running.get(name)
            self.running.restart(name, self.running.configs[name], pipe.model)

    def _pipelines_changed(self) -> None:
        """Pipelines were restarted, added or removed: the config, the local API's result
        feeds, the birth state and status.json follow (telemetry and the API read the live
        list)."""
        self.cfg = self.cfg.model_copy(update={"pipelines": list(self.running.configs.values())})
        if not self._started:
            return  # start() is still adding them
        if self.api is not None:
            self.api.pipelines_changed()  # an added pipeline gets its result feed
        if self.session is not None:
            self.session.set_pipelines([p.name for p in self.pipelines])
        try:
            self.write_status()
        except OSError as e:  # the supervisor writes it again every few seconds
            log.warning("device=%s status.json not written: %s", self.cfg.device_id, e)

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
        if self.commands is not None:
            self.commands.stop()
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

    def request_restart(self) -> None:
        """Ask the supervisor to stop this agent and exit for a restart (``restart_agent``)."""
        self.restart_requested.set()
        for wake in self.on_restart_request:
            wake()

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
        extra["config"] = self.remote.report().model_dump(mode="json")
        return {
            **extra,
            "device_id": self.cfg.device_id,
            "agent_version": __version__,
            "profile": self.profile_name,
            "tags": self.cfg.tags,
            "time": round(time.time(), 3),
            "pipelines": [
                {**p.status(now), "source_ended": p.source_ended} for p in self.pipelines
            ],
        }

    def write_status(self) -> None:
        atomic_write_json(self.cfg.data_dir / STATUS_FILE, self.status())


def read_status(data_dir: Path) -> dict[str, Any] | None:
    path = data_dir / STATUS_FILE
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None
