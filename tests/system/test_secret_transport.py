"""An RTSP password never appears in plaintext off the device: a camera URL sealed for an
enrolled device rides a signed desired state through a real Mosquitto; every byte on the wire
(both directions of every client, through a recording TCP relay), every message a spy sees on
``#`` and the broker's persistence file on disk are searched for the password, and the
device's key from its enrollment bundle opens the value."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.desired import sign_desired, verify_desired
from agent.protocol.sealed import is_sealed, unseal_tree
from agent.protocol.state import ConfigTarget, DesiredState, SignedDesired, config_hash
from agent.protocol.topics import Topics
from cloud_sync.enroll import enroll_device
from cloud_sync.pki import FleetCA
from cloud_sync.registry.repo import Repository
from cloud_sync.sealing import seal_for_device
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for

pytestmark = pytest.mark.broker

PASSWORD = "p@ss:W0rd!-7f3k"
URL = f"rtsp://admin:{quote(PASSWORD, safe='')}@10.0.0.7:554/stream1"
FORMS = [PASSWORD, quote(PASSWORD, safe=""), "W0rd!-7f3k"]  # raw, as in the URL, a tail


class Relay:
    """A TCP relay in front of the broker that keeps every byte it carries, both ways."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.captured = bytearray()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                with self.lock:
                    self.captured += data
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.server.close()
        for s in self.sockets:
            with contextlib.suppress(OSError):
                s.close()


@pytest.fixture
def persistent_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A real Mosquitto that keeps retained messages on disk (as a production broker does)."""
    (tmp_path / "mosquitto").mkdir()
    b = Mosquitto(tmp_path / "mosquitto")
    conf = b.conf.read_text().replace(
        "persistence false\n", f"persistence true\npersistence_location {tmp_path / 'mosquitto'}/\n"
    )
    b.conf.write_text(conf)
    b.start()
    yield b
    b.stop()


def _client(port: int, cid: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_sealed_rtsp_password_never_travels_or_rests_in_plaintext(
    tmp_path: Path, persistent_broker: Mosquitto
) -> None:
    # the fleet: a CA, a registry (its desired-state key signs), one enrolled device
    repo = Repository.init(tmp_path / "registry")
    ca = FleetCA.init(tmp_path / "ca")
    bundle = enroll_device(
        ca, "cam-1", tmp_path / "bundles", broker_url="mqtts://127.0.0.1:8883",
        root_json=tmp_path / "registry" / "root.json",
    )  # fmt: skip

    # the operator seals the camera URL and the cloud signs a configuration carrying it
    token = seal_for_device(tmp_path / "ca", "cam-1", URL)
    document = json.dumps({"pipelines": [{"name": "front", "source": token, "model": "det"}]})
    state = DesiredState(
        device_id="cam-1", revision=1, issued_at=datetime.now(timezone.utc),
        config=ConfigTarget(document=document, hash=config_hash(document)),
    )  # fmt: skip
    payload = sign_desired(state, [repo.desired_signer()]).encode()
    assert all(f.encode() not in payload for f in FORMS)

    relay = Relay((persistent_broker.host, persistent_broker.port))
    spy_got: list[tuple[str, bytes]] = []
    device_got: list[bytes] = []
    topic = Topics().device("cam-1", "desired")
    spy = _client(relay.port, "spy")
    spy.on_message = lambda c, u, m: spy_got.append((m.topic, bytes(m.payload)))
    spy.subscribe("#", qos=1)
    cloud = _client(relay.port, "cloud")
    try:
        cloud.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
        # the device connects later and gets the retained state, as after an outage
        device = _client(relay.port, "cam-1")
        device.on_message = lambda c, u, m: device_got.append(bytes(m.payload))
        device.subscribe(topic, qos=1)
        assert wait_for(lambda: device_got and spy_got, 10)
        for c in (spy, cloud, device):
            c.disconnect()
            c.loop_stop()
    finally:
        relay.close()
    persistent_broker.stop()  # Mosquitto writes its persistence file on the way out

    db = (tmp_path / "mosquitto" / "mosquitto.db").read_bytes()
    assert token.encode() in db and token.encode() in bytes(relay.captured)  # we looked there
    for form in FORMS:
        assert form.encode() not in bytes(relay.captured), form
        assert form.encode() not in db, form
        assert all(form.encode() not in p for _, p in spy_got), form

    # on the device: verify the signature, then open the configuration with the bundle's key
    envelope = SignedDesired.decode(device_got[0])
    trust = repo.desired_trust()
    verify_desired(
        envelope, trusted_keys=dict(trust.keys), threshold=trust.threshold,
        device_id="cam-1", last_revision=None,
    )  # fmt: skip
    assert envelope.signed.config is not None
    tree = json.loads(envelope.signed.config.document)
    assert is_sealed(tree["pipelines"][0]["source"])
    key = serialization.load_pem_private_key((bundle / "device.key").read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    opened = unseal_tree(tree, key, device_id="cam-1")
    assert opened["pipelines"][0]["source"] == URL
