"""Ingest back-pressure: bounded memory, acknowledgements only after commit, hostile payloads.

Real parts: Mosquitto (``broker`` fixture), the ingest store on a SQLite file and on a
PostgreSQL server, ``edgefleet ingest`` as a child process that is SIGKILLed during a database
outage. Outages are real: another SQLite connection holds the write lock (``BEGIN
EXCLUSIVE``), or PostgreSQL refuses connections to the database and ends the open ones.
``outage_run`` (``tests/harness/outage.py``) is the scenario that ``scripts/ingest_outage.py``
runs for an hour.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from agent.protocol.schema import EXAMPLES
from agent.protocol.state import ReportedState
from cloud_sync.ingest.flow import ITEM_OVERHEAD, AckWindow, Received
from cloud_sync.ingest.metrics import IngestCollector
from cloud_sync.ingest.rows import DEAD_LETTER_KEEP
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.ingest.worker import IngestWorker
from tests.harness.broker import Mosquitto
from tests.harness.outage import (
    T0,
    TEL,
    TOPICS,
    Devices,
    Outage,
    PostgresRefuses,
    SqliteLock,
    outage_run,
    stored_keys,
    telemetry,
)
from tests.harness.util import wait_for

_ids = itertools.count()

# --- the window (pure) -----------------------------------------------------------------------


def item(n: int = 10, topic: str = "t") -> Received:
    return Received(topic, b"x" * n)


@pytest.mark.parametrize(
    ("max_messages", "max_bytes", "sizes", "admitted"),
    [
        (3, 10**6, [1, 1, 1, 1], 3),  # the message bound
        (100, 3 * (ITEM_OVERHEAD + 101), [100, 100, 100, 100], 3),  # the byte bound
        (100, 10, [10**6], 1),  # one oversized message: taken when the window is empty
        (100, 10, [10**6, 1], 1),  # and nothing beside it
    ],
)
def test_the_window_admits_up_to_its_bounds(
    max_messages: int, max_bytes: int, sizes: list[int], admitted: int
) -> None:
    w = AckWindow(max_messages, max_bytes)
    items = [item(n) for n in sizes]
    for it in items[:admitted]:
        assert w.admit(it)
    if admitted < len(items):
        blocked = threading.Thread(target=w.admit, args=(items[admitted],), daemon=True)
        blocked.start()
        time.sleep(0.1)
        assert blocked.is_alive(), "the reader was not held back"
        assert w.settle([items[0]]) == [items[0]]  # room again: the reader goes on
        blocked.join(2)
        assert not blocked.is_alive() and w.full_waits == 1 and w.full_s > 0
    assert w.peak_messages == min(admitted, len(items))


def test_acknowledgements_leave_in_arrival_order() -> None:
    w = AckWindow(10, 10**6)
    a, b, c, d = (item() for _ in range(4))
    for it in (a, b, c, d):
        w.admit(it)
    assert w.settle([b, d]) == []  # written first (state jumps the queue): a is not done yet
    assert w.settle([a]) == [a, b]
    assert (w.messages, w.bytes) == (2, c.size + d.size)
    assert w.settle([c]) == [c, d] and (w.messages, w.bytes) == (0, 0)


def test_closing_the_window_releases_a_waiting_reader() -> None:
    w = AckWindow(1, 10**6)
    w.admit(item())
    result: list[bool] = []
    t = threading.Thread(target=lambda: result.append(w.admit(item())), daemon=True)
    t.start()
    time.sleep(0.05)
    w.close()
    t.join(2)
    assert result == [False] and not w.admit(item())
    with pytest.raises(ValueError, match="must be >= 1"):
        AckWindow(0, 1)


# --- the worker: acknowledgements after commit -----------------------------------------------


def message(mid: int, topic: str, payload: bytes, qos: int = 1) -> mqtt.MQTTMessage:
    m = mqtt.MQTTMessage(mid=mid, topic=topic.encode())
    m.payload, m.qos = payload, qos
    return m


class Acks:
    """Stands in for ``client.ack``: records (mid, qos) in order."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def __call__(self, mid: int, qos: int) -> MQTTErrorCode:
        self.sent.append(mid)
        return MQTTErrorCode.MQTT_ERR_SUCCESS


@pytest.fixture
def offline_worker(tmp_path: Path) -> Iterator[tuple[IngestWorker, Acks]]:
    """A worker that is never connected: tests feed ``_on_message`` and run the writer."""
    store = open_store(f"sqlite:///{tmp_path / 'i.db'}")
    worker = IngestWorker("mqtt://127.0.0.1:1", store, max_unacked=5)
    acks = Acks()
    worker.client.ack = acks  # type: ignore[method-assign]
    try:
        yield worker, acks
    finally:
        store.close()


def write_all(worker: IngestWorker) -> None:
    batch, _ = worker._collect()
    worker._write(batch)


def test_acks_only_after_the_write_in_arrival_order(
    offline_worker: tuple[IngestWorker, Acks],
) -> None:
    """A reported state is written before the telemetry that came first, a bad payload is
    dead-lettered: each is acknowledged once handled, in the order they arrived."""
    worker, acks = offline_worker
    rep = cast(ReportedState, EXAMPLES["reported_state"])
    msgs = [
        message(1, *telemetry("cam-017", 1)),
        message(2, *telemetry("cam-017", 2)),
        message(3, TOPICS.device("cam-017", "reported"), rep.encode()),
        message(4, TOPICS.device("cam-017", "telemetry"), b"\xff not json"),
        message(5, *telemetry("cam-017", 5)),
    ]
    for m in msgs:
        worker._on_message(worker.client, None, m)
    assert acks.sent == [] and worker.backlog() == 5  # received, nothing stored yet
    batch, _ = worker._collect()
    assert [r.mid for r in batch] == [3, 1, 2, 4, 5]  # the reported state jumped the queue
    worker._write(batch)
    assert acks.sent == [1, 2, 3, 4, 5] and worker.backlog() == 0
    counts = worker.store.counts()
    assert (counts["device_telemetry"], counts["pipeline_state"], counts["dead_letters"]) == (
        3,
        1,
        1,
    )


def test_no_ack_on_a_later_connection(offline_worker: tuple[IngestWorker, Acks]) -> None:
    """Messages of a connection that ended are stored but not acknowledged on the next one
    (the broker numbers anew or sends them again; the store ignores the second copy)."""
    worker, acks = offline_worker
    for i in (1, 2):
        worker._on_message(worker.client, None, message(i, *telemetry("cam-017", i)))
    worker._on_disconnect(worker.client, None, None, "lost")
    worker._on_message(worker.client, None, message(1, *telemetry("cam-017", 3)))
    write_all(worker)
    assert acks.sent == [1] and worker.stale_acks == 2
    assert worker.store.counts()["device_telemetry"] == 3


def test_a_full_window_stops_the_reader_until_the_writer_catches_up(
    offline_worker: tuple[IngestWorker, Acks],
) -> None:
    worker, acks = offline_worker
    for i in range(5):
        worker._on_message(worker.client, None, message(i + 1, *telemetry("cam-017", i)))
    sixth = message(6, *telemetry("cam-017", 6))
    reader = threading.Thread(target=worker._on_message, args=(worker.client, None, sixth))
    reader.start()
    time.sleep(0.2)
    assert reader.is_alive() and worker.backlog() == 5  # paho's thread would wait here
    write_all(worker)
    reader.join(2)
    assert not reader.is_alive() and worker.backlog() == 1
    write_all(worker)
    assert acks.sent == [1, 2, 3, 4, 5, 6] and worker.window.peak_messages == 5


def test_an_unexpected_error_on_one_message_dead_letters_only_that_one(
    offline_worker: tuple[IngestWorker, Acks],
) -> None:
    """A write that fails in a way nobody foresaw (not bad data, not an outage) is blamed on
    the message, found one by one; the others are stored and everything is acknowledged."""
    worker, acks = offline_worker
    write = worker._writers["telemetry"]

    def fragile(msgs: list[dict[str, Any]]) -> object:
        if any(m["ts"] == T0 + timedelta(milliseconds=2) for m in msgs):
            raise RecursionError("maximum recursion depth exceeded")
        return write(msgs)

    worker._writers["telemetry"] = fragile
    for i in range(4):
        worker._on_message(worker.client, None, message(i + 1, *telemetry("cam-017", i)))
    write_all(worker)
    assert acks.sent == [1, 2, 3, 4] and worker.counts["telemetry"] == 3
    [letter] = worker.store.dead_letters()
    assert letter["reason"] == "RecursionError: maximum recursion depth exceeded"


# --- hostile payloads ------------------------------------------------------------------------


def hostile_payloads() -> dict[str, tuple[str, bytes]]:
    """kind and payload of messages meant to break a parser or the database."""
    tel = json.loads(TEL.model_dump_json())
    pipe = tel["pipelines"][0]
    ev = json.loads(EXAMPLES["inference_event"].model_dump_json())
    return {
        "nested lists": ("telemetry", b"[" * 30_000 + b"]" * 30_000),
        "nested objects": ("events", b'{"a":' * 10_000 + b"1" + b"}" * 10_000),
        "nested summary": ("events", json.dumps({**ev, "summary": {}}).encode().replace(
            b'"summary": {}', b'"summary": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000)),
        "5000-digit integer": ("telemetry", json.dumps(
            {**tel, "pipelines": [{**pipe, "frames_dropped": 0}]}).encode().replace(
            b'"frames_dropped": 0', b'"frames_dropped": ' + b"9" * 5000)),
        "2**70 errors": ("telemetry", json.dumps(
            {**tel, "pipelines": [{**pipe, "errors": 2**70}]}).encode()),
        "1e999 fps": ("telemetry", json.dumps(tel).encode().replace(
            b'"fps_out": ', b'"fps_out": 1e999, "x": ')),
        "frame_seq 2**80": ("events", json.dumps({**ev, "frame_seq": 2**80}).encode()),
        "frame_time 1e300": ("events", json.dumps({**ev, "frame_time": 1e300}).encode()),
        "invalid UTF-8": ("telemetry", json.dumps(tel).encode().replace(b"cam-017", b"cam\xff")),
        "NUL in a label": ("state", json.dumps(
            json.loads(EXAMPLES["device_state"].model_dump_json()) | {"agent_version": "1\x00"}
        ).encode()),
        "empty": ("reported", b""),
        "2 MB": ("telemetry", b'{"pad": "' + b"x" * (2 << 20) + b'"}'),
    }  # fmt: skip


@pytest.mark.broker
def test_hostile_payloads_never_stop_the_worker(broker: Mosquitto, store: Store) -> None:
    """Each is dead-lettered (its first bytes, length and hash), nothing escapes into paho's
    thread or ends the writer, and honest messages sent after them are stored."""
    worker = IngestWorker(broker.url, store, client_id=f"ingest-h{next(_ids)}", flush_s=0.05)
    subacked = threading.Event()
    worker.client.on_subscribe = lambda *_a: subacked.set()
    worker.start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"hostile-{next(_ids)}")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    try:
        assert subacked.wait(10)
        cases = hostile_payloads()
        for kind, payload in cases.values():
            pub.publish(TOPICS.device("cam-017", kind), payload, qos=1).wait_for_publish(10)
        # a topic that is not UTF-8 (Mosquitto refuses to route one) and something that is not
        # a message at all, handed to the callback directly as paho would
        worker._on_message(worker.client, None, message(0, "x", b"{}", qos=0))
        worker._on_message(worker.client, None, "not a message")  # type: ignore[arg-type]
        bad_topic = mqtt.MQTTMessage(mid=0, topic=b"edgefleet/v1/devices/\xff/telemetry")
        bad_topic.payload = b"{}"
        worker._on_message(worker.client, None, bad_topic)
        honest = [telemetry("cam-017", i) for i in range(3)]
        for topic, payload in honest:
            pub.publish(topic, payload, qos=1).wait_for_publish(10)
        # SQLite stores a NUL in a label (the contract allows it); PostgreSQL text cannot
        dead = len(cases) + 2 - (store.engine.dialect.name == "sqlite")

        def stored() -> bool:
            n = len(stored_keys(store, "cam-017"))
            return n == 3 and worker.counts["dead_letters"] == dead

        assert wait_for(stored, 20), (worker.counts, store.counts())
        assert worker._thread is not None and worker._thread.is_alive() and worker.error is None
        assert worker.client._thread is not None and worker.client._thread.is_alive()
        letters = store.dead_letters(100)
        kept = [d for d in letters if d["payload_bytes"] == (2 << 20) + 11]
        assert len(kept) == 1 and len(kept[0]["payload"]) == DEAD_LETTER_KEEP
        assert any(d["topic"].startswith("(topic not UTF-8)") for d in letters)
        assert worker.counts["dropped"] == 0 and worker.backlog() == 0
    finally:
        pub.loop_stop()
        pub.disconnect()
        worker.stop()


# --- database outages ------------------------------------------------------------------------


@pytest.fixture
def outage(db_url: str, tmp_path: Path) -> Iterator[Outage]:
    o: Outage = (
        SqliteLock(tmp_path / "ingest.db")
        if db_url.startswith("sqlite")
        else PostgresRefuses(db_url)
    )
    open_store(o.url).close()  # migrated before anything waits on it
    try:
        yield o
    finally:
        o.end()


@pytest.mark.broker
@pytest.mark.slow
def test_a_database_outage_keeps_memory_bounded_and_loses_nothing(
    broker: Mosquitto, outage: Outage
) -> None:
    """During the outage the worker holds at most ``max_unacked`` messages and stops reading;
    the broker keeps the rest; after it everything arrives, once."""
    store = open_store(outage.url)
    worker = IngestWorker(broker.url, store, client_id=f"ingest-o{next(_ids)}",
                          max_unacked=50, retry_s=0.05, retry_max_s=0.2)  # fmt: skip
    devices = Devices(broker.url, f"o{next(_ids)}", devices=10, rate_hz=200)
    try:
        worker.start()
        assert worker.subscribed.wait(10)
        time.sleep(0.3)  # SUBACK
        devices.start()
        assert wait_for(lambda: len(stored_keys(store, devices.prefix)) > 20, 10)
        outage.begin()
        assert wait_for(lambda: worker.backlog() == 50, 10), worker.backlog()
        time.sleep(2)  # ~400 more messages published meanwhile: the broker holds them
        assert worker.backlog() == 50 and worker.window.peak_messages == 50
        assert worker.store_down_since is not None and worker.store_failures > 0
        figures = {m.name: m.samples[0].value for m in IngestCollector(worker).collect()
                   if m.samples and not m.samples[0].labels}  # fmt: skip
        assert figures["edgefleet_ingest_store_up"] == 0
        assert figures["edgefleet_ingest_unacked_messages"] == 50
        assert "edgefleet_devices" not in figures  # the fleet view needs the database
        outage.end()
        devices.stop()
        sent = devices.sent()
        assert len(sent) > 400
        assert wait_for(lambda: set(stored_keys(store, devices.prefix)) >= sent, 30)
        assert worker.store_down_since is None and worker.window.full_waits > 0
        assert worker.window.peak_messages == 50
    finally:
        outage.end()
        worker.stop()
        store.close()


@pytest.mark.broker
@pytest.mark.slow
def test_a_worker_killed_during_an_outage_loses_nothing_it_had_received(
    broker: Mosquitto, outage: Outage, tmp_path: Path
) -> None:
    """The old worker acknowledged on receipt and queued in memory: a kill during an outage
    lost what it held. Now the broker keeps everything not yet committed."""
    # 50: below the broker's max_inflight_messages (100), so the worker's window is the bound
    r = outage_run(broker.url, outage, tmp_path, max_unacked=50)
    assert r["unacked_when_killed"] == 50, r  # full: it held messages when it died
    assert r["caught_up"] and r["missing"] == 0, r
    assert r["stored"] == r["stored_rows"] == r["acknowledged_by_broker"] > 800, r
    assert all(p["unacked"] <= 50 for p in r["peaks"].values()), r
