"""systemd integration: readiness and watchdog notifications, and the progress rule behind them.

``notify`` speaks the sd_notify datagram protocol on ``$NOTIFY_SOCKET`` (a path, or ``@name``
for the abstract namespace) with the standard library, so the agent needs no libsystemd.
``Liveness`` is pure: it decides from two snapshots of the pipelines' status whether the agent
is making progress, which is the only thing that feeds the watchdog. A pipeline is fine when it
inferred a frame within ``stall_s``, or is legitimately waiting: no model yet (delivery
pending), its source connecting/reconnecting/ended, or its run finished. A pipeline whose
source streams while inference stands still (a hung backend) stops the pings, and systemd
restarts the agent after ``WatchdogSec``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

# EX_TEMPFAIL: the exit code of a restart asked for by the restart_agent command; the unit
# (systemd/edgefleet-agent.service) has SuccessExitStatus=75 (not a failure) and
# RestartForceExitStatus=75 (restarted all the same, whatever Restart= says)
RESTART_EXIT_CODE = 75

WAITING_SOURCE_STATES = frozenset({"connecting", "waiting", "ended", "stopped"})


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd; False when not under systemd or failed."""
    env = os.environ if env is None else env
    path = env.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify %r to %s failed: %s", message.split("\n", 1)[0], path, e)
        return False


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec``), or None when it is off.

    systemd sets ``WATCHDOG_USEC``, and ``WATCHDOG_PID`` when the pings must come from one
    process; another pid means the watchdog is not ours.
    """
    env = os.environ if env is None else env
    try:
        usec = int(env.get("WATCHDOG_USEC", "0"))
    except ValueError:
        return None
    owner = env.get("WATCHDOG_PID")
    if usec <= 0 or (owner and owner != str(pid if pid is not None else os.getpid())):
        return None
    return usec / 2e6


@dataclass
class Liveness:
    """Pure: is every pipeline making progress? Feed ``check`` with ``Pipeline.status`` dicts."""

    stall_s: float = 30.0
    _last: dict[str, tuple[float, int]] = field(default_factory=dict)  # name -> (t, inferred)

    def check(self, statuses: Sequence[Mapping[str, Any]], now: float) -> list[str]:
        """Names of stalled pipelines, each with why (empty: all fine)."""
        stalled = []
        for st in statuses:
            name = str(st.get("name"))
            inferred = int(st.get("frames_inferred", 0))
            t, seen = self._last.get(name, (now, -1))
            if inferred != seen:
                self._last[name] = (now, inferred)
                continue
            if self._waiting(st):
                self._last[name] = (now, inferred)  # the stall clock restarts after a wait
                continue
            if now - t > self.stall_s:
                stalled.append(f"{name}: no frame inferred for {now - t:.0f} s "
                               f"while its source is {st.get('source_state')}")  # fmt: skip
        return stalled

    @staticmethod
    def _waiting(st: Mapping[str, Any]) -> bool:
        return (
            not st.get("model")
            or bool(st.get("finished"))
            or st.get("source_state") in WAITING_SOURCE_STATES
        )
