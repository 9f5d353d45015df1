"""The on-disk outbox: bounds (pure + SQLite, hypothesis) and delivery through a real Mosquitto."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.common.errors import BadDataError
from agent.common.mqtt import make_client
from agent.telemetry.outbox import Outbox, OutboxSender, plan_drop, row_size
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for

TOPIC = "edgefleet/v1/devices/d1/telemetry"


# ---------------------------------------------------------------- pure / no broker


@given(
    sizes=st.lists(st.integers(0, 50), max_size=30),
    new=st.integers(0, 50),
    max_rows=st.integers(1, 40),
    extra=st.integers(0, 200),
)
def test_plan_drop_makes_room_minimally(
    sizes: list[int], new: int, max_rows: int, extra: int
) -> None:
    max_bytes = new + extra
    n = plan_drop(len(sizes), sum(sizes), sizes, new, max_rows, max_bytes)
    rest = sizes[n:]
    assert len(rest) + 1 <= max_rows
    assert sum(rest) + new <= max_bytes
    if n:  # one fewer would not have been enough
        less = sizes[n - 1 :]
        assert len(less) + 1 > max_rows or sum(less) + new > max_bytes


@settings(max_examples=30, deadline=None)
@given(
    rows=st.lists(st.binary(max_size=40), max_size=60),
    max_rows=st.integers(1, 30),
    max_bytes=st.integers(len(TOPIC) + 40, 600),
)
def test_put_keeps_bounds_and_drops_oldest(
    tmp_path_factory: pytest.TempPathFactory, rows: list[bytes], max_rows: int, max_bytes: int
) -> None:
    path = tmp_path_factory.mktemp("ob") / "outbox.db"
    box = Outbox(path, max_rows=max_rows, max_bytes=max_bytes, clock=lambda: 1.0)
    for i, payload in enumerate(rows):
        box.put(TOPIC, payload)
        st_ = box.stats()
        assert st_["depth"] <= max_rows and st_["bytes"] <= max_bytes
        assert st_["depth"] + st_["dropped"] == i + 1
    kept = [r.payload for r in box.peek(0, 1000)]
    assert kept == rows[len(rows) - len(kept) :]  # a suffix: the oldest went first
    assert box.bytes() == sum(row_size(TOPIC, p) for p in kept)
    final = box.stats()
    box.close()
    again = Outbox(path, max_rows=max_rows, max_bytes=max_bytes)
    assert again.stats() == final  # depth, bytes and dropped all come back from the file
    again.close()


def test_bound_max_rows_100_put_250(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_rows=100)
    for i in range(250):
        box.put(TOPIC, str(i).encode())
    assert box.stats() == {"depth": 100, "bytes": box.bytes(), "dropped": 150}
    assert [r.payload for r in box.peek(0, 1000)] == [str(i).encode() for i in range(150, 250)]
    box.close()
    assert Outbox(tmp_path / "o.db").stats()["dropped"] == 150  # persisted


def test_the_bound_never_drops_rows_handed_to_the_network(tmp_path: Path) -> None:
    """paho delivers its in-flight messages after a reconnect, so a full outbox must drop the
    oldest rows *not* handed off; dropping in-flight ones counted as lost what then arrived
    (seen in the outage benchmark: 61 counted dropped, 60 missing)."""
    box = Outbox(tmp_path / "o.db", max_rows=5)
    for i in range(5):
        box.put(TOPIC, str(i).encode())
    box.handing_off(2)  # rows 1 and 2 (payloads 0, 1) are in paho's hands
    for i in range(5, 12):
        box.put(TOPIC, str(i).encode())
    kept = [r.payload for r in box.peek(0, 100)]
    assert kept[:2] == [b"0", b"1"], "an in-flight row was dropped"
    assert kept[2:] == [str(i).encode() for i in range(9, 12)]
    assert box.stats() == {"depth": 5, "bytes": box.bytes(), "dropped": 7}
    box.delete([1, 2])  # their PUBACKs
    box.handing_off(7)  # more than is queued: the bound may be exceeded, never miscounted
    box.put(TOPIC, b"12")
    assert box.stats()["depth"] == 4 and box.stats()["dropped"] == 7
    box.close()


@pytest.mark.parametrize(
    ("topic", "payload", "qos"),
    [("", b"x", 1), ("a/+/b", b"x", 1), ("a/#", b"x", 1), ("a", b"x", 3), ("a", "text", 1)],
)
def test_put_rejects_bad_rows(tmp_path: Path, topic: str, payload: bytes, qos: int) -> None:
    box = Outbox(tmp_path / "o.db")
    with pytest.raises(BadDataError):
        box.put(topic, payload, qos)
    assert box.depth() == 0


def test_put_rejects_row_larger_than_outbox(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_bytes=100)
    box.put(TOPIC, b"a")
    with pytest.raises(BadDataError, match="exceeds max_bytes"):
        box.put(TOPIC, b"x" * 100)
    assert box.depth() == 1


def test_put_is_thread_safe(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.db", max_rows=1000)

    def work(k: int) -> None:
        for i in range(200):
            box.put(TOPIC, f"{k}-{i}".encode())

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert box.stats()["depth"] == 800
    payloads = [r.payload.decode() for r in box.peek(0, 1000)]
    for k in range(4):  # each producer's rows keep their order
        mine = [p for p in payloads if p.startswith(f"{k}-")]
        assert mine == [f"{k}-{i}" for i in range(200)]


# ---------------------------------------------------------------- real broker


class Collector:
    """A QoS 1 subscriber that records payloads in arrival order."""

    def __init__(self, broker: Mosquitto, *, client_id: str = "", clean: bool = True) -> None:
        self.got: list[bytes] = []
        self.subscribed = threading.Event()
        self.client = make_client(client_id, clean=clean)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = lambda c, u, m: self.got.append(m.payload)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self.subscribed.wait(5)

    def _on_connect(self, client: mqtt.Client, *_: object) -> None:
        client.subscribe(TOPIC, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publisher(broker: Mosquitto, client_id: str = "dev-1") -> mqtt.Client:
    client = make_client(client_id)
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert wait_for(client.is_connected, 5)
    return client


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    b = Outbox(tmp_path / "outbox.db")
    yield b
    b.close()


def payloads(n: int, start: int = 0) -> list[bytes]:
    return [f"m{i:05d}".encode() for i in range(start, start + n)]


@pytest.mark.broker
def test_delivers_in_order_and_complete(broker: Mosquitto, box: Outbox) -> None:
    sub = Collector(broker)
    pub = publisher(broker)
    prev_calls: list[int] = []
    pub.on_publish = lambda c, u, mid, rc, p: prev_calls.append(mid)
    sender = OutboxSender(box, pub).start()
    want = payloads(300)
    for p in want:
        box.put(TOPIC, p)
    assert wait_for(lambda: len(sub.got) >= 300, 10)
    assert sub.got == want
    assert wait_for(lambda: box.depth() == 0, 5)
    assert len(prev_calls) >= 300  # the session's own on_publish still runs (chained)
    sender.stop()
    assert pub.on_publish is not None and pub.on_publish.__name__ == "<lambda>"
    pub.disconnect()
    pub.loop_stop()
    sub.close()


def persistent_broker(broker: Mosquitto) -> None:
    """Restart ``broker`` with persistence so a subscriber's session survives an outage."""
    broker.stop()
    text = broker.conf.read_text().replace(
        "persistence false", f"persistence true\npersistence_location {broker.workdir}/"
    )
    broker.conf.write_text(text)
    broker.start()


@pytest.mark.broker
def test_outage_500_messages_all_arrive_in_order(broker: Mosquitto, box: Outbox) -> None:
    persistent_broker(broker)
    sub = Collector(broker, client_id="ingest-1", clean=False)
    pub = publisher(broker)
    sender = OutboxSender(box, pub).start()
    box.put(TOPIC, b"before")
    assert wait_for(lambda: sub.got == [b"before"], 5)

    broker.stop()
    assert wait_for(lambda: not pub.is_connected(), 5)
    want = payloads(500)
    for p in want:
        box.put(TOPIC, p)
    time.sleep(0.3)
    assert box.depth() == 500  # nothing is deleted while nobody acknowledges
    broker.start()

    assert wait_for(lambda: len(sub.got) >= 501, 20), len(sub.got)
    assert sub.got[1:] == want
    assert wait_for(lambda: box.depth() == 0, 5)
    sender.stop()
    pub.disconnect()
    pub.loop_stop()
    sub.close()


@pytest.mark.broker
def test_row_stays_until_puback(broker: Mosquitto, box: Outbox) -> None:
    sub = Collector(broker)
    pub = publisher(broker)
    sender = OutboxSender(box, pub).start()
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)  # connection stays up, but no PUBACK can come
    try:
        for p in payloads(5):
            box.put(TOPIC, p)
        assert wait_for(lambda: sender.in_flight() == 5, 5)  # handed to paho, on the wire
        time.sleep(0.3)
        assert box.depth() == 5
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    assert wait_for(lambda: box.depth() == 0, 5)
    assert wait_for(lambda: sub.got == payloads(5), 5)
    sender.stop()
    pub.disconnect()
    pub.loop_stop()
    sub.close()


@pytest.mark.broker
def test_rows_survive_restart(broker: Mosquitto, tmp_path: Path) -> None:
    """Rows in flight when the process dies are still in the file and sent by the next run."""
    path = tmp_path / "restart.db"
    sub = Collector(broker)
    box = Outbox(path)
    pub = publisher(broker)
    assert broker.proc is not None
    broker.proc.send_signal(signal.SIGSTOP)  # the first run never sees a PUBACK
    try:
        sender = OutboxSender(box, pub).start()
        for p in payloads(50):
            box.put(TOPIC, p)
        assert wait_for(lambda: sender.in_flight() == 50, 5)
        sender.stop()  # "the process dies": the PUBACKs that come later reach no outbox
        box.close()
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    pub.disconnect()
    pub.loop_stop()

    box2 = Outbox(path)
    assert box2.depth() == 50
    pub2 = publisher(broker, "dev-1")
    sender2 = OutboxSender(box2, pub2).start()
    assert wait_for(lambda: box2.depth() == 0, 10)
    # At-least-once: the broker routed the copies of the first run that were on the wire
    # (paho keeps 20 in flight by default), then all 50 of the second run.
    assert wait_for(lambda: sub.got[-50:] == payloads(50), 5), sub.got
    first = sub.got[:-50]
    assert first == payloads(len(first))
    sender2.stop()
    box2.close()
    pub2.disconnect()
    pub2.loop_stop()
    sub.close()
