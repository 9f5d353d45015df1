"""Pure: how close each signed role of the registry is to expiring, and what to do about it.

TUF metadata expires on purpose (a frozen or replayed repository must not be trusted
forever): timestamp 1 day, snapshot 7, targets 90, root 365 by default. ``registry serve``
re-signs the roles whose keys it holds at half their lifetime
(``Repository.refresh_thresholds``); roles whose keys are offline (root always, targets when
its key is kept off the host) need the operator, so ``assess`` warns weeks ahead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

__all__ = ["OFFLINE_WARNING", "RoleStatus", "assess", "human"]

OFFLINE_WARNING = timedelta(days=30)
Level = Literal["ok", "warn", "expired"]


@dataclass(frozen=True)
class RoleStatus:
    """One role's freshness."""

    role: str
    version: int
    expires: datetime
    remaining: timedelta
    online: bool  # this host holds its key: serve re-signs it
    level: Level
    message: str


def assess(
    expiries: Mapping[str, tuple[int, datetime]],
    lifetimes: Mapping[str, timedelta],
    online: Mapping[str, bool],
    now: datetime,
    *,
    offline_warning: timedelta = OFFLINE_WARNING,
) -> list[RoleStatus]:
    """Each role's state at ``now``.

    An online role warns once it is past its re-sign point (half its lifetime) by another
    quarter: ``serve`` should have re-signed it and has not (not running, or failing). An
    offline role warns ``offline_warning`` ahead (capped at half its lifetime).
    """
    out = []
    for role, (version, expires) in expires_sorted(expiries):
        left = expires - now
        life = lifetimes.get(role, timedelta(days=365))
        is_online = bool(online.get(role)) and role != "root"
        if left <= timedelta(0):
            level: Level = "expired"
            msg = (
                f"{role} v{version} EXPIRED {human(-left)} ago: devices refuse updates until it is "
                + (
                    "re-signed (is `edgefleet registry serve` running?)"
                    if is_online
                    else "re-signed with its offline key (README: renewing the root)"
                )
            )
        elif is_online and left <= life / 4:
            level = "warn"
            msg = (
                f"{role} v{version} expires in {human(left)}: past its re-sign point "
                f"({human(life / 2)} before expiry); is `edgefleet registry serve` running?"
            )
        elif not is_online and left <= min(offline_warning, life / 2):
            level = "warn"
            msg = (
                f"{role} v{version} expires in {human(left)}; its key is offline: renew it before "
                f"{expires:%Y-%m-%d} (`edgefleet registry renew-root` with the root key)"
                if role == "root"
                else f"{role} v{version} expires in {human(left)}; its key is not on this host"
            )
        else:
            level, msg = "ok", f"{role} v{version} valid for {human(left)}"
        out.append(RoleStatus(role, version, expires, left, is_online, level, msg))
    return out


def human(td: timedelta) -> str:
    """``3 d 4 h`` / ``5 h 12 min`` / ``40 s``: a duration as an operator reads it."""
    s = int(abs(td.total_seconds()))
    d, rest = divmod(s, 86400)
    h, rest = divmod(rest, 3600)
    m = rest // 60
    if d:
        return f"{d} d {h} h"
    return f"{h} h {m} min" if h else f"{m} min" if m else f"{s} s"


def expires_sorted(
    expiries: Mapping[str, tuple[int, datetime]],
) -> list[tuple[str, tuple[int, datetime]]]:
    order = ("root", "targets", "snapshot", "timestamp")
    return sorted(expiries.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 9)
