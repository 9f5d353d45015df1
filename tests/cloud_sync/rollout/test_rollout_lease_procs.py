"""Two `edgefleet rollout controller` processes on one database (a SQLite file, PostgreSQL),
a real Mosquitto, devices as rows the test writes (``StoredFleet``): one acts at a time; kill
-9 of the holder mid-rollout hands over after the lease expires and the rollout completes with
one desired state per device; a clean stop hands over at once; a holder paused past its lease
(SIGSTOP … SIGCONT) acts no more.

Each controller counts what it published in its own output ("published N desired states"),
and the subscriber sees every desired state, so a stage sent twice or by two holders shows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from cloud_sync.cli import main
from cloud_sync.ingest.schema import LEASES
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.rollout import RolloutSpec, db, start
from cloud_sync.rollout.lease import Lease, holder_label
from cloud_sync.rollout.lease_db import read
from tests.harness.broker import Mosquitto
from tests.harness.rollout import NEW, DesiredWatcher, StoredFleet, make_registry
from tests.harness.util import terminate, wait_for

pytestmark = pytest.mark.broker
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")
EVERY_S, LEASE_S = 0.2, 2.0
HOST = socket.gethostname()


class Ctl:
    """One controller process, its output in a file the test reads as it goes."""

    def __init__(self, env: dict[str, Any], name: str) -> None:
        self.out = env["tmp"] / f"ctl-{name}.log"
        self.f = self.out.open("w")
        self.proc = subprocess.Popen(
            [EDGEFLEET, "rollout", "controller", "--every", str(EVERY_S), "--lease-s",
             str(LEASE_S), "--db", env["db"], "--repo", env["repo"], "--broker", env["broker"]],
            stdout=self.f, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        self.label = f"{HOST}:{self.proc.pid}"

    def text(self) -> str:
        return self.out.read_text()

    def published(self) -> int:
        return sum(
            int(line.split("published ")[1].split()[0])
            for line in self.text().splitlines()
            if " desired states (fencing token" in line
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # harmless when not stopped
        terminate(self.proc)
        self.f.close()


@pytest.fixture
def env(tmp_path: Path, broker: Mosquitto, db_url: str) -> Iterator[dict[str, Any]]:
    repo = tmp_path / "registry"
    make_registry(repo)
    store = open_store(db_url)
    watcher = DesiredWatcher(broker, repo)
    ctls: list[Ctl] = []
    env = {"db": db_url, "repo": str(repo), "broker": broker.url, "store": store,
           "w": watcher, "tmp": tmp_path, "ctls": ctls}  # fmt: skip
    yield env
    for c in ctls:
        c.stop()
    watcher.close()
    store.close()


def controller(env: dict[str, Any], name: str) -> Ctl:
    c = Ctl(env, name)
    env["ctls"].append(c)
    return c


def lease(store: Store) -> tuple[Lease | None, float]:
    return read(store)


def holder(store: Store) -> str | None:
    current, now = read(store)
    if current is None or current.holder is None or current.expires_at <= now:
        return None
    return holder_label(current.holder)


def record(store: Store) -> None:
    spec = RolloutSpec(id="r1", model="det", version=NEW, target="group:lobby",
                       pipeline="front", stages=["20%"], soak_s=0,
                       gates=["failures<10%"])  # fmt: skip
    now = datetime.now(timezone.utc)
    db.create(store, spec, start(spec, now), now)


def active_and_waiting(env: dict[str, Any]) -> tuple[Ctl, Ctl]:
    """Two controllers started together: (the one holding the lease, the one waiting)."""
    one, two = controller(env, "one"), controller(env, "two")
    by_label = {one.label: one, two.label: two}
    assert wait_for(lambda: holder(env["store"]) in by_label, 20), one.text() + two.text()
    a = by_label[str(holder(env["store"]))]
    b = two if a is one else one
    assert wait_for(lambda: f"waiting for the lease held by {a.label}" in b.text(), 20), b.text()
    return a, b


def freeze_outside_transactions(env: dict[str, Any], c: Ctl) -> None:
    """SIGSTOP ``c`` at a moment it holds no database lock.

    A process frozen inside a write transaction holds SQLite's write lock (every writer of the
    file waits until it goes on) or the lease row's lock on PostgreSQL (until the server ends
    the idle transaction, after the lease's length): stopping there tests that instead.
    """
    probe = sa.create_engine(env["db"].split("?")[0] + ("?timeout=0.3" if "sqlite" in env["db"]
                             else ""), poolclass=sa.pool.NullPool)  # fmt: skip
    try:
        for _ in range(20):
            os.kill(c.proc.pid, signal.SIGSTOP)
            try:
                with probe.connect() as conn:
                    if conn.dialect.name == "sqlite":
                        conn.exec_driver_sql("BEGIN IMMEDIATE")
                    q = sa.select(LEASES.c.name).with_for_update(nowait=True)
                    conn.execute(q)
                    conn.rollback()
                return
            except sa.exc.OperationalError:
                os.kill(c.proc.pid, signal.SIGCONT)
                time.sleep(0.05)
        raise AssertionError("the controller held a database lock at every try")
    finally:
        probe.dispose()


def follow_until_done(env: dict[str, Any], fleet: StoredFleet, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fleet.follow(list(env["w"].got))
        status = db.get(env["store"], "r1").state.status
        if status != "running":
            return status
        time.sleep(0.1)
    return db.get(env["store"], "r1").state.status


def assert_one_desired_state_each(env: dict[str, Any], fleet: StoredFleet) -> None:
    got = env["w"].got
    assert sorted(d.device_id for d in got) == sorted(fleet.ids)  # nobody twice
    assert all(d.revision == 1 and d.pipelines["front"].version == NEW for d in got)


def test_kill_9_mid_rollout_hands_over_after_expiry(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    store: Store = env["store"]
    fleet = StoredFleet(store, 10)
    a, b = active_and_waiting(env)
    record(store)
    env["w"].wait(2)  # stage 1: two canaries, sent by a
    assert wait_for(lambda: db.get(store, "r1").state.counts()["updating"] == 2, 10)
    time.sleep(3 * EVERY_S)  # a ticks on, idle: the canaries have not answered
    assert a.published() == 2 and b.published() == 0 and len(env["w"].got) == 2
    before, _ = lease(store)
    os.kill(a.proc.pid, signal.SIGKILL)  # mid-rollout, between its ticks
    killed = time.monotonic()
    assert wait_for(lambda: holder(store) == b.label, LEASE_S + 10, interval=0.02), b.text()
    took = time.monotonic() - killed
    with capsys.disabled():  # the number for the README (pytest -s shows it)
        print(f"[{store.engine.dialect.name}] takeover after kill -9: {took:.2f} s "
              f"(lease {LEASE_S:g} s, tick {EVERY_S:g} s)")  # fmt: skip
    after, _ = lease(store)
    assert before is not None and after is not None and after.fencing == before.fencing + 1
    assert follow_until_done(env, fleet) == "completed"
    assert_one_desired_state_each(env, fleet)
    assert b.published() == 8 and "took the lease" in b.text()
    assert main(["rollout", "status", "--db", env["db"]]) == 0
    assert f"controller lease: held by {b.label} until" in capsys.readouterr().out


def test_clean_stop_hands_over_at_once(env: dict[str, Any]) -> None:
    store: Store = env["store"]
    fleet = StoredFleet(store, 10)
    a, b = active_and_waiting(env)
    held, _ = lease(store)  # a's lease, renewed each tick: it expires no earlier than this
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(10) == 0
    assert "released the lease" in a.text()
    assert wait_for(lambda: holder(store) == b.label, 10), b.text()
    taken, _ = lease(store)
    assert held is not None and taken is not None and taken.acquired_at is not None
    assert taken.fencing == held.fencing + 1
    # b took it before a's lease would have run out: released, not expired
    assert taken.acquired_at < held.expires_at
    record(store)
    assert follow_until_done(env, fleet) == "completed"
    assert_one_desired_state_each(env, fleet)
    assert b.published() == 10 and a.published() == 0


def test_paused_holder_acts_no_more(env: dict[str, Any]) -> None:
    store: Store = env["store"]
    fleet = StoredFleet(store, 10)
    a, b = active_and_waiting(env)
    freeze_outside_transactions(env, a)  # a freezes holding the lease
    record(store)  # work appears while a is frozen
    assert wait_for(lambda: holder(store) == b.label, LEASE_S + 10), b.text()
    env["w"].wait(2)  # b sends stage 1
    os.kill(a.proc.pid, signal.SIGCONT)  # a wakes up believing it may hold the lease
    assert follow_until_done(env, fleet) == "completed"
    assert wait_for(lambda: "lost the lease" in a.text(), 10), a.text()
    assert a.published() == 0 and b.published() == 10
    assert_one_desired_state_each(env, fleet)
    assert holder(store) == b.label and a.proc.poll() is None  # a waits now
    assert wait_for(lambda: f"waiting for the lease held by {b.label}" in a.text(), 10)
