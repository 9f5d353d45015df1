"""Configuration rollouts end to end: ``edgefleet rollout start --config`` (in process), a real
Mosquitto, the real ingest worker into SQLite, the rollout controller, and ten devices that
verify each signed desired state and report ``ReportedState.config`` as contract 1.3 says
(``tests.harness.config_fleet``). Controller time is passed in, so soaks take no wall time.

The issue's scenario: an operator changes a camera's threshold on ten devices through a staged
rollout (two canaries, then the rest).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.state import PipelineTarget, config_hash
from cloud_sync.cli import main
from cloud_sync.deploy import DesiredPublisher
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.ingest.worker import IngestWorker
from cloud_sync.rollout import db
from cloud_sync.rollout.controller import RolloutController
from cloud_sync.rollout.snapshot import SnapshotReader
from cloud_sync.rollout.stages import selection_order
from tests.harness.broker import Mosquitto
from tests.harness.config_fleet import ConfigDevices
from tests.harness.rollout import OLD, make_registry
from tests.harness.util import wait_for

pytestmark = pytest.mark.broker  # every wait is bounded (wait_for), none longer than 15 s

THRESHOLD = """
[[pipelines]]
name = "front"
source = "rtsp://10.0.0.5/stream1"
model = "det"

[pipelines.tracking]
high_score = 0.7
new_track_score = 0.75
"""
N = 10


@pytest.fixture
def env(tmp_path: Path, broker: Mosquitto, request: Any) -> Iterator[dict[str, Any]]:
    repo = tmp_path / "registry"
    make_registry(repo)
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = open_store(url)
    worker = IngestWorker(broker.url, store, flush_s=0.05)
    worker.start()
    fail = getattr(request, "param", frozenset())
    fleet = ConfigDevices(broker, repo, N, fail=fail)
    assert wait_for(lambda: len(read(store)) == N, 15), "ingest did not see the ten devices"
    ctl = RolloutController(store, repo, broker.url)
    toml = tmp_path / "pipelines.toml"
    toml.write_text(THRESHOLD)
    yield {"repo": repo, "db": url, "store": store, "fleet": fleet, "ctl": ctl, "toml": toml,
           "broker": broker}  # fmt: skip
    ctl.close()
    fleet.close()
    worker.stop()
    store.close()


def read(store: Store) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {v.device_id: v for v in SnapshotReader(store).read(now, now, metrics=False)}


def cli(env: dict[str, Any], *args: str) -> int:
    conn = ["--db", env["db"], "--repo", str(env["repo"]), "--broker", env["broker"].url]
    return main([*args, *conn])


def start(env: dict[str, Any], *extra: str) -> int:
    return cli(env, "rollout", "start", "--config", str(env["toml"]), "--target", "group:lobby",
               "--stage", "2", "--soak", "60s", "--gate", "failures<10%", "--id", "cfg1",
               "--detach", *extra)  # fmt: skip


def applied_in_db(store: Store, ids: list[str], h: str) -> bool:
    views = read(store)
    return all(
        views[d].config is not None
        and views[d].config.hash == h
        and views[d].config.status == "applied"
        for d in ids
    )


def test_ten_devices_get_the_new_threshold_canaries_first(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    store, fleet, ctl = env["store"], env["fleet"], env["ctl"]
    t0 = datetime.now(timezone.utc)
    with DesiredPublisher(env["repo"], env["broker"].url) as pub:  # every device runs det@1.0.0
        front = {"front": PipelineTarget(model="det", version=OLD)}
        pub.publish(dict.fromkeys(fleet.ids, front), now=t0)
    assert wait_for(lambda: all(len(fleet.got(d)) == 1 for d in fleet.ids), 10)

    assert start(env) == 0
    printed = capsys.readouterr().out
    doc = json.dumps(json.loads(db.get(store, "cfg1").spec.config.template))  # type: ignore[union-attr]
    h = config_hash(db.get(store, "cfg1").spec.config.template)  # type: ignore[union-attr]
    assert f"checked: {h[:12]}" in printed and "config " + h[:12] in printed
    assert "high_score" in doc

    canaries = selection_order("cfg1", fleet.ids)[:2]
    rest = [d for d in fleet.ids if d not in canaries]
    ctl.tick(t0)  # stage 1: the two canaries
    fleet.wait_configs(canaries)
    for d in canaries:
        s = fleet.got(d)[-1]
        assert s.revision == 2 and s.pipelines == front  # models kept, revision + 1
        assert s.config is not None and s.config.hash == h == config_hash(s.config.document)
        assert json.loads(s.config.document)["pipelines"][0]["tracking"]["high_score"] == 0.7
    assert all(len(fleet.got(d)) == 1 for d in rest)  # not reached: old desired state only
    assert wait_for(lambda: applied_in_db(store, canaries, h), 10)

    ctl.tick(t0 + timedelta(seconds=10))  # both applied: soak starts
    ctl.tick(t0 + timedelta(seconds=40))  # soak not over
    assert all(len(fleet.got(d)) == 1 for d in rest)
    ctl.tick(t0 + timedelta(seconds=75))  # gates pass: stage 2, the other eight
    fleet.wait_configs(rest)
    assert wait_for(lambda: applied_in_db(store, fleet.ids, h), 10)
    ctl.tick(t0 + timedelta(seconds=80))
    ctl.tick(t0 + timedelta(seconds=145))
    row = db.get(store, "cfg1")
    assert row.state.status == "completed", [e.message for e in row.state.history]
    assert row.state.counts()["committed"] == N
    assert all(len(fleet.got(d)) == 2 for d in fleet.ids)  # one configuration each, no repeat
    assert fleet.errors == []

    capsys.readouterr()
    assert main(status_args(env)) == 0
    out = capsys.readouterr().out
    assert f"rollout cfg1 config {h[:12]} completed" in out
    assert f"sent {h[:12]}  running {h[:12]}  last {h[:12]} applied" in out
    assert "high_score" not in out  # never the document


def status_args(env: dict[str, Any]) -> list[str]:
    return ["rollout", "status", "cfg1", "--db", env["db"]]


EVERY_DEVICE_FAILS = frozenset(f"cam-{i:02d}" for i in range(N))


@pytest.mark.parametrize("env", [EVERY_DEVICE_FAILS], indirect=True)
def test_canaries_roll_back_so_the_rollout_halts_and_nobody_else_gets_it(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    store, fleet, ctl = env["store"], env["fleet"], env["ctl"]
    t0 = datetime.now(timezone.utc)
    assert start(env) == 0
    h = db.get(store, "cfg1").spec.config.hash  # type: ignore[union-attr]
    canaries = selection_order("cfg1", fleet.ids)[:2]
    ctl.tick(t0)
    fleet.wait_configs(canaries)

    def reported_rolled_back() -> bool:
        views = read(store)
        return all(views[d].config and views[d].config.status == "rolled_back" for d in canaries)

    assert wait_for(reported_rolled_back, 10)
    ctl.tick(t0 + timedelta(seconds=10))  # failures<10%: 2 of 2 failed, checked at once
    row = db.get(store, "cfg1")
    assert row.state.status == "paused" and row.state.paused_by_gate
    assert "failures 100.0% > 10%" in row.state.last_gates[0].detail
    assert f"config {h[:12]} rolled_back: health window failed" in row.state.last_gates[0].detail
    # nothing to revert: the operator is not told that abort would
    assert row.state.history[-1].message == (
        "paused by the failing gate; resume accepts it, abort stops it (configuration "
        "rollouts do not revert)"
    )
    ctl.tick(t0 + timedelta(seconds=200))  # a paused rollout sends nothing
    others = [d for d in fleet.ids if d not in canaries]
    assert all(fleet.got(d) == [] for d in others)

    capsys.readouterr()
    assert main(status_args(env)) == 0
    out = capsys.readouterr().out
    assert f"sent {h[:12]}  running local file  last {h[:12]} rolled_back" in out
    assert "health window failed: pipeline front stalled" in out

    # abort: nothing to publish (each device restored its previous configuration itself)
    assert cli(env, "rollout", "abort", "cfg1") == 0
    assert "configuration rollouts do not revert" in capsys.readouterr().out
    row = db.get(store, "cfg1")
    assert row.state.status == "aborted"
    assert all(len(fleet.got(d)) == 1 for d in canaries)
    assert all(fleet.got(d) == [] for d in others)
    assert fleet.errors == []

    assert main(["fleet", "status", "--db", env["db"]]) == 0
    out = capsys.readouterr().out
    assert f"config local file; last {h[:12]} rolled_back: health window failed" in out


def test_a_refused_configuration_records_and_publishes_nothing(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    store, fleet = env["store"], env["fleet"]
    cases = {
        "not TOML": ("[[pipelines]\n", "not valid TOML"),
        "invalid pipeline": (THRESHOLD.replace("0.7", "7.0"), "tracking.high_score"),
        "unknown secret": (
            THRESHOLD.replace("rtsp://", "rtsp://u:${secret:cam_pw}@"),
            "no value for secret(s) ['cam_pw']",
        ),
    }
    for text, expect in cases.values():
        env["toml"].write_text(text)
        assert start(env) == 2
        assert expect in capsys.readouterr().err
    env["toml"].write_text(THRESHOLD)
    assert start(env, "--secret", "cam_pw=hunter2") == 2
    err = capsys.readouterr().err
    assert "never on the command line" in err and "hunter2" not in err
    assert db.list_rollouts(store) == []
    assert all(fleet.got(d) == [] for d in fleet.ids)
