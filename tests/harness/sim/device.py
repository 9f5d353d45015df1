"""Adapter: one simulated device — the agent's real sync, update and telemetry code on top of
a simulated camera and inference (``tests.harness.sim.engine``).

Wiring follows ``agent.service.Agent._start_cloud``/``_start_delivery``: a ``DeviceSession``
(birth/LWT, signed desired state in, retained reported state out), a ``ChunkClient`` and
``MqttFetcher`` under a ``TufClient`` on the device's own data dir, a ``ModelStore``, and an
``UpdateManager`` with its ``HealthWindow``. What differs: the pipelines are ``SimPipeline``s,
the engine build is ``open_sim_model``, and, when a shared ``MqttLoop`` is given, the session's
paho client is driven by it instead of a thread of its own. Telemetry is the real
``Telemetry`` message (``TelemetrySnapshot``; in direct mode its device stats are one host
sample per second shared by the process's devices, ``HostStats``), published on the session's
client at each ``tick`` (``telemetry="direct"``: a device offline at that moment loses the
message) or through the real on-disk ``Outbox`` and ``OutboxSender`` with a
``TelemetryReporter`` thread (``telemetry="outbox"``: three more threads and a SQLite file per
device).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from agent import __version__
from agent.common.mqtt import parse_broker_url
from agent.config import BrokerConfig, UpdateConfig
from agent.pipeline.runner import Pipeline
from agent.profiles import get_profile
from agent.protocol.state import DeviceState, PipelineReport, ReportedState
from agent.protocol.telemetry import (
    DeviceStats,
)
from agent.protocol.topics import DEFAULT_ROOT
from agent.sync.session import DeviceSession
from agent.telemetry.device import CpuTimes, read_device_stats
from agent.telemetry.outbox import Outbox, OutboxSender
from agent.telemetry.reporter import TelemetryReporter, TelemetrySnapshot
from agent.update.delivery import wire_delivery
from agent.update.manager import UpdateManager
from agent.update.transfer.client import ChunkClient
from tests.harness.sim.engine import ProfileFn, SimPipeline, default_profile, open_sim_model
from tests.harness.sim.netloop import MqttLoop

log = logging.getLogger(__name__)

HOST_STATS_S = 1.0  # how long one host-stats sample serves every simulated device


class HostStats:
    """The host's device stats (``/proc``, ``statvfs`` of the data dir), read at most once per
    ``max_age_s`` and shared by every simulated device of the process.

    Simulated devices share one host: a real agent reads its own ``/proc`` per message, which
    for 1,000 simulated devices would be 1,000 reads of the same files per interval.
    """

    def __init__(self, max_age_s: float = HOST_STATS_S, sysroot: Path = Path("/")) -> None:
        self.max_age_s = max_age_s
        self.sysroot = sysroot
        self.reads = 0
        self._lock = threading.Lock()
        self._cpu: CpuTimes | None = None
        self._at = -float("inf")
        self._stats: DeviceStats | None = None

    def get(self, now: float, data_dir: Path) -> DeviceStats:
        """The latest sample, re-read when older than ``max_age_s``."""
        with self._lock:
            if self._stats is None or now - self._at >= self.max_age_s:
                stats, self._cpu = read_device_stats(
                    self.sysroot, prev_cpu=self._cpu, now=now, data_dir=data_dir
                )
                self._stats, self._at = DeviceStats(**stats), now
                self.reads += 1
            return self._stats


HOST_STATS = HostStats()


class SimTelemetrySnapshot(TelemetrySnapshot):
    """``TelemetrySnapshot`` whose device part is the process-wide ``HostStats`` sample; the
    pipelines' part (``status`` through the real ``PipelineMetrics``) and the message's
    validation are the real ones. Direct mode only (no outbox)."""

    def __init__(self, *args: Any, host: HostStats = HOST_STATS, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.host = host

    def device_stats(self, now: float) -> DeviceStats:
        return self.host.get(now, self.data_dir)


class SimDevice:
    """One simulated device (see module docstring).

    Args:
        device_id: its id (topic-safe).
        broker_url: ``mqtt://host:port``.
        trust_root: the registry's ``root.json`` (the device's provisioned trust).
        data_dir: its own data dir (TUF metadata, model store, outbox); created.
        groups: rollout groups, announced in the birth message.
        tags: other tags, announced in the birth message.
        pipelines: pipeline names.
        profile_fn: behaviour of (device, model version) — the simulated inference.
        telemetry_interval_s: seconds between telemetry messages.
        telemetry: ``"direct"`` (published by ``tick``) or ``"outbox"`` (real outbox threads).
        update: update settings (chunking, health window); the agent's defaults otherwise.
        device_profile: a built-in device profile name.
        topic_root: MQTT topic root.
        loop: drive the MQTT client from this shared loop (else paho's own thread).
        connect_delay_s: with ``loop``, wait this long before the first connect.
        rng: randomness (latencies, reconnect jitter).
    """

    def __init__(
        self,
        device_id: str,
        broker_url: str,
        trust_root: Path,
        data_dir: Path,
        *,
        groups: Sequence[str] = (),
        tags: Mapping[str, str] | None = None,
        pipelines: Sequence[str] = ("front",),
        profile_fn: ProfileFn = default_profile,
        telemetry_interval_s: float = 10.0,
        telemetry: Literal["direct", "outbox"] = "direct",
        update: UpdateConfig | None = None,
        device_profile: str = "x86-cpu",
        topic_root: str = DEFAULT_ROOT,
        loop: MqttLoop | None = None,
        connect_delay_s: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.device_id = device_id
        self.broker_url = broker_url
        self.trust_root = Path(trust_root)
        self.data_dir = Path(data_dir)
        self.tags = dict(tags or {})
        self.groups = list(groups)
        self.pipeline_names = list(pipelines)
        self.profile_fn = profile_fn
        self.telemetry_interval_s = telemetry_interval_s
        self.telemetry_mode = telemetry
        self.update = update or UpdateConfig()
        self.device_profile = device_profile
        self.topic_root = topic_root
        self.loop = loop
        self.connect_delay_s = connect_delay_s
        self.rng = rng or random.Random()
        self.pipelines: dict[str, SimPipeline] = {}
        self.session: DeviceSession | None = None
        self.chunks: ChunkClient | None = None
        self.updates: UpdateManager | None = None
        self.snapshot: TelemetrySnapshot | None = None
        self.outbox: Outbox | None = None
        self.outbox_sender: OutboxSender | None = None
        self.reporter: TelemetryReporter | None = None
        self.telemetry_sent = 0
        # phase → how many times a pipeline entered it (``waiting``: a fetch interrupted by
        # transport trouble such as chunk timeouts; the manager resumes it after retry_s)
        self.phase_entries: Counter[str] = Counter()
        self._last_phase: dict[str, str] = {}
        self.next_telemetry = 0.0
        self.started = False

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, now: float | None = None) -> None:
        """Wire the real agent parts, recover the persisted update state and connect."""
        now = time.monotonic() if now is None else now
        self.data_dir.mkdir(parents=True, exist_ok=True)
        upd = self.update
        broker = BrokerConfig(url=self.broker_url, topic_root=self.topic_root)
        birth = DeviceState(
            device_id=self.device_id,
            online=True,
            agent_version=__version__,
            profile=self.device_profile,
            pipelines=self.pipeline_names,
            tags=self.tags,
            groups=self.groups,
        )
        session = DeviceSession(broker, self.device_id, birth, self._on_desired, rng=self.rng)
        self.session = session
        for name in self.pipeline_names:
            pipe = SimPipeline(name, self.device_id, self.profile_fn, rng=self.rng)
            self.pipelines[name] = pipe
        # UpdateManager and TelemetrySnapshot are typed for the real Pipeline; SimPipeline has
        # the part of its surface they use (model, swap_model, observer, metrics, status).
        as_pipes = cast(dict[str, Pipeline], self.pipelines)
        delivery = wire_delivery(
            session,
            device_id=self.device_id,
            topic_root=self.topic_root,
            data_dir=self.data_dir,
            trust_root=self.trust_root,
            update=upd,
            profile=get_profile(self.device_profile),
            pipelines=as_pipes,
            open_model=open_sim_model,
            publish_reported=self._publish_reported,
        )
        self.chunks, self.updates = delivery.chunks, delivery.updates
        self.updates.recover()  # runs the last committed model, as the agent does on start
        self.updates.start()
        self._start_telemetry(list(as_pipes.values()))
        for pipe in self.pipelines.values():
            pipe.start(now)
        self.next_telemetry = now + self.rng.uniform(0, self.telemetry_interval_s)
        if self.loop is not None:
            host, port, _tls = parse_broker_url(self.broker_url)
            self.loop.add(
                session.client, host, port, keepalive=broker.keepalive_s,
                delay_s=self.connect_delay_s,
            )  # fmt: skip
        else:
            session.start()
        self.started = True

    def _start_telemetry(self, pipes: list[Pipeline]) -> None:
        if self.session is None:
            raise RuntimeError("telemetry needs the session: call start()")
        topic = self.session.topics.device(self.device_id, "telemetry")
        interval = self.telemetry_interval_s
        if self.telemetry_mode == "outbox":
            self.outbox = Outbox(self.data_dir / "outbox.db", max_rows=10_000)
            self.outbox_sender = OutboxSender(self.outbox, self.session.client).start()
            self.reporter = TelemetryReporter(
                self.device_id, pipes, self.outbox, topic, interval_s=interval,
                data_dir=self.data_dir,
            )  # fmt: skip
            self.reporter.start()
        else:
            self.snapshot = SimTelemetrySnapshot(
                self.device_id, pipes, None, interval_s=interval, data_dir=self.data_dir
            )
        self._telemetry_topic = topic

    def stop(self) -> None:
        """Stop in the agent's order: updates, telemetry, session; then close models."""
        if not self.started:
            return
        self.started = False
        if self.updates is not None:
            # its stop event also ends a running transfer (the chunk client shares it)
            self.updates.stop(timeout=2.0)
        if self.reporter is not None:
            self.reporter.stop()
        if self.outbox_sender is not None:
            self.outbox_sender.stop()
        if self.chunks is not None:
            self.chunks.close()
        if self.session is not None:
            if self.loop is not None:
                self.loop.release(self.session.client)
            self.session.stop()
            if self.loop is not None:
                self.loop.remove(self.session.client)
        if self.outbox is not None:
            self.outbox.close()
        for pipe in self.pipelines.values():
            model = pipe.swap_model(None)
            if model is not None:
                model.close()

    # --- driven by the fleet's ticker ----------------------------------------------------------

    def _publish_reported(self, reported: ReportedState) -> None:
        for p in reported.pipelines:
            prev = self._last_phase.get(p.name)
            if prev != p.phase.value:
                self._last_phase[p.name] = p.phase.value
                if prev is not None:  # the first report is where it starts, not a move
                    self.phase_entries[p.phase.value] += 1
        if self.session is not None:
            self.session.publish_reported(reported)

    def _on_desired(self, payload: bytes) -> None:
        if self.updates is not None:
            self.updates.submit_desired(payload)

    def advance(self, now: float) -> int:
        """Produce the simulated frames due by ``now``; returns how many."""
        return sum(p.advance(now) for p in self.pipelines.values())

    def tick(self, now: float) -> bool:
        """Publish a telemetry message if one is due (``"direct"`` mode); True if sent."""
        if self.snapshot is None or self.session is None or now < self.next_telemetry:
            return False
        self.next_telemetry = max(self.next_telemetry + self.telemetry_interval_s, now)
        if not self.session.connected.is_set():
            return False
        try:
            payload = self.snapshot.build().encode()
        except ValueError as e:  # pydantic's ValidationError: a bug, reported, not sent
            log.error("device=%s telemetry not built: %s", self.device_id, e)
            return False
        self.session.client.publish(self._telemetry_topic, payload, qos=1)
        self.telemetry_sent += 1
        return True

    # --- what it reports ---------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.session is not None and self.session.connected.is_set()

    def reports(self) -> list[PipelineReport]:
        """The reported state's pipelines, as the manager would publish them now."""
        if self.updates is None:
            return []
        return list(self.updates.reported().pipelines)

    def status(self) -> dict[str, Any]:
        """Device id, connection, and per pipeline: phase, active and target version, error."""
        out: dict[str, Any] = {"device_id": self.device_id, "online": self.connected}
        pipes = []
        for r in self.reports():
            pipe = self.pipelines.get(r.name)
            pipes.append(
                {
                    "name": r.name,
                    "phase": r.phase.value,
                    "active": f"{r.active_model}@{r.active_version}" if r.active_model else None,
                    "target": f"{r.target_model}@{r.target_version}" if r.target_model else None,
                    "last_error": r.last_error,
                    "p95_ms": (pipe.metrics.latency().get("infer") or {}).get("p95")
                    if pipe
                    else None,
                }
            )
        out["pipelines"] = pipes
        out["idle"] = self.updates.idle.is_set() if self.updates is not None else True
        if self.chunks is not None:
            c = self.chunks
            out["chunks"] = {
                "bytes_received": c.bytes_received,
                "bytes_refetched": c.bytes_refetched,
                "duplicates": c.duplicate_responses,
                "stale": c.stale_responses,
            }
        return out
