"""The controller lease: its pure rule (``lease.py``), and the database statement that applies
it (``lease_db.py``) checked case by case against the rule on SQLite and PostgreSQL, racing
takers, fenced saves; then the controller itself refusing to publish on a lost lease (real
Mosquitto)."""

from __future__ import annotations

import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from cloud_sync.ingest.schema import LEASES
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.rollout import RolloutSpec, db, start
from cloud_sync.rollout.controller import RolloutController
from cloud_sync.rollout.lease import (
    Lease,
    LocalDeadline,
    describe,
    holder_id,
    holder_label,
    lease_seconds,
    next_lease,
    released,
    waiting_line,
)
from cloud_sync.rollout.lease_db import ControllerLease, LeaseLost, apply, read
from cloud_sync.rollout.plan import decide
from tests.harness.broker import Mosquitto
from tests.harness.rollout import NEW, DesiredWatcher, StoredFleet, make_registry

NOW = 1_800_000_000.0
ME, OTHER = "cloud-1:100:aaaaaa", "cloud-2:200:bbbbbb"
FREE = Lease("rollout-controller")
HELD_BY_ME = Lease("rollout-controller", ME, 4, NOW + 5, NOW - 10, NOW - 1)
HELD_BY_OTHER = replace(HELD_BY_ME, holder=OTHER)
EXPIRED_OTHER = replace(HELD_BY_OTHER, expires_at=NOW - 0.5)
RELEASED = replace(HELD_BY_ME, holder=None, expires_at=0.0)

# (case, current, token I hold, take) -> (holder after, token after) or None: refused
CASES = [
    ("never taken: take", FREE, None, True, (ME, 1)),
    ("never taken: renew-only refused", FREE, None, False, None),
    ("mine: renew keeps the token", HELD_BY_ME, 4, True, (ME, 4)),
    ("mine: renew-only keeps the token", HELD_BY_ME, 4, False, (ME, 4)),
    ("mine with an old token: a new token", HELD_BY_ME, 3, True, None),
    ("another's, valid: wait", HELD_BY_OTHER, None, True, None),
    ("another's, expired: take, token + 1", EXPIRED_OTHER, None, True, (ME, 5)),
    ("another's, expired: renew-only refused", EXPIRED_OTHER, None, False, None),
    ("mine, expired: taken again with token + 1", replace(EXPIRED_OTHER, holder=ME), 4, True,
     (ME, 5)),
    ("mine, expired: renew-only refused", replace(EXPIRED_OTHER, holder=ME), 4, False, None),
    ("released: take, token + 1", RELEASED, None, True, (ME, 5)),
]  # fmt: skip
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("case", "current", "token", "take", "want"), CASES, ids=IDS)
def test_rule(
    case: str, current: Lease, token: int | None, take: bool, want: tuple[str, int] | None
) -> None:
    got = next_lease(current, ME, token, NOW, 3.0, take=take)
    if want is None:
        assert got is None, case
        return
    assert got is not None, case
    assert (got.holder, got.fencing, got.expires_at, got.renewed_at) == (*want, NOW + 3, NOW)
    # a new holder's acquisition time is now; a renewal keeps the first one
    assert got.acquired_at == (current.acquired_at if want[1] == current.fencing else NOW)


def test_release() -> None:
    assert released(HELD_BY_ME, ME, 4) == RELEASED
    assert released(HELD_BY_ME, ME, 3) is None  # an old token releases nothing
    assert released(HELD_BY_OTHER, ME, 4) is None


def test_lease_length() -> None:
    assert lease_seconds(5.0, None) == 15.0
    assert lease_seconds(0.2, 1.5) == 1.5
    with pytest.raises(ValueError, match=r"lease of 2 s is not longer than the 2 s tick"):
        lease_seconds(2.0, 2.0)


def test_local_deadline_ends_before_the_databases_expiry() -> None:
    d = LocalDeadline()
    assert not d.valid(0.0)  # never held
    d.renewed(sent=100.0, ttl_s=3.0, margin_s=0.3)
    assert d.valid(102.6) and not d.valid(102.7)
    d.lost()
    assert not d.valid(100.0)


def test_words() -> None:
    assert holder_label(ME) == "cloud-1:100"
    assert holder_label(holder_id("h", 7)) == "h:7"
    assert holder_id("h", 7) != holder_id("h", 7)  # a reused host name and pid differ
    assert "never taken" in describe(None, NOW)
    assert describe(HELD_BY_OTHER, NOW) == (
        "controller lease: held by cloud-2:200 until 2027-01-15 08:00:05.0Z (5.0 s left; "
        "fencing token 4)"
    )
    assert "free (expired" in describe(EXPIRED_OTHER, NOW)
    assert "last holder cloud-2:200" in describe(EXPIRED_OTHER, NOW)
    assert "free (released" in describe(RELEASED, NOW)
    assert waiting_line(HELD_BY_OTHER, NOW).startswith(
        "waiting for the lease held by cloud-2:200 until 2027-01-15 08:00:05.0Z (5.0 s left"
    )
    assert "free" in waiting_line(EXPIRED_OTHER, NOW)


# --- the database statement, on SQLite and PostgreSQL ------------------------------------


def _put(store: Store, lease: Lease, shift: float) -> None:
    """Store ``lease`` with its times moved by ``shift`` (test time NOW -> database time)."""
    apply(store, lease.name, "setup", None, 1.0, take=True)  # creates the row
    moved = {
        "holder": lease.holder, "fencing": lease.fencing,
        "expires_at": lease.expires_at + shift if lease.expires_at else 0.0,
        "acquired_at": None if lease.acquired_at is None else lease.acquired_at + shift,
        "renewed_at": None if lease.renewed_at is None else lease.renewed_at + shift,
    }  # fmt: skip
    with store.engine.begin() as c:
        c.execute(sa.update(LEASES).where(LEASES.c.name == lease.name).values(moved))


@pytest.mark.parametrize(("case", "current", "token", "take", "want"), CASES, ids=IDS)
def test_statement_follows_the_rule(
    store: Store,
    case: str,
    current: Lease,
    token: int | None,
    take: bool,
    want: tuple[str, int] | None,
) -> None:
    _, db_now = read(store)
    shift = db_now - NOW
    if current.fencing:
        _put(store, current, shift)
    before, _ = read(store)
    held, after, at = apply(store, current.name, ME, token, 3.0, take=take)
    assert held == (want is not None), case
    if want is None:
        assert after == (before or FREE), case  # refused: the row is untouched
        return
    assert (after.holder, after.fencing) == want, case
    # times are the database's clock: renewed between the first read and the last
    assert after.renewed_at is not None and db_now <= after.renewed_at <= at
    assert after.expires_at == pytest.approx(after.renewed_at + 3.0)


def test_racing_takers_one_wins(db_url: str) -> None:
    stores = [open_store(db_url) for _ in range(4)]
    go = threading.Barrier(len(stores))
    won: list[str] = []

    def take(i: int) -> None:
        go.wait()
        held, _, _ = apply(stores[i], "rollout-controller", f"h:{i}:x", None, 30.0, take=True)
        if held:
            won.append(f"h:{i}:x")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    lease, _ = read(stores[0])
    for s in stores:
        s.close()
    assert len(won) == 1 and lease is not None
    assert (lease.holder, lease.fencing) == (won[0], 1)


def _rollout(store: Store) -> db.RolloutRow:
    spec = RolloutSpec(id="r1", model="det", version=NEW, target="group:lobby",
                       pipeline="front", stages=["20%"], soak_s=0)  # fmt: skip
    now = datetime.now(timezone.utc)
    return db.create(store, spec, start(spec, now), now)


def test_stale_holder_cannot_save_or_confirm(store: Store) -> None:
    row = _rollout(store)
    a = ControllerLease(store, 0.3, holder="a:1:x")
    b = ControllerLease(store, 30.0, holder="b:2:y")
    assert a.acquire() and not b.acquire()
    stale = a.fence
    assert wait_until_expired(store)
    assert b.acquire() and b.token == 2  # a's lease expired: b takes it, token + 1
    paused = row.state.model_copy(update={"status": "paused"})
    with pytest.raises(LeaseLost, match="token 1 is no longer this controller's"):
        db.save(store, row, paused, datetime.now(timezone.utc), fence=stale)
    assert db.get(store, "r1").rev == 1  # nothing written
    with pytest.raises(LeaseLost):
        a.confirm()
    assert not a.release()  # releases nothing of b's
    saved = db.save(store, row, paused, datetime.now(timezone.utc), fence=b.fence)
    assert saved.rev == 2
    assert b.release()
    lease, _ = read(store)
    assert lease is not None and lease.holder is None and lease.fencing == 2


def test_expired_fence_is_refused_even_if_nobody_took_over(store: Store) -> None:
    row = _rollout(store)
    a = ControllerLease(store, 0.3, holder="a:1:x")
    assert a.acquire()
    assert wait_until_expired(store)
    with pytest.raises(LeaseLost, match="expired"):
        paused = row.state.model_copy(update={"status": "paused"})
        db.save(store, row, paused, row.updated_at, fence=a.fence)


def wait_until_expired(store: Store, timeout: float = 10.0) -> bool:
    """Wait until the database's clock is past the lease's expiry."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lease, now = read(store)
        if lease is not None and lease.expires_at <= now:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.broker
def test_controller_sends_nothing_once_the_lease_is_lost(tmp_path: Path, broker: Mosquitto) -> None:
    """A controller that decided while holding the lease, then lost it (paused past its
    expiry), publishes nothing and saves nothing; the new holder does the stage once."""
    repo = tmp_path / "registry"
    make_registry(repo)
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    watcher = DesiredWatcher(broker, repo)
    a = ControllerLease(store, 0.3, holder="a:1:x")
    b = ControllerLease(store, 30.0, holder="b:2:y")
    ctl_a = RolloutController(store, repo, broker.url, lease=a)
    ctl_b = RolloutController(store, repo, broker.url, lease=b)
    try:
        StoredFleet(store, 10)
        row = _rollout(store)
        assert a.acquire()
        now = datetime.now(timezone.utc)
        fleet = ctl_a.reader.read(now, now, metrics=False)
        decision = decide(row.spec, row.state, fleet, now)  # stage 1: two canaries
        assert wait_until_expired(store)  # ... and a is paused past its lease
        assert b.acquire()
        with pytest.raises(LeaseLost, match="ran out on this controller's clock"):
            ctl_a.apply(row, decision, now)
        assert db.get(store, "r1").rev == 1 and watcher.got == []
        [res] = ctl_b.tick()
        assert res.published == 2 and res.saved
        assert len(watcher.wait(2)) == 2
        with pytest.raises(LeaseLost):  # a again: its old token is refused too
            a.confirm()
    finally:
        ctl_a.close()
        ctl_b.close()
        watcher.close()
        store.close()
