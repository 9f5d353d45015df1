"""Rollout harness: a registry holding two versions of ``det``, a subscriber that verifies
every desired state the controller publishes as a device would, and ``StoredFleet``, devices
that exist only as rows the test writes into the ingest database (birth state, reported
state, telemetry), following the desired states they are sent. Time is passed in."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.protocol.desired import desired_keys_from_root, verify_desired
from agent.protocol.state import DesiredState, SignedDesired
from agent.protocol.topics import Topics
from cloud_sync.ingest.store import Store
from cloud_sync.registry.repo import Repository
from tests.harness.broker import Mosquitto, subscriber
from tests.harness.util import wait_for

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
OLD, NEW = "1.0.0", "2.0.0"


def make_registry(path: Path) -> Repository:
    """A registry with det@1.0.0 and det@2.0.0 (the files' contents do not matter here)."""
    repo = Repository.init(path)
    files = {}
    for v in (OLD, NEW):
        f = path.parent / f"det-{v}.onnx"
        f.write_bytes(f"model {v}".encode())
        files[f"models/det/{v}/model.onnx"] = str(f)
    repo.add_targets(files)
    return repo


class DesiredWatcher:
    """Collects every desired state published, verified like a device verifies it."""

    def __init__(self, broker: Mosquitto, repo_dir: Path) -> None:
        root = json.loads((repo_dir / "root.json").read_text())["signed"]
        self.keys, self.threshold = desired_keys_from_root(root)
        self.got: list[DesiredState] = []
        self.lock = threading.Lock()
        self.c = subscriber(broker, Topics().all_devices("desired"), self._on_message)

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        env = SignedDesired.decode(bytes(msg.payload))
        assert msg.topic == Topics().device(env.signed.device_id, "desired")
        verify_desired(env, trusted_keys=self.keys, threshold=self.threshold,
                       device_id=env.signed.device_id, last_revision=None)  # fmt: skip
        with self.lock:
            self.got.append(env.signed)

    def wait(self, n: int) -> list[DesiredState]:
        assert wait_for(lambda: len(self.got) >= n, 10), f"{len(self.got)} of {n} desired states"
        with self.lock:
            return list(self.got)

    def devices_with(self, version: str) -> list[str]:
        with self.lock:
            return [d.device_id for d in self.got if d.pipelines["front"].version == version]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class StoredFleet:
    """N devices that exist only as rows in the ingest database."""

    def __init__(self, store: Store, n: int) -> None:
        self.store = store
        self.ids = [f"dev-{i:02d}" for i in range(n)]
        self.running = dict.fromkeys(self.ids, OLD)
        for d in self.ids:
            birth = {"device_id": d, "online": True, "pipelines": ["front"],
                     "tags": {"site": "berlin"}, "groups": ["lobby"]}  # fmt: skip
            store.upsert_state(birth, now=T0)
            self.report(d, "committed", OLD, OLD)

    def report(
        self, d: str, phase: str, active: str, target: str, error: str | None = None
    ) -> None:
        self.store.upsert_reported({"device_id": d, "pipelines": [{
            "name": "front", "phase": phase, "active_model": "det", "active_version": active,
            "target_model": "det", "target_version": target, "last_error": error,
            "updated_at": T0.isoformat()}]})  # fmt: skip

    def follow(self, desired: list[DesiredState], *, fail: frozenset[str] = frozenset()) -> None:
        """Each device takes the newest desired state it got: commits it, or rolls back."""
        newest: dict[str, DesiredState] = {}
        for s in desired:
            if s.device_id not in newest or s.revision > newest[s.device_id].revision:
                newest[s.device_id] = s
        for d, s in newest.items():
            want = s.pipelines["front"].version
            if want == self.running[d]:
                continue
            if d in fail:
                self.report(d, "rolled_back", self.running[d], want, "health window failed")
            else:
                self.running[d] = want
                self.report(d, "committed", want, want)

    def telemetry(self, start: datetime, seconds: int, p95: dict[str, float] | None = None) -> None:
        """Every device reports every 10 s over ``[start, start + seconds]``."""
        msgs = [
            {"device_id": d, "ts": (start + timedelta(seconds=k)).isoformat(),
             "pipelines": [{"name": "front", "fps_out": 10.0, "errors": 0, "model": "det",
                            "version": self.running[d],
                            "latency_ms": {"total": {"p95": (p95 or {}).get(d, 10.0)}}}]}
            for k in range(0, seconds + 1, 10) for d in self.ids
        ]  # fmt: skip
        self.store.add_telemetry_batch(msgs, now=start)
