"""Network partitions between the device and a real Mosquitto (see tests/_partition.py).

Unlike a broker restart, a partition closes nothing: the device's socket stays open, its
publishes go into a black hole, a reconnect gets no CONNACK, and only the MQTT keepalive tells
it. The scenarios are functions of the partition's length, so ``scripts/partition_suite.py``
runs them for minutes; the tests run them for a few keepalive periods.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.protocol.topics import Topics
from agent.service import Agent
from cloud_sync.registry.publish import publish
from tests._partition import PartitionProxy
from tests.conftest import Mosquitto, wait_for
from tests.test_delivery import DEVICE, Fleet, _big_model, digit_loop  # noqa: F401 - fixture
from tests.test_telemetry_agent import Collector

pytestmark = [pytest.mark.broker, pytest.mark.video, pytest.mark.slow]


@pytest.fixture(name="fleet")
def _fleet(
    tmp_path: Path, broker: Mosquitto, digit_loop: Path, test_models: dict[str, Path]  # noqa: F811
) -> Iterator[Fleet]:
    """As test_delivery's ``fleet`` (a registry and chunk server on the broker)."""
    f = Fleet(tmp_path, broker, digit_loop, test_models)
    f.server.start()
    yield f
    f.close()


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
    dash = Collector(fleet.broker, Topics().device(DEVICE, "telemetry"))
    try:
        fleet.publish("digits", "1.0.0")
        fleet.publish("digits", "1.1.0")
        agent = start_partitioned_agent(fleet, proxy)
        assert agent.outbox is not None and agent.telemetry is not None
        fleet.deploy("digits@1.0.0")
        fleet.wait_phase("committed", version="1.0.0")
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
        big = _big_model(fleet.models["digits"], tmp / "big", megabytes)
        publish(fleet.repo, big, name="digits", version="2.0.0")
        agent = start_partitioned_agent(fleet, proxy, retry_s=1.0)
        fleet.deploy("digits@1.0.0")
        fleet.wait_phase("committed", version="1.0.0")
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


def test_proxy_black_holes_both_ways_and_delivers_held_bytes_on_heal(broker: Mosquitto) -> None:
    """The proxy itself: a cut stops a real MQTT round trip, a heal lets it finish."""
    proxy = PartitionProxy(broker.host, broker.port)
    got: list[bytes] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="probe")
    c.on_message = lambda cl, u, m: got.append(bytes(m.payload))
    c.connect(proxy.host, proxy.port, keepalive=60)
    c.loop_start()
    try:
        c.subscribe("p/t", qos=1)
        c.publish("p/t", b"before", qos=1).wait_for_publish(5)
        assert wait_for(lambda: got == [b"before"], 5)
        proxy.cut()
        info = c.publish("p/t", b"during", qos=1)
        time.sleep(1.0)
        assert not info.is_published() and got == [b"before"], "bytes crossed the partition"
        proxy.heal()
        info.wait_for_publish(5)
        assert wait_for(lambda: got == [b"before", b"during"], 5)
    finally:
        c.loop_stop()
        c.disconnect()
        proxy.close()


def test_partition_during_a_deploy_loses_nothing(fleet: Fleet) -> None:
    r = partition_during_deploy(fleet, cut_s=3 * KEEPALIVE_S)
    assert r["noticed_s"] <= 3 * KEEPALIVE_S and r["proxy_connections"] >= 2, r


def test_partition_mid_download_resumes_and_commits(fleet: Fleet, tmp_path: Path) -> None:
    r = partition_mid_download(fleet, cut_s=3 * KEEPALIVE_S, tmp=tmp_path)
    assert r["received_bytes"] < 2 * r["artifact_bytes"], r
