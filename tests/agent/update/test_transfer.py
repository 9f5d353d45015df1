"""Chunked transfer over MQTT: ChunkServer ↔ ChunkClient ↔ ngclient, against a real Mosquitto."""

from __future__ import annotations

import fcntl
import hashlib
import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import MQTTErrorCode
from securesystemslib.signer import CryptoSigner
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile, Targets, Timestamp
from tuf.ngclient import Updater

from agent.common.errors import BadDataError, TransportError
from agent.common.mqtt import make_client, parse_broker_url
from agent.protocol.fetch import FetchRequest, encode_response
from agent.update.transfer.client import ChunkClient
from agent.update.transfer.errors import (
    FileTooLargeError,
    RemoteNotFoundError,
    RequestRefusedError,
)
from agent.update.transfer.partial import resume_key
from agent.update.transfer.tuf_fetcher import MqttFetcher
from cloud_sync.registry.serve import ChunkServer, resolve_repo_path
from tests.harness.broker import Mosquitto
from tests.harness.fetch import (
    CHUNK,
    TOPICS,
    RawDevice,
    chunk_server,
    close_client,
    connect_client,
    put_random_file,
    random_bytes,
    served_repo,
)
from tests.harness.util import wait_for

MB = 1024 * 1024


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return served_repo(tmp_path)


@pytest.fixture
def server(broker: Mosquitto, repo: Path) -> Iterator[ChunkServer]:
    with chunk_server(repo, broker) as srv:
        yield srv


@pytest.fixture
def device(broker: Mosquitto) -> Iterator[mqtt.Client]:
    client = connect_client(broker, "edgefleet-dev1")
    yield client
    close_client(client)


# -- pure parts ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://localhost", ("localhost", 1883, False)),
        ("mqtt://127.0.0.1:1884", ("127.0.0.1", 1884, False)),
        ("mqtts://broker.example:8884/", ("broker.example", 8884, True)),
        ("MQTTS://b", ("b", 8883, True)),
        ("mqtt://[::1]:1883", ("::1", 1883, False)),
    ],
)
def test_parse_broker_url(url: str, expected: tuple[str, int, bool]) -> None:
    assert parse_broker_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "http://h:1",
        "mqtt://",
        "mqtt://h:0",
        "mqtt://h:99999",
        "mqtt://h:x",
        "mqtt://h/topic",
        "mqtt://u:p@h",
        "h:1883",
    ],
)
def test_parse_broker_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match="broker URL"):
        parse_broker_url(url)


def test_make_client_v2_and_persistent_needs_id() -> None:
    client = make_client("x")  # VERSION1 would raise DeprecationWarning (an error here)
    assert client.callback_api_version.name == "VERSION2"
    with pytest.raises(ValueError, match="client id"):
        make_client("", clean=False)


def test_resolve_repo_path_stays_inside(repo: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.pem"
    secret.write_text("KEY")
    (repo / "targets" / "out").symlink_to(secret)
    (repo / "targets" / "outdir").symlink_to(tmp_path)
    (repo / "targets" / "in").symlink_to(repo / "metadata")
    (repo / "targets" / "loop").symlink_to(repo / "targets" / "loop")
    root = repo.resolve()
    assert resolve_repo_path(root, "targets/a/b.bin") == root / "targets/a/b.bin"
    assert resolve_repo_path(root, "targets/in/1.root.json") == root / "metadata/1.root.json"
    for bad in ("targets/out", "targets/outdir/secret.pem", "targets/../../x", "targets/loop"):
        assert resolve_repo_path(root, bad) is None, bad


class FakeRegistry:
    """A stand-in paho client whose 'broker' answers from a ChunkServer core, shuffled.

    Every request is answered in a random order relative to its batch; the first attempt at
    each offset in ``drop`` is lost, and every answer in ``dup`` arrives twice.
    """

    def __init__(self, server: ChunkServer, *, drop: set[int], dup: bool, seed: int) -> None:
        self.server = server
        self.drop = set(drop)
        self.dup = dup
        self.rng = random.Random(seed)
        self.pending: list[bytes] = []
        self.cv = threading.Condition()
        self.callback: Callable[..., None] | None = None
        self.closed = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def message_callback_add(self, _topic: str, cb: Callable[..., None]) -> None:
        self.callback = cb

    def message_callback_remove(self, _topic: str) -> None:
        self.callback = None

    def subscribe(self, _topic: str, qos: int = 0) -> tuple[MQTTErrorCode, int]:
        return MQTTErrorCode.MQTT_ERR_SUCCESS, 1

    def unsubscribe(self, _topic: str) -> tuple[MQTTErrorCode, int]:
        return MQTTErrorCode.MQTT_ERR_SUCCESS, 1

    def is_connected(self) -> bool:
        return True

    def publish(self, _topic: str, payload: bytes, qos: int = 0) -> None:
        with self.cv:
            self.pending.append(payload)
            self.cv.notify()

    def close(self) -> None:
        with self.cv:
            self.closed = True
            self.cv.notify()
        self.thread.join(5)

    def _run(self) -> None:
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.pending or self.closed)
                if self.closed:
                    return
                batch, self.pending = self.pending, []
            time.sleep(0.002)  # let a whole window pile up, then answer it shuffled
            self.rng.shuffle(batch)
            for payload in batch:
                req = FetchRequest.decode(payload)
                if req.offset in self.drop:
                    self.drop.discard(req.offset)
                    continue
                header, data = self.server.answer(payload)
                if header is None or self.callback is None:
                    continue
                msg = SimpleNamespace(topic="t", payload=encode_response(header, data))
                for _ in range(2 if self.dup else 1):
                    self.callback(self, None, msg)


def test_out_of_order_lost_and_duplicate_answers(repo: Path, tmp_path: Path) -> None:
    size = 40 * 1024 + 123
    blob = random_bytes(size, 7)
    (repo / "targets" / "f.bin").write_bytes(blob)
    server = ChunkServer(repo, "mqtt://127.0.0.1:1", client_id="unused")
    fake = FakeRegistry(server, drop={3 * 1024, 17 * 1024, 40 * 1024}, dup=True, seed=3)
    try:
        cc = ChunkClient(
            fake,  # type: ignore[arg-type]
            "dev1",
            chunk_size=1024,
            window=6,
            request_timeout_s=0.2,
            backoff_s=0.01,
            retries=3,
        )
        seen: list[tuple[int, int]] = []
        n = cc.fetch_file(
            "targets/f.bin",
            tmp_path / "out" / "f.bin",
            max_length=size,
            progress=lambda got, total: seen.append((got, total)),
        )
        assert n == size
        assert (tmp_path / "out" / "f.bin").read_bytes() == blob
        assert [g for g, _ in seen] == sorted(g for g, _ in seen)
        assert seen[-1] == (size, size)
        lost = 1024 + 1024 + 123  # the three lost windows (the last one is short)
        assert cc.bytes_refetched >= lost  # more only if a slow machine missed a deadline
        assert cc.bytes_requested == size + cc.bytes_refetched
        assert cc.bytes_received == size  # duplicates are dropped, not counted
        assert cc.duplicate_responses + cc.stale_responses >= 1  # every answer came twice
        got = cc.fetch_range("targets/f.bin", 1000, 5000)
        assert (got.data, got.total) == (blob[1000:6000], size)
        tail = cc.fetch_range("targets/f.bin", size - 10, 100)
        assert (tail.data, tail.total) == (blob[-10:], size)
        assert cc.fetch_range("targets/f.bin", size + 5, 10).data == b""
    finally:
        fake.close()


@pytest.fixture
def fake_repo(repo: Path) -> Iterator[tuple[FakeRegistry, bytes]]:
    blob = random_bytes(20 * 1024 + 5, 11)
    (repo / "targets" / "f.bin").write_bytes(blob)
    fake = FakeRegistry(
        ChunkServer(repo, "mqtt://127.0.0.1:1", client_id="u"), drop=set(), dup=False, seed=1
    )
    yield fake, blob
    fake.close()


@pytest.mark.parametrize(
    ("sidecar_edit", "resumed", "wasted"),
    [
        ({}, True, 0),  # sidecar and prefix agree: only the rest is asked for
        ({"sha256": "0" * 64}, False, 0),  # bytes on disk differ from the sidecar: start over
        ({"total": 999_999}, False, 0),  # larger than allowed: start over, the registry decides
        ({"total": 20 * 1024}, False, 1024),  # the registry says another size: start over
        ({"contiguous": 10**9}, False, 0),  # nonsense: start over
        ({"version": 0}, False, 0),
    ],
)
def test_resume_trusts_only_a_verified_prefix(
    fake_repo: tuple[FakeRegistry, bytes],
    tmp_path: Path,
    sidecar_edit: dict[str, Any],
    resumed: bool,
    wasted: int,
) -> None:
    fake, blob = fake_repo
    path, have = "targets/f.bin", 8 * 1024
    resume_dir = tmp_path / "resume"
    resume_dir.mkdir()
    (resume_dir / f"{resume_key(path)}.part").write_bytes(blob[:have] + b"junk past the prefix")
    side = {
        "version": 1,
        "path": path,
        "total": len(blob),
        "contiguous": have,
        "sha256": hashlib.sha256(blob[:have]).hexdigest(),
        "chunk_size": 1024,
    }
    (resume_dir / f"{resume_key(path)}.json").write_text(json.dumps({**side, **sidecar_edit}))
    cc = ChunkClient(fake, "dev1", chunk_size=1024, request_timeout_s=1.0)  # type: ignore[arg-type]
    dest = tmp_path / "out.bin"
    assert cc.fetch_file(path, dest, max_length=len(blob), resume_dir=resume_dir) == len(blob)
    assert dest.read_bytes() == blob
    assert cc.bytes_requested == len(blob) - (have if resumed else 0) + wasted
    assert list(resume_dir.iterdir()) == []


def test_checkpoints_in_the_middle_only(
    fake_repo: tuple[FakeRegistry, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sidecar is written every ``checkpoint_bytes`` but not at the end of the file, where
    ``finish`` deletes it at once (its write would cost three fsyncs for nothing)."""
    import agent.update.transfer.partial as fetcher_mod

    fake, blob = fake_repo  # 20 KiB + 5 bytes
    written: list[int] = []
    real = fetcher_mod.atomic_write_json

    def spy(path: Path, data: dict[str, Any]) -> None:
        written.append(data["contiguous"])
        real(path, data)

    monkeypatch.setattr(fetcher_mod, "atomic_write_json", spy)
    cc = ChunkClient(fake, "dev1", chunk_size=1024, checkpoint_bytes=8 * 1024)  # type: ignore[arg-type]
    resume_dir = tmp_path / "resume"
    dest = tmp_path / "out.bin"
    assert cc.fetch_file("targets/f.bin", dest, max_length=10**6, resume_dir=resume_dir) == len(
        blob
    )
    assert dest.read_bytes() == blob
    assert written == [8 * 1024, 16 * 1024]
    assert list(resume_dir.iterdir()) == []
    # a file that ends exactly on a checkpoint: none at the end either
    written.clear()
    (fake.server.repo_root / "targets" / "g.bin").write_bytes(blob[: 16 * 1024])
    cc.fetch_file("targets/g.bin", tmp_path / "g.bin", max_length=10**6, resume_dir=resume_dir)
    assert written == [8 * 1024]


def test_one_download_per_partial(fake_repo: tuple[FakeRegistry, bytes], tmp_path: Path) -> None:
    fake, _ = fake_repo
    part = tmp_path / f"{resume_key('targets/f.bin')}.part"
    part.write_bytes(b"someone else's bytes")
    cc = ChunkClient(fake, "dev1")  # type: ignore[arg-type]
    with open(part, "r+b") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX)
        with pytest.raises(TransportError, match="someone else"):
            cc.fetch_file("targets/f.bin", tmp_path / "x", max_length=10**6, resume_dir=tmp_path)
    assert part.read_bytes() == b"someone else's bytes"
    assert cc.bytes_requested == 0


# -- against a real broker ----------------------------------------------------------------

SIZES = [0, 1, CHUNK - 1, CHUNK, 3 * CHUNK + 7, 5 * MB]


@pytest.mark.broker
@pytest.mark.parametrize("resumable", [False, True])
def test_round_trip_byte_exact(
    server: ChunkServer, device: mqtt.Client, repo: Path, tmp_path: Path, resumable: bool
) -> None:
    blobs = {f"targets/models/m/1.0.0/f{n}.bin": random_bytes(n, n) for n in SIZES}
    for path, blob in blobs.items():
        (repo / path).parent.mkdir(parents=True, exist_ok=True)
        (repo / path).write_bytes(blob)
    cc = ChunkClient(device, "dev1")
    resume_dir = tmp_path / "resume" if resumable else None
    for path, blob in blobs.items():
        dest = tmp_path / "dl" / Path(path).name
        assert cc.fetch_file(path, dest, max_length=len(blob), resume_dir=resume_dir) == len(blob)
        assert dest.read_bytes() == blob, path
    assert cc.bytes_received == sum(SIZES)
    assert cc.bytes_refetched == 0
    assert sorted(p.name for p in (tmp_path / "dl").iterdir()) == sorted(
        Path(p).name for p in blobs
    )
    if resume_dir is not None:
        assert list(resume_dir.iterdir()) == []
    stats = server.stats()
    assert stats.bytes_sent == sum(SIZES)
    assert stats.by_device == {"dev1": stats.requests}


@pytest.mark.broker
def test_path_traversal_is_refused(
    server: ChunkServer, device: mqtt.Client, broker: Mosquitto, repo: Path, tmp_path: Path
) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "root.pem").write_bytes(b"PRIVATE KEY")
    (repo / "keys").symlink_to(tmp_path / "keys")  # the repo dir itself links to secrets
    (repo / "targets" / "root.pem").symlink_to(tmp_path / "keys" / "root.pem")
    (repo / "targets" / "k").symlink_to(tmp_path / "keys")
    raw = RawDevice(broker, "attacker")
    try:
        for i, path in enumerate(
            [
                "targets/../keys/root.pem",
                "metadata/../../keys/root.pem",
                "/etc/passwd",
                str(tmp_path / "keys" / "root.pem"),
                "keys/root.pem",
                "targets/root.pem",
                "targets/k/root.pem",
            ]
        ):
            header = raw.ask(f"t{i}", path)
            assert header.status == "bad_request", path
            assert header.total == 0
        cc = ChunkClient(device, "dev1")
        with pytest.raises(RequestRefusedError):
            cc.fetch_file("targets/root.pem", tmp_path / "x", max_length=100)
        assert not (tmp_path / "x").exists()
        stats = server.stats()
        assert stats.bytes_sent == 0
        assert stats.bad_requests == 8
    finally:
        raw.close()


@pytest.mark.broker
def test_not_found(server: ChunkServer, device: mqtt.Client, tmp_path: Path) -> None:
    cc = ChunkClient(device, "dev1")
    with pytest.raises(RemoteNotFoundError) as e:
        cc.fetch_file(
            "targets/nope.bin", tmp_path / "d" / "nope", max_length=10, resume_dir=tmp_path
        )
    assert e.value.path == "targets/nope.bin"
    assert list((tmp_path / "d").iterdir()) == []
    assert not (tmp_path / f"{resume_key('targets/nope.bin')}.part").exists()
    with pytest.raises(tuf_exc.DownloadHTTPError) as he:
        MqttFetcher(cc).fetch("mqtt://registry/metadata/9.root.json")
    assert he.value.status_code == 404
    assert server.stats().not_found == 2


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
_REQUESTISH = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=80) | st.integers(),
        "path": st.text(max_size=40) | st.sampled_from(["targets/a.bin", "metadata/../x"]),
        "offset": st.integers(min_value=-5, max_value=1 << 62) | st.text(max_size=3),
        "length": st.integers(min_value=-5, max_value=1 << 30) | st.none(),
        "extra": _JSONISH,
    },
).map(lambda d: json.dumps(d).encode())


@pytest.fixture
def chunk_client(device: mqtt.Client) -> Iterator[ChunkClient]:
    cc = ChunkClient(device, "dev1")
    yield cc
    cc.close()


@pytest.mark.broker
@settings(
    max_examples=60,
    deadline=None,
    # The broker, the server and both clients are meant to be shared by every example: the
    # point is that one server survives all of them.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    payload=st.binary(max_size=300) | _REQUESTISH | _JSONISH.map(lambda v: json.dumps(v).encode())
)
@example(payload=b"")
@example(payload=b"[" * 100_000)
@example(payload=b"\xff\xfe{")
@example(payload=b'{"id": "x", "path": "targets/a.bin", "offset": 0, "length": 99999999}')
@example(payload=b'{"id": "x", "path": "targets/../../etc/passwd", "offset": 0, "length": 9}')
@example(payload=b"x" * 70_000)
def test_malformed_requests_never_stop_the_server(
    server: ChunkServer, device: mqtt.Client, chunk_client: ChunkClient, repo: Path, payload: bytes
) -> None:
    (repo / "targets" / "a.bin").write_bytes(b"abc")
    before = server.stats()
    stale = chunk_client.stale_responses
    # Sent on the device's own connection and topic: the broker keeps the order, the server
    # answers in order, so the valid request's answer proves the junk was handled first (and
    # whatever junk answer comes back on the device's topic must be ignored by the client).
    device.publish(TOPICS.device("dev1", "fetch/req"), payload, qos=1)
    assert chunk_client.fetch_range("targets/a.bin", 1, 10).data == b"bc"  # still serving
    stats = server.stats()
    assert stats.requests == before.requests + 2
    assert stats.dropped + stats.answered == stats.requests
    assert stats.errors == 0  # no handler crash, no read error: only bad requests
    if stats.answered == before.answered + 2:  # the junk got an answer (id recovered)
        assert stats.bad_requests == before.bad_requests + 1
        assert wait_for(lambda: chunk_client.stale_responses == stale + 1, 5)


@pytest.mark.broker
def test_two_replicas_share_the_load_each_request_answered_once(
    broker: Mosquitto, repo: Path
) -> None:
    (repo / "targets" / "x.bin").write_bytes(random_bytes(5000))
    # One replica serves on paho's thread, the other from a pool: both modes, one contract.
    servers = [
        ChunkServer(repo, broker.url, client_id=f"registry-{i}", workers=w)
        for i, w in enumerate((0, 3))
    ]
    for s in servers:
        s.start()
    raw = RawDevice(broker, "dev-many")
    try:
        ids = [f"r{i}" for i in range(200)]
        for rid in ids:
            req = FetchRequest(
                id=rid, path="targets/x.bin", offset=(int(rid[1:]) * 7) % 5000, length=100
            )
            raw.client.publish(raw.req, req.encode(), qos=1)
        answered: Counter[str] = Counter()
        while sum(answered.values()) < 200:
            header, data = raw.answers.get(timeout=10)
            answered[header.id] += 1
            assert header.status == "ok" and len(data) == min(100, 5000 - header.offset)
        # A barrier: more requests after the 200; answers to them come after any duplicate.
        for i in range(10):
            raw.ask(f"barrier{i}", "targets/x.bin")
        while not raw.answers.empty():
            header, _ = raw.answers.get_nowait()
            answered[header.id] += 1
        assert set(answered) == set(ids)
        assert set(answered.values()) == {1}
        handled = [s.stats().requests for s in servers]
        assert sum(handled) == 210
        assert all(h > 0 for h in handled), handled
    finally:
        raw.close()
        for s in servers:
            s.stop()


@pytest.mark.broker
def test_max_length_exceeded_leaves_nothing(
    server: ChunkServer, device: mqtt.Client, repo: Path, tmp_path: Path
) -> None:
    (repo / "targets" / "big.bin").write_bytes(random_bytes(MB))
    cc = ChunkClient(device, "dev1")
    dest_dir = tmp_path / "dest"
    resume_dir = tmp_path / "resume"
    for resume in (None, resume_dir):
        with pytest.raises(FileTooLargeError) as e:
            cc.fetch_file(
                "targets/big.bin", dest_dir / "big.bin", max_length=MB - 1, resume_dir=resume
            )
        assert (e.value.total, e.value.max_length) == (MB, MB - 1)
        assert isinstance(e.value, BadDataError)
        assert list(dest_dir.iterdir()) == []
    assert list(resume_dir.iterdir()) == []
    assert cc.bytes_requested <= 2 * CHUNK  # one window each time, never the whole file
    with pytest.raises(tuf_exc.DownloadLengthMismatchError):
        MqttFetcher(cc).download_bytes("mqtt://registry/targets/big.bin", 1000)


@pytest.mark.broker
def test_broker_gone_is_a_transport_error(
    server: ChunkServer, device: mqtt.Client, broker: Mosquitto, repo: Path, tmp_path: Path
) -> None:
    (repo / "targets" / "a.bin").write_bytes(b"abc")
    cc = ChunkClient(
        device, "dev1", request_timeout_s=0.2, retries=2, backoff_s=0.05, min_rate_bps=0
    )
    broker.stop()
    with pytest.raises(TransportError, match=r"unanswered|giving up"):
        cc.fetch_file("targets/a.bin", tmp_path / "a.bin", max_length=3)
    assert not (tmp_path / "a.bin").exists()
    with pytest.raises(tuf_exc.DownloadError):
        MqttFetcher(cc).download_bytes("mqtt://registry/targets/a.bin", 3)


@pytest.mark.broker
@pytest.mark.slow
def test_resume_after_broker_outage_refetches_at_most_one_window(
    server: ChunkServer, device: mqtt.Client, broker: Mosquitto, repo: Path, tmp_path: Path
) -> None:
    size = 5 * MB
    path = "targets/models/big/1.0.0/model.onnx"
    blob = put_random_file(repo, path, size, 42)
    resume_dir = tmp_path / "resume"
    dest = tmp_path / "models" / "model.onnx"
    window = 8
    c1 = ChunkClient(
        device,
        "dev1",
        window=window,
        request_timeout_s=0.5,
        retries=1,
        backoff_s=0.05,
        min_rate_bps=0,
    )
    stopper: list[threading.Thread] = []

    def stop_midway(got: int, total: int) -> None:
        if got >= total // 2 and not stopper:
            stopper.append(threading.Thread(target=broker.stop))
            stopper[0].start()

    with pytest.raises(TransportError):
        c1.fetch_file(path, dest, max_length=size, resume_dir=resume_dir, progress=stop_midway)
    stopper[0].join()
    assert not dest.exists()
    side = json.loads((resume_dir / f"{resume_key(path)}.json").read_text())
    have = side["contiguous"]
    assert size // 2 <= have < size
    assert (side["path"], side["total"], side["chunk_size"]) == (path, size, CHUNK)
    assert (resume_dir / f"{resume_key(path)}.part").stat().st_size == have

    broker.start()  # same port; the replica reconnects on its own
    assert wait_for(server.ready, 30)
    client2 = connect_client(broker, "edgefleet-dev1-restarted")
    try:
        c2 = ChunkClient(client2, "dev1", window=window)  # a new client, as after a restart
        first: list[int] = []
        c2.fetch_file(
            path,
            dest,
            max_length=size,
            resume_dir=resume_dir,
            progress=lambda got, _t: first.append(got) if not first else None,
        )
        assert dest.read_bytes() == blob
        assert first[0] > have  # it continued; it did not start over
        assert c2.bytes_requested - c2.bytes_refetched == size - have  # nothing on disk re-asked
        refetched = c1.bytes_received + c2.bytes_received - size
        assert 0 <= refetched <= window * CHUNK
        assert list(resume_dir.iterdir()) == []
    finally:
        close_client(client2)


@pytest.mark.broker
def test_serve_forever_ticks_then_stops_and_tick_errors_stop_serving(
    broker: Mosquitto, repo: Path
) -> None:
    stop = threading.Event()
    ticks: list[float] = []

    def on_tick(now: float) -> None:
        ticks.append(now)
        if len(ticks) == 3:
            stop.set()

    srv = ChunkServer(repo, broker.url, client_id="ticker", on_tick=on_tick)
    srv.serve_forever(stop, tick_s=0.01)
    assert len(ticks) == 3 and ticks == sorted(ticks)
    assert not srv.ready() and not srv.client.is_connected()

    def cannot_sign(_now: float) -> None:
        raise RuntimeError("timestamp key unavailable")

    failing = ChunkServer(repo, broker.url, client_id="ticker-2", on_tick=cannot_sign)
    with pytest.raises(RuntimeError, match="timestamp key"):
        failing.serve_forever(threading.Event())
    assert not failing.client.is_connected()


# -- ngclient on top --------------------------------------------------------------------


def _in(days: float) -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0) + timedelta(days=days)


class TinyRepo:
    """A minimal TUF repository (root, targets, snapshot, timestamp), consistent snapshots."""

    def __init__(self, repo: Path) -> None:
        self.dir = repo
        self.signers = {
            r: CryptoSigner.generate_ed25519() for r in ("root", "targets", "snapshot", "timestamp")
        }
        self.root = Metadata(Root(expires=_in(365)))
        for role, signer in self.signers.items():
            self.root.signed.add_key(signer.public_key, role)
        self.targets = Metadata(Targets(expires=_in(7)))
        self.snapshot = Metadata(Snapshot(expires=_in(7)))
        self.timestamp = Metadata(Timestamp(expires=_in(1)))

    def add_target(self, name: str, data: bytes) -> str:
        info = TargetFile.from_data(name, data, ["sha256"])
        self.targets.signed.targets[name] = info
        folder, _, base = name.rpartition("/")
        stored = self.dir / "targets" / folder / f"{info.hashes['sha256']}.{base}"
        stored.parent.mkdir(parents=True, exist_ok=True)
        stored.write_bytes(data)
        return f"{folder}/{info.hashes['sha256']}.{base}"

    def publish(self) -> None:
        md = self.dir / "metadata"
        self._write(self.root, "root", md / f"{self.root.signed.version}.root.json")
        self._write(self.targets, "targets", md / f"{self.targets.signed.version}.targets.json")
        self._write(self.snapshot, "snapshot", md / f"{self.snapshot.signed.version}.snapshot.json")
        self._write(self.timestamp, "timestamp", md / "timestamp.json")

    def _write(self, role: Metadata[Any], name: str, path: Path) -> None:
        role.signatures.clear()
        role.sign(self.signers[name])
        role.to_file(str(path))

    def rotate_root(self) -> None:
        self.root.signed.version += 1
        self._write(
            self.root, "root", self.dir / "metadata" / f"{self.root.signed.version}.root.json"
        )

    def root_v1(self) -> bytes:
        return (self.dir / "metadata" / "1.root.json").read_bytes()


@pytest.mark.broker
def test_ngclient_updater_over_mqtt(
    server: ChunkServer, device: mqtt.Client, repo: Path, tmp_path: Path
) -> None:
    tiny = TinyRepo(repo)
    model = random_bytes(3 * CHUNK + 11, 5)
    stored = tiny.add_target("models/det/1.0.0/model.onnx", model)
    tiny.add_target("models/det/1.0.0/labels.txt", b"cat\ndog\n")
    tiny.publish()
    bootstrap = tiny.root_v1()
    tiny.rotate_root()  # 2.root.json exists, 3.root.json does not: a 404 ends the walk

    fetcher = MqttFetcher(ChunkClient(device, "dev1"), resume_dir=tmp_path / "resume")
    meta_dir = tmp_path / "tuf" / "metadata"
    meta_dir.mkdir(parents=True)

    def updater() -> Updater:
        return Updater(
            str(meta_dir),
            "mqtt://registry/metadata/",
            str(tmp_path / "tuf" / "targets"),
            "mqtt://registry/targets/",
            fetcher=fetcher,
            bootstrap=bootstrap,
        )

    up = updater()
    up.refresh()
    assert Metadata[Root].from_file(str(meta_dir / "root.json")).signed.version == 2
    labels = up.get_targetinfo("models/det/1.0.0/labels.txt")
    assert labels is not None
    assert Path(up.download_target(labels)).read_bytes() == b"cat\ndog\n"

    # The resumable path: chunked download into a cache file, then ngclient verifies it.
    info = up.get_targetinfo("models/det/1.0.0/model.onnx")
    assert info is not None
    cache = tmp_path / "cache" / "model.onnx"
    fetcher.download_to(f"mqtt://registry/targets/{stored}", cache, max_length=info.length)
    assert up.find_cached_target(info, str(cache)) == str(cache)
    cache.write_bytes(model[:-1] + b"\x00")  # tampered or truncated: ngclient says no
    assert up.find_cached_target(info, str(cache)) is None
    assert Path(up.download_target(info, str(cache))).read_bytes() == model

    # Tampered target on the registry: ngclient's hash check refuses it.
    (repo / "targets" / stored).write_bytes(model[:-1] + b"\x01")
    with pytest.raises(tuf_exc.LengthOrHashMismatchError):
        updater().download_target(info, str(tmp_path / "bad.onnx"))
    assert not (tmp_path / "bad.onnx").exists()
