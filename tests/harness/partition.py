"""A network partition between a device and a real broker, on loopback, without root, and
the scenarios ``tests/system/test_partition.py`` runs for seconds and ``scripts/partition_suite.py``
for minutes.

``PartitionProxy`` forwards TCP between clients and an upstream (the real Mosquitto). ``cut()``
makes it a black hole, as a failed uplink is: sockets stay open, nothing arrives either way,
new connections are accepted by the kernel but their bytes go nowhere (so an MQTT CONNECT
gets no CONNACK), and only keepalive timeouts tell the client. Bytes read from a socket during
a cut are held, not dropped (TCP would retransmit them), and flow when ``heal()`` is called;
a connection its client gave up on during the cut is closed on both sides then.

iptables/tc would need CAP_NET_ADMIN, which test machines do not give; the proxy needs none.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any

from agent.protocol.topics import Topics
from agent.service import Agent
from cloud_sync.registry.publish import publish
from tests.harness.fleet import Collector, Fleet
from tests.harness.models import big_model
from tests.harness.util import wait_for


class PartitionProxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.host = "127.0.0.1"
        self.port = int(self._listener.getsockname()[1])
        self.url = f"mqtt://{self.host}:{self.port}"
        self._open = threading.Event()
        self._open.set()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self.connections = 0
        self.cuts = 0
        threading.Thread(target=self._accept, name="partition-accept", daemon=True).start()

    # --- control -----------------------------------------------------------------------------

    def cut(self) -> None:
        """Partition: from now on nothing passes in either direction."""
        self.cuts += 1
        self._open.clear()

    def heal(self) -> None:
        self._open.set()

    def close(self) -> None:
        self._closed.set()
        self._open.set()  # release pumps waiting for a heal
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks = list(self._sockets)
        for s in socks:
            with contextlib.suppress(OSError):
                s.close()

    # --- forwarding --------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(
                target=self._connect, args=(client,), name="partition-conn", daemon=True
            ).start()

    def _connect(self, client: socket.socket) -> None:
        self._track(client)
        self._open.wait()  # a connection made during a cut reaches the broker only on heal
        if self._closed.is_set():
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            self._drop(client)
            return
        upstream.settimeout(None)
        self._track(upstream)
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(
                target=self._pump, args=(src, dst), name="partition-pump", daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                self._open.wait()
                data = src.recv(65536)
                if not data:
                    self._open.wait()  # a close during a cut is seen by the peer on heal
                    break
                self._open.wait()  # read during a cut: held until the heal
                if self._closed.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._drop(src)
            self._drop(dst)

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.add(s)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(s)
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            s.close()


KEEPALIVE_S = 5  # the config's minimum: the device notices a partition after 1.5 x this


def start_partitioned_agent(fleet: Fleet, proxy: PartitionProxy, **update: Any) -> Agent:
    """The fleet's agent, but reaching the broker through ``proxy``."""
    cfg = fleet.config(**update)
    cfg = cfg.model_copy(
        update={
            "broker": cfg.broker.model_copy(update={"url": proxy.url, "keepalive_s": KEEPALIVE_S}),
            "telemetry": cfg.telemetry.model_copy(update={"interval_s": 0.5}),
        }
    )
    fleet.agent = Agent(cfg)
    fleet.agent.start()
    assert wait_for(lambda: fleet.agent is not None and fleet.agent.session.connected.is_set(), 10)
    return fleet.agent


def partition_during_deploy(fleet: Fleet, cut_s: float, log: Any = None) -> dict[str, Any]:
    """A partition of ``cut_s`` seconds while the operator deploys a new version.

    Checks: inference goes on during the cut on the running model; the device notices the cut
    (keepalive) and keeps telemetry in its outbox; after the heal it takes the version deployed
    during the cut (retained desired state), and every telemetry message produced arrives, in
    order of production, with none dropped. Returns the figures."""
    say = log or (lambda msg: None)
    proxy = PartitionProxy(fleet.broker.host, fleet.broker.port)
    dash = Collector(fleet.broker, Topics().device(fleet.device, "telemetry"))
    try:
        fleet.publish("digits", "1.0.0")
        fleet.publish("digits", "1.1.0")
        agent = start_partitioned_agent(fleet, proxy)
        assert agent.outbox is not None and agent.telemetry is not None
        fleet.commit("digits@1.0.0")
        assert wait_for(lambda: len(dash.messages) >= 3, 20), "no telemetry before the cut"
        frames0 = fleet.pipe.status(time.monotonic())["frames_inferred"]
        proxy.cut()
        t_cut = time.monotonic()
        say(f"partition for {cut_s:.0f} s")
        fleet.deploy("digits@1.1.0")  # reaches the broker, not the device
        assert wait_for(lambda: not agent.session.connected.is_set(), KEEPALIVE_S * 3), (
            "the device did not notice the partition"
        )
        noticed_s = time.monotonic() - t_cut
        time.sleep(max(0.0, cut_s - (time.monotonic() - t_cut)))
        frames1 = fleet.pipe.status(time.monotonic())["frames_inferred"]
        queued = agent.outbox.depth()
        assert fleet.running() == "digits@1.0.0", "the model changed during the partition"
        assert frames1 > frames0, "inference stopped during the partition"
        assert queued > 0, "no telemetry kept in the outbox during the partition"
        proxy.heal()
        t_heal = time.monotonic()
        fleet.wait_phase("committed", version="1.1.0", timeout=120)
        committed_s = time.monotonic() - t_heal
        assert fleet.running() == "digits@1.1.0"
        assert wait_for(lambda: agent.outbox is not None and agent.outbox.depth() == 0, 60)
        produced = agent.telemetry.sent

        def stamps() -> list[Any]:
            return [m.ts for m in dash.messages]

        assert wait_for(lambda: len(set(stamps())) >= produced, 20), (len(set(stamps())), produced)
        firsts = list(dict.fromkeys(stamps()))
        assert firsts == sorted(firsts), "telemetry arrived out of order"
        assert agent.outbox.stats()["dropped"] == 0
        return {
            "cut_s": round(cut_s, 1),
            "noticed_s": round(noticed_s, 1),
            "frames_during_cut": frames1 - frames0,
            "outbox_queued": queued,
            "telemetry_delivered": len(set(stamps())),
            "telemetry_produced": produced,
            "committed_after_heal_s": round(committed_s, 1),
            "proxy_connections": proxy.connections,
        }
    finally:
        fleet.stop_agent()
        dash.close()
        proxy.close()


def partition_mid_download(
    fleet: Fleet, cut_s: float, tmp: Path, megabytes: int = 8, log: Any = None
) -> dict[str, Any]:
    """A partition of ``cut_s`` seconds in the middle of a model download.

    Checks: the running model keeps running; after the heal the download resumes and
    commits, fetching again at most what was in flight (not the whole artifact)."""
    say = log or (lambda msg: None)
    proxy = PartitionProxy(fleet.broker.host, fleet.broker.port)
    try:
        fleet.publish("digits", "1.0.0")
        big = big_model(fleet.models["digits"], tmp / "big", megabytes)
        publish(fleet.repo, big, name="digits", version="2.0.0")
        agent = start_partitioned_agent(fleet, proxy, retry_s=1.0)
        fleet.commit("digits@1.0.0")
        sent0 = fleet.server.stats().bytes_sent
        fleet.deploy("digits@2.0.0")
        half = (megabytes << 20) // 3
        assert wait_for(lambda: fleet.server.stats().bytes_sent - sent0 > half, 60)
        proxy.cut()
        say(f"partition for {cut_s:.0f} s at {fleet.server.stats().bytes_sent - sent0} bytes")
        time.sleep(cut_s)
        assert fleet.running() == "digits@1.0.0"
        proxy.heal()
        t_heal = time.monotonic()
        fleet.wait_phase("committed", version="2.0.0", timeout=180)
        committed_s = time.monotonic() - t_heal
        assert fleet.running() == "digits@2.0.0"
        targets = sum(t.length for p, t in fleet.repo.targets().items() if "/2.0.0/" in p)
        chunks = agent.updates.tuf.fetcher.chunks  # type: ignore[union-attr]
        received = chunks.bytes_received
        # what was in flight at the cut may come twice, plus metadata refreshes
        slack = 2 * chunks.window * chunks.chunk_size + (1 << 20)
        assert received <= targets + slack, f"received {received} for {targets} of targets"
        return {
            "cut_s": round(cut_s, 1),
            "artifact_bytes": targets,
            "received_bytes": received,
            "committed_after_heal_s": round(committed_s, 1),
        }
    finally:
        fleet.stop_agent()
        proxy.close()
