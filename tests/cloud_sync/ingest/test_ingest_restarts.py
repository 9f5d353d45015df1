"""What the ingest worker keeps across its own restarts and the broker's (real Mosquitto)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.protocol.schema import EXAMPLES
from agent.protocol.topics import Topics
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.ingest.worker import IngestWorker
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for

pytestmark = pytest.mark.broker
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)


def publish_telemetry(broker: Mosquitto, seconds: range) -> None:
    """Telemetry of cam-017 for each second, as a device's outbox sends it (QoS 1)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="device")
    c.connect(broker.host, broker.port)
    c.loop_start()
    try:
        ex = EXAMPLES["telemetry"]
        for s in seconds:
            msg = ex.model_copy(update={"ts": T0 + timedelta(seconds=s)})
            c.publish(Topics().device(ex.device_id, "telemetry"), msg.encode(), qos=1
                      ).wait_for_publish(5)  # fmt: skip
    finally:
        c.loop_stop()
        c.disconnect()


def start(broker: Mosquitto, store: Store, share: str | None) -> IngestWorker:
    # a client id per variant: the session broker keeps persistent sessions between tests,
    # and a resumed session would carry the other variant's subscriptions
    w = IngestWorker(broker.url, store, share_group=share, client_id=f"ingest-a-{share}")
    w.start()
    assert w.subscribed.wait(10)
    return w


@pytest.mark.parametrize("share", ["ingest", None], ids=["shared", "plain"])
def test_messages_sent_while_the_worker_restarts_are_kept(
    broker: Mosquitto, tmp_path: Path, share: str | None
) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        w = start(broker, store, share)
        publish_telemetry(broker, range(0, 5))
        assert wait_for(lambda: store.counts()["device_telemetry"] == 5, 30), store.counts()
        w.stop()  # persistent session: the broker queues for it
        publish_telemetry(broker, range(5, 10))
        w = start(broker, store, share)
        assert wait_for(lambda: store.counts()["device_telemetry"] == 10, 30), store.counts()
        w.stop()
    finally:
        store.close()


def test_a_plain_worker_keeps_its_subscription_across_a_broker_restart(
    broker: Mosquitto, tmp_path: Path
) -> None:
    conf = broker.conf.read_text().replace("persistence false", "persistence true")
    broker.conf.write_text(conf + f"persistence_location {tmp_path}/\n")
    broker.stop()
    broker.start()
    store = open_store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    try:
        w = start(broker, store, None)
        w.stop()  # the worker is away when the broker restarts and devices flush
        broker.stop()
        broker.start()
        publish_telemetry(broker, range(0, 5))
        w = start(broker, store, None)
        assert wait_for(lambda: store.counts()["device_telemetry"] == 5, 10), store.counts()
        w.stop()
    finally:
        store.close()
