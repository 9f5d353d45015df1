"""One bad device against a real Mosquitto running the generated config and ACL (issue 14).

An enrolled device is trusted with its own topics only. Measured on Mosquitto 2.0.11 with the
config this project rendered before these tests:

- a device that subscribed to ``$share/ingest/…`` and ``$share/registry/…`` (the group names
  were fixed and public) was dealt every other message of another device; the read ACL then
  dropped them: ingest received 10 of 20, the registry 10 of 20 chunk requests;
- a device that connected with the client id ``edgefleet-ingest-2`` logged the ingest worker off;
- a 20 MB device message reached ingest.

The attack tests below fail on that config with the public group names (two ingest workers
stored 14 of 20, the registry answered 10 of 20, both services were logged off, the 20 MB
message went through). Mosquitto 2.0's ACL file does not check SUBSCRIBE at all (the first
test keeps that fact in view), so the fix is a secret group name per deployment
(``FleetCA.share_group``), the certificate CN as client id (``use_username_as_clientid``) and
broker limits (``max_packet_size``, ``max_queued_bytes``); deploy/mosquitto/README.md.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.protocol.fetch import MAX_CHUNK, MAX_HEADER, FetchRequest, decode_response
from agent.protocol.telemetry import Snapshot
from agent.protocol.topics import REGISTRY_SHARE_GROUP
from cloud_sync.acl import (
    MAX_PACKET_SIZE,
    MAX_QUEUED_BYTES,
    MAX_QUEUED_MESSAGES,
    render_mosquitto_conf,
)
from cloud_sync.ingest.worker import SHARE_GROUP
from cloud_sync.pki import SHARE_GROUP_FILE, FleetCA, PkiError, service_share_group
from cloud_sync.registry.serve import ChunkServer
from tests.harness.shared_groups import StoringWorker, T, join_every_group, telemetry_message
from tests.harness.tls import ROOT, TlsFleet
from tests.harness.util import wait_for

N = 20  # messages the honest device sends in each attack


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[TlsFleet]:
    f = TlsFleet(tmp_path)
    for role, name in [("device", "dev-a"), ("device", "dev-b"), ("ingest", "ingest-1"),
                       ("ingest", "ingest-2"), ("registry", "registry-1"),
                       ("operator", "alice")]:  # fmt: skip
        f.issue(role, name)  # type: ignore[arg-type]
    f.start()
    yield f
    f.close()


# ------------------------------------------------------------------ 1: shared subscriptions


@pytest.mark.broker
def test_mosquitto_2_0_lets_any_device_join_a_group_it_knows(fleet: TlsFleet) -> None:
    """Why the group names are secret: with a name the device knows, the broker deals it every
    other message and the read ACL drops them. If this starts failing, the broker checks
    shared subscriptions now (see deploy/mosquitto/README.md)."""
    ingest = fleet.connect("svc:ingest-1", "edgefleet-ingest-1")
    assert ingest.subscribe(T.shared(SHARE_GROUP, "telemetry")) == [1]
    att = join_every_group(fleet)
    b = fleet.connect("dev-b", "edgefleet-dev-b")
    for i in range(N):
        b.publish(T.device("dev-b", "telemetry"), b"t%d" % i)
    assert wait_for(lambda: len(ingest.got) >= N // 2, 5)
    time.sleep(0.5)
    assert (len(ingest.got), len(att.got)) == (N // 2, 0)  # the other half is gone


@pytest.mark.broker
def test_ingest_workers_get_every_message_while_a_device_sits_in_their_group(
    fleet: TlsFleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    w1 = StoringWorker(fleet, "svc:ingest-1", monkeypatch, tmp_path)
    w2 = StoringWorker(fleet, "svc:ingest-2", monkeypatch, tmp_path)
    try:
        assert w1.group == w2.group == fleet.ca.share_group("ingest") != SHARE_GROUP
        att = join_every_group(fleet)
        b = fleet.connect("dev-b", "edgefleet-dev-b")
        for i in range(N):
            b.publish(T.device("dev-b", "telemetry"), telemetry_message("dev-b", i))
        assert wait_for(lambda: w1.stored() + w2.stored() >= N, 15), (w1.stored(), w2.stored())
        time.sleep(0.5)
        assert (w1.stored() + w2.stored(), att.got) == (N, [])  # 20 of 20, nothing leaked
        assert w1.stored() and w2.stored()  # the two workers share the load
        assert w1.store.counts()["dead_letters"] == w2.store.counts()["dead_letters"] == 0
    finally:
        w1.close()
        w2.close()


@pytest.mark.broker
def test_the_registry_answers_every_request_while_a_device_sits_in_its_group(
    fleet: TlsFleet, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Also: a full-size chunk answer (256 KiB window) passes the broker's packet limit."""
    repo = tmp_path / "repo"
    (repo / "targets").mkdir(parents=True)
    blob = bytes(range(256)) * (N * MAX_CHUNK // 256)
    (repo / "targets" / "blob.bin").write_bytes(blob)
    for k, v in fleet.tls_env("svc:registry-1").items():
        monkeypatch.setenv(k, v)
    group = service_share_group(REGISTRY_SHARE_GROUP)  # as `edgefleet registry serve` does
    assert group == fleet.ca.share_group("registry")
    server = ChunkServer(repo, fleet.url, root=ROOT, client_id="edgefleet-registry-1",
                         share_group=group)  # fmt: skip
    server.start()
    try:
        att = join_every_group(fleet)
        b = fleet.connect("dev-b", "edgefleet-dev-b")
        assert b.subscribe(T.device("dev-b", "fetch/resp")) == [1]
        for i in range(N):
            req = FetchRequest(id=f"r{i}", path="targets/blob.bin", offset=i * MAX_CHUNK,
                               length=MAX_CHUNK)  # fmt: skip
            b.publish(T.device("dev-b", "fetch/req"), req.encode())
        assert wait_for(lambda: len(b.got) >= N, 15), len(b.got)
        time.sleep(0.3)
        answers = [decode_response(p) for p in b.payloads()]
        assert sorted(h.id for h, _ in answers) == sorted(f"r{i}" for i in range(N))
        assert all(h.status == "ok" and len(d) == MAX_CHUNK for h, d in answers)
        assert att.got == []
        # sticky transfers: the replica names itself after the client id it chose, whatever
        # id the broker gave it, and answers on its own topic
        b.got.clear()
        first = FetchRequest(id="s0", path="targets/blob.bin", offset=0, length=MAX_CHUNK,
                             busy_ok=True, sticky_ok=True)  # fmt: skip
        b.publish(T.device("dev-b", "fetch/req"), first.encode())
        assert wait_for(lambda: b.got, 10)
        header, _ = decode_response(b.got[0][1])
        assert (header.status, header.replica) == ("ok", "edgefleet-registry-1")
        nxt = first.model_copy(update={"id": "s1", "offset": MAX_CHUNK})
        b.publish(T.replica_requests("dev-b", "edgefleet-registry-1"), nxt.encode())
        assert wait_for(lambda: len(b.got) == 2, 10)
        assert decode_response(b.got[1][1])[0].id == "s1"
    finally:
        server.stop()


# ------------------------------------------------------------------------- 2: client ids


@pytest.mark.broker
def test_a_device_cannot_take_a_services_client_id(fleet: TlsFleet) -> None:
    ingest = fleet.connect("svc:ingest-1", "edgefleet-ingest-1")
    assert ingest.subscribe(T.all_devices("events")) == [1]
    registry = fleet.connect("svc:registry-1", "edgefleet-registry-1")
    b = fleet.connect("dev-b", "edgefleet-dev-b")
    # the ids the services ask for, and the ids the broker gives them (their CNs)
    for cid in ("edgefleet-ingest-1", "edgefleet-registry-1", "svc:ingest-1",
                "svc:registry-1", "edgefleet-dev-b", "dev-b"):  # fmt: skip
        fleet.connect("dev-a", cid)  # accepted, under the id dev-a
    time.sleep(0.5)
    assert (ingest.disconnects, registry.disconnects, b.disconnects) == (0, 0, 0)
    b.publish(T.device("dev-b", "events"), b"still here")
    assert wait_for(lambda: ingest.got, 5)
    assert ingest.payloads() == [b"still here"]


@pytest.mark.broker
def test_one_connection_per_identity(fleet: TlsFleet) -> None:
    """The other side of binding ids to identities: a second connection with the same
    certificate replaces the first, whatever id it asks for (hence one identity per worker,
    replica and concurrent operator tool)."""
    first = fleet.connect("op:alice", "edgefleet-deploy-1")
    fleet.connect("op:alice", "edgefleet-deploy-2")
    assert wait_for(lambda: first.disconnects == 1, 5)


# ----------------------------------------------------------------------- 5: broker limits


@pytest.mark.broker
def test_an_oversized_message_is_refused_and_a_full_size_snapshot_passes(
    fleet: TlsFleet,
) -> None:
    ingest = fleet.connect("svc:ingest-1", "edgefleet-ingest-1")
    assert ingest.subscribe(T.all_devices("events"), T.all_devices("snapshots")) == [1, 1]
    big = fleet.connect("dev-b", "edgefleet-dev-b")
    big.client.publish(T.device("dev-b", "events"), b"x" * (20 << 20), qos=1)
    assert wait_for(lambda: big.disconnects >= 1, 10)  # the broker hangs up on the sender
    b = fleet.connect("dev-b", "edgefleet-dev-b-again")
    b.publish(T.device("dev-b", "snapshots"), b"s" * Snapshot.max_bytes)
    assert wait_for(lambda: ingest.got, 10)
    time.sleep(0.5)
    assert [(t.rsplit("/", 1)[1], len(p)) for t, p in ingest.got] == [
        ("snapshots", Snapshot.max_bytes)
    ]


def test_limits_leave_room_for_honest_traffic() -> None:
    topic = len(T.device("d" * 64, "snapshots"))
    assert 5 + 2 + topic + 2 + Snapshot.max_bytes < MAX_PACKET_SIZE < 20 << 20
    chunk_answer = 4 + MAX_HEADER + MAX_CHUNK
    assert 64 * chunk_answer < MAX_QUEUED_BYTES  # a device's largest window (agent config)
    assert MAX_QUEUED_MESSAGES * 1024 < MAX_QUEUED_BYTES  # ingest catching up on ~1 kB telemetry
    conf = render_mosquitto_conf(port=8883, host="0.0.0.0", ca="c", cert="c", key="k", crl="r",
                                 acl="a").splitlines()  # fmt: skip
    for line in (f"max_packet_size {MAX_PACKET_SIZE}", f"max_queued_bytes {MAX_QUEUED_BYTES}",
                 "use_username_as_clientid true"):  # fmt: skip
        assert line in conf
    # listener settings come after their listener line
    assert conf.index("use_username_as_clientid true") > conf.index("listener 8883 0.0.0.0")


# ------------------------------------------------------------------ identities and groups


def test_ca_issues_per_replica_identities_in_one_secret_group(tmp_path: Path) -> None:
    from cloud_sync.cli import main

    ca = FleetCA.init(tmp_path / "ca")
    d = str(ca.dir)
    assert main(["ca", "identity", "ingest", "--role", "ingest", "--replicas=2", "--dir", d]) == 0
    assert main(["ca", "identity", "registry", "--role", "registry", "--dir", d]) == 0
    assert main(["ca", "identity", "alice", "--role", "operator", "--dir", d]) == 0
    ids = ca.dir / "identities"
    groups = {p.parent.name: p.read_text().strip() for p in ids.glob(f"*/{SHARE_GROUP_FILE}")}
    assert set(groups) == {"svc-ingest-1", "svc-ingest-2", "svc-registry"}  # not operators
    assert groups["svc-ingest-1"] == groups["svc-ingest-2"] == ca.share_group("ingest")
    assert groups["svc-registry"] == ca.share_group("registry") != groups["svc-ingest-1"]
    assert len(groups["svc-ingest-1"]) == len("ingest-") + 32  # 128 random bits
    assert oct((ids / "svc-ingest-1" / SHARE_GROUP_FILE).stat().st_mode & 0o777) == "0o600"
    assert FleetCA.init(tmp_path / "other").share_group("ingest") != groups["svc-ingest-1"]
    # renewing keeps the group; the broker config renders one ACL block per identity
    ca.renew("svc:ingest-2", ids / "svc-ingest-2")
    assert (ids / "svc-ingest-2" / SHARE_GROUP_FILE).read_text().strip() == groups["svc-ingest-1"]
    assert main(["ca", "broker-config", "--dir", d, "--out", str(tmp_path / "broker")]) == 0
    acl = (tmp_path / "broker" / "edgefleet.acl").read_text()
    for cn in ("svc:ingest-1", "svc:ingest-2", "svc:registry", "op:alice"):
        assert f"\nuser {cn}\n" in acl
    assert groups["svc-ingest-1"] not in acl  # the broker never needs the secret
    with pytest.raises(PkiError, match="no shared-subscription group"):
        ca.share_group("operator")


def test_service_share_group_lookup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert service_share_group("ingest", env={}) == "ingest"  # plain brokers, the demo
    cert = tmp_path / "client.crt"
    with caplog.at_level(logging.WARNING, logger="cloud_sync.pki"):
        assert service_share_group("ingest", env={"EDGEFLEET_TLS_CERT": str(cert)}) == "ingest"
    assert "public shared-subscription group 'ingest'" in caplog.text
    (tmp_path / SHARE_GROUP_FILE).write_text("ingest-0123abcd\n")
    assert service_share_group("ingest", env={"EDGEFLEET_TLS_CERT": str(cert)}) == (
        "ingest-0123abcd"
    )
    (tmp_path / SHARE_GROUP_FILE).write_text("a/#\n")
    with pytest.raises(PkiError, match="not a group name"):
        service_share_group("ingest", env={"EDGEFLEET_TLS_CERT": str(cert)})
