"""Chunk-transfer harness: plain paho clients on a test broker, a raw device that speaks the
fetch protocol byte for byte, the served repository folder and its ``ChunkServer``.

The transfer, flow-control, registry-key and chunk-server abuse tests share it.
"""

from __future__ import annotations

import json
import queue
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.common.mqtt import make_client
from agent.protocol.fetch import FetchHeader, decode_response
from agent.protocol.topics import Topics
from cloud_sync.registry.serve import ChunkServer
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for

CHUNK = 64 * 1024
TOPICS = Topics()


def random_bytes(n: int, seed: int = 0) -> bytes:
    """``n`` bytes, the same for the same ``seed``."""
    return random.Random(seed).randbytes(n)


def served_repo(tmp: Path) -> Path:
    """An empty repository folder (``metadata/``, ``targets/``) under ``tmp`` to serve."""
    root = tmp / "repo"
    (root / "metadata").mkdir(parents=True)
    (root / "targets").mkdir()
    return root


def put_random_file(repo: Path, path: str, size: int, seed: int) -> bytes:
    """Write ``random_bytes(size, seed)`` at ``path`` (``targets/…``, folders made) in the
    served folder ``repo``; returns the bytes."""
    blob = random_bytes(size, seed)
    (repo / path).parent.mkdir(parents=True)
    (repo / path).write_bytes(blob)
    return blob


@contextmanager
def chunk_server(
    repo: Path, broker: Mosquitto, client_id: str = "registry-1"
) -> Iterator[ChunkServer]:
    """A started ``ChunkServer`` serving the folder ``repo`` on ``broker``; stopped on exit."""
    srv = ChunkServer(repo, broker.url, client_id=client_id)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def connect_client(broker: Mosquitto, client_id: str) -> mqtt.Client:
    """A paho client (the project's settings) connected to ``broker``, its loop running."""
    client = make_client(client_id)
    client.connect(broker.host, broker.port, keepalive=30)
    client.loop_start()
    if not wait_for(client.is_connected, 10):
        raise RuntimeError(f"{client_id} did not connect to {broker.url}")
    return client


def close_client(client: mqtt.Client) -> None:
    """Disconnect and stop the loop of a ``connect_client`` client."""
    client.disconnect()
    client.loop_stop()
    # paho may lose a disconnect() that races its reconnect(); see ChunkServer.stop
    if client.is_connected() or client.socket() is not None:
        client.disconnect()


class RawDevice:
    """A device that publishes raw payloads and collects every answer on its resp topic."""

    def __init__(self, broker: Mosquitto, device_id: str) -> None:
        self.device_id = device_id
        self.req = TOPICS.device(device_id, "fetch/req")
        self.answers: queue.SimpleQueue[tuple[FetchHeader, bytes]] = queue.SimpleQueue()
        self.subscribed = threading.Event()
        self.client = make_client(f"raw-{device_id}")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self.subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.client.subscribe(TOPICS.device(device_id, "fetch/resp"), qos=1)
        if not self.subscribed.wait(10):
            raise RuntimeError("raw device not subscribed")

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        self.answers.put(decode_response(bytes(msg.payload)))

    def publish(self, payload: bytes) -> None:
        self.client.publish(self.req, payload, qos=1).wait_for_publish(10)

    def ask(self, rid: str, path: str, offset: int = 0, length: int = CHUNK) -> FetchHeader:
        self.publish(
            json.dumps({"id": rid, "path": path, "offset": offset, "length": length}).encode()
        )
        return self.wait(rid)[0]

    def wait(self, rid: str, timeout: float = 10.0) -> tuple[FetchHeader, bytes]:
        deadline = time.monotonic() + timeout
        while True:
            header, data = self.answers.get(timeout=max(0.01, deadline - time.monotonic()))
            if header.id == rid:
                return header, data

    def close(self) -> None:
        close_client(self.client)
