"""Pure: is the wall clock plausible? A Jetson without an RTC battery boots in 1970.

Until NTP syncs, TLS refuses every certificate ("not yet valid") and signed-metadata checks
compare against a date decades off. The agent cannot fix the clock, but it can say so in plain
words instead of failing with an obscure handshake error: ``clock_problem`` compares the clock
with the newest time the device has seen (files it wrote in its data dir, the release floor).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from pathlib import Path

__all__ = ["CLOCK_FLOOR", "clock_problem", "last_seen_time"]

# No device runs this release before it was made: a clock before this is certainly wrong.
CLOCK_FLOOR = datetime(2026, 1, 1, tzinfo=timezone.utc)
SLACK = timedelta(days=1)


def clock_problem(now: datetime, last_seen: datetime | None = None) -> str | None:
    """None when ``now`` is plausible; else the problem in words.

    Args:
        now: the wall clock (aware).
        last_seen: the newest time the device wrote something (a clock a day or more
            before it went backwards).
    """
    floor = max(CLOCK_FLOOR, last_seen - SLACK) if last_seen is not None else CLOCK_FLOOR
    if now >= floor:
        return None
    return (
        f"the device clock reads {now:%Y-%m-%d %H:%M} UTC, before {floor:%Y-%m-%d} (the "
        f"{'newest file this device wrote' if last_seen and floor > CLOCK_FLOOR else 'release'})"
        ": it is not set (no RTC battery, NTP not synced yet); TLS connections and signed "
        "updates fail until it is; the unit waits for time-sync.target where the system has one"
    )


def last_seen_time(paths: Iterable[Path]) -> datetime | None:
    """Adapter: the newest modification time among ``paths`` that exist."""
    times = []
    for p in paths:
        try:
            times.append(p.stat().st_mtime)
        except OSError:
            continue
    return datetime.fromtimestamp(max(times), timezone.utc) if times else None
