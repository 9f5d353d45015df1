"""Fleet simulator: 50 devices on the agent's real sync/update code against real Mosquitto, a
real TUF registry and chunk server; only the camera and the inference are simulated."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest

import scripts.fleet_sim
from agent.config import UpdateConfig
from agent.protocol.state import PipelineTarget, ReportedState
from agent.protocol.topics import Topics
from cloud_sync.registry.serve import ChunkServer
from tests.harness.broker import Mosquitto, subscriber
from tests.harness.sim import SimFleet, SimPipeline, SimProfile
from tests.harness.sim.registry import build_sim_model, make_sim_registry
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.slow]
N = 50
BASE = SimProfile(fps=20, p50_ms=20, p95_ms=30)


@pytest.fixture(scope="module")
def fleet_sim() -> ModuleType:
    return scripts.fleet_sim


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with sim@1.0.0 and sim@1.1.0 (~256 KB ONNX models), built once."""
    tmp = tmp_path_factory.mktemp("fleet-registry")
    make_sim_registry(tmp / "registry", tmp / "src", ["1.0.0", "1.1.0"], 256 << 10)
    return tmp / "registry"


class Reported:
    """The latest retained reported state of every device, as the cloud sees it."""

    def __init__(self, broker: Mosquitto) -> None:
        self.latest: dict[str, ReportedState] = {}
        self._lock = threading.Lock()
        self.client = subscriber(broker, Topics().all_devices("reported"), self._on_message)

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.payload:
            r = ReportedState.decode(bytes(msg.payload))
            with self._lock:
                self.latest[r.device_id] = r

    def phases(self) -> dict[str, tuple[str, str | None]]:
        """device → (phase, active version) of its first pipeline."""
        with self._lock:
            return {
                d: (r.pipelines[0].phase.value, r.pipelines[0].active_version)
                for d, r in self.latest.items()
            }

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def world(
    broker: Mosquitto, registry: Path, tmp_path: Path
) -> Iterator[tuple[Mosquitto, Path, Reported]]:
    server = ChunkServer(registry, broker.url, client_id="registry-1", workers=2)
    server.start()
    reported = Reported(broker)
    yield broker, registry, reported
    reported.close()
    server.stop()


def make_fleet(
    broker: Mosquitto, registry: Path, tmp: Path, bad: frozenset[str] | set[str] = frozenset()
) -> SimFleet:
    def profile(device_id: str, model: PipelineTarget | None) -> SimProfile:
        if model is not None and model.version == "1.1.0" and device_id in bad:
            return BASE.degraded(latency_factor=3.0)
        return BASE

    return SimFleet(
        broker.url,
        registry / "root.json",
        N,
        base_dir=tmp / "devices",
        profile_fn=profile,
        update=UpdateConfig(health_window_s=1.0, health_min_frames=5, retry_s=2.0),
        telemetry_interval_s=1.0,
        loops=2,
        tick_s=0.1,
    )


def test_deploy_to_all_and_offline_devices_catch_up(
    world: tuple[Mosquitto, Path, Reported], tmp_path: Path, fleet_sim: ModuleType
) -> None:
    broker, registry, reported = world
    fleet = make_fleet(broker, registry, tmp_path)
    ids = list(fleet.devices)
    offline = ids[-10:]
    try:
        fleet.start(only=ids[:-10])
        assert wait_for(lambda: fleet.summary()["online"] == N - 10, 20)
        assert fleet_sim.deploy_all(registry, broker.url, ids, "sim@1.0.0") == []
        assert wait_for(lambda: fleet.all_in("committed", "1.0.0", ids[:-10]), 40), fleet.summary()
        # the offline ten get the retained desired state when they come up
        fleet.start_devices(offline)
        assert wait_for(lambda: fleet.all_in("committed", "1.0.0"), 30), fleet.summary()
        assert wait_for(lambda: set(reported.phases().values()) == {("committed", "1.0.0")}, 10)
        assert sorted(reported.phases()) == ids
        summary = fleet.summary()
        assert summary["versions"] == {"sim@1.0.0": N}
        assert summary["telemetry_sent"] > 0
        assert summary["phase_entries"].get("rejected", 0) == 0
    finally:
        fleet.stop()
    assert not any(t.name.startswith("mqtt-loop") for t in threading.enumerate())


def test_bad_version_rolls_back_on_its_devices_only(
    world: tuple[Mosquitto, Path, Reported], tmp_path: Path, fleet_sim: ModuleType
) -> None:
    broker, registry, reported = world
    ids = [f"sim-{i:04d}" for i in range(N)]
    bad = fleet_sim.pick(ids, 0.1)
    assert len(bad) == 5
    fleet = make_fleet(broker, registry, tmp_path, bad)
    try:
        fleet.start()
        assert fleet_sim.deploy_all(registry, broker.url, ids, "sim@1.0.0") == []
        assert wait_for(lambda: fleet.all_in("committed", "1.0.0"), 40), fleet.summary()
        assert fleet_sim.deploy_all(registry, broker.url, ids, "sim@1.1.0") == []
        good = [d for d in ids if d not in bad]
        assert wait_for(
            lambda: (
                fleet.all_in("committed", "1.1.0", good)
                and fleet.all_in("rolled_back", "1.0.0", bad)
            ),
            40,
        ), fleet.summary()
        for d in bad:
            (r,) = fleet.devices[d].reports()
            assert r.target_version == "1.1.0"
            assert r.last_error is not None and "p95 latency" in r.last_error
        want = {d: ("rolled_back", "1.0.0") if d in bad else ("committed", "1.1.0") for d in ids}
        assert wait_for(lambda: reported.phases() == want, 10)
    finally:
        fleet.stop()


def test_sim_pipeline_feeds_metrics_and_observer() -> None:
    pipe = SimPipeline("front", "dev", lambda d, m: SimProfile(fps=100, error_rate=0.5),
                       rng=random.Random(1))  # fmt: skip
    seen: list[bool] = []
    pipe.start(now=0.0)
    assert pipe.advance(1.0) == 0  # no model, no frames
    model = SimpleNamespace(card=SimpleNamespace(name="m", version="1.0.0"))
    pipe.swap_model(model)  # type: ignore[arg-type]  # the pipeline reads only the card
    pipe.observer = lambda m, ok, nan, ms: seen.append(ok)
    assert pipe.advance(2.0) == 100
    assert 30 < seen.count(False) < 70
    snap = pipe.metrics.snapshot(2.0)
    assert snap["frames_inferred"] + snap["errors"] == 100


def test_sim_model_check_runs_once_per_content(
    tmp_path: Path, fleet_sim: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine-build stand-in checks each model's bytes once per process (1,000 devices
    install the same bytes), and still refuses bytes that are not ONNX."""
    import onnx

    from agent.common.errors import ModelError
    from tests.harness.sim import engine

    calls: list[int] = []
    real = onnx.checker.check_model
    monkeypatch.setattr(onnx.checker, "check_model", lambda m, *a, **k: (calls.append(1),
                        real(m, *a, **k)))  # fmt: skip
    monkeypatch.setattr(engine, "_SIGNATURES", {})
    path = build_sim_model(tmp_path / "m.onnx", 4096, seed=7)
    data = path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    first = engine._checked_signature(data, sha, path)
    again = engine._checked_signature(path.read_bytes(), sha, path)
    assert again == first and len(calls) == 1
    assert [s.name for s in first.inputs] == ["image"]  # the weights are not an input
    assert [s.name for s in first.outputs] == ["scores"]
    junk = b"not onnx at all"
    for _ in range(2):
        with pytest.raises(ModelError, match="not a valid ONNX model"):
            engine._checked_signature(junk, hashlib.sha256(junk).hexdigest(), path)
    assert hashlib.sha256(junk).hexdigest() not in engine._SIGNATURES


def test_sim_telemetry_shares_one_host_sample_per_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.harness.sim import device as sim_device

    reads: list[float] = []
    real = sim_device.read_device_stats

    def counting(root: Path, **kw: Any) -> Any:
        reads.append(kw["now"])
        return real(root, **kw)

    monkeypatch.setattr(sim_device, "read_device_stats", counting)
    host = sim_device.HostStats(max_age_s=1.0)
    clock = [100.0]
    snaps = []
    for i in range(3):
        pipe = SimPipeline("front", f"dev{i}", rng=random.Random(i))
        pipe.start(now=99.0)
        snaps.append(sim_device.SimTelemetrySnapshot(
            f"dev{i}", [pipe], None, interval_s=1.0, data_dir=tmp_path, host=host,  # type: ignore[list-item]
            clock=lambda: clock[0],
        ))  # fmt: skip
    msgs = [s.build() for s in snaps]
    clock[0] = 100.5
    msgs += [s.build() for s in snaps]
    assert reads == [100.0]  # six messages, one read of /proc
    clock[0] = 101.0
    msgs.append(snaps[0].build())
    assert reads == [100.0, 101.0]
    assert [m.device_id for m in msgs[:3]] == ["dev0", "dev1", "dev2"]
    assert all(m.device.mem_total_mb > 0 and m.pipelines[0].name == "front" for m in msgs)


def test_mqtt_loop_runs_every_posted_command_with_few_wake_ups() -> None:
    """Commands posted from other threads all run; a wake-up byte already on its way is not
    sent again (each one is a syscall and a loop pass)."""
    from tests.harness.sim.netloop import MqttLoop

    class CountingSocket:
        def __init__(self, sock: Any) -> None:
            self.sock, self.sends = sock, 0

        def send(self, data: bytes) -> int:
            self.sends += 1
            return int(self.sock.send(data))

        def close(self) -> None:
            self.sock.close()

    loop = MqttLoop("test-loop")
    counting = CountingSocket(loop._wake_w)
    loop._wake_w = counting  # type: ignore[assignment]
    loop.start()
    ran: list[int] = []
    try:

        def post_many(k: int) -> None:
            for i in range(500):
                loop._post(lambda i=i: ran.append(k * 1000 + i))

        threads = [threading.Thread(target=post_many, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        loop.call(lambda: None)  # every command posted before this one has run
        assert sorted(ran) == sorted(k * 1000 + i for k in range(4) for i in range(500))
        assert counting.sends < 1000  # one per post before (2,001)
    finally:
        loop.stop()
