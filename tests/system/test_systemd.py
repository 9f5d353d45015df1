"""sd_notify over a real datagram socket, the watchdog settings, and the progress rule."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.systemd import Liveness, notify, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    s.bind(path)
    s.settimeout(2)
    yield s, path
    s.close()


def test_notify_sends_a_datagram(notify_socket: tuple[socket.socket, str]) -> None:
    s, path = notify_socket
    assert notify("READY=1\nSTATUS=running", {"NOTIFY_SOCKET": path})
    assert s.recv(4096) == b"READY=1\nSTATUS=running"


def test_notify_abstract_namespace() -> None:
    name = f"edgefleet-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(2)
        assert notify("WATCHDOG=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(64) == b"WATCHDOG=1"


def test_notify_without_systemd_or_with_a_dead_socket(tmp_path: Path) -> None:
    assert notify("READY=1", {}) is False
    assert notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


@pytest.mark.parametrize(
    "env,pid,expected",
    [
        ({}, 1, None),
        ({"WATCHDOG_USEC": "20000000"}, 1, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "1"}, 1, 10.0),
        ({"WATCHDOG_USEC": "20000000", "WATCHDOG_PID": "2"}, 1, None),  # someone else's
        ({"WATCHDOG_USEC": "0"}, 1, None),
        ({"WATCHDOG_USEC": "soon"}, 1, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], pid: int, expected: float | None) -> None:
    assert watchdog_interval(env, pid) == expected


def _st(name: str, inferred: int, *, model: str | None = "det@1", source: str = "streaming",
        finished: bool = False) -> dict[str, Any]:  # fmt: skip
    return {"name": name, "frames_inferred": inferred, "model": model,
            "source_state": source, "finished": finished}  # fmt: skip


def test_progress_keeps_the_watchdog_fed() -> None:
    live = Liveness(stall_s=10)
    for t in range(0, 100, 5):
        assert live.check([_st("a", t), _st("b", 2 * t)], float(t)) == []


def test_hung_inference_is_stalled_after_stall_s() -> None:
    live = Liveness(stall_s=10)
    assert live.check([_st("a", 5), _st("b", 5)], 0.0) == []
    assert live.check([_st("a", 5), _st("b", 9)], 10.0) == []  # a: exactly 10 s, not yet
    stalled = live.check([_st("a", 5), _st("b", 12)], 10.5)
    assert stalled == ["a: no frame inferred for 10 s while its source is streaming"]
    assert live.check([_st("a", 6), _st("b", 13)], 11.0) == []  # it recovered


@pytest.mark.parametrize(
    "waiting",
    [_st("a", 5, model=None), _st("a", 5, source="connecting"), _st("a", 5, source="waiting"),
     _st("a", 5, source="ended"), _st("a", 5, finished=True)],
)  # fmt: skip
def test_legitimate_waits_never_stall(waiting: dict[str, Any]) -> None:
    live = Liveness(stall_s=10)
    for t in range(0, 300, 7):
        assert live.check([waiting], float(t)) == []
    # the stall clock restarts at the last check that saw the wait (t = 294): streaming
    # again with no frame yet is fine for stall_s after that, then stalled
    resumed = {**waiting, "model": "det@1", "source_state": "streaming", "finished": False}
    assert live.check([resumed], 300.0) == []
    assert live.check([resumed], 304.0) == []
    assert live.check([resumed], 305.0) == [
        "a: no frame inferred for 11 s while its source is streaming"
    ]
