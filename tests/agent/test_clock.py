"""Clock sanity: a device that booted in 1970 says so instead of failing obscurely."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.clock import CLOCK_FLOOR, clock_problem, last_seen_time

UTC = timezone.utc


@pytest.mark.parametrize(
    ("now", "last_seen", "bad"),
    [
        (datetime(1970, 1, 1, tzinfo=UTC), None, True),  # no RTC battery
        (datetime(2025, 12, 31, tzinfo=UTC), None, True),  # before the release
        (datetime(2026, 6, 1, tzinfo=UTC), None, False),
        # went back more than a day behind what this device already wrote
        (datetime(2026, 6, 1, tzinfo=UTC), datetime(2026, 9, 1, tzinfo=UTC), True),
        (datetime(2026, 8, 31, 12, tzinfo=UTC), datetime(2026, 9, 1, tzinfo=UTC), False),
    ],
)  # fmt: skip
def test_clock_problem(now: datetime, last_seen: datetime | None, bad: bool) -> None:
    problem = clock_problem(now, last_seen)
    assert (problem is not None) is bad
    if problem:
        assert f"{now:%Y-%m-%d}" in problem and "NTP" in problem


def test_last_seen_time_is_the_newest_file(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("x")
    b.write_text("y")
    t = (CLOCK_FLOOR + timedelta(days=100)).timestamp()
    os.utime(a, (t, t))
    os.utime(b, (t + 50, t + 50))
    seen = last_seen_time([a, b, tmp_path / "missing"])
    assert seen == datetime.fromtimestamp(t + 50, timezone.utc)
    assert last_seen_time([tmp_path / "missing"]) is None


def test_the_agent_unit_waits_for_time_sync() -> None:
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "edgefleet-agent.service").read_text()
    assert "After=network-online.target time-sync.target" in unit
    assert "Wants=network-online.target time-sync.target" in unit
