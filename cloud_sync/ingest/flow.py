"""Pure core (threads, no I/O): the ingest worker's window of received, unacknowledged messages.

An ingest worker acknowledges a QoS 1 message only once it is committed to the database (or
dead-lettered there), so the broker keeps everything else. The window holds what was received
and is not yet acknowledged, bounded in messages and bytes: when it is full, ``admit`` blocks
the MQTT reader, which stops reading the socket, and the broker's persistent session holds the
rest (its ``max_queued_messages`` / ``max_queued_bytes``). Acknowledgements leave in the order
the messages arrived (MQTT 3.1.1 §4.6: "It MUST send PUBACK packets in the order in which the
corresponding PUBLISH packets were received"), even when state messages were written first.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable

# What one queued message costs besides its payload and topic characters: the Received object,
# the bytes and str headers, its queue and ledger slots (measured with tracemalloc: ~190 bytes
# on CPython 3.11; rounded up).
ITEM_OVERHEAD = 256


class Received:
    """One message from the broker, from receipt until it is acknowledged.

    Attributes:
        topic: the MQTT topic (text; a topic that is not UTF-8 arrives as a readable stand-in).
        payload: the bytes as received.
        mid: the MQTT packet id, for the acknowledgement.
        qos: 0 (nothing to acknowledge), 1 or 2.
        epoch: the connection it arrived on; an acknowledgement goes out only on that one.
        size: what it counts against the window's byte bound.
        done: stored, dead-lettered or dropped: due for acknowledgement.
    """

    __slots__ = ("done", "epoch", "mid", "payload", "qos", "size", "topic")

    def __init__(self, topic: str, payload: bytes, mid: int = 0, qos: int = 0, epoch: int = 0):
        self.topic = topic
        self.payload = payload
        self.mid = mid
        self.qos = qos
        self.epoch = epoch
        self.size = len(payload) + len(topic) + ITEM_OVERHEAD
        self.done = False

    def __repr__(self) -> str:
        return f"Received({self.topic!r}, {len(self.payload)} bytes, mid={self.mid})"


class AckWindow:
    """The received messages not yet acknowledged: at most ``max_messages`` and ``max_bytes``.

    ``admit`` (the MQTT reader) waits for room; ``settle`` (the writer) marks messages handled
    and returns those now due for acknowledgement, oldest first, freeing their room. One
    message larger than ``max_bytes`` is admitted when the window is empty, so it cannot stall
    the worker. Thread-safe.
    """

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        if max_messages < 1 or max_bytes < 1:
            raise ValueError(
                f"window bounds must be >= 1, got {max_messages} messages, {max_bytes} bytes"
            )
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 0
        self.bytes = 0
        self.peak_messages = 0
        self.peak_bytes = 0
        self.full_waits = 0  # how often the reader had to wait for room
        self.full_s = 0.0  # and for how long in all
        self._ledger: deque[Received] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def _room_for(self, size: int) -> bool:
        return self.messages == 0 or (
            self.messages < self.max_messages and self.bytes + size <= self.max_bytes
        )

    def admit(self, item: Received) -> bool:
        """Take ``item`` into the window, waiting while it is full.

        Returns:
            False when the window was closed (the worker stops): the message is not taken, and
            not acknowledged, so the broker delivers it again.
        """
        with self._cond:
            if not self._closed and not self._room_for(item.size):
                self.full_waits += 1
                t0 = time.monotonic()
                while not self._closed and not self._room_for(item.size):
                    self._cond.wait()
                self.full_s += time.monotonic() - t0
            if self._closed:
                return False
            self._ledger.append(item)
            self.messages += 1
            self.bytes += item.size
            self.peak_messages = max(self.peak_messages, self.messages)
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            return True

    def settle(self, items: Iterable[Received]) -> list[Received]:
        """Mark ``items`` handled; return every message now due for acknowledgement.

        Those are the handled ones at the head of the ledger, in the order they were admitted:
        a handled message behind an unhandled one waits for it.
        """
        with self._cond:
            for it in items:
                it.done = True
            due: list[Received] = []
            ledger = self._ledger
            while ledger and ledger[0].done:
                it = ledger.popleft()
                self.messages -= 1
                self.bytes -= it.size
                due.append(it)
            if due:
                self._cond.notify_all()
            return due

    def close(self) -> None:
        """Admit nothing more and release a waiting reader (the worker stops)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
