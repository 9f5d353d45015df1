"""A real Mosquitto on a loopback port for the tests, benchmarks and fault suites: the demo's
``cloud_sync.localbroker.MosquittoBroker`` with what a test machine needs on top; and a plain
subscriber on it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from cloud_sync.localbroker import MosquittoBroker, mosquitto_path


class Mosquitto(MosquittoBroker):
    """``stop``/``start`` simulate outages (the port is kept); ``nodelay=False`` runs it with
    Mosquitto's default ``set_tcp_nodelay false`` (the transfer benchmarks compare both)."""

    def __init__(self, workdir: Path, port: int | None = None, *, nodelay: bool = True) -> None:
        super().__init__(workdir, port)
        conf = self.conf.read_text()
        if not nodelay:
            conf = conf.replace("set_tcp_nodelay true", "set_tcp_nodelay false")
        if os.geteuid() == 0:
            # as root Mosquitto drops to the 'mosquitto' user, which cannot write persistence
            # files or read keys in pytest's root-only temp dirs
            conf += "user root\n"
        self.conf.write_text(conf)

    def start(self) -> None:
        if mosquitto_path() is None:
            import pytest

            pytest.fail(
                "mosquitto is not installed; scripts/test installs it (apt-get install mosquitto)"
            )
        super().start()


def subscriber(
    broker: MosquittoBroker,
    topic: str,
    on_message: Callable[[Any, Any, mqtt.MQTTMessage], None],
    client_id: str = "watcher",
) -> mqtt.Client:
    """A paho client subscribed (QoS 1) to ``topic`` on ``broker``, its loop running, each
    message handed to ``on_message``; ``loop_stop`` and ``disconnect`` it when done."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.on_message = on_message
    client.connect(broker.host, broker.port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    return client
