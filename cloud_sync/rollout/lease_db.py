"""Adapter: the controller lease in the ingest database (table ``leases``, schema version 8).

Why a lease row and not PostgreSQL's advisory locks: the same SQL gives the same semantics on
both backends the store supports (SQLite has no advisory locks, and a session lock would need
one connection held open for the process's life, which SQLite's file lock cannot share), and
a row carries what an operator wants to see (who, until when) and a **fencing token** that
writes check in their own transaction.

Every acquisition or renewal is one conditional ``UPDATE`` (``lease.next_lease`` is its rule):
PostgreSQL re-checks the ``WHERE`` of a concurrent ``UPDATE`` on the row it waited for, SQLite
runs writers one at a time (``BEGIN IMMEDIATE``), so two controllers cannot both take it.
Time is the database's: ``statement_timestamp()`` on PostgreSQL, ``julianday('now')`` on
SQLite (the clock of the host running the statement; a SQLite file is shared by processes of
one host only, so they all read the same clock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from agent.common.errors import TransportError
from cloud_sync.ingest.db import guard
from cloud_sync.ingest.schema import LEASES
from cloud_sync.ingest.store import Store
from cloud_sync.rollout.lease import (
    ROLLOUT_CONTROLLER,
    Fence,
    Lease,
    LocalDeadline,
    holder_id,
    holder_label,
)

log = logging.getLogger(__name__)
L = LEASES.c


class LeaseLost(TransportError):
    """This controller does not hold the lease (any more): nothing was published or saved.

    Attributes:
        holder: the lease's holder now (None: free), as far as known.
    """

    def __init__(self, message: str, holder: str | None = None) -> None:
        super().__init__(message)
        self.holder = holder


def db_now(conn: Connection) -> sa.ColumnElement[float]:
    """The database's time in epoch seconds, one value within a statement."""
    if conn.dialect.name == "postgresql":
        epoch = sa.extract("epoch", sa.func.statement_timestamp())
        return sa.cast(epoch, postgresql.DOUBLE_PRECISION())
    # julianday('now') is fixed for the duration of one statement (SQLite's date functions)
    return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)", sa.Float())


def _lease(m: Any) -> Lease:
    return Lease(
        name=m["name"], holder=m["holder"], fencing=int(m["fencing"]),
        expires_at=float(m["expires_at"]), acquired_at=m["acquired_at"],
        renewed_at=m["renewed_at"],
    )  # fmt: skip


def _frozen_holder_limit(conn: Connection, seconds: float) -> None:
    """PostgreSQL: end this session if it sits in the transaction longer than ``seconds``.

    A holder paused (SIGSTOP, a VM freeze) inside a lease or a fenced save would otherwise keep
    the lease row locked and nobody could take over; the server ends such a session and its
    locks go. (SQLite has no such thing: a writer frozen inside its transaction holds the file's
    write lock, and every writer waits; README "One controller at a time".)
    """
    if conn.dialect.name == "postgresql":
        ms = max(1, int(seconds * 1000))
        conn.execute(sa.text(f"SET LOCAL idle_in_transaction_session_timeout = {ms}"))


def _ensure(conn: Connection, name: str) -> None:
    """The lease row exists (free, token 0) — inserted once, by whoever comes first."""
    ins = postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert
    row = {"name": name, "holder": None, "fencing": 0, "expires_at": 0.0}
    conn.execute(ins(LEASES).values(row).on_conflict_do_nothing(index_elements=["name"]))


def read(store: Store, name: str = ROLLOUT_CONTROLLER) -> tuple[Lease | None, float]:
    """The lease (None: never taken) and the database's time now.

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    with guard(f"read lease {name}"), store.engine.connect() as conn:
        now = float(conn.execute(sa.select(db_now(conn))).scalar_one())
        r = conn.execute(sa.select(LEASES).where(L.name == name)).first()
    return (None if r is None else _lease(r._mapping)), now


def apply(
    store: Store, name: str, me: str, token: int | None, ttl_s: float, *, take: bool
) -> tuple[bool, Lease, float]:
    """Renew (``me`` holds ``token``) or, with ``take``, take a free or expired lease.

    Returns:
        (whether ``me`` holds it now, the row as it is now, the database's time).

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    with guard(f"lease {name}"), store.engine.begin() as conn:
        _frozen_holder_limit(conn, ttl_s)
        _ensure(conn, name)
        now = db_now(conn)
        renewing = sa.and_(
            L.holder == me, L.fencing == (-1 if token is None else token), L.expires_at > now
        )
        free = sa.or_(L.holder.is_(None), L.expires_at <= now)
        stmt = (
            sa.update(LEASES)
            .where(L.name == name, sa.or_(renewing, free) if take else renewing)
            .values(
                holder=me,
                fencing=sa.case((renewing, L.fencing), else_=L.fencing + 1),
                expires_at=now + ttl_s,
                acquired_at=sa.case((renewing, L.acquired_at), else_=now),
                renewed_at=now,
            )
        )
        changed = conn.execute(stmt).rowcount == 1
        r = conn.execute(sa.select(LEASES, now.label("db_now")).where(L.name == name)).one()
    return changed, _lease(r._mapping), float(r._mapping["db_now"])


def release(store: Store, fence: Fence) -> bool:
    """Let the lease go at once (``lease.released``); False: ``fence`` no longer held it.

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    stmt = (
        sa.update(LEASES)
        .where(L.name == fence.name, L.holder == fence.holder, L.fencing == fence.token)
        .values(holder=None, expires_at=0.0)
    )
    with guard(f"release lease {fence.name}"), store.engine.begin() as conn:
        return bool(conn.execute(stmt).rowcount == 1)


def check_fence(conn: Connection, fence: Fence) -> None:
    """Inside a write's transaction: ``fence`` still holds an unexpired lease.

    On PostgreSQL the row is locked (``FOR SHARE``) until the write commits, so a takeover
    waits for it; SQLite's writers run one at a time anyway.

    Raises:
        LeaseLost: another holder, another token, or expired.
    """
    _frozen_holder_limit(conn, fence.ttl_s)
    now = db_now(conn)
    q = sa.select(L.holder, L.fencing, L.expires_at, now.label("db_now"))
    r = conn.execute(q.where(L.name == fence.name).with_for_update(read=True)).first()
    if r is None or r.holder != fence.holder or int(r.fencing) != fence.token:
        holder = None if r is None else r.holder
        raise LeaseLost(
            f"write refused: lease {fence.name} token {fence.token} is no longer this "
            f"controller's (token now {None if r is None else r.fencing}, held by "
            f"{holder_label(holder) if holder else 'nobody'})",
            holder,
        )
    if float(r.expires_at) <= float(r.db_now):
        raise LeaseLost(
            f"write refused: lease {fence.name} token {fence.token} expired "
            f"{float(r.db_now) - float(r.expires_at):.1f} s ago",
            fence.holder,
        )


class ControllerLease:
    """Adapter: this process's claim on the lease — take or renew each tick, confirm before
    publishing, fence every save, release at exit."""

    def __init__(
        self,
        store: Store,
        ttl_s: float,
        *,
        name: str = ROLLOUT_CONTROLLER,
        holder: str | None = None,
        margin_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Args:
        store: the ingest store the rollouts live in.
        ttl_s: the lease's length (``lease.lease_seconds``).
        name: which lease.
        holder: this process's id (default ``HOST:PID:NONCE``).
        margin_s: stop acting this long before the local deadline (default ttl/10, ≤ 1 s).
        clock: monotonic seconds.
        """
        self.store = store
        self.ttl_s = ttl_s
        self.name = name
        self.holder = holder or holder_id()
        self.margin_s = min(1.0, ttl_s / 10) if margin_s is None else margin_s
        self.clock = clock
        self.deadline = LocalDeadline()
        self.token: int | None = None
        self.last: Lease | None = None  # the row as the last statement saw it
        self.last_db_now = 0.0

    @property
    def label(self) -> str:
        """``HOST:PID``."""
        return holder_label(self.holder)

    @property
    def fence(self) -> Fence | None:
        """What this holder's writes carry (None: it holds no lease)."""
        if self.token is None:
            return None
        return Fence(self.name, self.holder, self.token, self.ttl_s)

    def _apply(self, *, take: bool) -> bool:
        sent = self.clock()
        held, self.last, self.last_db_now = apply(
            self.store, self.name, self.holder, self.token, self.ttl_s, take=take
        )
        if held:
            self.token = self.last.fencing
            self.deadline.renewed(sent, self.ttl_s, self.margin_s)
        else:
            self.token = None
            self.deadline.lost()
        return held

    def acquire(self) -> bool:
        """Renew the lease, or take it when free or expired; whether this process holds it.

        Raises:
            StoreUnavailable: the database cannot be reached (the local deadline runs on).
        """
        return self._apply(take=True)

    def confirm(self) -> None:
        """Before publishing: the local deadline has not passed and a renewal succeeds.

        Raises:
            LeaseLost: it ran out locally, or the database refused the renewal.
            StoreUnavailable: the database cannot be reached.
        """
        if not self.deadline.valid(self.clock()):
            held = self.token is not None
            self.token = None
            raise LeaseLost(
                f"lease {self.name} ran out on this controller's clock"
                + (" (paused or slow past its lease)" if held else ""),
                self.holder if held else None,
            )
        if not self._apply(take=False):
            holder = self.last.holder if self.last else None
            raise LeaseLost(
                f"lease {self.name} was taken over by "
                f"{holder_label(holder) if holder else 'nobody'}",
                holder,
            )

    def release(self) -> bool:
        """Let the lease go (a clean stop); whether it was still ours."""
        fence = self.fence
        self.token = None
        self.deadline.lost()
        return fence is not None and release(self.store, fence)


__all__ = ["ControllerLease", "LeaseLost", "apply", "check_fence", "db_now", "read", "release"]
