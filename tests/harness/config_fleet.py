"""Devices that take remote pipeline configurations, over a real broker, as the agent reports.

``ConfigDevices`` is N devices behind one MQTT connection: each announces itself (retained
birth state, online, pipeline ``front``, group ``lobby``) and reports (retained ``reported``,
``front`` on det@1.0.0 committed, ``config`` running the local file). When a desired state
arrives it is checked as a device checks it — the signature against the registry's root, the
document's hash, the document with the device's own ``PipelineConfig`` models — and the
device answers with ``ReportedState.config`` exactly as contract 1.3 describes: ``applied``
with the new hash running, or (devices listed in ``fail``) ``rolled_back`` with the previous
hash kept and a reason. The ingest worker stores those reports; the controller reads them.

The real agent's apply code is another part of this work; these devices report the way it
will (``agent.protocol.state.ConfigReport``), so the cloud side is tested end to end on the
wire.
"""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.pipeline.config import PipelineConfig
from agent.protocol.desired import desired_keys_from_root, verify_desired
from agent.protocol.state import (
    ConfigReport,
    ConfigStatus,
    DesiredState,
    DeviceState,
    PipelineReport,
    ReportedState,
    SignedDesired,
    UpdatePhase,
    config_hash,
)
from agent.protocol.topics import Topics
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for


class ConfigDevices:
    """N simulated devices answering desired configurations (see the module docstring)."""

    def __init__(
        self, broker: Mosquitto, repo_dir: Path, n: int, *, fail: frozenset[str] = frozenset()
    ) -> None:
        root = json.loads((repo_dir / "root.json").read_text())["signed"]
        self.keys, self.threshold = desired_keys_from_root(root)
        self.ids = [f"cam-{i:02d}" for i in range(n)]
        self.fail = fail
        self.topics = Topics()
        self.lock = threading.Lock()
        self.desired: dict[str, list[DesiredState]] = {d: [] for d in self.ids}
        self.running: dict[str, str | None] = dict.fromkeys(self.ids)  # config hash, None: local
        self.errors: list[str] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="config-devices")
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        for d in self.ids:
            birth = DeviceState(device_id=d, online=True, agent_version="test", profile="x86-cpu",
                                pipelines=["front"], groups=["lobby"])  # fmt: skip
            self._send(d, "state", birth.encode())
            self.report(d, None)
        self.client.subscribe(self.topics.all_devices("desired"), qos=1)

    def _send(self, device_id: str, kind: str, payload: bytes, wait: bool = True) -> None:
        info = self.client.publish(self.topics.device(device_id, kind), payload, qos=1, retain=True)
        if wait:  # never in paho's callback thread: the acknowledgement is read by that thread
            info.wait_for_publish(5)

    def report(self, device_id: str, config: ConfigReport | None, wait: bool = True) -> None:
        """Publish the device's retained reported state with ``config``."""
        now = datetime.now(timezone.utc)
        front = PipelineReport(name="front", phase=UpdatePhase.COMMITTED, active_model="det",
                               active_version="1.0.0", updated_at=now)  # fmt: skip
        msg = ReportedState(device_id=device_id, pipelines=[front], config=config)
        self._send(device_id, "reported", msg.encode(), wait)

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            self._take(msg)
        except Exception as e:  # a test assertion below reports what went wrong
            with self.lock:
                self.errors.append(f"{msg.topic}: {type(e).__name__}: {e}")

    def _take(self, msg: mqtt.MQTTMessage) -> None:
        env = SignedDesired.decode(bytes(msg.payload))
        d = env.signed.device_id
        if msg.topic != self.topics.device(d, "desired") or d not in self.desired:
            raise ValueError("desired state on another device's topic")
        verify_desired(env, trusted_keys=self.keys, threshold=self.threshold, device_id=d,
                       last_revision=None)  # fmt: skip
        state = env.signed
        with self.lock:
            self.desired[d].append(state)
        cfg = state.config
        if cfg is None or cfg.hash == self.running[d]:
            return
        if config_hash(cfg.document) != cfg.hash:
            raise ValueError("config hash does not match its document")
        for table in json.loads(cfg.document)["pipelines"]:  # as the device validates it
            PipelineConfig.model_validate(table)
        now = datetime.now(timezone.utc)
        if d in self.fail:
            why = "health window failed: pipeline front stalled for 30 s"
            report = ConfigReport(hash=self.running[d], revision=state.revision,
                                  target_hash=cfg.hash, status=ConfigStatus.ROLLED_BACK,
                                  reason=why, updated_at=now)  # fmt: skip
        else:
            self.running[d] = cfg.hash
            report = ConfigReport(hash=cfg.hash, revision=state.revision, target_hash=cfg.hash,
                                  status=ConfigStatus.APPLIED, updated_at=now)  # fmt: skip
        self.report(d, report, wait=False)

    def got(self, device_id: str) -> list[DesiredState]:
        """Every desired state ``device_id`` received, oldest first."""
        with self.lock:
            return list(self.desired[device_id])

    def wait_configs(self, ids: list[str], timeout: float = 10.0) -> None:
        """Until each of ``ids`` has received a desired state with a configuration."""
        ok = wait_for(lambda: all(any(s.config for s in self.got(d)) for d in ids), timeout)
        assert ok, {d: len(self.got(d)) for d in ids}

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
