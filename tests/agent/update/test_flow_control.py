"""Chunk transfer flow control: admission (busy), expired requests, adaptive timeout, AIMD."""

from __future__ import annotations

import json
import queue
import random
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.protocol.fetch import FetchHeader, FetchRequest, decode_response, encode_response
from agent.update.transfer.client import ChunkClient
from agent.update.transfer.errors import FetchStoppedError
from cloud_sync.registry.gate import Clocks, Job
from cloud_sync.registry.serve import Admission, ChunkServer
from tests.harness.broker import Mosquitto
from tests.harness.fetch import (
    RawDevice,
    close_client,
    connect_client,
    put_random_file,
    random_bytes,
    served_repo,
)
from tests.harness.util import wait_for

KB = 1024
MB = 1024 * 1024


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return served_repo(tmp_path)


# -- pure parts ---------------------------------------------------------------------------


def test_admission_is_first_come_first_served() -> None:
    adm = Admission(2)
    a, b, c, d = (("a", "p"), ("b", "p"), ("c", "p"), ("d", "p"))
    assert adm.check(a, 0.0).admitted and adm.check(b, 0.0).admitted
    hint_c = adm.check(c, 0.1)
    hint_d = adm.check(d, 0.2)
    assert not hint_c.admitted and not hint_d.admitted and hint_c.in_line and hint_d.in_line
    assert hint_d.retry_after_s >= hint_c.retry_after_s
    adm.done(a, 1.0)
    assert not adm.check(d, 1.1).admitted  # c is first in line, d must not jump it
    assert adm.check(c, 1.2).admitted
    assert adm.check(a, 1.3).admitted  # a late re-send of a finished transfer (grace)
    adm.done(b, 2.0)
    assert adm.check(d, 2.1).admitted
    assert set(adm.active) == {c, d}


def test_admission_forgets_idle_transfers_and_absent_waiters() -> None:
    adm = Admission(1, idle_s=5.0)
    assert adm.check(("a", "p"), 0.0).admitted
    hint = adm.check(("b", "p"), 1.0)
    assert not hint.admitted
    assert not adm.check(("c", "p"), 1.0).admitted
    # a stops asking (crashed device); b never comes back; c keeps asking
    assert adm.check(("c", "p"), 7.0 + 2 * hint.retry_after_s).admitted
    assert ("b", "p") not in adm.waiting
    assert adm.waiting_of("b") == 0 and adm.active_of("a") == 0 and adm.active_of("c") == 1


def test_clock_skew_cancels_out() -> None:
    clocks = Clocks()
    skew = -3600.0  # the device's clock is an hour behind
    assert clocks.delay("d", 1000.0 + skew, 1000.05, learn=True) == 0.0
    assert clocks.delay("d", 1001.0 + skew, 1001.05, learn=True) == pytest.approx(0.0, abs=0.02)
    assert clocks.delay("d", 1002.0 + skew, 1009.0, learn=True) == pytest.approx(6.95, abs=0.1)


def test_old_forms_are_unchanged_on_the_wire() -> None:
    req = FetchRequest(id="r1", path="targets/a", offset=0, length=10)
    assert json.loads(req.encode()) == {"id": "r1", "path": "targets/a", "offset": 0, "length": 10}
    flow = FetchRequest(
        id="r1", path="targets/a", offset=0, length=10, sent_at=1.5, timeout_s=2, busy_ok=True
    )
    assert FetchRequest.decode(flow.encode()) == flow
    ok = encode_response(FetchHeader(id="r1", path="targets/a", offset=0, total=3), b"abc")
    (n,) = struct.unpack(">I", ok[:4])
    assert set(json.loads(ok[4 : 4 + n])) == {"id", "path", "offset", "total", "status", "error"}
    busy = FetchHeader(id="r1", path="targets/a", offset=0, total=0, status="busy", retry_after_s=2)
    assert decode_response(encode_response(busy))[0].retry_after_s == 2


class FakeBroker:
    """A paho stand-in: requests go to ``answer(payload)``; its answers come back shuffled-free."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.callback: Any = None
        self.sent: list[dict[str, Any]] = []

    def message_callback_add(self, _topic: str, cb: Any) -> None:
        self.callback = cb

    def message_callback_remove(self, _topic: str) -> None:
        self.callback = None

    def subscribe(self, *_a: Any, **_k: Any) -> tuple[int, int]:
        return 0, 1

    def unsubscribe(self, *_a: Any) -> None:
        pass

    def is_connected(self) -> bool:
        return True

    def publish(self, _topic: str, payload: bytes, qos: int = 0) -> None:
        self.sent.append(json.loads(payload))
        out = self.answer(payload)
        if out is not None and self.callback is not None:
            self.callback(self, None, SimpleNamespace(topic="t", payload=out))


def busy_then_serve(repo: Path, n: int, *, retry_after_s: float) -> Callable[[bytes], bytes | None]:
    """A registry that answers the first ``n`` requests ``busy``, then serves ``repo``."""
    server = ChunkServer(repo, "mqtt://127.0.0.1:1", client_id="u")
    left = [n]

    def answer(payload: bytes) -> bytes | None:
        req = FetchRequest.decode(payload)
        if left[0] > 0:
            left[0] -= 1
            h = FetchHeader(id=req.id, path=req.path, offset=req.offset, total=0,
                            status="busy", retry_after_s=retry_after_s)  # fmt: skip
            return encode_response(h)
        header, data = server.answer(payload)
        return None if header is None else encode_response(header, data)

    return answer


def test_busy_waits_without_failing_or_tripping_the_rate_guard(repo: Path) -> None:
    blob = random_bytes(200 * KB, 1)
    (repo / "targets" / "f.bin").write_bytes(blob)
    fake = FakeBroker(busy_then_serve(repo, 4, retry_after_s=0.15))
    cc = ChunkClient(
        fake,  # type: ignore[arg-type]
        "dev1",
        chunk_size=16 * KB,
        window=4,
        retries=0,  # a busy answer counted as a failure would end the fetch at once
        rate_span_s=0.1,
        min_rate_bps=10 * MB,  # would trip during the ~0.6 s wait if the guard ran then
        rng=random.Random(0),
    )
    t0 = time.monotonic()
    data = b"".join(cc.iter_file("targets/f.bin"))
    assert data == blob
    assert time.monotonic() - t0 >= 4 * 0.15 * 0.8
    assert cc.busy_responses == 4
    assert cc.bytes_refetched == 0 and cc.timeouts == 0
    assert all(m.get("busy_ok") is True and "sent_at" in m for m in fake.sent)


def test_a_transfer_waiting_in_line_does_not_poll_fast(repo: Path) -> None:
    """Parked on ``busy`` for ~1 s, a transfer wakes a few times, not every 0.1 s: a fleet
    parks hundreds of them, and each wake-up is a thread switch under the GIL."""
    (repo / "targets" / "f.bin").write_bytes(b"y" * 100)
    fake = FakeBroker(busy_then_serve(repo, 1, retry_after_s=1.2))
    cc = ChunkClient(fake, "dev1", rng=random.Random(0))  # type: ignore[arg-type]
    wakes = [0]
    connected = cc.connected

    def counting() -> bool:
        wakes[0] += 1
        return connected()

    cc.connected = counting  # type: ignore[method-assign]
    t0 = time.monotonic()
    assert cc.fetch_range("targets/f.bin", 0, 100).data == b"y" * 100
    assert time.monotonic() - t0 >= 1.2 * 0.8
    assert cc.busy_responses == 1
    assert wakes[0] <= 8, wakes[0]  # ~4 (+ the loop's own passes); at 0.1 s it was ~15


def test_falls_back_to_the_old_request_form_for_an_old_registry(repo: Path) -> None:
    (repo / "targets" / "f.bin").write_bytes(b"x" * 100)
    server = ChunkServer(repo, "mqtt://127.0.0.1:1", client_id="u")

    def old_registry(payload: bytes) -> bytes | None:
        obj = json.loads(payload)
        if set(obj) - {"id", "path", "offset", "length"}:
            h = FetchHeader(
                id=obj["id"],
                path=obj["path"],
                offset=0,
                total=0,
                status="bad_request",
                error="bad fetch request: Extra inputs are not permitted",
            )
            return encode_response(h)
        header, data = server.answer(payload)
        return None if header is None else encode_response(header, data)

    fake = FakeBroker(old_registry)
    cc = ChunkClient(fake, "dev1")  # type: ignore[arg-type]
    assert cc.fetch_range("targets/f.bin", 0, 100).data == b"x" * 100
    assert not cc.flow_fields
    assert set(fake.sent[-1]) == {"id", "path", "offset", "length"}


def test_stop_event_ends_a_transfer(repo: Path) -> None:
    stop = threading.Event()
    fake = FakeBroker(lambda _p: None)  # nobody answers
    cc = ChunkClient(fake, "dev1", stop_event=stop)  # type: ignore[arg-type]
    threading.Timer(0.2, stop.set).start()
    t0 = time.monotonic()
    with pytest.raises(FetchStoppedError):
        cc.fetch_range("targets/f.bin", 0, 10)
    assert time.monotonic() - t0 < 2


# -- against a real broker ----------------------------------------------------------------


def fetch_at_once(
    chunks: list[ChunkClient], path: str, blob: bytes, tmp_path: Path
) -> tuple[list[BaseException], dict[int, float]]:
    """Every client fetches ``path`` (content ``blob``) at the same moment, one thread each;
    returns the errors and when each finished."""
    errors: list[BaseException] = []
    ends: dict[int, float] = {}
    go = threading.Barrier(len(chunks))

    def fetch(i: int) -> None:
        try:
            go.wait()
            dest = tmp_path / f"dev{i}" / "model.onnx"
            chunks[i].fetch_file(path, dest, max_length=len(blob), resume_dir=tmp_path / f"r{i}")
            ends[i] = time.monotonic()
            assert dest.read_bytes() == blob
        except BaseException as e:  # returned to the test
            errors.append(e)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(len(chunks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return errors, ends


@pytest.fixture
def narrow_server(broker: Mosquitto, repo: Path) -> Iterator[ChunkServer]:
    srv = ChunkServer(repo, broker.url, client_id="registry-1", max_transfers=1)
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.broker
def test_two_devices_through_one_transfer_slot(
    narrow_server: ChunkServer, broker: Mosquitto, repo: Path, tmp_path: Path
) -> None:
    size = 6 * MB
    path = "targets/models/m/1.0.0/model.onnx"
    blob = put_random_file(repo, path, size, 3)
    clients = [connect_client(broker, f"edgefleet-dev{i}") for i in (1, 2)]
    chunks = [ChunkClient(c, f"dev{i}", window=4) for i, c in zip((1, 2), clients, strict=True)]
    try:
        errors, ends = fetch_at_once(chunks, path, blob, tmp_path)
    finally:
        for c in clients:
            close_client(c)
    assert not errors, errors
    waited = [i for i in (0, 1) if chunks[i].busy_responses > 0]
    assert len(waited) == 1, [c.busy_responses for c in chunks]  # exactly one had to wait
    first = 1 - waited[0]
    assert ends[waited[0]] > ends[first]
    for cc in chunks:
        assert cc.timeouts == 0 and cc.bytes_refetched == 0
        assert cc.bytes_received == size
    stats = narrow_server.stats()
    assert stats.busy >= 1 and stats.admitted == 2 and stats.expired == 0
    assert stats.bytes_sent == 2 * size
    assert stats.errors == 0 and stats.dropped == 0


@pytest.mark.broker
def test_old_devices_wait_in_line_unanswered_and_expired_requests(
    narrow_server: ChunkServer, broker: Mosquitto, repo: Path
) -> None:
    big_path = "targets/big.bin"
    big = repo / big_path
    big.write_bytes(random_bytes(300 * KB, 5))
    other = ("other", str(big.resolve()))
    with narrow_server._lock:  # another device holds the only transfer slot
        assert narrow_server._admission.check(other, time.monotonic()).admitted
    raw = RawDevice(broker, "old")
    new = RawDevice(broker, "new")
    try:
        # An old device (no busy_ok) does not know "busy": it gets no answer while it waits in
        # line (it asks again after its timeout, as for a lost message)...
        raw.publish(
            json.dumps({"id": "o1", "path": big_path, "offset": 0, "length": 64 * KB}).encode()
        )
        with pytest.raises(queue.Empty):
            raw.wait("o1", timeout=1.0)
        usage = narrow_server.usage("old")
        assert usage is not None and (usage.held, usage.waiting, usage.transfers) == (1, 1, 0)
        assert raw.ask("o2", "targets/missing.bin").status == "not_found"  # no line for these
        # ... and once the place is free, its re-send is served with the header it knows.
        narrow_server._release(other)
        header = raw.ask("o1", big_path)
        assert (header.status, header.total, header.retry_after_s) == ("ok", 300 * KB, None)

        def flow(rid: str, path: str, sent_at: float) -> dict[str, Any]:
            return {
                "id": rid,
                "path": path,
                "offset": 0,
                "length": 64 * KB,
                "sent_at": sent_at,
                "timeout_s": 1.0,
                "busy_ok": True,
            }

        new.publish(json.dumps(flow("n1", big_path, time.time())).encode())
        busy, data = new.wait("n1")
        assert busy.status == "busy" and busy.retry_after_s and data == b""
        new.publish(json.dumps(flow("n2", "targets/missing.bin", time.time())).encode())
        assert new.wait("n2")[0].status == "not_found"  # single-window answers skip the line
        new.publish(json.dumps(flow("n3", big_path, time.time() - 30)).encode())
        with pytest.raises(queue.Empty):
            new.wait("n3", timeout=1.0)
        stats = narrow_server.stats()
        assert stats.expired == 1 and stats.busy == 1 and stats.held == 1
    finally:
        raw.close()
        new.close()


class DroppingServer(ChunkServer):
    """Drops the first request for each offset in ``drop`` (a lost message)."""

    drop: set[int]

    def _intake(self, topic: str, payload: bytes) -> Job | None:
        offset = json.loads(payload).get("offset")
        if offset in self.drop:
            self.drop.discard(offset)
            return None
        return super()._intake(topic, payload)


@pytest.mark.broker
def test_timeouts_halve_the_window_and_it_grows_back(
    broker: Mosquitto, repo: Path, tmp_path: Path
) -> None:
    chunk, n = 16 * KB, 96
    blob = random_bytes(chunk * n, 9)
    (repo / "targets" / "f.bin").write_bytes(blob)
    srv = DroppingServer(repo, broker.url, client_id="registry-drop")
    srv.drop = {20 * chunk, 21 * chunk}
    srv.start()
    client = connect_client(broker, "edgefleet-dev1")
    try:
        cc = ChunkClient(
            client, "dev1", chunk_size=chunk, window=8, request_timeout_s=0.4, backoff_s=0.01
        )
        seen: list[float] = []
        cc.fetch_file(
            "targets/f.bin",
            tmp_path / "f.bin",
            max_length=len(blob),
            progress=lambda _g, _t: seen.append(cc.cwnd),
        )
        assert (tmp_path / "f.bin").read_bytes() == blob
    finally:
        close_client(client)
        srv.stop()
    assert cc.timeouts == 2
    assert cc.window_cuts == 1  # two windows of one loss event: one cut
    assert min(seen) <= 5  # halved from 8 (to 4, +1 for the answer that ended the wait)
    assert seen[-1] == 8  # and grown back, +1 per window answered
    assert cc.bytes_refetched == 2 * chunk
    assert cc.srtt is not None and cc.srtt < 0.4
    assert cc.rto <= 0.8  # the doubled timeout came back down with new samples


@pytest.mark.broker
def test_timeout_adapts_to_measured_round_trips(
    broker: Mosquitto, repo: Path, tmp_path: Path
) -> None:
    (repo / "targets" / "f.bin").write_bytes(random_bytes(2 * MB, 2))
    srv = ChunkServer(repo, broker.url, client_id="registry-rtt")
    srv.start()
    client = connect_client(broker, "edgefleet-dev1")
    try:
        cc = ChunkClient(client, "dev1", window=8, request_timeout_s=5.0)
        assert cc.rto == 5.0
        cc.fetch_file("targets/f.bin", tmp_path / "f.bin", max_length=2 * MB)
    finally:
        close_client(client)
        srv.stop()
    assert cc.srtt is not None and cc.srtt < 1.0
    assert cc.rto == pytest.approx(1.0)  # SRTT + 4 RTTVAR on loopback is under the 1 s floor


# -- sticky transfers across replicas -------------------------------------------------------


def test_replica_names_are_topic_safe_and_parse_back() -> None:
    from agent.protocol.topics import Topics
    from agent.protocol.wire import BadMessage

    t = Topics()
    topic = t.replica_requests("dev1", "registry-a")
    assert topic == "edgefleet/v1/devices/dev1/fetch/req/registry-a"
    assert t.parse(topic) == ("dev1", "fetch/req")
    assert t.all_replica_requests("registry-a") == "edgefleet/v1/devices/+/fetch/req/registry-a"
    for bad in ("a/b", "+", "#", "", "x y"):
        with pytest.raises(ValueError, match="topic-safe"):
            t.replica_requests("dev1", bad)
        assert t.parse(f"edgefleet/v1/devices/dev1/fetch/req/{bad}") is None
        header = {"id": "r", "path": "targets/a", "offset": 0, "total": 1, "replica": bad}
        raw = json.dumps(header).encode()
        with pytest.raises(BadMessage):
            decode_response(struct.pack(">I", len(raw)) + raw)
    # an old request never carries the flag; the answer to it never names a replica
    old = FetchRequest(id="r", path="targets/a", offset=0, length=1, busy_ok=True)
    assert "sticky_ok" not in json.loads(old.encode())


class SlowServer(ChunkServer):
    """Reads each window a little late, so that a transfer lasts long enough to interrupt."""

    delay_s = 0.004

    def _finish(self, job: Job) -> None:
        time.sleep(self.delay_s)
        super()._finish(job)


def _replicas(broker: Mosquitto, repo: Path, n: int, **kw: Any) -> list[ChunkServer]:
    out: list[ChunkServer] = []
    for i in range(n):
        srv = SlowServer(repo, broker.url, client_id=f"registry-{i}", share_group="sticky", **kw)
        srv.start()
        out.append(srv)
    return out


@pytest.mark.broker
def test_each_transfer_stays_on_the_replica_that_admitted_it(
    broker: Mosquitto, repo: Path, tmp_path: Path
) -> None:
    """Two replicas with one transfer slot each, two devices at once: each device's bytes all
    come from one replica (before sticky transfers, windows alternated between replicas and
    each transfer needed a slot on both)."""
    size = 2 * MB
    path = "targets/models/m/1.0.0/model.onnx"
    blob = put_random_file(repo, path, size, 7)
    servers = _replicas(broker, repo, 2, max_transfers=1)
    clients = [connect_client(broker, f"edgefleet-sticky{i}") for i in (0, 1)]
    chunks = [ChunkClient(c, f"sticky{i}", window=8) for i, c in enumerate(clients)]
    try:
        errors, _ends = fetch_at_once(chunks, path, blob, tmp_path)
    finally:
        for c in clients:
            close_client(c)
        stats = [s.stats() for s in servers]
        for s in servers:
            s.stop()
    assert not errors, errors
    for i in (0, 1):
        served = [st.bytes_by_device.get(f"sticky{i}", 0) for st in stats]
        assert sorted(served) == [0, size], served  # one replica sent the whole file
        assert chunks[i].timeouts == 0 and chunks[i].bytes_received == size
    assert sum(st.admitted for st in stats) == 2
    assert all(st.errors == 0 and st.dropped == 0 for st in stats)


@pytest.mark.broker
def test_a_sticky_transfer_survives_its_replica_going_away(
    broker: Mosquitto, repo: Path, tmp_path: Path
) -> None:
    """The replica serving a transfer stops mid-file: the device's windows to it time out, it
    asks through the shared topic again, and the other replica finishes the file."""
    size = 3 * MB
    path = "targets/big.bin"
    blob = random_bytes(size, 8)
    (repo / path).write_bytes(blob)
    servers = _replicas(broker, repo, 2)
    client = connect_client(broker, "edgefleet-sticky-survivor")
    chunk = ChunkClient(client, "survivor", window=2, request_timeout_s=1.0, min_timeout_s=0.3)
    done: list[BaseException | None] = []
    dest = tmp_path / "big.bin"

    def fetch() -> None:
        try:
            chunk.fetch_file(path, dest, max_length=size, resume_dir=tmp_path / "r")
            done.append(None)
        except BaseException as e:  # reported below
            done.append(e)

    th = threading.Thread(target=fetch)
    try:
        th.start()
        assert wait_for(lambda: chunk.bytes_received >= MB // 2, 30)
        serving = [s for s in servers if s.stats().bytes_by_device.get("survivor", 0) > 0]
        assert len(serving) == 1, "one replica serves the transfer"
        serving[0].stop()
        th.join(120)
    finally:
        close_client(client)
        for s in servers:
            s.stop()
    assert done == [None], done
    assert dest.read_bytes() == blob
    other = next(s for s in servers if s is not serving[0])
    assert other.stats().bytes_by_device.get("survivor", 0) > 0  # it finished the file
    assert chunk.timeouts >= 1
