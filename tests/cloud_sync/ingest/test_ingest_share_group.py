"""Two ingest workers in one ``$share`` group on a real Mosquitto split the telemetry: each
gets a share, and every message is stored exactly once (none lost, none by both).

Each worker writes to its own SQLite file here, so a message delivered to both would show up
as the same (device, ts) in both files; in a deployment they share one database, where the
duplicate would hide behind the idempotent insert. (``tests/cloud_sync/test_broker_security.py``
runs two workers on the TLS broker with an intruder in the group; this is the plain split.)
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa

from agent.protocol.schema import EXAMPLES
from agent.protocol.topics import Topics
from cloud_sync.ingest.schema import DEVICE_TELEMETRY
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.ingest.worker import IngestWorker
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for

pytestmark = pytest.mark.broker
T0 = datetime(2026, 11, 23, 12, 0, tzinfo=timezone.utc)
N = 300
DEVICES = ("cam-1", "cam-2", "cam-3")


def keys(store: Store) -> list[tuple[str, datetime]]:
    """(device, ts) of every stored telemetry row."""
    with store.engine.connect() as c:
        rows = c.execute(sa.select(DEVICE_TELEMETRY.c.device_id, DEVICE_TELEMETRY.c.ts))
        return [(d, ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts)
                for d, ts in rows]  # fmt: skip


def close_all(dev: mqtt.Client, workers: list[IngestWorker], stores: list[Store]) -> None:
    dev.loop_stop()
    dev.disconnect()
    for w in workers:
        w.stop()
    for s in stores:
        s.close()


def test_two_workers_in_one_group_each_store_a_share_and_nothing_twice(
    broker: Mosquitto, tmp_path: Path
) -> None:
    stores = [open_store(f"sqlite:///{tmp_path / f'w{i}.db'}") for i in (1, 2)]
    workers = [IngestWorker(broker.url, s, share_group="ingest", client_id=f"ingest-{i}",
                            flush_s=0.05) for i, s in enumerate(stores, 1)]  # fmt: skip
    acked = [False, False]
    for i, w in enumerate(workers):
        w.client.on_subscribe = lambda *_a, i=i: acked.__setitem__(i, True)
        w.start()
    dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="devices")
    try:
        assert wait_for(lambda: all(acked), 10), "subscriptions not acknowledged"
        dev.connect(broker.host, broker.port)
        dev.loop_start()
        ex = EXAMPLES["telemetry"]
        sent = []
        for i in range(N):
            d = DEVICES[i % len(DEVICES)]
            ts = T0 + timedelta(seconds=i)
            msg = ex.model_copy(update={"device_id": d, "ts": ts})
            dev.publish(Topics().device(d, "telemetry"), msg.encode(), qos=1)
            sent.append((d, ts))
        total = lambda: sum(s.counts()["device_telemetry"] for s in stores)  # noqa: E731
        assert wait_for(lambda: total() >= N, 20), [s.counts() for s in stores]
        assert not wait_for(lambda: total() > N, 0.5), "a message was stored twice"
        got = [keys(s) for s in stores]
        assert got[0] and got[1], f"one worker got nothing: {[len(g) for g in got]}"
        assert not set(got[0]) & set(got[1]), "a message went to both workers"
        both = Counter(got[0] + got[1])
        assert both == Counter(sent)  # every message once, none lost, none extra
        assert [w.counts["telemetry"] for w in workers] == [len(g) for g in got]
        assert all(s.counts()["dead_letters"] == 0 for s in stores)
    finally:
        close_all(dev, workers, stores)


def test_a_volume_only_worker_leaves_state_and_reported_to_the_other(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """``control=False`` (``ingest --volume-only``): that worker writes its share of the
    telemetry and no state or reported message; the other worker writes all of those."""
    stores = [open_store(f"sqlite:///{tmp_path / f'w{i}.db'}") for i in (1, 2)]
    workers = [IngestWorker(broker.url, s, share_group="ingest", client_id=f"ingest-c{i}",
                            flush_s=0.05, control=i == 1)
               for i, s in enumerate(stores, 1)]  # fmt: skip
    for w in workers:
        w.start()
    dev = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="devices")
    try:
        assert all(w.subscribed.wait(10) for w in workers), "subscriptions not acknowledged"
        dev.connect(broker.host, broker.port)
        dev.loop_start()
        for d in DEVICES:
            for kind, example in (("state", "device_state"), ("reported", "reported_state")):
                msg = EXAMPLES[example].model_copy(update={"device_id": d})
                dev.publish(Topics().device(d, kind), msg.encode(), qos=1, retain=True)
        ex = EXAMPLES["telemetry"]
        for i in range(N):
            d = DEVICES[i % len(DEVICES)]
            msg = ex.model_copy(update={"device_id": d, "ts": T0 + timedelta(seconds=i)})
            dev.publish(Topics().device(d, "telemetry"), msg.encode(), qos=1)
        total = lambda: sum(s.counts()["device_telemetry"] for s in stores)  # noqa: E731
        assert wait_for(lambda: total() >= N, 30), [s.counts() for s in stores]
        assert wait_for(lambda: stores[0].counts()["devices"] == len(DEVICES), 10)
        assert workers[0].counts["state"] == workers[0].counts["reported"] == len(DEVICES)
        assert workers[1].counts["state"] == workers[1].counts["reported"] == 0
        assert stores[1].counts()["pipeline_state"] == 0  # rows of reported states
        with stores[1].engine.connect() as c:  # telemetry makes a devices row; state fills it
            online = c.execute(sa.text("SELECT online, agent_version FROM devices")).all()
        assert online and all(row == (None, None) for row in online), online
        assert stores[1].counts()["device_telemetry"] > 0, "the volume-only worker got no share"
    finally:
        close_all(dev, workers, stores)
