"""Enrollment, mutual TLS and ACLs against a real Mosquitto with the generated config."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509

from agent.config import load_config
from agent.protocol.state import DeviceState
from agent.protocol.topics import Topics
from agent.service import Agent
from cloud_sync.acl import render_acl, render_mosquitto_conf
from cloud_sync.enroll import enroll_device
from cloud_sync.pki import FleetCA, PkiError
from cloud_sync.registry.repo import Repository
from tests.harness.tls import AgedFleet, SecureFleet
from tests.harness.util import wait_for

pytestmark = pytest.mark.broker
T = Topics()


class Inbox:
    """Messages a client receives on its subscriptions."""

    def __init__(self, client: mqtt.Client, *topics: str) -> None:
        self.got: list[tuple[str, bytes]] = []
        self.granted: list[int] = []
        done = threading.Event()
        client.on_message = lambda c, u, m: self.got.append((m.topic, bytes(m.payload)))

        def on_sub(c: Any, u: Any, mid: int, rcs: list[Any], p: Any = None) -> None:
            self.granted = [int(getattr(rc, "value", rc)) for rc in rcs]
            done.set()

        client.on_subscribe = on_sub
        client.subscribe([(t, 1) for t in topics])
        assert done.wait(5)

    def topics(self) -> list[str]:
        return [t for t, _ in self.got]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[SecureFleet]:
    f = SecureFleet(tmp_path)
    f.broker.start()
    yield f
    f.close()


def _pub(c: mqtt.Client, topic: str, payload: bytes = b"x") -> None:
    c.publish(topic, payload, qos=1).wait_for_publish(5)


def test_clients_without_a_fleet_certificate_are_refused(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        fleet.connect(None, cid="anonymous")
    # a certificate from another CA is refused too
    other = FleetCA.init(tmp_path / "other-ca")
    fleet.creds["stranger"] = other.issue("device", "dev-a", tmp_path / "stranger")
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        fleet.connect("stranger")


def test_a_device_publishes_only_its_own_topics(fleet: SecureFleet) -> None:
    ingest = fleet.connect("svc:ingest")
    inbox = Inbox(ingest, T.all_devices("telemetry"), T.all_devices("reported"),
                  f"$share/ingest/{T.all_devices('events')}")  # fmt: skip
    assert inbox.granted == [1, 1, 1]
    a = fleet.connect("dev-a")
    _pub(a, T.device("dev-b", "telemetry"), b"forged")
    _pub(a, T.device("dev-b", "reported"), b"forged")
    _pub(a, T.device("dev-a", "telemetry"), b"mine")
    _pub(a, T.device("dev-a", "events"), b"mine")
    assert wait_for(lambda: len(inbox.got) >= 2, 5)
    time.sleep(0.3)  # anything forged would have arrived by now too
    assert sorted(inbox.topics()) == [T.device("dev-a", "events"), T.device("dev-a", "telemetry")]


def test_no_device_can_write_desired_state(fleet: SecureFleet) -> None:
    a = fleet.connect("dev-a")
    inbox_a = Inbox(a, T.device("dev-a", "desired"))
    op = fleet.connect("op:alice")
    inbox_op = Inbox(op, T.all_devices("desired"))
    _pub(a, T.device("dev-a", "desired"), b"self-granted")
    _pub(a, T.device("dev-b", "desired"), b"forged")
    _pub(op, T.device("dev-a", "desired"), b"signed by the operator")
    assert wait_for(lambda: inbox_a.got, 5)
    time.sleep(0.3)
    assert inbox_a.got == [(T.device("dev-a", "desired"), b"signed by the operator")]
    assert [p for _, p in inbox_op.got] == [b"signed by the operator"]


def test_a_device_cannot_read_another_devices_data(fleet: SecureFleet) -> None:
    a = fleet.connect("dev-a")
    spy = Inbox(a, T.device("dev-b", "events"), T.device("dev-b", "desired"))
    # (Mosquitto 2.0.11 grants the SUBSCRIBE of a 3.1.1 client but never delivers to it)
    ingest = fleet.connect("svc:ingest")
    control = Inbox(ingest, T.device("dev-b", "events"))
    b = fleet.connect("dev-b")
    _pub(b, T.device("dev-b", "events"), b"b's result")
    assert wait_for(lambda: control.got, 5)
    assert spy.got == []


def test_a_revoked_certificate_is_refused(fleet: SecureFleet) -> None:
    fleet.connect("dev-b", cid="before")
    revoked = fleet.ca.revoke("dev-b")
    crl = x509.load_pem_x509_crl(fleet.ca.crl_file.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial) is not None
    fleet.broker.stop()
    fleet.broker.start()  # the broker reads the CRL at start
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        fleet.connect("dev-b", cid="after")
    fleet.connect("dev-a", cid="still-fine")


def test_ca_refuses_duplicates_bad_names_and_overwrites(fleet: SecureFleet, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="already has a certificate"):
        fleet.ca.issue("device", "dev-a", tmp_path / "again")
    with pytest.raises(PkiError, match="bad identity name"):
        fleet.ca.issue("device", "a/b", tmp_path / "bad")
    with pytest.raises(PkiError, match="already holds a fleet CA"):
        FleetCA.init(fleet.ca.dir)
    with pytest.raises(PkiError, match="no fleet CA"):
        FleetCA(tmp_path / "nowhere")
    assert oct(fleet.creds["dev-a"].key.stat().st_mode & 0o777) == "0o600"
    assert oct((fleet.ca.dir / "ca.key").stat().st_mode & 0o777) == "0o600"


@pytest.mark.video
def test_an_enrolled_agent_joins_over_mutual_tls(
    fleet: SecureFleet, tmp_path: Path, synthetic_video: Path, test_models: dict[str, Path]
) -> None:
    repo = Repository.init(tmp_path / "registry")
    assert repo is not None
    bundle = enroll_device(
        fleet.ca, "dev-c", tmp_path / "bundles", broker_url=f"mqtts://127.0.0.1:{fleet.broker.port}",
        root_json=tmp_path / "registry" / "root.json", tags={"site": "berlin"}, groups=["lobby"],
        conf_dir=tmp_path / "bundles" / "dev-c",
    )  # fmt: skip
    fleet.write_config()  # dev-c needs no ACL change: device rules are patterns
    text = (bundle / "agent.toml").read_text()
    text = text.replace('data_dir = "/var/lib/edgefleet"', f'data_dir = "{tmp_path / "data"}"')
    text += (f'\n[[pipelines]]\nname = "front"\nsource = "{synthetic_video}"\n'
             f'model = "{test_models["blobdet"] / "model.onnx"}"\nloop = true\n')  # fmt: skip
    (bundle / "agent.toml").write_text(text)
    ingest = fleet.connect("svc:ingest")
    inbox = Inbox(ingest, T.device("dev-c", "state"), T.device("dev-c", "telemetry"))
    agent = Agent(load_config(bundle / "agent.toml"))
    agent.start()
    try:
        assert wait_for(lambda: len(inbox.got) >= 2, 20), inbox.got
    finally:
        agent.stop()
    state = DeviceState.decode(next(p for t, p in inbox.got if t.endswith("/state")))
    assert state.device_id == "dev-c" and state.groups == ["lobby"]
    assert state.tags == {"site": "berlin"}


def test_committed_broker_templates_are_current() -> None:
    d = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
    services = [("svc:ingest", "ingest"), ("svc:registry", "registry"), ("op:admin", "operator")]
    assert (d / "edgefleet.acl").read_text() == render_acl("edgefleet/v1", services)
    base = "/etc/mosquitto/edgefleet"
    assert (d / "edgefleet.conf").read_text() == render_mosquitto_conf(
        port=8883,
        host="0.0.0.0",
        ca=f"{base}/ca.crt",
        cert=f"{base}/server.crt",
        key=f"{base}/server.key",
        crl=f"{base}/crl.pem",
        acl=f"{base}/edgefleet.acl",
    )


# --------------------------------------------------------------------------------- a year on
def test_a_ca_left_alone_for_a_year_still_admits_its_devices(tmp_path: Path) -> None:
    """The CRL is valid 30 days; without a refresh Mosquitto refuses every client after that.
    The daily `edgefleet ca refresh-crl` (systemd/edgefleet-crl.timer) re-signs it at half
    its validity: run over a year on an injected clock, the broker admits the device today."""
    from datetime import datetime, timedelta, timezone

    stale = AgedFleet(tmp_path / "stale", days=365)
    stale.broker.start()
    try:
        with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
            stale.connect("dev-a", cid="expired-crl")  # the bug: nobody re-signed the CRL
    finally:
        stale.close()

    fleet = AgedFleet(tmp_path / "kept", days=365)
    t, rewrites = fleet.start, 0
    while t <= datetime.now(timezone.utc):
        rewrites += fleet.ca.refresh_crl(now=t)  # the timer, once a day
        t += timedelta(days=1)
    assert 20 <= rewrites <= 30  # every ~15 days, not every day
    fleet.broker.start()
    try:
        fleet.connect("dev-a", cid="a-year-on")
        fleet.connect("svc:ingest", cid="svc-a-year-on")
    finally:
        fleet.close()


def test_a_device_certificate_is_renewed_and_the_old_one_refused(
    fleet: SecureFleet, tmp_path: Path
) -> None:
    from cloud_sync.enroll import ca_warnings

    old = fleet.creds["dev-a"]
    fleet.connect("dev-a", cid="old-cert")
    new = fleet.ca.renew("dev-a", tmp_path / "renewed" / "dev-a")
    fleet.broker.stop()
    fleet.broker.start()  # reload: the rewritten CRL names the old certificate
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        fleet.connect("dev-a", cid="old-cert-again")
    fleet.creds["dev-a"] = new
    fleet.connect("dev-a", cid="new-cert")
    assert old.cert.read_bytes() != new.cert.read_bytes()
    from datetime import datetime, timedelta, timezone

    rows = ca_warnings(fleet.ca, datetime.now(timezone.utc) + timedelta(days=800), timedelta(30))
    assert ("device:dev-a", "warn") in {(w, lv) for w, _, lv in rows}
    assert any(w == "crl" and lv == "expired" for w, _, lv in rows)  # 800 d on, unrefreshed


def test_refresh_crl_command_installs_and_reloads_only_when_due(tmp_path: Path) -> None:
    from datetime import datetime, timedelta, timezone

    from cloud_sync.cli import main

    ca = FleetCA.init(tmp_path / "ca", now=datetime.now(timezone.utc) - timedelta(days=20))
    target, marker = tmp_path / "broker" / "crl.pem", tmp_path / "reloaded"
    argv = ["ca", "refresh-crl", "--dir", str(ca.dir), "--install", str(target),
            "--reload", f"touch {marker}"]  # fmt: skip
    assert main(argv) == 0  # 20 of 30 days gone: due
    assert marker.exists() and target.read_bytes() == ca.crl_file.read_bytes()
    nxt = ca.crl_next_update()
    assert nxt is not None and nxt > datetime.now(timezone.utc) + timedelta(days=29)
    marker.unlink()
    assert main(argv) == 0  # fresh now: nothing rewritten, no reload
    assert not marker.exists()
