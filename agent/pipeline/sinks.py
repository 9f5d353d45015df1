"""Adapter: where inference events go (a JSONL file, an in-process callback).

A sink takes one event dict per inferred frame. Sinks never raise into the pipeline: a sink
that fails counts an error and the frame's result is lost for that sink only.
"""

from __future__ import annotations

import abc
import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar


class Sink(abc.ABC):
    """Receives inference events."""

    # True for sinks that also need the frame (snapshots): the pipeline then calls emit_frame.
    wants_frame: ClassVar[bool] = False

    @abc.abstractmethod
    def emit(self, event: dict[str, Any]) -> None:
        """Deliver one event."""

    def emit_frame(self, event: dict[str, Any], image: Any) -> None:
        """Deliver one event with its frame (BGR ``uint8`` array); only if ``wants_frame``."""
        self.emit(event)

    def close(self) -> None:  # noqa: B027 - optional hook
        """Flush and release."""


class CallbackSink(Sink):
    """Calls a function with each event (tests, the demo, the local API)."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self._fn = fn

    def emit(self, event: dict[str, Any]) -> None:
        self._fn(event)


class JsonlSink(Sink):
    """Appends one JSON line per event; rotates to ``NAME.1`` past ``max_bytes``.

    Lines are written whole with one ``write`` call on an append-mode file, so a power cut
    leaves at worst a last line without its newline, which readers skip.
    """

    def __init__(self, path: str | os.PathLike[str], *, max_bytes: int = 64 << 20) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - long-lived handle
        self._size = self.path.stat().st_size

    def emit(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with self._lock:
            if self._size + len(line) > self.max_bytes and self._size > 0:
                self._fh.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                self._size = 0
            self._fh.write(line)
            self._fh.flush()
            self._size += len(line)

    def close(self) -> None:
        with self._lock:
            self._fh.close()
