"""Pure: maintenance windows — when a built model may be activated (``[update] window``).

A window is ``HH:MM-HH:MM`` in the device's local time; one that ends before it starts runs
across midnight (``22:00-02:00``); several are separated by commas. Times are naive local
wall-clock readings passed in: the arithmetic is on the clock face, so a daylight-saving
jump can make "next opens in" an hour off for that one night, never the inside/outside test.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

_SPAN = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")
DAY_MIN = 24 * 60


@dataclass(frozen=True)
class Window:
    """One daily window, minutes after local midnight; ``end`` ≤ ``start`` wraps midnight."""

    start: int
    end: int

    def __str__(self) -> str:
        return (
            f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        )

    def contains(self, minute: float) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


def _minute(hh: str, mm: str, text: str, *, end: bool) -> int:
    h, m = int(hh), int(mm)
    if m > 59 or h > 24 or (h == 24 and (m != 0 or not end)):
        raise ValueError(f"{hh}:{mm} in window {text!r} is not a time of day (00:00-23:59)")
    return h * 60 + m


def parse_windows(text: str) -> tuple[Window, ...]:
    """``"02:00-05:00"`` or ``"22:00-23:00,02:00-04:00"`` → windows.

    Raises:
        ValueError: in words: a span that is not ``HH:MM-HH:MM``, a time that does not exist,
            or an empty window (start = end).
    """
    spans = [s for s in text.split(",")]
    if not text.strip():
        raise ValueError("window is empty; give HH:MM-HH:MM (device local time) or leave it out")
    out = []
    for span in spans:
        m = _SPAN.match(span)
        if m is None:
            raise ValueError(
                f'window part {span.strip()!r} is not HH:MM-HH:MM (e.g. "02:00-05:00", '
                "several separated by commas, device local time)"
            )
        start = _minute(m[1], m[2], text, end=False)
        end = _minute(m[3], m[4], text, end=True) % DAY_MIN
        if start == end:
            raise ValueError(
                f"window {span.strip()!r} starts when it ends; to activate any time leave "
                "the window out"
            )
        out.append(Window(start, end))
    return tuple(out)


def _minute_of(local: datetime) -> float:
    return local.hour * 60 + local.minute + local.second / 60 + local.microsecond / 60e6


def inside(windows: tuple[Window, ...], local: datetime) -> bool:
    """True when ``local`` (device local time) is inside any window; no windows: always."""
    if not windows:
        return True
    minute = _minute_of(local)
    return any(w.contains(minute) for w in windows)


def until_open(windows: tuple[Window, ...], local: datetime) -> timedelta:
    """Time from ``local`` until a window opens (zero when inside one, or none configured)."""
    if inside(windows, local):
        return timedelta(0)
    minute = _minute_of(local)
    return timedelta(minutes=min((w.start - minute) % DAY_MIN for w in windows))


def describe(windows: tuple[Window, ...]) -> str:
    """``"02:00-05:00"``, ``"22:00-23:00, 02:00-04:00"``."""
    return ", ".join(str(w) for w in windows)


def wait_text(windows: tuple[Window, ...], local: datetime) -> str:
    """What a built model waits for, in words (the reported ``waiting``)."""
    left = until_open(windows, local)
    total_min = max(1, int(-(-left.total_seconds() // 60)))  # rounded up: never "in 0 min"
    h, m = divmod(total_min, 60)
    when = f"{h} h {m} min" if h else f"{m} min"
    return (
        f"activation waits for maintenance window {describe(windows)} (device local time), "
        f"next opens in {when}"
    )
