"""Operating a fleet of real agents from the operator's CLI: a registry, a fleet CA that
enrolls every device (its key seals the device's secrets), the ingest worker into SQLite, a
spy on ``#``, and N in-process ``Agent``s (the real daemon: update manager, remote
configuration, ONNX Runtime, OpenCV) on one Mosquitto.

In-process, because ten agent processes would cost ten interpreters with ONNX Runtime and
OpenCV on a two-core machine; each agent still has its own MQTT session, data dir, outbox and
key, and the rollout CLI runs as the operator's own process (``OpsFleet.cli``).

The devices' transport here is plain MQTT on loopback: mutual TLS with these same enrolled
certificates is covered by the enrollment and ACL tests; the device key in ``[broker]
key_file`` is what opens sealed values, whichever transport carries them.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from agent.config import parse_config
from agent.protocol.sealed import install_redaction
from agent.service import Agent
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.ingest.worker import IngestWorker
from cloud_sync.pki import FleetCA
from cloud_sync.registry.repo import Repository
from cloud_sync.registry.serve import ChunkServer
from cloud_sync.rollout.snapshot import SnapshotReader
from scripts import make_test_models
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for

EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
# a threshold or source change is judged quickly; no test here is about latency
UPDATE = {"health_window_s": 4.0, "health_min_frames": 3, "max_latency_ratio": 100.0}


def slow_digit_video(models: dict[str, Path], path: Path, fps: int = 5, n: int = 20) -> Path:
    """``n`` test-set digits at ``fps`` (lossless FFV1): a low-rate camera for many agents."""
    z = np.load(models["digits"] / "test_set.npz")
    images = next(z[k] for k in z.files if z[k].ndim == 3)[:n]
    labels = next(z[k] for k in z.files if z[k].ndim == 1)[:n]
    make_test_models.write_digit_video(path, images, labels, scale=8, fps=fps)
    return path


def pipeline_table(source: str, model: Path, **extra: Any) -> dict[str, Any]:
    """Pipeline ``front``: ``source`` through the local ``model`` with tracking."""
    loop = not source.startswith("http")
    return {"name": "front", "source": source, "model": str(model), "loop": loop,
            "tracking": {}, **extra}  # fmt: skip


class Spy:
    """Every MQTT message on ``#`` (retained ones included), topic and payload."""

    def __init__(self, broker: Mosquitto) -> None:
        self.lock = threading.Lock()
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="spy")
        self.client.on_message = self._on
        self.client.connect(broker.host, broker.port)
        self.client.subscribe("#", qos=1)
        self.client.loop_start()

    def _on(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append((msg.topic, bytes(msg.payload)))

    def payloads(self) -> list[tuple[str, bytes]]:
        with self.lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


class AgentLog:
    """What the agents log, as ``edgefleet-agent run`` logs it (INFO, redaction filter on the
    handler), into ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handler = logging.FileHandler(path)
        self.handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
        self.root = logging.getLogger()
        self.level = self.root.level
        self.root.addHandler(self.handler)
        self.root.setLevel(logging.INFO)
        install_redaction()

    def text(self) -> str:
        self.handler.flush()
        return self.path.read_text(encoding="utf-8", errors="replace")

    def close(self) -> None:
        self.root.removeHandler(self.handler)
        self.root.setLevel(self.level)
        self.handler.close()


class OpsFleet:
    """N real agents ``cam-00``… in group ``lobby`` running ``pipeline`` (see module doc)."""

    def __init__(self, tmp: Path, broker: Mosquitto, n: int, pipeline: dict[str, Any]) -> None:
        self.tmp = tmp
        self.broker = broker
        self.repo_dir = tmp / "registry"
        self.repo = Repository.init(self.repo_dir)
        # the registry's server: a device refreshes its TUF metadata before it trusts a
        # desired state (the desired-state keys are in the root)
        self.server = ChunkServer(self.repo_dir, broker.url, client_id="registry-1")
        self.server.start()
        self.ca_dir = tmp / "ca"
        self.db_path = tmp / "fleet.db"
        self.db = f"sqlite:///{self.db_path}"
        self.ids = [f"cam-{i:02d}" for i in range(n)]
        self.log = AgentLog(tmp / "agents.log")
        self.spy = Spy(broker)
        self.store: Store = open_store(self.db)
        self.worker = IngestWorker(broker.url, self.store, flush_s=0.05)
        self.worker.start()
        self.agents: dict[str, Agent] = {}
        self.pipeline = pipeline  # what each agent's local file runs
        assert self.cli("ca", "init", "--dir", str(self.ca_dir), conn=False).returncode == 0
        ca = FleetCA(self.ca_dir)
        for d in self.ids:  # as `edgefleet device enroll` issues it (that one writes mqtts://)
            ca.issue("device", d, tmp / "bundles" / d)
        try:
            for d in self.ids:
                self.start(d, pipeline)
            ok = wait_for(lambda: len(self.views()) == n and all(
                v.contract for v in self.views().values()), 20)  # fmt: skip
            assert ok, f"the ingest saw {sorted(self.views())}"
        except BaseException:
            self.close()
            raise

    def data_dir(self, d: str) -> Path:
        return self.tmp / "devices" / d

    def start(self, d: str, pipeline: dict[str, Any]) -> Agent:
        bundle = self.tmp / "bundles" / d
        cfg = parse_config({
            "device_id": d, "data_dir": str(self.data_dir(d)), "profile": "x86-cpu",
            "groups": ["lobby"], "pipelines": [pipeline],
            "broker": {"url": self.broker.url, "cert_file": str(bundle / "device.crt"),
                       "key_file": str(bundle / "device.key")},
            "trust": {"root": str(self.repo_dir / "root.json")},
            "telemetry": {"interval_s": 1.0}, "update": UPDATE,
            "engine": {"type": "onnxruntime", "threads": 1},
        })  # fmt: skip
        agent = Agent(cfg)
        self.agents[d] = agent
        agent.start()
        assert wait_for(lambda: agent.session.connected.is_set(), 10), d
        return agent

    def views(self) -> dict[str, Any]:
        from datetime import datetime, timezone

        now = datetime.now(timezone.utc)
        return {v.device_id: v for v in SnapshotReader(self.store).read(now, now, metrics=False)}

    def cli(self, *args: str, conn: bool = True, stdin: str | None = None,
            timeout: float = 90) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """``edgefleet ARGS`` as the operator's process (with the fleet's database, registry
        and broker when ``conn``); its exit code and output."""
        extra = ["--db", self.db, "--repo", str(self.repo_dir), "--broker", self.broker.url]
        return subprocess.run(
            [EDGEFLEET, *args, *(extra if conn else [])], capture_output=True, text=True,
            input=stdin, timeout=timeout,
        )  # fmt: skip

    def files_at_rest(self) -> Iterable[Path]:
        """The cloud's files: the ingest and rollout database (with its WAL) and the registry."""
        yield from self.tmp.glob("fleet.db*")
        yield from (p for p in self.repo_dir.rglob("*") if p.is_file())

    def close(self) -> None:
        for a in self.agents.values():
            a.stop()
        self.spy.close()
        self.server.stop()
        self.worker.stop()
        self.store.close()
        self.log.close()
