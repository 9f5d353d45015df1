"""Opt-in camera snapshots: off by default, rate-limited, JPEG end to end into the fleet page."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.config import parse_config
from agent.protocol.schema import EXAMPLES
from agent.protocol.telemetry import Snapshot
from agent.protocol.topics import Topics
from agent.protocol.wire import BadMessage
from agent.service import Agent
from agent.telemetry.outbox import Outbox
from agent.telemetry.snapshots import SnapshotSink, encode_jpeg
from cloud_sync.ingest.store import open_store
from cloud_sync.ingest.web import serve_web
from cloud_sync.ingest.worker import IngestWorker
from tests.harness.broker import Mosquitto
from tests.harness.util import free_port, wait_for


def test_encode_jpeg_downscales_keeping_the_aspect() -> None:
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[100:200, 100:300] = (0, 0, 255)
    jpeg, w, h = encode_jpeg(frame, max_width=320, quality=80)
    assert (w, h) == (320, 240)
    back = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert back.shape == (240, 320, 3)
    assert back[75, 100, 2] > 200 and back[75, 100, 0] < 50  # the red box, halved
    _, w2, h2 = encode_jpeg(frame, max_width=1920, quality=80)
    assert (w2, h2) == (640, 480)  # never upscaled


def test_sink_sends_at_most_one_per_interval(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox.db", max_rows=100, max_bytes=10 << 20)
    t = [0.0]
    sink = SnapshotSink("cam-1", box, "snap", every_s=10, clock=lambda: t[0])
    frame = np.full((48, 64, 3), 90, np.uint8)
    event = {"pipeline": "front", "model": "det", "version": "1.0.0", "frame_time": 1.7e9}
    for i, now in enumerate([0.0, 1.0, 9.9, 10.0, 15.0, 25.0]):
        t[0] = now
        sink.emit_frame({**event, "frame_seq": i}, frame)
    sink.emit({**event, "frame_seq": 99})  # an event without its frame sends nothing
    rows = box.peek(0, 10)
    box.close()
    sent = [Snapshot.decode(r.payload) for r in rows]
    assert [s.frame_seq for s in sent] == [0, 3, 5]  # t = 0, 10, 25
    assert sent[0].width == 64 and sent[0].jpeg()[:2] == b"\xff\xd8"


@pytest.mark.parametrize(
    "jpeg_b64,why",
    [
        ("not base64!", "jpeg_b64"),
        (base64.b64encode(b"\x89PNG\r\n\x1a\n....").decode(), "not a JPEG"),
        ("/9j/" + "A" * ((2 << 20) // 3 * 4 + 8), "jpeg_b64"),  # a JPEG over 2 MiB
    ],
)
def test_snapshot_message_rejects_what_is_not_a_jpeg(jpeg_b64: str, why: str) -> None:
    good = EXAMPLES["snapshot"].model_dump(mode="json")
    with pytest.raises(BadMessage, match=why):
        Snapshot.decode(json.dumps({**good, "jpeg_b64": jpeg_b64}).encode())


class Listener:
    """Counts messages on one topic (what leaves the device)."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.count = 0
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"l-{topic[-12:]}")
        self.client.on_message = self._on
        self.subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on(self, *a: Any) -> None:
        with self.lock:
            self.count += 1

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _agent(tmp: Path, broker: Mosquitto, video: Path, model: Path, **pipeline: Any) -> Agent:
    return Agent(parse_config({
        "device_id": "snap-01", "data_dir": str(tmp / "data"), "profile": "x86-cpu",
        "pipelines": [{"name": "front", "source": str(video), "model": str(model), "loop": True,
                       "events": {"policy": "every"}, **pipeline}],
        "broker": {"url": broker.url}, "telemetry": {"interval_s": 1},
    }))  # fmt: skip


@pytest.mark.broker
@pytest.mark.video
def test_frames_never_leave_the_device_by_default(
    broker: Mosquitto, synthetic_video: Path, test_models: dict[str, Path], tmp_path: Path
) -> None:
    topics = Topics()
    snaps = Listener(broker, topics.device("snap-01", "snapshots"))
    events = Listener(broker, topics.device("snap-01", "events"))
    assert snaps.subscribed.wait(5) and events.subscribed.wait(5)
    agent = _agent(tmp_path, broker, synthetic_video, test_models["blobdet"] / "model.onnx")
    agent.start()
    try:
        assert wait_for(lambda: events.count >= 30, 30)  # frames were inferred and reported
    finally:
        agent.stop()
        snaps.close()
        events.close()
    assert snaps.count == 0


@pytest.mark.broker
@pytest.mark.video
def test_opted_in_snapshots_reach_the_database_and_the_fleet_page(
    broker: Mosquitto, synthetic_video: Path, test_models: dict[str, Path], tmp_path: Path
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    worker = IngestWorker(broker.url, store)
    worker.start()
    assert worker.subscribed.wait(10)
    agent = _agent(tmp_path, broker, synthetic_video, test_models["blobdet"] / "model.onnx",
                   snapshots={"every_s": 1, "max_width": 320, "jpeg_quality": 70})  # fmt: skip
    port = free_port()
    web = serve_web(store, port)
    agent.start()
    try:
        assert wait_for(lambda: store.counts()["snapshots"] >= 2, 30)
        snap = store.latest_snapshot("snap-01", "front")
        assert snap is not None and (snap["width"], snap["height"]) == (320, 240)
        assert snap["model"] == "blobdet"
        with urlopen(f"http://127.0.0.1:{port}/api/devices/snap-01/snapshot.jpg", timeout=10) as r:
            assert r.headers["Content-Type"] == "image/jpeg"
            body = r.read()
        img = cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (240, 320, 3)
        # the synthetic video's bright square is in the picture, not a blank frame
        assert int(img.max()) > 200 and int(img.min()) < 60
    finally:
        agent.stop()
        web.stop()
        worker.stop()
        store.close()
