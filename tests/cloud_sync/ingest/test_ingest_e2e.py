"""Agent → Mosquitto → ingest worker → SQLite → `edgefleet fleet status`, all real."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.protocol.topics import Topics
from agent.service import Agent
from cloud_sync.ingest.store import open_store
from cloud_sync.ingest.worker import IngestWorker
from tests.harness.broker import Mosquitto
from tests.harness.fleet import looping_agent_config
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video]


def fleet_status(db: str, *args: str) -> list[dict[str, Any]]:
    """`edgefleet fleet status --json` as an operator runs it."""
    out = subprocess.run(
        [
            str(Path(sys.executable).parent / "edgefleet"),
            "fleet",
            "status",
            "--db",
            db,
            "--json",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: list[dict[str, Any]] = json.loads(out.stdout)
    return result


def test_fleet_status_shows_what_the_agent_reports(
    broker: Mosquitto, synthetic_video: Path, test_models: dict[str, Path], tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = open_store(db)
    worker = IngestWorker(broker.url, store)
    worker.start()
    assert worker.subscribed.wait(10)
    model = test_models["blobdet"] / "model.onnx"
    cfg = looping_agent_config("cam-07", tmp_path / "data", synthetic_video, model, broker.url,
                               tags={"site": "berlin"}, groups=["lobby"])  # fmt: skip
    agent = Agent(cfg)
    agent.start()
    try:

        def seen() -> bool:
            fleet = store.fleet()
            return bool(fleet) and any(
                (p.get("fps") or 0) > 0 for p in fleet[0].get("pipelines", [])
            )

        assert wait_for(seen, 30), store.fleet()
        # inference events (policy "rate", 1/s by default) reach the store too
        assert wait_for(lambda: store.counts()["events"] >= 2, 20), store.counts()
        assert wait_for(lambda: worker.counts["events"] >= 2, 5)  # counted after the commit
        # a malformed telemetry payload is dead-lettered, the worker keeps going
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="junk")
        c.connect(broker.host, broker.port)
        c.loop_start()
        c.publish(
            Topics().device("cam-07", "telemetry"), b'{"type": "telemetry"}', qos=1
        ).wait_for_publish(5)
        c.loop_stop()
        c.disconnect()
        assert wait_for(lambda: worker.counts["dead_letters"] == 1, 10)
        before = worker.counts["telemetry"]
        assert wait_for(lambda: worker.counts["telemetry"] > before + 2, 10)
        # the same fleet, as Prometheus scrapes it
        from urllib.request import urlopen

        from cloud_sync.ingest.metrics import serve_metrics
        from tests.harness.util import free_port

        port = free_port()
        server = serve_metrics(worker, port)
        try:
            with urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
        finally:
            server.shutdown()
            server.server_close()
        assert 'edgefleet_ingest_messages_total{kind="telemetry"}' in text
        assert "edgefleet_devices 1.0" in text
        assert 'edgefleet_fleet_pipeline_fps{device_id="cam-07",model="blobdet"' in text
        dead = store.dead_letters(5)
        assert len(dead) == 1 and dead[0]["topic"].endswith("cam-07/telemetry")
        assert "field required" in dead[0]["reason"].lower(), dead[0]["reason"]
    finally:
        agent.stop()
        worker.stop()
        store.close()
    fleet = fleet_status(db, "--tag", "site=berlin")
    assert [d["device_id"] for d in fleet] == ["cam-07"]
    dev = fleet[0]
    assert "online" in dev and dev["tags"] == {"site": "berlin"} and dev["groups"] == ["lobby"]
    pipe = dev["pipelines"][0]
    assert pipe["name"] == "front" and pipe["model"] == "blobdet" and pipe["version"] == "1.0.0"
    assert "phase" in pipe
    assert fleet_status(db, "--tag", "site=paris") == []
