"""Pure: asking long work on another thread to stop, and saying why.

An update's download and engine build run on the update manager's thread; the MQTT thread
(a newer desired state) and the command handler (an operator's cancel) must stop them without
doing the work themselves. They ``request`` on an ``Interrupt``; the transfer and the build
poll ``is_set`` (the chunk client's stop flag, ``agent.engine.build_child``) and raise; the
manager ``take``s the request to learn what to do. The agent stopping counts as set too (the
``stop`` event given), but is never taken: it stays the manager's own signal.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal, Protocol

Kind = Literal["newer", "cancel"]


class StopFlag(Protocol):
    """What long work polls: ``threading.Event`` and ``Interrupt`` both are one."""

    def is_set(self) -> bool: ...


class Interrupted(Exception):
    """Work stopped on request (not bad data, not transport trouble): what it produced so far
    is kept. Deliberately not an ``EdgefleetError``: no handler may take it for a failure of
    the model or the network."""


@dataclass(frozen=True)
class Request:
    """Why the running update should stop: ``newer`` (a newer desired state to check) or
    ``cancel`` (the operator's reason in ``reason``)."""

    kind: Kind
    reason: str = ""


class Interrupt:
    """A thread-safe stop request for the work running now; a cancel outranks a newer state."""

    def __init__(self, stop: threading.Event | None = None) -> None:
        self._stop = stop
        self._lock = threading.Lock()
        self._request: Request | None = None
        self.wake = threading.Event()  # set with each request: waits poll it

    def request(self, kind: Kind, reason: str = "") -> None:
        with self._lock:
            if self._request is None or kind == "cancel":
                self._request = Request(kind, reason)
        self.wake.set()

    def is_set(self) -> bool:
        """True while a request is pending or the agent stops."""
        return self._request is not None or (self._stop is not None and self._stop.is_set())

    def pending(self) -> Request | None:
        return self._request

    def take(self) -> Request | None:
        """The pending request, cleared."""
        with self._lock:
            req, self._request = self._request, None
        self.wake.clear()
        return req


_BUILD_FLAG: ContextVar[StopFlag | None] = ContextVar("edgefleet_build_stop", default=None)


@contextmanager
def stop_builds_on(flag: StopFlag) -> Iterator[None]:
    """Engine builds waited for on this thread inside the block stop when ``flag`` is set
    (the child is killed, ``Interrupted`` raised). A context variable rather than a parameter
    threaded through every layer that opens a model (``agent.models`` → ``agent.engine``)."""
    token = _BUILD_FLAG.set(flag)
    try:
        yield
    finally:
        _BUILD_FLAG.reset(token)


def build_stop_requested() -> bool:
    """True when the block around the current build (``stop_builds_on``) asks it to stop."""
    flag = _BUILD_FLAG.get()
    return flag is not None and flag.is_set()
