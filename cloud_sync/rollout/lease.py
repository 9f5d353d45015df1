"""Pure: the lease that lets one rollout controller act at a time — its rule, times and words.

A lease is one row (``leases`` table): the holder's id, when it expires and a fencing counter.
``next_lease`` is the rule the database statement in ``lease_db.py`` applies atomically:

* the holder renews (same id and fencing token, not yet expired): expiry moves on, token kept;
* anyone takes a lease that is free (released) or expired: the token goes up by one, so
  everything the previous holder might still try to write carries a token that no longer
  matches and is refused;
* otherwise nothing changes (a second controller waits).

Times are seconds since the epoch **on the database's clock** (PostgreSQL's
``clock_timestamp()``; on SQLite, the clock of the host whose process runs the statement — one
host, since a SQLite file is shared only by processes of one machine). Controllers never
compare their own wall clocks with each other's. Locally a holder counts its lease down on its
monotonic clock from *before* it sent the renewal (``LocalDeadline``), which can only end
earlier than the database's expiry, so a paused or cut-off holder stops acting first.
"""

from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, replace
from datetime import datetime, timezone

ROLLOUT_CONTROLLER = "rollout-controller"  # the lease's name (primary key)
LEASE_TICKS = 3  # default lease length, in controller ticks


@dataclass(frozen=True)
class Lease:
    """One lease row.

    Attributes:
        name: which lease (``rollout-controller``).
        holder: ``HOST:PID:NONCE`` of the holder, None when free.
        fencing: goes up by one with every new holder (0: never taken).
        expires_at: database-clock epoch seconds (0: free).
        acquired_at: when the current holder took it (None: never taken).
        renewed_at: when it was last taken or renewed.
    """

    name: str
    holder: str | None = None
    fencing: int = 0
    expires_at: float = 0.0
    acquired_at: float | None = None
    renewed_at: float | None = None

    def held_at(self, now: float) -> bool:
        """Whether somebody holds it at database time ``now``."""
        return self.holder is not None and self.expires_at > now


@dataclass(frozen=True)
class Fence:
    """What a holder's writes carry: the lease, its id and its fencing token. A write whose
    fence no longer matches the lease row (or whose lease expired) is refused."""

    name: str
    holder: str
    token: int
    ttl_s: float = 10.0  # the lease length: PostgreSQL ends a write frozen longer than this


def next_lease(
    current: Lease, me: str, token: int | None, now: float, ttl_s: float, *, take: bool
) -> Lease | None:
    """The lease after ``me`` asks for it at database time ``now``; None: refused, unchanged.

    Args:
        current: the row as it is.
        me: the asking controller's holder id.
        token: the fencing token ``me`` holds (None: it holds none).
        now: the database's time.
        ttl_s: how long the lease lasts from ``now``.
        take: also take a free or expired lease (a renewal-only check passes False).
    """
    renewing = current.holder == me and current.fencing == token and current.expires_at > now
    if renewing:
        return replace(current, expires_at=now + ttl_s, renewed_at=now)
    if take and not current.held_at(now):
        return Lease(current.name, me, current.fencing + 1, now + ttl_s, now, now)
    return None


def released(current: Lease, me: str, token: int) -> Lease | None:
    """The lease after ``me`` lets it go (None: ``me`` does not hold it with ``token``).

    The token stays: the next holder's is one higher all the same."""
    if current.holder != me or current.fencing != token:
        return None
    return replace(current, holder=None, expires_at=0.0)


def holder_id(host: str | None = None, pid: int | None = None) -> str:
    """``HOST:PID:NONCE``: the nonce tells apart two processes that reuse a host name and a
    pid (containers, a restart)."""
    host = host or socket.gethostname()
    return f"{host}:{pid if pid is not None else os.getpid()}:{secrets.token_hex(3)}"


def holder_label(holder: str) -> str:
    """``HOST:PID`` of a holder id (what an operator looks for)."""
    return holder.rsplit(":", 1)[0] if holder.count(":") >= 2 else holder


def lease_seconds(every_s: float, lease_s: float | None) -> float:
    """The lease length: ``lease_s``, or ``LEASE_TICKS`` ticks.

    Raises:
        ValueError: a lease no longer than a tick (the holder could not renew it in time).
    """
    ttl = LEASE_TICKS * every_s if lease_s is None else lease_s
    if ttl <= every_s:
        raise ValueError(
            f"lease of {ttl:g} s is not longer than the {every_s:g} s tick: the holder could "
            f"not renew it in time; use --lease-s above {every_s:g} (default {LEASE_TICKS} ticks)"
        )
    return ttl


@dataclass
class LocalDeadline:
    """The holder's own view of how long it may act, on its monotonic clock.

    The database's expiry is ``t_db + ttl`` with ``t_db`` no earlier than the moment the
    renewal was sent, so ``sent + ttl - margin`` ends first: a holder that sees this deadline
    pass stops acting before anybody else can take the lease.
    """

    until: float = float("-inf")

    def renewed(self, sent: float, ttl_s: float, margin_s: float) -> None:
        """A renewal sent at monotonic ``sent`` succeeded."""
        self.until = sent + ttl_s - margin_s

    def lost(self) -> None:
        """The lease is gone (refused, released or never held)."""
        self.until = float("-inf")

    def valid(self, now: float) -> bool:
        """Whether the holder may still act at monotonic ``now``."""
        return now < self.until


def describe(lease: Lease | None, now: float) -> str:
    """One line for ``rollout status``: who holds the lease and until when (database time)."""
    if lease is None or lease.fencing == 0:
        return "controller lease: never taken (no `edgefleet rollout controller` ran yet)"
    until = _utc(lease.expires_at)
    if lease.holder is None:
        return f"controller lease: free (released; fencing token {lease.fencing})"
    who = holder_label(lease.holder)
    if lease.expires_at <= now:
        return (
            f"controller lease: free (expired {until}, {now - lease.expires_at:.1f} s ago; "
            f"last holder {who}, fencing token {lease.fencing})"
        )
    return (
        f"controller lease: held by {who} until {until} ({lease.expires_at - now:.1f} s left; "
        f"fencing token {lease.fencing})"
    )


def waiting_line(lease: Lease | None, now: float) -> str:
    """``waiting for the lease held by HOST:PID until …`` (a controller that is not active)."""
    if lease is None or lease.holder is None or lease.expires_at <= now:
        return "waiting for the lease (free: taking it on the next tick)"
    return (
        f"waiting for the lease held by {holder_label(lease.holder)} until "
        f"{_utc(lease.expires_at)} ({lease.expires_at - now:.1f} s left, renewed every tick)"
    )


def _utc(epoch: float) -> str:
    t = datetime.fromtimestamp(epoch, timezone.utc)
    return f"{t:%Y-%m-%d %H:%M:%S}.{t.microsecond // 100_000}Z"


__all__ = [
    "LEASE_TICKS",
    "ROLLOUT_CONTROLLER",
    "Fence",
    "Lease",
    "LocalDeadline",
    "describe",
    "holder_id",
    "holder_label",
    "lease_seconds",
    "next_lease",
    "released",
    "waiting_line",
]
