"""One bad device's tools against the TLS broker (``tests.harness.tls.TlsFleet``), and what it
attacks: ``join_every_group`` puts dev-a in every ``$share`` group it can know or guess;
``StoringWorker`` is a real ingest worker that counts what it stores. The broker-security and
bad-device tests share them."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import cast

import pytest

from agent.protocol.schema import EXAMPLES
from agent.protocol.telemetry import Telemetry
from agent.protocol.topics import REGISTRY_SHARE_GROUP, Topics
from cloud_sync.ingest.store import open_store
from cloud_sync.ingest.worker import SHARE_GROUP, IngestWorker
from cloud_sync.pki import service_share_group
from tests.harness.tls import ROOT, Conn, TlsFleet

T = Topics(ROOT)


class StoringWorker:
    """A real ``IngestWorker`` with its own SQLite store on the TLS broker, in the group
    ``edgefleet ingest`` picks (``service_share_group``)."""

    def __init__(self, fleet: TlsFleet, cn: str, mp: pytest.MonkeyPatch, tmp: Path) -> None:
        for k, v in fleet.tls_env(cn).items():
            mp.setenv(k, v)  # the worker reads its TLS identity from the environment
        self.group = service_share_group(SHARE_GROUP)
        self.store = open_store(f"sqlite:///{tmp / (cn.replace(':', '-') + '.db')}")
        self.worker = IngestWorker(fleet.url, self.store, client_id=f"edgefleet-{cn[4:]}",
                                   share_group=self.group, flush_s=0.05)  # fmt: skip
        subacked = threading.Event()
        self.worker.client.on_subscribe = lambda *_a: subacked.set()
        self.worker.start()
        assert subacked.wait(10), f"{cn}: subscriptions not acknowledged"

    def stored(self) -> int:
        """Telemetry messages written (dead letters would count as lost)."""
        return self.store.counts()["device_telemetry"]

    def close(self) -> None:
        self.worker.stop()
        self.store.close()


def telemetry_message(device: str, i: int) -> bytes:
    """The example telemetry of ``device``, ``i`` seconds later: a distinct, valid message."""
    t = cast(Telemetry, EXAMPLES["telemetry"])
    return t.model_copy(update={"device_id": device, "ts": t.ts + timedelta(seconds=i)}).encode()


def join_every_group(fleet: TlsFleet) -> Conn:
    """dev-a in every group name it can know or guess, for every volume topic."""
    att = fleet.connect("dev-a", "edgefleet-dev-a")
    topics = [f"$share/{g}/{T.all_devices(k)}"
              for g in (SHARE_GROUP, REGISTRY_SHARE_GROUP, "+", "edgefleet", "default")
              for k in ("telemetry", "events", "snapshots", "fetch/req")]  # fmt: skip
    # the broker grants every one of them: Mosquitto 2.0's ACL file does not check SUBSCRIBE
    assert att.subscribe(*topics) == [1] * len(topics)
    return att
