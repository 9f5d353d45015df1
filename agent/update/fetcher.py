"""Adapter: files from the registry in byte windows over MQTT, resumable, and ngclient's fetcher.

``ChunkClient`` asks for ``(path, offset, length)`` windows on the device's ``fetch/req`` topic
and matches answers on ``fetch/resp`` by request id: several windows in flight, answers in any
order, each request timed out and retried with backoff, a minimum-rate guard, and a size cap
learnt from the first answer (the endless-data defence).

Flow control (``docs/protocol.md``, ``agent.protocol.fetch``): the timeout of a window adapts to
measured round trips like TCP's (RFC 6298: SRTT + 4·RTTVAR, Karn's rule, doubled on a timeout,
within a floor and a cap); the number of windows in flight is an AIMD congestion window
(halved once per loss event, +1 per window answered, never above ``window``); a ``busy`` answer
parks the transfer for ``retry_after_s`` (with jitter), one probe at a time, without using up
retries and without the minimum-rate guard running. ``fetch_file`` keeps the partial file
and a sidecar in ``resume_dir`` so that a new client, even in a new process, continues from the
verified prefix on disk without asking for those bytes again.

``MqttFetcher`` is python-tuf's ``FetcherInterface`` on top: ``_fetch`` yields chunks so that
ngclient's own length caps apply, and errors become the ``tuf.api.exceptions`` ngclient knows
(``not_found`` → ``DownloadHTTPError(…, 404)``, which ngclient reads as "no newer root" when it
probes ``N+1.root.json``). Content is never trusted here: ngclient verifies length and hashes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import queue
import random
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from tuf.api import exceptions as tuf_exc
from tuf.ngclient.fetcher import FetcherInterface

from agent.common.errors import BadDataError, TransportError
from agent.common.fsutil import atomic_write_json, fsync_dir
from agent.common.mqtt import CallbackGuard
from agent.protocol.fetch import (
    _PATH_PATTERN,
    MAX_CHUNK,
    FetchHeader,
    FetchRequest,
    decode_response,
)
from agent.protocol.topics import DEFAULT_ROOT, Topics
from agent.protocol.wire import BadMessage

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
_PATH_RE = re.compile(_PATH_PATTERN)
_SIDECAR_VERSION = 1
_POLL_S = 0.1  # how often an idle transfer looks at the connection state and stop event
# ... and one waiting in the registry's line (``busy``): nothing is due before its probe, so
# it wakes less often (a fleet parks hundreds of transfers; each wake-up costs a thread switch)
_PARKED_POLL_S = 0.5


class RemoteNotFoundError(BadDataError):
    """The registry has no such file. Attributes: ``path``."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class FileTooLargeError(BadDataError):
    """The file is larger than the caller's cap. Attributes: ``path``, ``total``, ``max_length``."""

    def __init__(self, message: str, *, path: str, total: int, max_length: int) -> None:
        super().__init__(message)
        self.path = path
        self.total = total
        self.max_length = max_length


class RequestRefusedError(BadDataError):
    """The registry answered ``bad_request`` (path outside the repository, malformed)."""


class ChunkProtocolError(BadDataError):
    """An answer contradicting its request or earlier answers (size changed, short data)."""


class ChunkTimeoutError(TransportError):
    """A window was not answered after all retries. Attributes: ``path``, ``offset``."""

    def __init__(self, message: str, *, path: str, offset: int) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class SlowTransferError(TransportError):
    """Fewer bytes than ``min_rate_bps`` allows over the guard span. Attributes: ``path``."""

    def __init__(self, message: str, *, path: str) -> None:
        super().__init__(message)
        self.path = path


class FetchStoppedError(TransportError):
    """The client's ``stop_event`` was set while a transfer ran (the partial is kept)."""


class _PartialMismatch(BadDataError):
    """The registry's size differs from the partial file's sidecar: start over."""


@dataclass(frozen=True)
class FetchedRange:
    """Bytes of one range and the size of the whole file."""

    data: bytes
    total: int


@dataclass
class _Slot:
    """One window in flight."""

    rid: str
    offset: int
    length: int
    attempts: int = 0
    deadline: float = 0.0
    resend_at: float | None = None
    sent: float = 0.0  # clock() of the last send
    after_busy: bool = False  # the next send repeats a request the registry answered busy


def resume_key(path: str) -> str:
    """Name of a path's partial download in ``resume_dir``: hex sha256 of the path."""
    return hashlib.sha256(path.encode()).hexdigest()


class ChunkClient:
    """Windowed, retrying, resumable downloads over one device's fetch topics.

    Args:
        client: a paho client, connected (or connecting) with its loop running. Only a topic
            callback is added (``message_callback_add``); ``on_connect`` stays the session's,
            which should call ``resubscribe()`` after each reconnect (the client also
            resubscribes by itself after a timeout or a reconnect it notices).
        device_id: this device's id.
        root: topic root.
        chunk_size: bytes per window (≤ 256 KiB; the default stays far under AWS IoT's 128 KB).
        window: windows in flight, and the bound on out-of-order windows held in memory.
        request_timeout_s: time for one window's answer before it is asked again, until
            round trips have been measured (then SRTT + 4·RTTVAR, see ``min_timeout_s``).
        retries: re-sends per window before ``ChunkTimeoutError``.
        min_rate_bps: slower than this over ``rate_span_s`` → ``SlowTransferError``; 0 = off.
        rate_span_s: the span of the rate guard.
        backoff_s: first wait before a re-send, doubled per attempt up to ``backoff_max_s``.
        backoff_max_s: cap of that wait.
        checkpoint_bytes: the sidecar is rewritten after this much progress (and on exit).
        clock: monotonic seconds (injectable for tests).
        min_timeout_s: floor of the adaptive timeout (at most ``request_timeout_s``).
        max_timeout_s: cap of the adaptive timeout (at least ``request_timeout_s``).
        max_busy_wait_s: longest wait in the registry's line (``busy``) before giving up.
        stop_event: when set, a running transfer stops with ``FetchStoppedError``.
        rng: jitter of the waits after ``busy``.
        flow_fields: send ``sent_at``/``timeout_s``/``busy_ok`` (turned off by itself when a
            registry that predates them refuses them).

    Raises:
        ValueError: a parameter out of range or a device id that is not topic-safe.

    Counters (read any time): ``bytes_requested`` (all windows sent, re-sends included),
    ``bytes_received`` (data in accepted answers), ``bytes_refetched`` (bytes asked again by
    re-sends), ``duplicate_responses`` (a second answer to a window, seen while its transfer
    runs), ``stale_responses`` (answers no transfer waits for: late duplicates, answers to
    someone else's junk), ``bad_responses`` (undecodable), ``busy_responses`` (``busy``
    answers), ``timeouts`` (windows unanswered in time), ``window_cuts`` (halvings of
    ``cwnd``); and the flow state ``rto`` (current timeout), ``srtt``, ``cwnd``. ``guard``
    counts, by reason, the answers the response callback dropped (undecodable ones included).
    """

    def __init__(
        self,
        client: mqtt.Client,
        device_id: str,
        *,
        root: str = DEFAULT_ROOT,
        chunk_size: int = 64 * 1024,
        window: int = 8,
        request_timeout_s: float = 5.0,
        retries: int = 5,
        min_rate_bps: int = 10_000,
        rate_span_s: float = 10.0,
        backoff_s: float = 0.2,
        backoff_max_s: float = 5.0,
        checkpoint_bytes: int = 1 << 20,
        clock: Callable[[], float] = time.monotonic,
        min_timeout_s: float = 1.0,
        max_timeout_s: float = 60.0,
        max_busy_wait_s: float = 1800.0,
        stop_event: threading.Event | None = None,
        rng: random.Random | None = None,
        flow_fields: bool = True,
    ) -> None:
        if not 1 <= chunk_size <= MAX_CHUNK:
            raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK}, got {chunk_size}")
        if window < 1 or retries < 0 or request_timeout_s <= 0 or rate_span_s <= 0:
            raise ValueError("window >= 1, retries >= 0, request_timeout_s > 0, rate_span_s > 0")
        if min_rate_bps < 0 or backoff_s < 0 or backoff_max_s < backoff_s:
            raise ValueError("min_rate_bps >= 0 and 0 <= backoff_s <= backoff_max_s")
        if min_timeout_s <= 0 or max_timeout_s <= 0 or max_busy_wait_s < 0:
            raise ValueError("min_timeout_s > 0, max_timeout_s > 0, max_busy_wait_s >= 0")
        topics = Topics(root)
        self.req_topic = topics.device(device_id, "fetch/req")
        self.resp_topic = topics.device(device_id, "fetch/resp")
        self.device_id = device_id
        self.chunk_size = chunk_size
        self.window = window
        self.request_timeout_s = request_timeout_s
        self.retries = retries
        self.min_rate_bps = min_rate_bps
        self.rate_span_s = rate_span_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.checkpoint_bytes = checkpoint_bytes
        self.clock = clock
        self.bytes_requested = 0
        self.bytes_received = 0
        self.bytes_refetched = 0
        self.duplicate_responses = 0
        self.stale_responses = 0
        self.bad_responses = 0
        self.busy_responses = 0
        self.timeouts = 0
        self.window_cuts = 0
        self.min_timeout_s = min(min_timeout_s, request_timeout_s)
        self.max_timeout_s = max(max_timeout_s, request_timeout_s)
        self.max_busy_wait_s = max_busy_wait_s
        self.stop_event = stop_event
        self.flow_fields = flow_fields
        self.rng = rng or random.Random()
        self.rto = request_timeout_s
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.cwnd = float(window)
        self._last_cut = -math.inf
        self._client = client
        self._lock = threading.Lock()
        self._routes: dict[str, queue.SimpleQueue[tuple[FetchHeader, bytes]]] = {}
        self._token = secrets.token_hex(4)
        self._seq = 0
        # paho's network thread runs the callback: whatever an answer holds must not end it
        self.guard = CallbackGuard(f"device={device_id} fetch")
        client.message_callback_add(self.resp_topic, self.guard.wrap(self._on_message))
        self.resubscribe()

    # -- MQTT plumbing ------------------------------------------------------------------

    def resubscribe(self) -> None:
        """(Re)subscribe to this device's response topic; idempotent, cheap.

        A failure (not connected) is left to the next call: transfers call this after a
        timeout or a reconnect they notice, the session from its ``on_connect``.
        """
        rc, _ = self._client.subscribe(self.resp_topic, qos=1)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.debug("fetch: subscribe to %s deferred (rc=%s)", self.resp_topic, rc)

    def close(self) -> None:
        """Stop listening on the response topic (the paho client stays the caller's)."""
        self._client.message_callback_remove(self.resp_topic)
        self._client.unsubscribe(self.resp_topic)

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        try:
            header, data = decode_response(payload)
        except BadMessage:
            with self._lock:
                self.bad_responses += 1
            raise  # dropped; the guard logs the first of each kind and counts them
        with self._lock:
            route = self._routes.get(header.id)
            if route is None:
                self.stale_responses += 1
                return
        route.put((header, data))

    def _add(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)

    # -- plumbing for _Transfer --------------------------------------------------------

    def _new_id(self, q: queue.SimpleQueue[tuple[FetchHeader, bytes]]) -> str:
        with self._lock:
            self._seq += 1
            rid = f"{self._token}-{self._seq}"
            self._routes[rid] = q
        return rid

    def _drop_route(self, rid: str) -> None:
        with self._lock:
            self._routes.pop(rid, None)

    def _publish(self, req: FetchRequest, replica: str | None = None) -> None:
        """On the shared request topic, or on ``replica``'s own (a sticky transfer; the name
        came validated, topic-safe, in an answer header)."""
        topic = self.req_topic if replica is None else f"{self.req_topic}/{replica}"
        self._client.publish(topic, req.encode(), qos=1)

    def _connected(self) -> bool:
        return bool(self._client.is_connected())

    # -- flow control (pure arithmetic on this client's state) ----------------------------

    def current_window(self) -> int:
        """Windows allowed in flight now: the congestion window, within ``1..window``."""
        return max(1, min(self.window, int(self.cwnd)))

    def _rtt_sample(self, rtt: float) -> None:
        """RFC 6298 estimator; only first-attempt answers are sampled (Karn)."""
        with self._lock:
            if self.srtt is None:
                self.srtt, self.rttvar = rtt, rtt / 2
            else:
                self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
                self.srtt = 0.875 * self.srtt + 0.125 * rtt
            rto = self.srtt + max(0.01, 4 * self.rttvar)
            self.rto = min(self.max_timeout_s, max(self.min_timeout_s, rto))

    def _window_done(self) -> None:
        """Additive increase: +1 per window answered, up to ``window``."""
        with self._lock:
            self.cwnd = min(float(self.window), self.cwnd + 1.0)

    def _timed_out(self, sent: float, now: float) -> None:
        """A window sent at ``sent`` timed out: halve ``cwnd`` (once per loss event: only for
        windows sent after the previous cut) and back the timeout off (doubled, capped)."""
        with self._lock:
            self.timeouts += 1
            if sent < self._last_cut:
                return
            self._last_cut = now
            self.window_cuts += 1
            self.cwnd = max(1.0, self.cwnd / 2)
            self.rto = min(self.max_timeout_s, self.rto * 2)

    # -- public API -----------------------------------------------------------------------

    def fetch_range(self, path: str, offset: int, length: int) -> FetchedRange:
        """Bytes ``[offset, offset + length)`` of ``path`` (fewer at the end of the file).

        Raises:
            RemoteNotFoundError, RequestRefusedError, ChunkProtocolError (BadDataError);
            ChunkTimeoutError, SlowTransferError (TransportError).
        """
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
        t = _Transfer(self, path, offset, end=offset + max(length, 1))
        data = b"".join(d for _, d in t.run())
        return FetchedRange(data[:length], t.total or 0)

    def iter_file(self, path: str) -> Iterator[bytes]:
        """The whole file as chunks, in order (no cap: the consumer stops when it has enough).

        Raises:
            as ``fetch_range``, while iterating.
        """
        for _, data in _Transfer(self, path, 0).run():
            yield data

    def fetch_file(
        self,
        path: str,
        dest: Path,
        *,
        max_length: int,
        resume_dir: Path | None = None,
        progress: Progress | None = None,
    ) -> int:
        """Download ``path`` to ``dest`` (replaced atomically); returns the file size.

        With ``resume_dir``, the partial file ``<sha256 of path>.part`` and its sidecar
        ``.json`` (path, total, contiguous prefix length, sha256 of that prefix, chunk size)
        survive failures; the next call, from any ``ChunkClient``, verifies the prefix on disk
        and asks only for the rest. Without it, nothing survives a failure.

        Args:
            path: ``metadata/…`` or ``targets/…``.
            dest: final location; its folder is created.
            max_length: largest acceptable size (from signed metadata): the endless-data cap.
            resume_dir: where partial downloads live.
            progress: ``progress(bytes_on_disk, total)`` after each window written.

        Raises:
            FileTooLargeError: the file exceeds ``max_length`` (partial removed, no ``dest``).
            RemoteNotFoundError, RequestRefusedError, ChunkProtocolError: partial removed.
            ChunkTimeoutError, SlowTransferError: partial kept for the next call.
            OSError: local disk trouble.
        """
        _check_path(path)
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = _Partial.open(path, dest, resume_dir, self.chunk_size)
        try:
            try:
                return self._fill(partial, max_length, progress)
            except _PartialMismatch as e:
                log.warning("fetch %s: %s", path, e)
                partial.discard()
                partial = _Partial.open(path, dest, resume_dir, self.chunk_size)
                return self._fill(partial, max_length, progress)
        except BadDataError:
            partial.discard()
            raise
        except BaseException:
            partial.suspend()
            raise

    def _fill(self, partial: _Partial, max_length: int, progress: Progress | None) -> int:
        hint = partial.total if partial.have else None
        if hint is not None and hint > max_length:  # local state only: let the registry decide
            raise _PartialMismatch(f"partial download is of a {hint}-byte file; starting over")
        t = _Transfer(self, partial.path, partial.have, limit=max_length, total_hint=hint)
        for _, data in t.run():
            partial.append(data, t.total or 0, self.checkpoint_bytes)
            if progress is not None:
                progress(partial.have, t.total or 0)
        total = t.total or 0
        partial.finish(total)
        return total


class _Transfer:
    """One windowed download of ``[start, min(end, total))`` of a registry file.

    Until the first answer tells the file size, one window is in flight (nothing is asked
    past what the caller would accept); then ``window`` of them. Answers are matched by id
    and released in order; windows that arrive early wait in memory, and count against the
    window, so memory stays under ``window * chunk_size``.
    """

    def __init__(
        self,
        owner: ChunkClient,
        path: str,
        start: int,
        *,
        end: int | None = None,
        limit: int | None = None,
        total_hint: int | None = None,
    ) -> None:
        _check_path(path)
        self.c = owner
        self.path = path
        self.start = start
        self.end = end
        self.limit = limit
        self.total_hint = total_hint
        self.total: int | None = None
        self.q: queue.SimpleQueue[tuple[FetchHeader, bytes]] = queue.SimpleQueue()
        self.inflight: dict[str, _Slot] = {}
        self.ready: dict[int, bytes] = {}
        self.next_off = start
        self.got = 0
        self.waiting_since: float | None = None  # not admitted by the registry (busy) since
        self.probe_at: float | None = None  # when waiting: next probe (None: one is out)
        self.replica: str | None = None  # the registry replica serving this transfer (sticky)

    def _stop_at(self) -> int | None:
        if self.total is None:
            return None
        return self.total if self.end is None else min(self.total, self.end)

    def run(self) -> Iterator[tuple[int, bytes]]:
        """Yield ``(offset, data)`` in order.

        Raises:
            FileTooLargeError, RemoteNotFoundError, RequestRefusedError, ChunkProtocolError,
            _PartialMismatch, ChunkTimeoutError, SlowTransferError.
        """
        pos = self.start
        rate_t, rate_b = self.c.clock(), 0
        connected = self.c._connected()
        try:
            while (stop := self._stop_at()) is None or pos < stop:
                now = self.c.clock()
                if self.c.stop_event is not None and self.c.stop_event.is_set():
                    raise FetchStoppedError(f"{self.path}: fetch stopped (partial kept)")
                if self.waiting_since is not None:  # the guard runs only while admitted
                    self._check_wait(now)
                    rate_t, rate_b = now, self.got
                if self.c.min_rate_bps and now - rate_t >= self.c.rate_span_s:
                    self._check_rate(self.got - rate_b, now - rate_t)
                    rate_t, rate_b = now, self.got
                # A reconnect may have lost the subscription and every answer in flight.
                was, connected = connected, self.c._connected()
                if connected and not was:
                    self.c.resubscribe()
                    for slot in self.inflight.values():
                        slot.resend_at = now
                self._send_due(now, connected)
                try:
                    header, data = self.q.get(timeout=self._wait_s(now))
                except queue.Empty:
                    self._expire(self.c.clock())
                    continue
                if self._accept(header, data):
                    while pos in self.ready:
                        chunk = self.ready.pop(pos)
                        yield pos, chunk
                        pos += len(chunk)
        finally:
            for rid in self.inflight:
                self.c._drop_route(rid)

    def _check_rate(self, nbytes: int, span: float) -> None:
        if nbytes < self.c.min_rate_bps * self.c.rate_span_s:
            raise SlowTransferError(
                f"{self.path}: {nbytes} bytes in {span:.1f} s, below {self.c.min_rate_bps} B/s;"
                " giving up (a partial download is kept for resume)",
                path=self.path,
            )

    def _check_wait(self, now: float) -> None:
        """Raises: ChunkTimeoutError after ``max_busy_wait_s`` in the registry's line."""
        if self.waiting_since is not None and now - self.waiting_since > self.c.max_busy_wait_s:
            raise ChunkTimeoutError(
                f"{self.path}: registry busy for {now - self.waiting_since:.0f} s; giving up "
                "(a partial download is kept)",
                path=self.path,
                offset=self.next_off,
            )

    def _send_due(self, now: float, connected: bool) -> None:
        """Open new windows while there is room, and re-send those whose backoff is over.

        While the registry has not admitted the transfer (``busy``), only one probe goes out
        when its wait is over, and no new window is opened.
        """
        if self.waiting_since is not None:
            for slot in self.inflight.values():  # genuine re-sends (a probe that timed out)
                if slot.resend_at is not None and slot.resend_at <= now:
                    self._send(slot, now, connected)
            if self.probe_at is not None and now >= self.probe_at:
                self.probe_at = None
                parked = [s for s in self.inflight.values() if s.deadline == math.inf]
                if parked:
                    self._send(min(parked, key=lambda s: s.offset), now, connected)
            return
        while True:
            stop = self._stop_at()
            if stop is None:
                if self.inflight or self.next_off != self.start:
                    break
                length = self.c.chunk_size
                # Nothing past what the caller accepts; at least 1 byte, so that a resumed
                # complete file is confirmed by an empty answer at its end.
                for bound in (self.end, self.limit, self.total_hint):
                    if bound is not None:
                        length = min(length, bound - self.start)
                length = max(1, length)
            elif (
                self.next_off < stop
                and len(self.inflight) + len(self.ready) < self.c.current_window()
            ):
                length = min(self.c.chunk_size, stop - self.next_off)
            else:
                break
            slot = _Slot(self.c._new_id(self.q), self.next_off, length)
            self.inflight[slot.rid] = slot
            self.next_off += length
            slot.resend_at = now
        for slot in self.inflight.values():
            if slot.resend_at is not None and slot.resend_at <= now:
                self._send(slot, now, connected)

    def _send(self, slot: _Slot, now: float, connected: bool) -> None:
        """Publish (or, while disconnected, only count) one attempt of a window."""
        slot.attempts += 1
        timeout = self.c.rto
        slot.deadline = now + timeout
        slot.sent = now
        slot.resend_at = None
        self.c._add(bytes_requested=slot.length)
        if slot.attempts > 1 and not slot.after_busy:
            self.c._add(bytes_refetched=slot.length)
        slot.after_busy = False
        if connected:
            # Not queued while disconnected: a pile of stale requests would all be answered.
            if self.c.flow_fields:
                req = FetchRequest(
                    id=slot.rid,
                    path=self.path,
                    offset=slot.offset,
                    length=slot.length,
                    sent_at=round(time.time(), 3),
                    timeout_s=round(timeout, 3),
                    busy_ok=True,
                    sticky_ok=True,
                )
            else:
                req = FetchRequest(
                    id=slot.rid, path=self.path, offset=slot.offset, length=slot.length
                )
            self.c._publish(req, self.replica)

    def _wait_s(self, now: float) -> float:
        wake = now + (_POLL_S if self.waiting_since is None else _PARKED_POLL_S)
        if self.probe_at is not None:
            wake = min(wake, self.probe_at)
        for s in self.inflight.values():
            wake = min(wake, s.resend_at if s.resend_at is not None else s.deadline)
        return max(0.0, wake - now)

    def _park(self, slot: _Slot) -> None:
        """Hold a window until the registry admits the transfer (not a failure)."""
        slot.attempts = max(0, slot.attempts - 1)
        slot.after_busy = True
        slot.resend_at = None
        slot.deadline = math.inf

    def _on_busy(self, slot: _Slot, retry_after: float, now: float) -> None:
        """The registry is full: park every window, probe again after ``retry_after``."""
        self.c._add(busy_responses=1)
        self.replica = None  # probe through the shared topic: whichever replica has room
        if self.waiting_since is None:
            self.waiting_since = now
            log.debug("fetch %s: registry busy, waiting %.2f s", self.path, retry_after)
            for other in self.inflight.values():
                if other.resend_at is not None:  # not sent yet: hold it too
                    other.resend_at = None
                    other.deadline = math.inf
        if slot.deadline != math.inf:  # a second busy for a parked window changes nothing
            self._park(slot)
        wait = min(max(retry_after, 0.05), 3600.0) * self.c.rng.uniform(0.8, 1.2)
        self.probe_at = now + wait

    def _admitted(self, now: float) -> None:
        """An answer with data: the registry serves us; release the parked windows."""
        if self.waiting_since is None:
            return
        self.waiting_since = None
        self.probe_at = None
        for slot in self.inflight.values():
            if slot.deadline == math.inf:
                slot.resend_at = now

    def _expire(self, now: float) -> None:
        """Schedule a backed-off re-send of every window past its deadline.

        Raises:
            ChunkTimeoutError: a window used up its retries.
        """
        expired = [s for s in self.inflight.values() if s.resend_at is None and now >= s.deadline]
        if expired:
            self.c.resubscribe()  # cheap; the cure when a broker restart lost the subscription
            self.replica = None  # a replica that stopped answering may be gone: ask them all
        for slot in expired:
            self.c._timed_out(slot.sent, now)
            self._retry_later(slot, now, "timed out")

    def _retry_later(self, slot: _Slot, now: float, why: str) -> None:
        if slot.attempts > self.c.retries:
            raise ChunkTimeoutError(
                f"{self.path}: window at {slot.offset} {why} after {slot.attempts} attempts "
                f"(timeout now {self.c.rto:.2f} s); giving up (a partial download is kept)",
                path=self.path,
                offset=slot.offset,
            )
        delay = min(self.c.backoff_s * 2 ** (slot.attempts - 1), self.c.backoff_max_s)
        slot.resend_at = now + delay
        log.debug(
            "fetch %s: window %d %s (attempt %d), re-send in %.2f s",
            self.path,
            slot.offset,
            why,
            slot.attempts,
            delay,
        )

    def _accept(self, header: FetchHeader, data: bytes) -> bool:
        """Take one answer; True when a window was completed.

        Raises:
            FileTooLargeError, RemoteNotFoundError, RequestRefusedError, ChunkProtocolError,
            _PartialMismatch, ChunkTimeoutError.
        """
        slot = self.inflight.get(header.id)
        if slot is None:
            self.c._add(duplicate_responses=1)
            return False
        if header.status == "not_found":
            raise RemoteNotFoundError(f"registry has no {self.path}", path=self.path)
        now = self.c.clock()
        if header.status == "busy":
            self._on_busy(slot, header.retry_after_s or 1.0, now)
            return False
        if header.status == "bad_request":
            if self.c.flow_fields and "extra inputs" in header.error.lower():
                # A registry that predates flow control: ask again the old way.
                log.info("fetch: registry refuses flow-control fields; not sending them")
                self.c.flow_fields = False
                slot.attempts = max(0, slot.attempts - 1)
                slot.after_busy = True
                slot.resend_at = now
                return False
            raise RequestRefusedError(f"registry refused {self.path}: {header.error}")
        if header.status != "ok":  # "error": the registry could not read it right now
            log.warning("fetch %s: registry error at %d: %s", self.path, slot.offset, header.error)
            self._retry_later(slot, self.c.clock(), "failed on the registry")
            return False
        if self.total is None:
            self._learn_total(header.total)
        total = header.total if self.total is None else self.total
        expected = max(0, min(slot.length, total - slot.offset))
        if header.path != self.path or header.offset != slot.offset or header.total != total:
            raise ChunkProtocolError(
                f"{self.path}: answer for ({header.path}, {header.offset}, size {header.total})"
                f" to a request for ({self.path}, {slot.offset}, size {total}); aborting"
            )
        if len(data) != expected:
            raise ChunkProtocolError(
                f"{self.path}: window at {slot.offset} carries {len(data)} bytes, expected "
                f"{expected}; aborting"
            )
        del self.inflight[slot.rid]
        self.c._drop_route(slot.rid)
        if self.replica is None and header.replica is not None:
            self.replica = header.replica  # the rest of the transfer goes to this replica
        if slot.attempts == 1 and slot.deadline != math.inf:
            self.c._rtt_sample(now - slot.sent)
        self.c._window_done()
        self._admitted(now)
        self.got += len(data)
        self.c._add(bytes_received=len(data))
        if data:
            self.ready[slot.offset] = data
        return True

    def _learn_total(self, total: int) -> None:
        """Raises: FileTooLargeError, _PartialMismatch."""
        if self.limit is not None and total > self.limit:
            raise FileTooLargeError(
                f"{self.path} is {total} bytes, more than the {self.limit} allowed; "
                "not downloading it",
                path=self.path,
                total=total,
                max_length=self.limit,
            )
        if self.total_hint is not None and total != self.total_hint:
            raise _PartialMismatch(
                f"registry says {total} bytes, the partial download expected "
                f"{self.total_hint}; starting over"
            )
        self.total = total


def _check_path(path: str) -> None:
    """Raises: BadDataError for a path the contract does not allow."""
    if not _PATH_RE.match(path) or ".." in path.split("/"):
        raise BadDataError(f"{path!r} is not a registry path (metadata/… or targets/…)")


class _Partial:
    """A download in progress: the ``.part`` file, its prefix hash and the sidecar."""

    def __init__(
        self, path: str, dest: Path, part: Path, sidecar: Path | None, chunk_size: int
    ) -> None:
        self.path = path
        self.dest = dest
        self.part = part
        self.sidecar = sidecar
        self.chunk_size = chunk_size
        self.total = 0
        self.have = 0
        self.saved = 0
        self.sha = hashlib.sha256()
        self.fh: IO[bytes] | None = None

    @classmethod
    def open(cls, path: str, dest: Path, resume_dir: Path | None, chunk_size: int) -> _Partial:
        """The partial download of ``path``: resumed when its sidecar and prefix check out."""
        if resume_dir is None:
            fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
            p = cls(path, dest, Path(tmp), None, chunk_size)
            p.fh = os.fdopen(fd, "wb")
            return p
        resume_dir.mkdir(parents=True, exist_ok=True)
        key = resume_key(path)
        p = cls(path, dest, resume_dir / f"{key}.part", resume_dir / f"{key}.json", chunk_size)
        p._load()
        return p

    def _load(self) -> None:
        """Trust the sidecar's prefix only if the bytes on disk hash to it; else start over."""
        if self.sidecar is None:
            raise RuntimeError("only resumable partials are loaded")
        state: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(self.sidecar.read_text())
            state = loaded if isinstance(loaded, dict) else {}
        have = state.get("contiguous")
        total = state.get("total")
        ok = (
            state.get("version") == _SIDECAR_VERSION
            and state.get("path") == self.path
            and isinstance(have, int)
            and isinstance(total, int)
            and 0 <= have <= total
        )
        fd = os.open(self.part, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            # Another download of the same path (thread or process) would interleave writes.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise TransportError(
                f"{self.path} is being downloaded by someone else into {self.part}; try later"
            ) from e
        self.fh = os.fdopen(fd, "r+b")
        if ok and isinstance(have, int) and isinstance(total, int):
            if self._prefix_sha(have) == state.get("sha256"):
                self.have = self.saved = have
                self.total = total
                log.info("fetch %s: resuming at %d of %d bytes", self.path, have, total)
            else:
                log.warning(
                    "fetch %s: partial download does not match its sidecar; starting over",
                    self.path,
                )
        if self.have == 0:
            with contextlib.suppress(FileNotFoundError):
                self.sidecar.unlink()
        self.fh.seek(self.have)
        self.fh.truncate()

    def _prefix_sha(self, n: int) -> str | None:
        """sha256 of the first ``n`` bytes on disk (kept as the running hash), None if short."""
        if self.fh is None:
            raise RuntimeError("partial download is closed")
        sha = hashlib.sha256()
        self.fh.seek(0)
        remaining = n
        while remaining:
            block = self.fh.read(min(remaining, 1 << 20))
            if not block:
                return None
            sha.update(block)
            remaining -= len(block)
        self.sha = sha
        return sha.hexdigest()

    def append(self, data: bytes, total: int, checkpoint_bytes: int) -> None:
        """Write the next contiguous window; checkpoint every ``checkpoint_bytes``, except at
        the end of the file (``finish`` follows: a sidecar written there would be deleted at
        once, after three fsyncs; ``suspend`` still checkpoints if it does not come)."""
        if self.fh is None:
            raise RuntimeError("partial download is closed")
        self.fh.write(data)
        if self.sidecar is not None:  # the prefix hash only matters for a resume
            self.sha.update(data)
        self.have += len(data)
        self.total = total
        if self.have - self.saved >= checkpoint_bytes and self.have < total:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Data first (fsync), then the sidecar naming it: the sidecar never claims more."""
        if self.sidecar is None or self.fh is None or self.have == self.saved:
            return
        self.fh.flush()
        os.fsync(self.fh.fileno())
        atomic_write_json(
            self.sidecar,
            {
                "version": _SIDECAR_VERSION,
                "path": self.path,
                "total": self.total,
                "contiguous": self.have,
                "sha256": self.sha.hexdigest(),
                "chunk_size": self.chunk_size,
            },
        )
        self.saved = self.have

    def suspend(self) -> None:
        """Keep what we have for a later resume (transport trouble, interruption)."""
        if self.fh is None:
            return
        try:
            self._checkpoint()
        finally:
            self.fh.close()
            self.fh = None
            if self.sidecar is None:
                with contextlib.suppress(FileNotFoundError):
                    self.part.unlink()

    def discard(self) -> None:
        """Forget the partial download (bad data: resuming it would be wrong)."""
        if self.fh is not None:
            self.fh.close()
            self.fh = None
        for f in (self.part, self.sidecar):
            if f is not None:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()

    def finish(self, total: int) -> None:
        """Move the complete file to ``dest`` atomically and drop the sidecar.

        Raises:
            ChunkProtocolError: fewer bytes on disk than the registry's size.
        """
        if self.fh is None:
            raise RuntimeError("partial download is closed")
        if self.have != total:
            raise ChunkProtocolError(f"{self.path}: {self.have} bytes received of {total}")
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()
        self.fh = None
        _move_into_place(self.part, self.dest)
        if self.sidecar is not None:
            with contextlib.suppress(FileNotFoundError):
                self.sidecar.unlink()


def _move_into_place(src: Path, dest: Path) -> None:
    """``os.replace``, or copy + fsync + replace when ``src`` is on another file system."""
    try:
        os.replace(src, dest)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        src.unlink()
    fsync_dir(dest.parent)


class MqttFetcher(FetcherInterface):
    """python-tuf's network abstraction over a ``ChunkClient``.

    ``base_url`` (default ``mqtt://registry/``) is stripped from ngclient's URLs, so the
    Updater is built with ``metadata_base_url="mqtt://registry/metadata/"`` and
    ``target_base_url="mqtt://registry/targets/"``: ``mqtt://registry/metadata/2.root.json``
    becomes the registry path ``metadata/2.root.json``.

    Args:
        chunks: the device's chunk client.
        base_url: URL prefix of the registry.
        resume_dir: where ``download_to`` keeps partial downloads.
    """

    def __init__(
        self,
        chunks: ChunkClient,
        *,
        base_url: str = "mqtt://registry/",
        resume_dir: Path | None = None,
    ) -> None:
        self.chunks = chunks
        self.base_url = base_url if base_url.endswith("/") else base_url + "/"
        self.resume_dir = resume_dir

    def url_to_path(self, url: str) -> str:
        """Registry path of an ngclient URL.

        Raises:
            tuf.api.exceptions.DownloadError: a URL outside ``base_url`` or not a registry path.
        """
        if not url.startswith(self.base_url):
            raise tuf_exc.DownloadError(f"{url} is not under {self.base_url}")
        path = url[len(self.base_url) :]
        try:
            _check_path(path)
        except BadDataError as e:
            raise tuf_exc.DownloadError(f"{url}: {e}") from e
        return path

    def _fetch(self, url: str) -> Iterator[bytes]:
        """Chunks of ``url``; the first window is asked for before returning, so a missing
        file raises here (``DownloadHTTPError`` 404), as an HTTP fetcher's would.

        Raises:
            tuf.api.exceptions.DownloadHTTPError: 404 not found, 400 refused.
            tuf.api.exceptions.SlowRetrievalError: the minimum-rate guard tripped.
            tuf.api.exceptions.DownloadError: any other failure (also while iterating).
        """
        path = self.url_to_path(url)
        chunks = self.chunks.iter_file(path)
        with _as_download_error(url):
            first = next(chunks, None)
        if first is None:
            return iter(())
        return _mapped_stream(url, first, chunks)

    def download_to(
        self,
        url: str,
        dest: Path,
        max_length: int,
        progress: Progress | None = None,
    ) -> Path:
        """Resumable download of ``url`` to ``dest`` (in ``resume_dir`` when set).

        Nothing is verified here: pass ``dest`` to ngclient's
        ``Updater.find_cached_target(targetinfo, str(dest))``, which checks length and hashes
        against the signed ``TargetFile`` and returns None on a mismatch (then delete ``dest``).

        Raises:
            tuf.api.exceptions.DownloadLengthMismatchError: larger than ``max_length``.
            tuf.api.exceptions.DownloadHTTPError: 404 not found, 400 refused.
            tuf.api.exceptions.SlowRetrievalError, tuf.api.exceptions.DownloadError.
        """
        path = self.url_to_path(url)
        with _as_download_error(url):
            self.chunks.fetch_file(
                path, dest, max_length=max_length, resume_dir=self.resume_dir, progress=progress
            )
        return dest


@contextlib.contextmanager
def _as_download_error(url: str) -> Iterator[None]:
    """Map edgefleet errors to the ``tuf.api.exceptions`` ngclient handles."""
    try:
        yield
    except RemoteNotFoundError as e:
        raise tuf_exc.DownloadHTTPError(f"{url}: not found on the registry", 404) from e
    except RequestRefusedError as e:
        raise tuf_exc.DownloadHTTPError(f"{url}: {e}", 400) from e
    except FileTooLargeError as e:
        raise tuf_exc.DownloadLengthMismatchError(str(e)) from e
    except SlowTransferError as e:
        raise tuf_exc.SlowRetrievalError(str(e)) from e
    except (TransportError, BadDataError) as e:
        raise tuf_exc.DownloadError(f"{url}: {e}") from e


def _mapped_stream(url: str, first: bytes, rest: Iterator[bytes]) -> Iterator[bytes]:
    """Yield ``first`` then ``rest``; errors mapped, since ``FetcherInterface.fetch`` wraps
    only what ``_fetch`` raises, not what the iterator raises later."""
    try:
        yield first
        with _as_download_error(url):
            yield from rest
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()
