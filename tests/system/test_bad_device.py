"""One enrolled device doing its worst, beside honest devices, on the production broker config.

A real TLS Mosquitto with the ACL and config ``edgefleet ca broker-config`` renders, a real
``IngestWorker`` and ``ChunkServer`` in the deployment's secret groups, two honest devices
that send telemetry and download a file with the real fetcher, and one device with a valid
certificate that, all at once: joins every shared group it can name, connects under the
services' client ids, floods chunk requests with path aliases and no ``busy_ok``, sends
deeply nested, huge-number, non-UTF-8 and 20 MB messages on its own topics. The honest
devices' telemetry must all be stored, their downloads must complete with the right bytes,
and the services must stay connected. The download time with and without the attacker is
printed (no timing assertion: the machine is shared). Everything here runs in one process, so
the attacker's own client threads share the GIL with the honest devices and the services: the
printed ratio is pessimistic. ``tests/cloud_sync/registry/test_chunk_server_abuse.py`` measures
it with each party
in a process of its own.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from agent.protocol.fetch import FetchRequest
from agent.protocol.topics import REGISTRY_SHARE_GROUP
from agent.update.transfer.client import ChunkClient
from cloud_sync.pki import service_share_group
from cloud_sync.registry.serve import ChunkServer
from tests.harness.shared_groups import StoringWorker, T, join_every_group, telemetry_message
from tests.harness.tls import ROOT, TlsFleet
from tests.harness.util import wait_for

N = 40  # telemetry messages per honest device per round
BLOB = bytes(range(256)) * (4 * 1024 * 1024 // 256)  # 4 MiB
HONEST = ("dev-b", "dev-c")

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[TlsFleet]:
    f = TlsFleet(tmp_path)
    for role, name in [("device", "dev-a"), ("device", "dev-b"), ("device", "dev-c"),
                       ("ingest", "ingest-1"), ("registry", "registry-1")]:  # fmt: skip
        f.issue(role, name)  # type: ignore[arg-type]
    f.start()
    yield f
    f.close()


class Honest:
    """An honest device: a TLS connection, telemetry out, one download with ChunkClient."""

    def __init__(self, fleet: TlsFleet, who: str) -> None:
        self.who = who
        self.client = fleet.client(who, f"edgefleet-{who}")
        self.disconnects = 0
        self.client.on_disconnect = lambda *a: setattr(self, "disconnects", self.disconnects + 1)
        self.client.connect(fleet.broker.host, fleet.broker.port, keepalive=10)
        self.client.loop_start()
        assert wait_for(self.client.is_connected, 10), f"{who} not connected"
        self.chunks = ChunkClient(self.client, who, window=16)

    def send_telemetry(self, first: int) -> None:
        for i in range(first, first + N):
            msg = telemetry_message(self.who, i)
            info = self.client.publish(T.device(self.who, "telemetry"), msg, qos=1)
            info.wait_for_publish(10)
            time.sleep(0.01)

    def download(self, dest: Path) -> float:
        t0 = time.monotonic()
        self.chunks.fetch_file("targets/blob.bin", dest, max_length=len(BLOB),
                               resume_dir=dest.parent / f".{dest.name}.r")  # fmt: skip
        took = time.monotonic() - t0
        assert dest.read_bytes() == BLOB, f"{self.who} got other bytes"
        return took


def _round(devices: list[Honest], tmp: Path, tag: str, first: int) -> list[float]:
    """Each honest device sends N telemetry messages while downloading the blob."""
    times: dict[str, float] = {}
    errors: list[str] = []

    def run(d: Honest) -> None:
        try:
            sender = threading.Thread(target=d.send_telemetry, args=(first,))
            sender.start()
            times[d.who] = d.download(tmp / f"{tag}-{d.who}.bin")
            sender.join(60)
        except Exception as e:  # reported below
            errors.append(f"{d.who}: {e!r}")

    threads = [threading.Thread(target=run, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    return [times[d.who] for d in devices]


class Attack:
    """dev-a, with a valid certificate, doing everything at once until stopped."""

    def __init__(self, fleet: TlsFleet) -> None:
        self.fleet = fleet
        self.stop = threading.Event()
        self.sent = 0
        self.threads = [threading.Thread(target=self._flood, daemon=True),
                        threading.Thread(target=self._junk, daemon=True)]  # fmt: skip

    def __enter__(self) -> Attack:
        self.joined = join_every_group(self.fleet)  # every shared group it can name or guess
        # the services' client ids: the broker makes them "dev-a" (and so drops the
        # attacker's own earlier connection, nothing else)
        self.thieves = []
        for cid in ("edgefleet-ingest-1", "edgefleet-registry-1", "svc:ingest-1"):
            with contextlib.suppress(ConnectionError):
                self.thieves.append(self.fleet.connect("dev-a", cid))
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)

    def _client(self, cid: str) -> mqtt.Client:
        c = self.fleet.client("dev-a", cid)
        c.connect(self.fleet.broker.host, self.fleet.broker.port, keepalive=10)
        c.loop_start()
        wait_for(c.is_connected, 5)
        return c

    def _flood(self) -> None:
        """Chunk requests with aliases, no busy_ok, as fast as one Python client goes."""
        c = self._client("flood")
        paths = ["targets/blob.bin", "targets/./blob.bin", "targets//blob.bin",
                 "targets/blob.bin/", "targets/../keys/root.pem"]  # fmt: skip
        i = 0
        while not self.stop.is_set():
            req = FetchRequest(id=f"x{i}", path=paths[i % len(paths)],
                               offset=(i * 65536) % len(BLOB), length=65536)  # fmt: skip
            c.publish(T.device("dev-a", "fetch/req"), req.encode(), qos=0)
            i += 1
            self.sent = i
            if i % 200 == 0:
                time.sleep(0.05)  # ~3,000 requests/s: above its rate limit, below paho's
        c.loop_stop()
        c.disconnect()

    def _junk(self) -> None:
        """Hostile payloads on its own topics, then one 20 MB message (the broker cuts it)."""
        deep = b"[" * 1500 + b"]" * 1500
        junk = [deep, b'{"v": 1' + b"0" * 5000 + b"}", b'{"ts": 1e999}', b"\xff\xfe\x00",
                b'{"device_id": "dev-b", "type": "telemetry"}']  # fmt: skip
        c = self._client("junk")
        while not self.stop.is_set():
            for kind in ("telemetry", "events", "state", "reported", "snapshots"):
                for p in junk:
                    c.publish(T.device("dev-a", kind), p, qos=1)
            time.sleep(0.2)
            if not getattr(self, "_big_sent", False):
                self._big_sent = True
                c.publish(T.device("dev-a", "telemetry"), b"x" * (20 * 1024 * 1024), qos=1)
                time.sleep(0.5)
                c.loop_stop()
                c = self._client("junk2")  # cut off by the broker: come back and go on
        c.loop_stop()
        c.disconnect()


def test_one_device_doing_its_worst_costs_the_others_nothing(
    fleet: TlsFleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    (repo / "targets").mkdir(parents=True)
    (repo / "metadata").mkdir()
    (repo / "targets" / "blob.bin").write_bytes(BLOB)
    ingest = StoringWorker(fleet, "svc:ingest-1", monkeypatch, tmp_path)
    for k, v in fleet.tls_env("svc:registry-1").items():
        monkeypatch.setenv(k, v)
    server = ChunkServer(repo, fleet.url, root=ROOT, client_id="edgefleet-registry-1",
                         share_group=service_share_group(REGISTRY_SHARE_GROUP))  # fmt: skip
    server.start()
    devices: list[Honest] = []
    try:
        devices = [Honest(fleet, who) for who in HONEST]
        alone = _round(devices, tmp_path, "alone", first=0)
        assert wait_for(lambda: ingest.stored() == 2 * N, 30), ingest.stored()

        with Attack(fleet) as attack:
            time.sleep(1.0)  # let the flood and the junk get going
            attacked = _round(devices, tmp_path, "attacked", first=N)
            sent = attack.sent
        # every honest message stored, none lost to the attacker's group joins or junk
        assert wait_for(lambda: ingest.stored() == 4 * N, 30), ingest.stored()
        assert attack.joined.got == []  # the secret groups: it received nobody's messages
        assert sum(d.disconnects for d in devices) == 0
        assert ingest.worker.client.is_connected() and server.client.is_connected()
        # the attacker was accounted for as a device of its own, and refused
        stats = server.stats()
        print(f"honest downloads alone {alone}, attacked {attacked}: ratio of sums "
              f"{sum(attacked) / sum(alone):.2f}; attacker sent {sent} requests; server "
              f"{stats}")  # fmt: skip
        assert sent > 1000
        dead = ingest.store.counts()["dead_letters"]
        assert dead > 0  # its junk was refused and kept as dead letters, bounded
        assert all(len(d["payload"]) <= 4096 for d in ingest.store.dead_letters(50))
    finally:
        for d in devices:
            d.client.loop_stop()
            d.client.disconnect()
        server.stop()
        ingest.close()
