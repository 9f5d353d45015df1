"""A registry, its chunk server and one in-process agent around a broker: the delivery tests,
the fault suites and the delivery benchmark share it; an agent config looping a video; and a
telemetry subscriber."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.config import AgentConfig, parse_config
from agent.protocol.state import ReportedState, SignedDesired
from agent.protocol.telemetry import Telemetry
from agent.protocol.topics import Topics
from agent.service import Agent
from cloud_sync.deploy import deploy
from cloud_sync.localbroker import MosquittoBroker
from cloud_sync.registry.publish import publish
from cloud_sync.registry.repo import Repository
from cloud_sync.registry.serve import ChunkServer
from tests.harness.broker import Mosquitto
from tests.harness.models import build_test_models, write_digit_loop
from tests.harness.util import wait_for

DEVICE = "cam-01"
# No test is about latency: a loaded CI machine's jitter must not roll a good version back
# (the latency rule has its own tests in test_machine.py).
# These fleets test delivery, not latency (the latency rollback is tested in test_machine.py):
# in a 0.5 s window the p95 of a 0.3 ms model is its slowest frame, and on two cores shared
# with CPU-heavy tests one frame may take 6 ms, past 20x (a rollback seen in CI). 100 is the
# config's maximum.
TEST_UPDATE = {"health_window_s": 0.5, "health_min_frames": 5, "max_latency_ratio": 100.0}


class Fleet:
    """One registry, chunk servers (``server``, the latest, runs from ``start_server()``) and
    one agent around a broker.

    ``tag`` names the device ``cam-TAG`` and the servers ``registry-TAG-N`` (a benchmark's
    runs on one broker); without it they are ``DEVICE`` and ``registry-N``. ``watch`` keeps
    the device's reported states in ``reported``.
    """

    def __init__(
        self,
        tmp: Path,
        broker: MosquittoBroker,
        video: Path,
        models: dict[str, Path] | None = None,
        *,
        tag: str | None = None,
        server_workers: int = 2,
        update: dict[str, Any] | None = None,
        watch: bool = True,
    ) -> None:
        self.tmp = tmp
        self.broker = broker
        self.video = video
        self.models = models or {}
        self.device = f"cam-{tag}" if tag else DEVICE
        self._server_id = f"registry-{tag}" if tag else "registry"
        self._server_workers = server_workers
        self.update = TEST_UPDATE if update is None else update
        self.repo_dir = tmp / "registry"
        self.repo = Repository.init(self.repo_dir)
        self.servers: list[ChunkServer] = []  # the started ones
        self.server = self._new_server()
        self.agent: Agent | None = None
        self.reported: list[ReportedState] = []
        self.watcher: mqtt.Client | None = None
        if watch:
            self.watcher = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher")
            self.watcher.on_message = self._on_reported
            self.watcher.connect(broker.host, broker.port)
            self.watcher.subscribe(Topics().device(self.device, "reported"), qos=1)
            self.watcher.loop_start()

    def _on_reported(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            self.reported.append(ReportedState.decode(bytes(msg.payload)))

    def _new_server(self) -> ChunkServer:
        name = f"{self._server_id}-{len(self.servers) + 1}"
        return ChunkServer(
            self.repo_dir, self.broker.url, client_id=name, workers=self._server_workers
        )

    def start_server(self) -> ChunkServer:
        """Start ``server`` if it never ran, else a new one in its place (a registry restart)."""
        if self.servers:
            self.server = self._new_server()
        self.servers.append(self.server)
        self.server.start()
        return self.server

    def publish(self, name: str, version: str, model: str = "digits", pad_bytes: int = 0) -> None:
        """Publish a copy of a test model whose bytes differ per version (as real versions'
        do), so each version has its own engine to build; ``pad_bytes`` more in its doc
        string make a bigger artifact with the same graph."""
        import onnx

        d = self.tmp / "src" / f"{name}-{version}"
        shutil.copytree(self.models[model], d)
        m = onnx.load(str(d / "model.onnx"))
        m.doc_string = f"{name} {version}" + " " * pad_bytes
        onnx.save(m, str(d / "model.onnx"))
        publish(self.repo, d / "model.onnx", name=name, version=version)

    def config(self, **update: Any) -> AgentConfig:
        return parse_config(
            {
                "device_id": self.device,
                "data_dir": str(self.tmp / "data"),
                "profile": "x86-cpu",
                "pipelines": [
                    {"name": "front", "source": str(self.video), "model": "digits", "loop": True}
                ],
                "broker": {"url": self.broker.url},
                "trust": {"root": str(self.repo_dir / "root.json")},
                "update": {**self.update, **update},
            }
        )

    def start_agent(self, **update: Any) -> Agent:
        cfg = self.config(**update)
        agent = Agent(cfg)
        self.agent = agent
        agent.start()
        if not wait_for(lambda: agent.session.connected.is_set(), 10):
            raise RuntimeError("the agent did not connect to the broker")
        return agent

    def stop_agent(self) -> None:
        if self.agent is not None:
            self.agent.stop()
            self.agent = None

    def inject_desired(self, envelope: SignedDesired) -> None:
        """Publish a desired-state message straight to the broker (an attacker, or a replay)."""
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="injector")
        c.connect(self.broker.host, self.broker.port)
        c.loop_start()
        topic = Topics().device(self.device, "desired")
        c.publish(topic, envelope.encode(), qos=1, retain=True).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()

    def deploy(self, ref: str) -> SignedDesired:
        return deploy(self.repo_dir, self.broker.url, self.device, ref, pipeline="front")

    @property
    def pipe(self) -> Any:
        assert self.agent is not None
        return self.agent.pipelines[0]

    def running(self) -> str | None:
        m = self.pipe.model
        return m.ref if m is not None else None

    def last(self) -> Any:
        assert self.agent is not None and self.agent.updates is not None
        return self.agent.updates.reported().pipelines[0]

    def wait_phase(self, *phases: str, version: str, timeout: float = 60) -> Any:
        """Wait until the attempt for ``version`` reached one of ``phases``."""
        ok = wait_for(
            lambda: (
                self.last().phase.value in phases
                and self.last().target_version == version
                and self.agent is not None
                and self.agent.updates.idle.is_set()
            ),
            timeout,
        )
        assert ok, f"phase {self.last().phase.value}, wanted {phases}: {self.last().last_error}"
        return self.last()

    def commit(self, ref: str, timeout: float = 60) -> Any:
        """Deploy ``ref`` (``name@version``), wait until its attempt is committed; the agent's
        reported pipeline then."""
        self.deploy(ref)
        return self.wait_phase("committed", version=ref.split("@", 1)[1], timeout=timeout)

    def close(self) -> None:
        self.stop_agent()
        for s in self.servers:
            s.stop()
        if self.watcher is not None:
            self.watcher.loop_stop()
            self.watcher.disconnect()


def looping_agent_config(
    device_id: str, data_dir: Path, video: Path, model: Path, broker_url: str, **extra: Any
) -> AgentConfig:
    """An agent whose one pipeline ``front`` loops ``video`` through the local ``model`` file,
    telemetry every 0.2 s; ``extra`` adds top-level fields (``tags``, ``groups`` …)."""
    return parse_config({
        "device_id": device_id, "data_dir": str(data_dir), "profile": "x86-cpu", **extra,
        "pipelines": [{"name": "front", "source": str(video), "model": str(model), "loop": True}],
        "broker": {"url": broker_url}, "telemetry": {"interval_s": 0.2},
    })  # fmt: skip


def local_fleet(workdir: Path) -> Fleet:
    """The fault suites' set-up: the test models, a Mosquitto in ``workdir/mosquitto``, the
    digit video and a ``Fleet`` with its chunk server started (``close_local_fleet`` ends it)."""
    models = build_test_models()
    (workdir / "mosquitto").mkdir(parents=True, exist_ok=True)
    broker = Mosquitto(workdir / "mosquitto")
    broker.start()
    fleet = Fleet(workdir, broker, write_digit_loop(models, workdir / "digits.mkv"), models)
    fleet.start_server()
    return fleet


def close_local_fleet(fleet: Fleet) -> None:
    """End what ``local_fleet`` started: the agent, the chunk servers, the broker."""
    fleet.close()
    fleet.broker.stop()


class Collector:
    """Telemetry a subscriber (a dashboard with a persistent session) receives on ``topic``."""

    def __init__(self, broker: MosquittoBroker, topic: str) -> None:
        self.messages: list[Telemetry] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="dash", clean_session=False
        )
        self.client.on_message = self._on
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect_async(broker.host, broker.port)
        self.client.loop_start()

    def _on(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(Telemetry.decode(bytes(msg.payload)))

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
