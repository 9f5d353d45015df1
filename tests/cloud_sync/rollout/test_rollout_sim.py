"""A staged rollout end to end on 20 simulated devices (``tests.harness.sim``: the agent's real
sync, update and telemetry code, simulated camera and inference), a real TUF registry and
chunk server, Mosquitto, the ingest worker into SQLite and the rollout controller's loop."""

from __future__ import annotations

import threading
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import pytest

import scripts.fleet_sim
from agent.config import UpdateConfig
from cloud_sync.ingest.store import open_store
from cloud_sync.ingest.worker import IngestWorker
from cloud_sync.registry.serve import ChunkServer
from cloud_sync.rollout import RolloutSpec, db, start
from cloud_sync.rollout.controller import RolloutController
from tests.harness.broker import Mosquitto
from tests.harness.sim import SimFleet, SimProfile
from tests.harness.sim.registry import make_sim_registry
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]
N = 20


@pytest.fixture(scope="module")
def fleet_sim() -> ModuleType:
    return scripts.fleet_sim


def test_rollout_on_twenty_simulated_devices(
    broker: Mosquitto, tmp_path: Path, fleet_sim: ModuleType
) -> None:
    repo = tmp_path / "registry"
    make_sim_registry(repo, tmp_path / "src", ["1.0.0", "1.1.0"], 64 << 10)
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    server = ChunkServer(repo, broker.url, client_id="registry-1", workers=2)
    worker = IngestWorker(broker.url, store, flush_s=0.1)
    fleet = SimFleet(
        broker.url, repo / "root.json", N, base_dir=tmp_path / "devices",
        groups_fn=lambda d: ["lobby"], profile_fn=lambda d, m: SimProfile(fps=20, p95_ms=30),
        update=UpdateConfig(health_window_s=1.0, health_min_frames=5, retry_s=2.0),
        telemetry_interval_s=1.0, loops=2, tick_s=0.1,
    )  # fmt: skip
    ctl = RolloutController(store, repo, broker.url)
    stop = threading.Event()
    loop = threading.Thread(target=ctl.run, args=(stop, 0.5), daemon=True)
    try:
        server.start()
        worker.start()
        fleet.start()
        ids = list(fleet.devices)
        assert fleet_sim.deploy_all(repo, broker.url, ids, "sim@1.0.0") == []
        assert wait_for(lambda: fleet.all_in("committed", "1.0.0"), 40), fleet.summary()
        # older simulators announced groups as a `groups` tag, newer ones in the birth message
        spec = RolloutSpec(
            id="sim-r1", model="sim", version="1.1.0", target="group:lobby, tag:groups=lobby",
            pipeline="front",
            stages=["10%"], soak_s=2, gates=["failures<10%", "p95_latency<+20%"],
        )  # fmt: skip
        now = datetime.now(timezone.utc)
        db.create(store, spec, start(spec, now), now)
        loop.start()
        assert wait_for(lambda: db.get(store, "sim-r1").state.status != "running", 60), db.get(
            store, "sim-r1"
        ).state.history[-1]
        row = db.get(store, "sim-r1")
        assert row.state.status == "completed", [e.message for e in row.state.history]
        assert row.state.counts()["committed"] == N
        assert all(g.ok for g in row.state.last_gates)
        assert fleet.all_in("committed", "1.1.0"), fleet.summary()
    finally:
        stop.set()
        if loop.is_alive():
            loop.join(10)
        fleet.stop()
        worker.stop()
        server.stop()
        store.close()
