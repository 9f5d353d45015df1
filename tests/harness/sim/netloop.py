"""Adapter: many paho clients driven from one thread (paho's external-event-loop API).

``loop_start`` gives every paho client a thread of its own; a simulated fleet of 1,000
devices would then run 1,000 network threads that wake every second for nothing. ``MqttLoop``
drives any number of clients from one thread with a ``selectors`` selector instead:
``on_socket_open``/``on_socket_close`` (un)register the socket for reading,
``on_socket_register_write``/``on_socket_unregister_write`` toggle write interest (paho calls
them from whichever thread publishes, so they are posted to the loop thread), and the loop
calls ``loop_read``/``loop_write`` on readiness and ``loop_misc`` (keepalive) once a second.

Reconnecting is the loop's job in this mode (``loop_forever`` is what does it normally): a
client that lost its socket is reconnected after a delay doubling from ``min_delay_s`` to
``max_delay_s`` with a per-client random factor, so a fleet that lost the broker together
does not come back in lock-step. ``reconnect()`` opens the TCP connection blocking (paho's
``connect_timeout``, 5 s by default): fine on a LAN or loopback, which is where the simulator
runs.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import random
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

MISC_EVERY_S = 1.0


@dataclass(eq=False)
class _Entry:
    """One client the loop drives."""

    client: mqtt.Client
    host: str
    port: int
    keepalive: int
    connect_at: float | None  # monotonic time of the next (re)connect attempt
    delay_s: float
    jitter: float
    active: bool = True
    sock: Any = None
    write: bool = False


class MqttLoop:
    """One thread, one selector, many paho clients.

    Args:
        name: thread name.
        min_delay_s: first reconnect delay (times a per-client factor in [1, 2)).
        max_delay_s: cap of the reconnect delay.
        rng: jitter source (injectable for tests).
    """

    def __init__(
        self,
        name: str = "mqtt-loop",
        *,
        min_delay_s: float = 1.0,
        max_delay_s: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.min_delay_s = min_delay_s
        self.max_delay_s = max_delay_s
        self._rng = rng or random.Random()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._cmds: SimpleQueue[Callable[[], None]] = SimpleQueue()
        self._woken = False  # a wake-up byte is on its way: later posts need not send one
        self._entries: dict[int, _Entry] = {}
        self._due: list[tuple[float, int, _Entry]] = []  # heap of (connect_at, seq, entry)
        self._seq = itertools.count()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.connect_attempts = 0
        self.connect_failures = 0

    # --- public API (any thread) -----------------------------------------------------------

    def start(self) -> MqttLoop:
        """Start the loop thread; returns self."""
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread, close every socket still open and the selector."""
        self._stop.set()
        self._wake()
        if self._thread.is_alive():
            self._thread.join(timeout)
        for entry in list(self._entries.values()):
            self._close_socket(entry)
        self._entries.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self, client: mqtt.Client, host: str, port: int, *, keepalive: int = 60, delay_s: float = 0
    ) -> None:
        """Drive ``client`` from now on; its first connect is attempted after ``delay_s``.

        Takes over the client's socket callbacks (a previous ``on_socket_open``, such as
        ``make_client``'s TCP_NODELAY, is still called first).
        """
        entry = _Entry(
            client,
            host,
            port,
            keepalive,
            connect_at=None,
            delay_s=self.min_delay_s,
            jitter=self._rng.uniform(1.0, 2.0),
        )
        first = time.monotonic() + max(0.0, delay_s)
        prev_open = client.on_socket_open

        def on_open(c: mqtt.Client, ud: Any, sock: Any) -> None:
            if prev_open is not None:
                prev_open(c, ud, sock)
            self._post(lambda: self._register(entry, sock))

        client.on_socket_open = on_open
        client.on_socket_close = lambda c, ud, sock: self._post(lambda: self._unregister(entry))
        client.on_socket_register_write = lambda c, ud, sock: self._post(
            lambda: self._want_write(entry, True)
        )
        client.on_socket_unregister_write = lambda c, ud, sock: self._post(
            lambda: self._want_write(entry, False)
        )
        client.connect_async(host, port, keepalive=keepalive)

        def enrol() -> None:
            self._entries[id(client)] = entry
            self._schedule(entry, first)

        self._post(enrol)

    def release(self, client: mqtt.Client) -> None:
        """Stop reconnecting ``client`` (call before disconnecting it); traffic still flows."""

        def mark() -> None:
            entry = self._entries.get(id(client))
            if entry is not None:
                entry.active = False
                entry.connect_at = None

        self.call(mark)

    def remove(self, client: mqtt.Client, timeout: float = 5.0) -> None:
        """Forget ``client``; its socket, if still open, is closed. Blocks until done."""

        def drop() -> None:
            entry = self._entries.pop(id(client), None)
            if entry is not None:
                self._close_socket(entry)

        self.call(drop, timeout=timeout)

    def call(self, fn: Callable[[], None], timeout: float = 5.0) -> None:
        """Run ``fn`` on the loop thread and wait for it (inline when the loop is not running)."""
        if threading.current_thread() is self._thread or not self._thread.is_alive():
            fn()
            return
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        self._post(run)
        done.wait(timeout)

    def connected(self) -> int:
        """How many of the clients are connected now."""
        return sum(1 for e in list(self._entries.values()) if e.client.is_connected())

    # --- loop thread -----------------------------------------------------------------------

    def _post(self, fn: Callable[[], None]) -> None:
        if threading.current_thread() is self._thread:
            fn()
            return
        self._cmds.put(fn)
        if not self._woken:  # the loop clears it before draining the queue
            self._wake()

    def _wake(self) -> None:
        self._woken = True
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    def _register(self, entry: _Entry, sock: Any) -> None:
        self._unregister(entry)
        entry.sock, entry.write = sock, False
        try:
            self._sel.register(sock, selectors.EVENT_READ, entry)
        except (ValueError, KeyError, OSError) as e:  # closed already: the next misc pass sees it
            log.debug("%s: socket not registered: %s", self.name, e)
            entry.sock = None

    def _schedule(self, entry: _Entry, at: float) -> None:
        entry.connect_at = at
        heapq.heappush(self._due, (at, next(self._seq), entry))

    def _backoff(self, entry: _Entry, now: float) -> None:
        self._schedule(entry, now + entry.delay_s * entry.jitter)
        entry.delay_s = min(self.max_delay_s, entry.delay_s * 2)

    def _unregister(self, entry: _Entry) -> None:
        sock, entry.sock = entry.sock, None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self._sel.unregister(sock)

    def _want_write(self, entry: _Entry, on: bool) -> None:
        if entry.sock is None or entry.write == on:
            return
        entry.write = on
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if on else 0)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.modify(entry.sock, events, entry)

    def _close_socket(self, entry: _Entry) -> None:
        """Close what paho still holds open for a client the loop lets go of."""
        self._unregister(entry)
        client = entry.client
        if client.socket() is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_write()
        sock = client.socket()
        if sock is not None:  # the DISCONNECT could not be written: close it ourselves
            with contextlib.suppress(Exception):
                sock.close()

    def _run(self) -> None:
        next_misc = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            first_due = self._due[0][0] if self._due else next_misc
            timeout = max(0.0, min(next_misc, first_due) - now)
            for key, mask in self._sel.select(min(timeout, MISC_EVERY_S)):
                entry = key.data
                if entry is None:
                    with contextlib.suppress(BlockingIOError, OSError):
                        self._wake_r.recv(4096)
                    # before the commands run: whatever is posted from now on wakes us again
                    self._woken = False
                    continue
                self._io(entry, mask)
            self._run_commands()
            now = time.monotonic()
            if now >= next_misc:
                next_misc = now + MISC_EVERY_S
                self._misc(now)
            self._connect_due(now)

    def _run_commands(self) -> None:
        while True:
            try:
                fn = self._cmds.get_nowait()
            except Empty:
                return
            try:
                fn()
            except Exception:  # a bad command must not stop every client's network
                log.exception("%s: command failed", self.name)

    def _io(self, entry: _Entry, mask: int) -> None:
        client = entry.client
        try:
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        except Exception:  # a callback's bug costs this client's connection, not the loop
            log.exception("%s: client %s failed in its network callbacks", self.name, client)
        if client.socket() is None:
            self._unregister(entry)

    def _misc(self, now: float) -> None:
        for entry in list(self._entries.values()):
            client = entry.client
            if client.socket() is not None:
                with contextlib.suppress(Exception):
                    client.loop_misc()
                if client.is_connected():
                    entry.delay_s = self.min_delay_s
            if client.socket() is None:
                self._unregister(entry)
                if entry.active and entry.connect_at is None:
                    self._backoff(entry, now)

    def _connect_due(self, now: float) -> None:
        while self._due and self._due[0][0] <= now:
            at, _, entry = heapq.heappop(self._due)
            if entry.connect_at != at or not entry.active or id(entry.client) not in self._entries:
                continue  # rescheduled, released or removed since
            entry.connect_at = None
            self.connect_attempts += 1
            try:
                entry.client.reconnect()
            except (OSError, ValueError) as e:
                self.connect_failures += 1
                log.debug("%s: connect to %s:%d failed: %s", self.name, entry.host, entry.port, e)
                self._backoff(entry, now)
