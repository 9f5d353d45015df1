"""Maintenance windows: parsing, inside/outside, next opening — midnight wrap, several windows,
naive local times (no daylight-saving arithmetic)."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from agent.common.errors import ConfigError
from agent.common.window import Window, inside, parse_windows, until_open, wait_text
from agent.config import parse_config

DAY = datetime(2026, 3, 29)  # a European DST night: local times stay naive clock readings


def at(hhmm: str) -> datetime:
    h, m = hhmm.split(":")
    return DAY.replace(hour=int(h), minute=int(m))


@pytest.mark.parametrize(
    ("text", "windows"),
    [
        ("02:00-05:00", (Window(120, 300),)),
        ("22:00-02:00", (Window(1320, 120),)),
        (" 22:00 - 23:00 , 2:00-4:30", (Window(1320, 1380), Window(120, 270))),
        ("23:00-24:00", (Window(1380, 0),)),
    ],
)
def test_parse(text: str, windows: tuple[Window, ...]) -> None:
    assert parse_windows(text) == windows


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "empty"),
        ("02:00", "HH:MM-HH:MM"),
        ("2-5", "HH:MM-HH:MM"),
        ("25:00-02:00", "not a time of day"),
        ("02:60-03:00", "not a time of day"),
        ("24:00-02:00", "not a time of day"),
        ("03:00-03:00", "starts when it ends"),
        ("02:00-05:00,", "HH:MM-HH:MM"),
    ],
)
def test_bad_windows_say_why(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_windows(text)


@pytest.mark.parametrize(
    ("text", "now", "is_inside", "opens_in_min"),
    [
        ("02:00-05:00", "01:59", False, 1),
        ("02:00-05:00", "02:00", True, 0),
        ("02:00-05:00", "04:59", True, 0),
        ("02:00-05:00", "05:00", False, 21 * 60),  # end is exclusive: tomorrow's
        ("22:00-02:00", "23:30", True, 0),  # across midnight, before it
        ("22:00-02:00", "01:00", True, 0),  # across midnight, after it
        ("22:00-02:00", "02:00", False, 20 * 60),
        ("22:00-02:00", "12:00", False, 10 * 60),
        ("22:00-23:00,02:00-04:00", "23:10", False, 170),  # the next is after midnight
        ("22:00-23:00,02:00-04:00", "05:00", False, 17 * 60),
        ("22:00-23:00,02:00-04:00", "03:00", True, 0),
    ],
)
def test_inside_and_next_opening(text: str, now: str, is_inside: bool, opens_in_min: int) -> None:
    w = parse_windows(text)
    assert inside(w, at(now)) is is_inside
    assert until_open(w, at(now)) == timedelta(minutes=opens_in_min)


def test_no_window_means_always() -> None:
    assert inside((), at("13:00")) and until_open((), at("13:00")) == timedelta(0)


def test_wait_text_names_the_window_and_rounds_up() -> None:
    w = parse_windows("02:00-05:00")
    text = wait_text(w, at("22:47") + timedelta(seconds=30))
    assert text == (
        "activation waits for maintenance window 02:00-05:00 (device local time), "
        "next opens in 3 h 13 min"
    )
    assert wait_text(w, at("01:59") + timedelta(seconds=59)).endswith("next opens in 1 min")


def test_config_refuses_a_bad_window_naming_the_field(tmp_path: object) -> None:
    base = {"device_id": "cam-01", "data_dir": "/tmp/x", "profile": "x86-cpu", "pipelines": []}
    ok = parse_config({**base, "update": {"maintenance_window": "22:00-02:00"}})
    assert ok.update.maintenance_window == "22:00-02:00"
    with pytest.raises(ConfigError) as ei:
        parse_config({**base, "update": {"maintenance_window": "2am-5am"}})
    assert "maintenance_window" in str(ei.value) and "HH:MM-HH:MM" in str(ei.value)
