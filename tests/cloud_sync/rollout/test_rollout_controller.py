"""The rollout controller against a real Mosquitto and a real SQLite ingest database.

The "devices" are the test: it writes their birth state, reported state and telemetry into
the ingest database directly, and reads what the controller published from the broker
(``edgefleet/v1/devices/+/desired``), checking each signature with the agent's own verifier
against the registry's root. Time is passed in (``tick(now)``), so soaks take no wall time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.protocol.desired import desired_keys_from_root, verify_desired
from agent.protocol.state import DesiredState, SignedDesired
from agent.protocol.topics import Topics
from cloud_sync.deploy import DesiredPublisher, last_issued
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.registry.repo import Repository
from cloud_sync.rollout import RolloutSpec, db, start
from cloud_sync.rollout.controller import RolloutController
from cloud_sync.rollout.stages import selection_order
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for

pytestmark = pytest.mark.broker
T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
OLD, NEW = "1.0.0", "2.0.0"


def make_registry(path: Path) -> Repository:
    """A registry with det@1.0.0 and det@2.0.0 (the files' contents do not matter here)."""
    repo = Repository.init(path)
    files = {}
    for v in (OLD, NEW):
        f = path.parent / f"det-{v}.onnx"
        f.write_bytes(f"model {v}".encode())
        files[f"models/det/{v}/model.onnx"] = str(f)
    repo.add_targets(files)
    return repo


class Watcher:
    """Collects every desired state published, verified like a device verifies it."""

    def __init__(self, broker: Mosquitto, repo_dir: Path) -> None:
        root = json.loads((repo_dir / "root.json").read_text())["signed"]
        self.keys, self.threshold = desired_keys_from_root(root)
        self.got: list[DesiredState] = []
        self.lock = threading.Lock()
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="watcher")
        self.c.on_message = self._on_message
        self.c.connect(broker.host, broker.port)
        self.c.subscribe(Topics().all_devices("desired"), qos=1)
        self.c.loop_start()

    def _on_message(self, c: Any, u: Any, msg: mqtt.MQTTMessage) -> None:
        env = SignedDesired.decode(bytes(msg.payload))
        assert msg.topic == Topics().device(env.signed.device_id, "desired")
        verify_desired(env, trusted_keys=self.keys, threshold=self.threshold,
                       device_id=env.signed.device_id, last_revision=None)  # fmt: skip
        with self.lock:
            self.got.append(env.signed)

    def wait(self, n: int) -> list[DesiredState]:
        assert wait_for(lambda: len(self.got) >= n, 10), f"{len(self.got)} of {n} desired states"
        with self.lock:
            return list(self.got)

    def devices_with(self, version: str) -> list[str]:
        with self.lock:
            return [d.device_id for d in self.got if d.pipelines["front"].version == version]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


class Fleet:
    """N devices that exist only as rows in the ingest database."""

    def __init__(self, store: Store, n: int) -> None:
        self.store = store
        self.ids = [f"dev-{i:02d}" for i in range(n)]
        self.running = dict.fromkeys(self.ids, OLD)
        for d in self.ids:
            birth = {"device_id": d, "online": True, "pipelines": ["front"],
                     "tags": {"site": "berlin"}, "groups": ["lobby"]}  # fmt: skip
            store.upsert_state(birth, now=T0)
            self.report(d, "committed", OLD, OLD)

    def report(
        self, d: str, phase: str, active: str, target: str, error: str | None = None
    ) -> None:
        self.store.upsert_reported({"device_id": d, "pipelines": [{
            "name": "front", "phase": phase, "active_model": "det", "active_version": active,
            "target_model": "det", "target_version": target, "last_error": error,
            "updated_at": T0.isoformat()}]})  # fmt: skip

    def follow(self, desired: list[DesiredState], *, fail: frozenset[str] = frozenset()) -> None:
        """Each device takes the newest desired state it got: commits it, or rolls back."""
        newest: dict[str, DesiredState] = {}
        for s in desired:
            if s.device_id not in newest or s.revision > newest[s.device_id].revision:
                newest[s.device_id] = s
        for d, s in newest.items():
            want = s.pipelines["front"].version
            if want == self.running[d]:
                continue
            if d in fail:
                self.report(d, "rolled_back", self.running[d], want, "health window failed")
            else:
                self.running[d] = want
                self.report(d, "committed", want, want)

    def telemetry(self, start: datetime, seconds: int, p95: dict[str, float] | None = None) -> None:
        """Every device reports every 10 s over ``[start, start + seconds]``."""
        msgs = [
            {"device_id": d, "ts": (start + timedelta(seconds=k)).isoformat(),
             "pipelines": [{"name": "front", "fps_out": 10.0, "errors": 0, "model": "det",
                            "version": self.running[d],
                            "latency_ms": {"total": {"p95": (p95 or {}).get(d, 10.0)}}}]}
            for k in range(0, seconds + 1, 10) for d in self.ids
        ]  # fmt: skip
        self.store.add_telemetry_batch(msgs, now=start)


@pytest.fixture
def env(tmp_path: Path, broker: Mosquitto) -> Iterator[dict[str, Any]]:
    repo_dir = tmp_path / "registry"
    make_registry(repo_dir)
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    watcher = Watcher(broker, repo_dir)
    ctl = RolloutController(store, repo_dir, broker.url)
    yield {"repo": repo_dir, "store": store, "watcher": watcher, "ctl": ctl, "broker": broker}
    ctl.close()
    watcher.close()
    store.close()


def record(store: Store, **kw: Any) -> RolloutSpec:
    base: dict[str, Any] = {"id": "r1", "model": "det", "version": NEW, "target": "group:lobby",
                            "pipeline": "front", "stages": ["10%"], "soak_s": 60}  # fmt: skip
    spec = RolloutSpec(**{**base, **kw})
    db.create(store, spec, start(spec, T0), T0)
    return spec


def status(store: Store, rid: str = "r1") -> str:
    return db.get(store, rid).state.status


def test_twenty_devices_ten_percent_then_all(env: dict[str, Any]) -> None:
    store, w, ctl = env["store"], env["watcher"], env["ctl"]
    fleet = Fleet(store, 20)
    record(store, gates=["failures<10%", "p95_latency<+20%"])
    canaries = selection_order("r1", fleet.ids)[:2]

    ctl.tick(T0)  # stage 1: the two canaries get det@2.0.0
    assert sorted(d.device_id for d in w.wait(2)) == sorted(canaries)
    fleet.follow(w.wait(2))
    ctl.tick(T0 + timedelta(seconds=10))  # settled: soak starts
    fleet.telemetry(T0 + timedelta(seconds=10), 60)
    ctl.tick(T0 + timedelta(seconds=40))  # soak not over: nothing new
    assert len(w.got) == 2 and status(store) == "running"
    ctl.tick(T0 + timedelta(seconds=70))  # gates pass, stage 2: the other 18
    got = w.wait(20)
    assert sorted(d.device_id for d in got) == sorted(fleet.ids)
    fleet.follow(got)
    ctl.tick(T0 + timedelta(seconds=80))
    fleet.telemetry(T0 + timedelta(seconds=80), 60)
    ctl.tick(T0 + timedelta(seconds=140))
    row = db.get(store, "r1")
    assert row.state.status == "completed", row.state.history[-1].message
    assert row.state.counts()["committed"] == 20
    assert len(w.got) == 20  # one desired state per device, no duplicates
    assert all(d.revision == 1 and d.pipelines["front"].version == NEW for d in w.got)
    assert [g.ok for g in row.state.last_gates] == [True, True]
    kinds = [e.kind for e in row.state.history]
    assert kinds.count("stage_started") == 2 and kinds[-1] == "completed"


def test_bad_canary_trips_the_gate_and_rolls_back(env: dict[str, Any]) -> None:
    store, w, ctl = env["store"], env["watcher"], env["ctl"]
    fleet = Fleet(store, 20)
    record(store, gates=["p95_latency<+20%"], on_fail="rollback")
    canaries = selection_order("r1", fleet.ids)[:2]
    ctl.tick(T0)
    fleet.follow(w.wait(2))
    ctl.tick(T0 + timedelta(seconds=10))
    fleet.telemetry(T0 + timedelta(seconds=10), 60, p95=dict.fromkeys(canaries, 50.0))
    ctl.tick(T0 + timedelta(seconds=70))
    row = db.get(store, "r1")
    assert row.state.status == "failed"
    gate = row.state.last_gates[0]
    assert not gate.ok and gate.value == pytest.approx(4.0)  # 50 ms vs 10 ms: +400 %
    assert "canaries 50.0 ms vs baseline 10.0 ms" in gate.detail
    got = w.wait(4)
    assert set(w.devices_with(NEW)) == set(canaries)  # nobody else ever got the new version
    back = [d for d in got if d.pipelines["front"].version == OLD]
    assert sorted(d.device_id for d in back) == sorted(canaries)
    assert all(d.revision == 2 for d in back)
    ctl.tick(T0 + timedelta(seconds=200))  # a failed rollout sends nothing more
    assert len(w.got) == 4


def test_bad_canary_pauses_with_the_gates_numbers(env: dict[str, Any]) -> None:
    store, w, ctl = env["store"], env["watcher"], env["ctl"]
    fleet = Fleet(store, 10)
    record(store, gates=["failures<10%"], stages=["20%"])
    canaries = selection_order("r1", fleet.ids)[:2]
    ctl.tick(T0)
    fleet.follow(w.wait(2), fail=frozenset(canaries[:1]))
    ctl.tick(T0 + timedelta(seconds=10))  # failures are checked at once: 1 of 2 failed
    row = db.get(store, "r1")
    assert row.state.status == "paused" and row.state.paused_by_gate
    assert "failures 50.0% > 10%" in row.state.last_gates[0].detail
    assert "health window failed" in row.state.last_gates[0].detail
    ctl.tick(T0 + timedelta(seconds=100))
    assert len(w.got) == 2  # paused: nothing sent


def test_restart_and_crash_resume_without_new_picks(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, w, repo, broker = env["store"], env["watcher"], env["repo"], env["broker"]
    fleet = Fleet(store, 20)
    record(store, stages=["10%", "50%"])
    order = selection_order("r1", fleet.ids)
    env["ctl"].tick(T0)
    env["ctl"].close()  # controller 1 goes away after stage 1 went out
    fleet.follow(w.wait(2))

    ctl2 = RolloutController(store, repo, broker.url)
    ctl2.tick(T0 + timedelta(seconds=10))
    fleet.telemetry(T0 + timedelta(seconds=10), 60)
    saves = 0
    real_save = db.save

    def crash_once(*a: Any, **kw: Any) -> Any:
        nonlocal saves
        saves += 1
        if saves == 1:
            raise SystemExit("killed between publish and save")
        return real_save(*a, **kw)

    monkeypatch.setattr(db, "save", crash_once)
    with pytest.raises(SystemExit):
        ctl2.tick(T0 + timedelta(seconds=70))  # stage 2 published, state not saved
    ctl2.close()
    assert len(w.wait(10)) == 10 and db.get(store, "r1").state.stage == 0

    ctl3 = RolloutController(store, repo, broker.url)
    try:
        ctl3.tick(T0 + timedelta(seconds=71))  # decides stage 2 again: the same devices
    finally:
        ctl3.close()
    got = w.wait(18)
    assert set(w.devices_with(NEW)) == set(order[:10])  # no device beyond the 50 % prefix
    again = [d for d in got if d.revision == 2]
    assert sorted(d.device_id for d in again) == sorted(order[2:10])  # the same 8, republished
    row = db.get(store, "r1")
    assert row.state.stage == 1 and sorted(row.state.devices) == sorted(order[:10])


def test_abort_reverts_touched_devices(env: dict[str, Any]) -> None:
    store, w, ctl = env["store"], env["watcher"], env["ctl"]
    fleet = Fleet(store, 20)
    record(store)
    canaries = selection_order("r1", fleet.ids)[:2]
    ctl.tick(T0)
    fleet.follow(w.wait(2))
    row = ctl.command("r1", "abort", T0 + timedelta(seconds=5), why="test")
    assert row.state.status == "aborted"
    back = [d for d in w.wait(4) if d.pipelines["front"].version == OLD]
    assert sorted(d.device_id for d in back) == sorted(canaries)
    assert row.state.counts()["reverted"] == 2
    with pytest.raises(Exception, match="cannot abort a rollout that is aborted"):
        ctl.command("r1", "abort", T0 + timedelta(seconds=6))


def test_publisher_keeps_other_pipelines_and_counts_up(env: dict[str, Any]) -> None:
    """One pipeline changes, the others keep what we issued; the revision continues from the
    broker's retained state when our record was lost."""
    from agent.protocol.state import PipelineTarget

    repo, broker, w = env["repo"], env["broker"], env["watcher"]
    old, new = PipelineTarget(model="det", version=OLD), PipelineTarget(model="det", version=NEW)
    with DesiredPublisher(repo, broker.url) as pub:
        pub.publish({"cam": {"front": old, "rear": old}})
        pub.publish({"cam": {"rear": new}})
    rec = last_issued(repo, "cam")
    assert rec is not None and rec.revision == 2
    assert {k: v.version for k, v in rec.pipelines.items()} == {"front": OLD, "rear": NEW}
    (repo / "desired" / "cam.json").unlink()
    with DesiredPublisher(repo, broker.url) as pub:  # learns revision 2 from the broker
        out = pub.publish({"cam": {"front": new}})
    assert out["cam"].signed.revision == 3
    assert {k: v.version for k, v in out["cam"].signed.pipelines.items()} == {
        "front": NEW, "rear": NEW}  # fmt: skip
    assert len(w.wait(3)) == 3
