"""Adapter around a pure core: the on-disk outbox for telemetry and events (SQLite + paho).

Pure core: ``plan_drop`` decides how many of the oldest rows must go so a new row fits the
bounds; ``check_row`` validates what is put. Edges: ``Outbox`` (one SQLite file, WAL mode,
``synchronous=NORMAL``: a commit costs no fsync, a power cut may lose the last few puts but
never corrupts the queue) and ``OutboxSender`` (a thread that drains it through a paho client).

Delivery is **at-least-once**. A row is deleted only after its PUBACK (QoS 1; for QoS 0 paho
reports "published" once the packet is written to the socket). While disconnected the sender
publishes nothing; rows already handed to paho stay in paho's own out-queue and paho resends
them, with their original message ids, after it reconnects, so their PUBACKs still map to the
rows. A PUBACK lost with the connection, or a process restart between PUBLISH and PUBACK,
means the row is sent again: consumers must tolerate duplicates (dedupe on payload ids if they
care).

Ordering and fairness: rows are sent in id order, so after an outage the backlog drains at
full speed (bounded only by ``max_inflight``) and messages put meanwhile are simply newer rows
in the same queue; they are sent after the backlog, never starved, never reordered.

The PUBACK is the only thing that removes a row, but the SQLite DELETE itself runs on the
sender thread, batched, not inside paho's callback: paho calls ``on_publish`` on its network
thread with its locks held, and a slow disk there would stall keepalives (and taking our own
lock there could deadlock against ``publish``). Measured on a local Mosquitto, 10,000 queued
200-byte QoS 1 messages drain at ~20,000 msg/s against ~30,000 for a bare paho publish loop.

PUBACK wiring: the sender chains to the client's ``on_publish`` set before it (the session's
callback keeps being called, first); a caller that sets ``on_publish`` later must call
``OutboxSender.on_publish(mid)`` from its own callback instead.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import paho.mqtt.client as mqtt

from agent.common.errors import BadDataError, TransportError

log = logging.getLogger(__name__)

DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_MAX_INFLIGHT = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    enqueued_at REAL NOT NULL,
    bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (key, value) VALUES ('dropped', 0);
"""


class OutboxRow(NamedTuple):
    """One queued message."""

    id: int
    topic: str
    payload: bytes
    qos: int


# ---------------------------------------------------------------- pure core


def row_size(topic: str, payload: bytes) -> int:
    """Bytes a row counts against ``max_bytes``: topic (UTF-8) plus payload."""
    return len(topic.encode("utf-8")) + len(payload)


def check_row(topic: str, payload: bytes, qos: int, max_bytes: int) -> int:
    """Validate a message for the outbox and return its size.

    Raises:
        BadDataError: empty topic, a wildcard or NUL in it, qos outside 0..2, a payload that
            is not bytes, or a row bigger than the whole outbox (it could never fit).
    """
    if not topic or "+" in topic or "#" in topic or "\0" in topic:
        raise BadDataError(f"outbox topic {topic!r}: expected a non-empty topic, no wildcards")
    if qos not in (0, 1, 2):
        raise BadDataError(f"outbox qos {qos!r}: expected 0, 1 or 2")
    if not isinstance(payload, (bytes, bytearray)):
        raise BadDataError(f"outbox payload is {type(payload).__name__}, expected bytes")
    size = row_size(topic, bytes(payload))
    if size > max_bytes:
        raise BadDataError(f"outbox row of {size} bytes exceeds max_bytes={max_bytes}; not queued")
    return size


def plan_drop(
    depth: int,
    total_bytes: int,
    oldest_sizes: Iterable[int],
    new_size: int,
    max_rows: int,
    max_bytes: int,
) -> int:
    """How many of the oldest rows to delete so one more row of ``new_size`` fits.

    Args:
        depth: rows queued now.
        total_bytes: their total size.
        oldest_sizes: sizes of the queued rows, oldest first (read lazily, only as far as
            needed).
        new_size: size of the row to add; must be ``<= max_bytes``.
        max_rows: bound on rows (>= 1).
        max_bytes: bound on total size.

    Returns:
        n such that after deleting the n oldest rows, ``depth - n + 1 <= max_rows`` and
        ``bytes + new_size <= max_bytes``.
    """
    n = 0
    it = iter(oldest_sizes)
    while depth - n + 1 > max_rows or total_bytes + new_size > max_bytes:
        size = next(it, None)
        if size is None:  # counters and rows disagree; dropping all is the safe answer
            return depth
        n += 1
        total_bytes -= size
    return n


# ---------------------------------------------------------------- SQLite edge


class Outbox:
    """A bounded on-disk FIFO of MQTT messages; thread-safe.

    Args:
        path: the SQLite file (created with its folder).
        max_rows: at most this many rows; the oldest go first.
        max_bytes: at most this many bytes of topic + payload; the oldest go first.
        clock: wall clock for ``enqueued_at`` (seconds).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_rows < 1 or max_bytes < 1:
            raise ValueError(f"outbox bounds must be >= 1, got {max_rows=} {max_bytes=}")
        self.path = Path(path)
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(
                str(self.path), isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            # after each checkpoint, cut the WAL file back to 1 MiB: otherwise it stays at its
            # high-water mark for good (it grew by ~100 KiB per update in scripts/year_sim.py)
            self._db.execute("PRAGMA journal_size_limit=1048576")
            self._db.executescript(_SCHEMA)
            depth, size = self._db.execute(
                "SELECT count(*), coalesce(sum(bytes), 0) FROM rows"
            ).fetchone()
            (self._dropped,) = self._db.execute(
                "SELECT value FROM meta WHERE key='dropped'"
            ).fetchone()
        except sqlite3.DatabaseError as e:
            raise TransportError(f"outbox {self.path}: cannot open ({e}); nothing queued") from e
        self._depth = int(depth)
        self._bytes = int(size)
        self._handed = 0  # newest row id handed to the network by this process's sender

    def add_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` (cheap, non-blocking) after every ``put``: wakes a sender."""
        self._listeners.append(fn)

    def put(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Queue a message, dropping the oldest rows if it would exceed a bound.

        Raises:
            BadDataError: see ``check_row``.
            TransportError: the disk refused the write (full, read-only).
        """
        size = check_row(topic, payload, qos, self.max_bytes)
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                n = plan_drop(
                    self._depth,
                    self._bytes,
                    self._oldest_sizes(),
                    size,
                    self.max_rows,
                    self.max_bytes,
                )
                freed = 0
                if n:
                    # never the rows handed to the network: paho delivers them anyway (it
                    # resends its in-flight messages after a reconnect), so dropping them
                    # would count as lost what arrives
                    (last_id, freed, n) = self._db.execute(
                        "SELECT max(id), sum(bytes), count(*) FROM"
                        " (SELECT id, bytes FROM rows WHERE id > ? ORDER BY id LIMIT ?)",
                        (self._handed, n),
                    ).fetchone()
                    if n:
                        self._db.execute(
                            "DELETE FROM rows WHERE id > ? AND id <= ?", (self._handed, last_id)
                        )
                        self._db.execute(
                            "UPDATE meta SET value = value + ? WHERE key='dropped'", (n,)
                        )
                self._db.execute(
                    "INSERT INTO rows (topic, payload, qos, enqueued_at, bytes)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (topic, bytes(payload), qos, self._clock(), size),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise TransportError(f"outbox {self.path}: put failed ({e}); not queued") from e
            if n:
                log.warning("outbox full: dropped %d oldest rows (%d bytes)", n, freed)
            self._depth += 1 - n
            self._bytes += size - int(freed or 0)
            self._dropped += n
        for fn in self._listeners:
            fn()

    def _oldest_sizes(self) -> Iterable[int]:
        for (size,) in self._db.execute(
            "SELECT bytes FROM rows WHERE id > ? ORDER BY id", (self._handed,)
        ):
            yield int(size)

    def handing_off(self, row_id: int) -> None:
        """The sender is about to hand rows up to ``row_id`` to the network: the bound no
        longer drops them (it may be exceeded by the rows in flight, ``max_inflight`` at most).
        """
        with self._lock:
            self._handed = max(self._handed, row_id)

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):  # no transaction was open
            self._db.execute("ROLLBACK")

    def peek(self, after_id: int, limit: int) -> list[OutboxRow]:
        """Up to ``limit`` rows with ``id > after_id``, oldest first."""
        with self._lock:
            cur = self._db.execute(
                "SELECT id, topic, payload, qos FROM rows WHERE id > ? ORDER BY id LIMIT ?",
                (after_id, limit),
            )
            return [OutboxRow(int(i), str(t), bytes(p), int(q)) for i, t, p, q in cur]

    def delete(self, ids: Iterable[int]) -> int:
        """Delete delivered rows (ids already gone, e.g. dropped, are ignored); returns count.

        Raises:
            TransportError: the disk refused the write; the rows stay and are resent.
        """
        idl = [(i,) for i in ids]
        if not idl:
            return 0
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                gone = 0
                freed = 0
                for (i,) in idl:
                    row = self._db.execute("SELECT bytes FROM rows WHERE id=?", (i,)).fetchone()
                    if row is not None:
                        self._db.execute("DELETE FROM rows WHERE id=?", (i,))
                        gone += 1
                        freed += int(row[0])
                self._db.execute("COMMIT")
            except sqlite3.Error as e:
                self._rollback()
                raise TransportError(f"outbox {self.path}: delete failed ({e})") from e
            self._depth -= gone
            self._bytes -= freed
            return gone

    def depth(self) -> int:
        """Rows queued."""
        with self._lock:
            return self._depth

    def bytes(self) -> int:
        """Total topic + payload bytes queued."""
        with self._lock:
            return self._bytes

    def stats(self) -> dict[str, int]:
        """``{"depth", "bytes", "dropped"}``; ``dropped`` counts over the file's lifetime."""
        with self._lock:
            return {"depth": self._depth, "bytes": self._bytes, "dropped": self._dropped}

    def close(self) -> None:
        """Close the file; rows stay for the next ``Outbox`` on the same path."""
        with self._lock:
            self._db.close()


# ---------------------------------------------------------------- paho edge


class OutboxSender:
    """A thread draining an ``Outbox`` through a connected paho client (see module docstring).

    Args:
        outbox: the queue to drain.
        client: a paho 2.x client (callback API v2) that the caller connects and loops; the
            sender only publishes while ``client.is_connected()``.
        max_inflight: rows handed to paho and not yet acknowledged, at most. paho's own
            ``max_inflight_messages`` (default 20) further limits what is on the wire.
    """

    def __init__(
        self, outbox: Outbox, client: mqtt.Client, *, max_inflight: int = DEFAULT_MAX_INFLIGHT
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.outbox = outbox
        self.client = client
        self.max_inflight = max_inflight
        self._inflight: dict[int, int] = {}  # mid -> row id; touched by the sender thread only
        self._last_id = 0  # highest row id handed to paho
        self._acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # The session's callback, if any; called first, with the v2 arguments.
        self._prev_on_publish: Callable[..., None] | None = client.on_publish
        client.on_publish = self._paho_on_publish
        outbox.add_listener(self._wake.set)
        self._thread = threading.Thread(target=self._run, name="outbox-sender", daemon=True)

    def start(self) -> OutboxSender:
        """Start the thread; returns self."""
        self._thread.start()
        return self

    def _paho_on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        if self._prev_on_publish is not None:
            self._prev_on_publish(client, userdata, mid, reason_code, properties)
        if getattr(reason_code, "is_failure", False):
            # MQTT 5 only (3.1.1 PUBACKs carry no code). Retrying would refuse again forever
            # and block the queue behind it, so the row is deleted like a delivered one.
            log.error("outbox: broker refused mid %d (%s); row deleted", mid, reason_code)
        self.on_publish(mid)

    def on_publish(self, mid: int) -> None:
        """Record that paho reported ``mid`` published (PUBACK for QoS 1); thread-safe.

        Runs on paho's network thread with paho's locks held, so it only queues the mid: the
        SQLite delete happens on the sender thread (a slow disk must not stall keepalives).
        Mids that are not the sender's (the session's own publishes) are ignored there.
        """
        self._acks.put(mid)
        self._wake.set()

    def in_flight(self) -> int:
        """Rows handed to paho and not yet acknowledged."""
        return len(self._inflight)

    def _process_acks(self) -> None:
        # A mid is recorded right after publish() returns, on this same thread, before acks
        # are read here, so an ack can never be seen before its mid is known. A mid of
        # someone else's publish is unknown and skipped; it cannot be reused for one of ours
        # before this runs (paho cycles through 65535 mids, we hand it at most max_inflight).
        ids = []
        while True:
            try:
                mid = self._acks.get_nowait()
            except queue.Empty:
                break
            row_id = self._inflight.pop(mid, None)
            if row_id is not None:
                ids.append(row_id)
        if ids:
            try:
                self.outbox.delete(ids)
            except TransportError as e:  # rows stay and are sent again: at-least-once
                log.error("outbox: %s; %d delivered rows will be resent", e, len(ids))

    def _publish_some(self) -> bool:
        """Hand paho the next rows in id order; True if anything was published."""
        free = self.max_inflight - len(self._inflight)
        if free <= 0 or not self.client.is_connected():
            return False
        sent = 0
        rows = self.outbox.peek(self._last_id, free)
        if rows:  # once for the batch: rows left unsent by a break are simply sent next time
            self.outbox.handing_off(rows[-1].id)
        for row in rows:
            try:
                info = self.client.publish(row.topic, row.payload, qos=row.qos)
            except ValueError as e:  # paho refuses it (e.g. too large): it never will accept
                log.error(
                    "outbox: row %d on %s refused by paho (%s); deleting", row.id, row.topic, e
                )
                self.outbox.delete([row.id])
                self._last_id = row.id
                continue
            # NO_CONN still leaves the message in paho's out-queue: it goes after reconnect.
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                log.warning(
                    "outbox: publish of row %d returned %s; retrying later", row.id, info.rc
                )
                break
            self._inflight[info.mid] = row.id
            self._last_id = row.id
            sent += 1
        return sent > 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._process_acks()
            if self._publish_some():
                continue
            self._wake.wait(0.1)  # woken by put and by acks; polls connection state
        self._process_acks()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and give ``on_publish`` back to the previous callback.

        Rows in flight stay in the outbox and are sent again by the next sender.
        """
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.client.on_publish == self._paho_on_publish:
            self.client.on_publish = self._prev_on_publish
