"""The rollout controller against a real Mosquitto and a real SQLite ingest database.

The "devices" are the test (``tests.harness.rollout.StoredFleet``): it writes their birth
state, reported state and telemetry into the ingest database directly, and reads what the
controller published from the broker (``edgefleet/v1/devices/+/desired``), checking each
signature with the agent's own verifier against the registry's root. Time is passed in
(``tick(now)``), so soaks take no wall time.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.deploy import DesiredPublisher, last_issued
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.rollout import RolloutSpec, db, start
from cloud_sync.rollout.controller import RolloutController
from cloud_sync.rollout.stages import selection_order
from tests.harness.broker import Mosquitto
from tests.harness.rollout import NEW, OLD, T0, DesiredWatcher, StoredFleet, make_registry

pytestmark = pytest.mark.broker


@pytest.fixture
def env(tmp_path: Path, broker: Mosquitto) -> Iterator[dict[str, Any]]:
    repo_dir = tmp_path / "registry"
    make_registry(repo_dir)
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    watcher = DesiredWatcher(broker, repo_dir)
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
    fleet = StoredFleet(store, 20)
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
    fleet = StoredFleet(store, 20)
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
    fleet = StoredFleet(store, 10)
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
    fleet = StoredFleet(store, 20)
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
    fleet = StoredFleet(store, 20)
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
