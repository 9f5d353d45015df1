"""``edgefleet rollout …`` as an operator runs it (subprocesses), against a real Mosquitto and
a real SQLite ingest database; the devices are rows the test writes
(``tests.harness.rollout.StoredFleet``) following the desired states the CLI publishes."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_sync.ingest.store import Store, open_store
from cloud_sync.rollout import db
from cloud_sync.rollout.stages import selection_order
from tests.harness.broker import Mosquitto
from tests.harness.rollout import NEW, DesiredWatcher, StoredFleet, make_registry
from tests.harness.util import terminate

pytestmark = pytest.mark.broker
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([EDGEFLEET, *args], capture_output=True, text=True, timeout=timeout,
                          check=False)  # fmt: skip


@pytest.fixture
def env(tmp_path: Path, broker: Mosquitto) -> Iterator[dict[str, Any]]:
    repo = tmp_path / "registry"
    make_registry(repo)
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = open_store(url)
    watcher = DesiredWatcher(broker, repo)
    yield {"db": url, "repo": str(repo), "broker": broker.url, "store": store, "w": watcher}
    watcher.close()
    store.close()


def conn(env: dict[str, Any]) -> list[str]:
    return ["--db", env["db"], "--repo", env["repo"], "--broker", env["broker"]]


def start_args(env: dict[str, Any], *extra: str) -> list[str]:
    return ["rollout", "start", f"det@{NEW}", "--target", "group:lobby", "--pipeline", "front",
            "--stage", "20%", "--soak", "0", "--gate", "failures<10%", "--id", "r1",
            "--every", "0.2", *extra, *conn(env)]  # fmt: skip


def follow_until(
    env: dict[str, Any], fleet: StoredFleet, proc: subprocess.Popen[str], fail: frozenset[str]
) -> None:
    """Play the devices until the process exits (at most 30 s)."""
    deadline = time.monotonic() + 30
    while proc.poll() is None and time.monotonic() < deadline:
        fleet.follow(list(env["w"].got), fail=fail)
        time.sleep(0.1)


def test_detach_status_pause_resume_and_the_controller(env: dict[str, Any]) -> None:
    store: Store = env["store"]
    fleet = StoredFleet(store, 10)
    r = run(*start_args(env, "--detach"))
    assert r.returncode == 0, r.stderr
    assert "rollout r1: det@2.0.0 to 'group:lobby' (front); stages 20%, 100%" in r.stdout
    st = run("rollout", "status", "--json", "--db", env["db"])
    assert st.returncode == 0, st.stderr
    [one] = json.loads(st.stdout)
    assert (one["id"], one["status"], one["stages"], one["selected"]) == (
        "r1", "running", ["20%", "100%"], 0)  # fmt: skip
    p = run("rollout", "pause", "r1", "--db", env["db"])
    assert p.returncode == 0 and "paused: operator" in p.stdout, p.stderr
    again = run("rollout", "pause", "r1", "--db", env["db"])
    assert again.returncode == 2 and "cannot pause a rollout that is paused" in again.stderr
    assert json.loads(run("rollout", "status", "r1", "--json", "--db", env["db"]).stdout)[
        "status"] == "paused"  # fmt: skip
    assert run("rollout", "resume", "r1", "--db", env["db"]).returncode == 0

    ctl = subprocess.Popen([EDGEFLEET, "rollout", "controller", "--every", "0.2", *conn(env)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while db.get(store, "r1").state.status == "running" and time.monotonic() < deadline:
            fleet.follow(list(env["w"].got))
            time.sleep(0.1)
        ctl.send_signal(signal.SIGTERM)
        out, err = ctl.communicate(timeout=10)
    finally:
        terminate(ctl)  # type: ignore[arg-type]
    assert ctl.returncode == 0, err
    assert "rollout controller stopped" in out
    assert db.get(store, "r1").state.status == "completed"
    assert sorted(d.device_id for d in env["w"].got) == sorted(fleet.ids)
    text = run("rollout", "status", "r1", "--db", env["db"]).stdout
    assert "completed: stage 2/2 (100%); devices 10/10 done (10 committed, 0 failed)" in text


def test_foreground_completes_with_progress(env: dict[str, Any]) -> None:
    fleet = StoredFleet(env["store"], 10)
    proc = subprocess.Popen([EDGEFLEET, *start_args(env)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        follow_until(env, fleet, proc, frozenset())
        out, err = proc.communicate(timeout=10)
    finally:
        terminate(proc)  # type: ignore[arg-type]
    assert proc.returncode == 0, out + err
    assert "stage 1/2 (20%); devices 0/2 done (0 committed, 0 failed), 2 updating" in out
    assert "completed: stage 2/2 (100%); devices 10/10 done (10 committed" in out


def test_foreground_paused_by_a_gate_exits_1_with_its_numbers(env: dict[str, Any]) -> None:
    fleet = StoredFleet(env["store"], 10)
    bad = frozenset(selection_order("r1", fleet.ids)[:1])
    proc = subprocess.Popen([EDGEFLEET, *start_args(env)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        follow_until(env, fleet, proc, bad)
        out, err = proc.communicate(timeout=10)
    finally:
        terminate(proc)  # type: ignore[arg-type]
    assert proc.returncode == 1, out + err
    assert "paused" in out and "failures 50.0% > 10% (1 of 2 stage devices failed" in out
    assert len(env["w"].got) == 2  # the canaries only


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--gate", "latency<5%"], "unknown metric 'latency'"),
        (["--stage", "5x"], "bad stage '5x'"),
        (["--stage", "50%", "--stage", "10%"], "stages must increase"),
        (["--soak", "ten"], "bad duration 'ten'"),
        (["--target", "group:"], "bad target 'group:'"),
    ],
)
def test_bad_syntax_exits_2_with_the_parsers_message(
    env: dict[str, Any], extra: list[str], message: str
) -> None:
    r = run(*start_args(env, "--detach"), *extra)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_clear_errors(env: dict[str, Any], tmp_path: Path) -> None:
    args = start_args(env, "--detach")
    args[2] = "det@9.9.9"
    r = run(*args)
    assert r.returncode == 2 and "det@9.9.9 is not published" in r.stderr, r.stderr
    r = run("rollout", "status", "nope", "--db", env["db"])
    assert r.returncode == 2 and "no rollout 'nope'" in r.stderr
    r = run("rollout", "promote", "nope", "--db", env["db"])
    assert r.returncode == 2 and "no rollout 'nope'" in r.stderr
    r = run("rollout", "status", "--db", "postgresql+psycopg://nobody@127.0.0.1:1/none")
    assert r.returncode == 2 and "database unavailable" in r.stderr, r.stderr
    assert run(*start_args(env, "--detach")).returncode == 0
    r = run(*start_args(env, "--detach"))
    assert r.returncode == 2 and "'r1' is taken" in r.stderr
