"""Test harness: a real TLS Mosquitto running the broker config and ACL ``cloud_sync.acl``
renders, a fleet CA, and paho clients connected with the CA's identities.

``TlsFleet`` takes the config text from its ``render_conf``/``render_acl`` arguments, so a test
can run the same attack against another config (the pre-fix one, say) on the same harness.
``SecureFleet`` (the enrollment tests) issues two devices, the ingest service and an operator
up front; ``AgedFleet`` is one made ``days`` ago (the enrollment tests and ``year_sim``). All
three are a ``TlsBroker``: the CA, the broker certificate and the broker.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud_sync.acl import render_acl, render_mosquitto_conf
from cloud_sync.pki import Credentials, FleetCA, Role
from tests.harness.broker import Mosquitto

ROOT = "edgefleet/v1"


def write_tls_config(
    broker: Mosquitto,
    ca: FleetCA,
    services: list[tuple[str, str]],
    *,
    conf: Callable[..., str] = render_mosquitto_conf,
    acl: Callable[[str, list[tuple[str, str]]], str] = render_acl,
) -> None:
    """Write the TLS-only broker config and the ACL for ``services`` into the broker's
    folder (read at the broker's next start)."""
    acl_file = broker.workdir / "edgefleet.acl"
    acl_file.write_text(acl(ROOT, services))
    server = ca.dir / "server"
    broker.conf.write_text(conf(
        port=broker.port, host="127.0.0.1", ca=str(ca.ca_file),
        cert=str(server / "server.crt"), key=str(server / "server.key"),
        crl=str(ca.crl_file), acl=str(acl_file),
    ) + "log_dest stderr\nlog_type error\n"
      # as root, Mosquitto drops to the 'mosquitto' user, which cannot read the test's
      # 0600 keys under the root-only pytest temp dir
      + ("user root\n" if os.geteuid() == 0 else ""))  # fmt: skip


class TlsBroker:
    """A CA with a broker certificate for 127.0.0.1, made at ``now`` (default: now), and a
    TLS-only Mosquitto in ``tmp/broker`` (not started); ``close`` ends its clients and it."""

    def __init__(self, tmp: Path, now: datetime | None = None) -> None:
        self.tmp = tmp
        self.ca = FleetCA.init(tmp / "ca", now=now)
        self.ca.issue_server(("127.0.0.1", "localhost"), now=now)
        self.creds: dict[str, Credentials] = {}
        (tmp / "broker").mkdir()
        self.broker = Mosquitto(tmp / "broker")
        self.clients: list[mqtt.Client] = []

    def close(self) -> None:
        for c in self.clients:
            c.loop_stop()
            c.disconnect()
        self.broker.stop()


class TlsFleet(TlsBroker):
    """A CA with a broker certificate for 127.0.0.1 and a TLS-only Mosquitto (not started)."""

    def __init__(
        self,
        tmp: Path,
        *,
        conf: Callable[..., str] = render_mosquitto_conf,
        acl: Callable[[str, list[tuple[str, str]]], str] = render_acl,
    ) -> None:
        super().__init__(tmp)
        self._conf, self._acl = conf, acl

    def issue(self, role: Role, name: str) -> str:
        """Issue an identity; returns its CN (the key for ``connect``)."""
        creds = self.ca.issue(role, name, self.tmp / "id" / name)
        cn = self.ca.issued()[-1].name
        self.creds[cn] = creds
        return cn

    def start(self) -> None:
        """Render the config and ACL for every live identity, then start the broker."""
        services = [(r.name, r.role) for r in self.ca.issued()
                    if r.role != "device" and r.revoked_at is None]  # fmt: skip
        write_tls_config(self.broker, self.ca, services, conf=self._conf, acl=self._acl)
        self.broker.start()

    @property
    def url(self) -> str:
        """The broker's URL as a service is given it."""
        return f"mqtts://127.0.0.1:{self.broker.port}"

    def tls_env(self, cn: str) -> dict[str, str]:
        """The environment a service started as ``cn`` reads its TLS identity from."""
        c = self.creds[cn]
        return {"EDGEFLEET_TLS_CA": str(c.ca), "EDGEFLEET_TLS_CERT": str(c.cert),
                "EDGEFLEET_TLS_KEY": str(c.key)}  # fmt: skip

    def client(self, who: str, cid: str) -> mqtt.Client:
        """A paho client (MQTT 3.1.1, like the project's) with ``who``'s certificate."""
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cid,
                        protocol=MQTTProtocolVersion.MQTTv311)  # fmt: skip
        creds = self.creds[who]
        c.tls_set(ca_certs=str(self.ca.ca_file), certfile=str(creds.cert),
                  keyfile=str(creds.key))  # fmt: skip
        self.clients.append(c)
        return c

    def connect(self, who: str, cid: str) -> Conn:
        """A connected client; raises ConnectionError when the broker does not accept it."""
        conn = Conn(self.client(who, cid), self.broker.host, self.broker.port)
        if not conn.up.wait(5):
            raise ConnectionError(f"{who} ({cid}) was not accepted")
        return conn


class Conn:
    """A connected client that records its connection's life and what it receives."""

    def __init__(self, client: mqtt.Client, host: str, port: int) -> None:
        self.client = client
        self.up = threading.Event()
        self.disconnects = 0
        self.got: list[tuple[str, bytes]] = []
        self._subacks: dict[int, list[int]] = {}
        self._subbed = threading.Condition()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = lambda c, u, m: self.got.append((m.topic, bytes(m.payload)))
        client.on_subscribe = self._on_subscribe
        # no automatic reconnect: a client that was kicked off stays off, so tests see it
        client.reconnect_delay_set(60, 60)
        client.connect(host, port, keepalive=10)
        client.loop_start()

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, p: Any = None) -> None:
        if not rc.is_failure:
            self.up.set()

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, p: Any = None) -> None:
        self.disconnects += 1
        self.up.clear()

    def _on_subscribe(self, c: Any, u: Any, mid: int, rcs: list[Any], p: Any = None) -> None:
        with self._subbed:
            self._subacks[mid] = [int(getattr(rc, "value", rc)) for rc in rcs]
            self._subbed.notify_all()

    def subscribe(self, *topics: str, qos: int = 1) -> list[int]:
        """Subscribe and wait for the SUBACK; returns the granted QoS (128: refused)."""
        rc, mid = self.client.subscribe([(t, qos) for t in topics])
        if mid is None:
            raise ConnectionError(f"subscribe not sent: {rc}")
        with self._subbed:
            if not self._subbed.wait_for(lambda: mid in self._subacks, 5):
                raise TimeoutError(f"no SUBACK for {topics}")
            return self._subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.client.publish(topic, payload, qos=qos).wait_for_publish(10)

    def payloads(self) -> list[bytes]:
        return [p for _, p in self.got]


class SecureFleet(TlsBroker):
    """A CA, a TLS-only Mosquitto with the rendered ACL (not started), and identities for two
    devices, the ingest service and an operator."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.creds = {
            "dev-a": self.ca.issue("device", "dev-a", tmp / "id" / "dev-a"),
            "dev-b": self.ca.issue("device", "dev-b", tmp / "id" / "dev-b"),
            "svc:ingest": self.ca.issue("ingest", "ingest", tmp / "id" / "ingest"),
            "op:alice": self.ca.issue("operator", "alice", tmp / "id" / "alice"),
        }
        self.write_config()

    def write_config(self) -> None:
        services = [(r.name, r.role) for r in self.ca.issued() if r.role != "device"]
        write_tls_config(self.broker, self.ca, services)

    def connect(self, who: str | None, *, cid: str | None = None) -> mqtt.Client:
        """A connected client with ``who``'s certificate (None: TLS without one)."""
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=cid or f"t-{who}")
        creds = self.creds[who] if who else None
        c.tls_set(ca_certs=str(self.ca.ca_file),
                  certfile=str(creds.cert) if creds else None,
                  keyfile=str(creds.key) if creds else None)  # fmt: skip
        ok = threading.Event()
        c.on_connect = lambda cl, u, f, rc, p=None: ok.set() if not rc.is_failure else None
        c.connect(self.broker.host, self.broker.port, keepalive=10)
        c.loop_start()
        self.clients.append(c)
        if not ok.wait(5):
            raise ConnectionError(f"{who} was not accepted")
        return c


class AgedFleet(SecureFleet):
    """A SecureFleet whose CA, broker certificate and identities were made ``days`` ago."""

    def __init__(self, tmp: Path, days: int) -> None:
        self.start = datetime.now(timezone.utc) - timedelta(days=days)
        TlsBroker.__init__(self, tmp, now=self.start)
        self.creds = {
            "dev-a": self.ca.issue("device", "dev-a", tmp / "id" / "dev-a", now=self.start),
            "svc:ingest": self.ca.issue("ingest", "ingest", tmp / "id" / "ingest", now=self.start),
        }
        self.write_config()
