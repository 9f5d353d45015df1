"""Network partitions between the device and a real Mosquitto (``tests/harness/partition.py``).

Unlike a broker restart, a partition closes nothing: the device's socket stays open, its
publishes go into a black hole, a reconnect gets no CONNACK, and only the MQTT keepalive tells
it. The scenarios are functions of the partition's length (in the harness), so
``scripts/partition_suite.py`` runs them for minutes; the tests run them for a few keepalive
periods.
"""

from __future__ import annotations

import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from tests.harness.broker import Mosquitto
from tests.harness.fleet import Fleet
from tests.harness.partition import (
    KEEPALIVE_S,
    PartitionProxy,
    partition_during_deploy,
    partition_mid_download,
)
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video, pytest.mark.slow]


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
