"""Adapter: windowed, retrying, resumable downloads over one device's MQTT fetch topics.

``ChunkClient`` asks for ``(path, offset, length)`` windows on the device's ``fetch/req``
topic and matches answers on ``fetch/resp`` by request id, each routed to the ``Transfer``
that asked (``transfer``): several windows in flight, answers in any order, each request
timed out and retried with backoff, a minimum-rate guard, and a size cap learnt from the
first answer (the endless-data defence).

Flow control (``docs/protocol.md``, ``agent.protocol.fetch``; the arithmetic is ``flow``'s):
the timeout of a window adapts to measured round trips like TCP's (RFC 6298: SRTT + 4·RTTVAR,
Karn's rule, doubled on a timeout, within a floor and a cap); the number of windows in flight
is an AIMD congestion window (halved once per loss event, +1 per window answered, never above
``window``) shared by the client's transfers; a ``busy`` answer parks the transfer for
``retry_after_s`` (with jitter), one probe at a time, without using up retries and without the
minimum-rate guard running. ``fetch_file`` keeps the partial file and a sidecar in
``resume_dir`` (``partial``) so that a new client, even in a new process, continues from the
verified prefix on disk without asking for those bytes again.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from agent.common.errors import BadDataError
from agent.common.interrupt import StopFlag
from agent.common.mqtt import CallbackGuard
from agent.protocol.fetch import MAX_CHUNK, FetchRequest, decode_response
from agent.protocol.topics import DEFAULT_ROOT, Topics
from agent.protocol.wire import BadMessage
from agent.update.transfer.errors import PartialMismatch
from agent.update.transfer.flow import FlowControl
from agent.update.transfer.partial import Partial
from agent.update.transfer.transfer import Answers, Transfer, check_path

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FetchedRange:
    """Bytes of one range and the size of the whole file."""

    data: bytes
    total: int


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
        stop_event: when set, a running transfer stops with ``FetchStoppedError`` (an event,
            or the update manager's ``agent.common.interrupt.Interrupt``).
        rng: jitter of the waits after ``busy``.
        flow_fields: send ``sent_at``/``timeout_s``/``busy_ok`` (turned off by itself when a
            registry that predates them refuses them).
        kinds: the request and answer topic kinds: the device's own model downloads
            (``fetch/req``, ``fetch/resp``), or the cloud fetching one of the device's event
            clips (``clips/req``, ``clips/resp``).

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
        stop_event: StopFlag | None = None,
        rng: random.Random | None = None,
        flow_fields: bool = True,
        kinds: tuple[str, str] = ("fetch/req", "fetch/resp"),
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
        self.req_topic = topics.device(device_id, kinds[0])
        self.resp_topic = topics.device(device_id, kinds[1])
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
        self.max_busy_wait_s = max_busy_wait_s
        self.stop_event = stop_event
        self.flow_fields = flow_fields
        self.rng = rng or random.Random()
        self._flow = FlowControl(
            window=window,
            timeout_s=request_timeout_s,
            min_timeout_s=min_timeout_s,
            max_timeout_s=max_timeout_s,
        )
        self._client = client
        self._lock = threading.Lock()
        self._routes: dict[str, Answers] = {}
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

    # -- the Link of a Transfer ---------------------------------------------------------

    def count(self, **deltas: int) -> None:
        """Add to counters by name (``bytes_received=n``)."""
        with self._lock:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)

    def open_route(self, answers: Answers) -> str:
        """A new request id; answers carrying it go to ``answers`` until ``close_route``."""
        with self._lock:
            self._seq += 1
            rid = f"{self._token}-{self._seq}"
            self._routes[rid] = answers
        return rid

    def close_route(self, rid: str) -> None:
        """Forget ``rid``: later answers to it count as stale."""
        with self._lock:
            self._routes.pop(rid, None)

    def publish(self, req: FetchRequest, replica: str | None = None) -> None:
        """On the shared request topic, or on ``replica``'s own (a sticky transfer; the name
        came validated, topic-safe, in an answer header)."""
        topic = self.req_topic if replica is None else f"{self.req_topic}/{replica}"
        self._client.publish(topic, req.encode(), qos=1)

    def connected(self) -> bool:
        """True while the paho client says it is connected."""
        return bool(self._client.is_connected())

    # -- flow control (``flow.FlowControl``, shared by this client's transfers) ------------

    @property
    def rto(self) -> float:
        """The current timeout of a window."""
        return self._flow.rto

    @property
    def srtt(self) -> float | None:
        """Smoothed round trip (None before the first sample)."""
        return self._flow.srtt

    @property
    def rttvar(self) -> float:
        """Round-trip variation."""
        return self._flow.rttvar

    @property
    def cwnd(self) -> float:
        """Congestion window (windows allowed in flight, before rounding down)."""
        return self._flow.cwnd

    @property
    def min_timeout_s(self) -> float:
        """Floor of the adaptive timeout."""
        return self._flow.min_timeout_s

    @property
    def max_timeout_s(self) -> float:
        """Cap of the adaptive timeout."""
        return self._flow.max_timeout_s

    def current_window(self) -> int:
        """Windows allowed in flight now: the congestion window, within ``1..window``."""
        return self._flow.current_window()

    def on_rtt(self, rtt: float) -> None:
        """A round trip measured on a window's first attempt (Karn's rule)."""
        with self._lock:
            self._flow.sample(rtt)

    def on_window_done(self) -> None:
        """A window was answered: additive increase."""
        with self._lock:
            self._flow.window_done()

    def on_timeout(self, sent: float, now: float) -> None:
        """A window sent at ``sent`` timed out: counted; the window is cut (once per loss
        event) and the timeout backed off."""
        with self._lock:
            self.timeouts += 1
            if self._flow.timed_out(sent, now):
                self.window_cuts += 1

    # -- public API -----------------------------------------------------------------------

    def fetch_range(self, path: str, offset: int, length: int) -> FetchedRange:
        """Bytes ``[offset, offset + length)`` of ``path`` (fewer at the end of the file).

        Raises:
            RemoteNotFoundError, RequestRefusedError, ChunkProtocolError (BadDataError);
            ChunkTimeoutError, SlowTransferError (TransportError).
        """
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
        t = Transfer(self, path, offset, end=offset + max(length, 1))
        data = b"".join(d for _, d in t.run())
        return FetchedRange(data[:length], t.total or 0)

    def iter_file(self, path: str) -> Iterator[bytes]:
        """The whole file as chunks, in order (no cap: the consumer stops when it has enough).

        Raises:
            as ``fetch_range``, while iterating.
        """
        for _, data in Transfer(self, path, 0).run():
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
        check_path(path)
        if max_length < 0:
            raise ValueError(f"max_length must be >= 0, got {max_length}")
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        partial = Partial.open(path, dest, resume_dir, self.chunk_size)
        try:
            try:
                return self._fill(partial, max_length, progress)
            except PartialMismatch as e:
                log.warning("fetch %s: %s", path, e)
                partial.discard()
                partial = Partial.open(path, dest, resume_dir, self.chunk_size)
                return self._fill(partial, max_length, progress)
        except BadDataError:
            partial.discard()
            raise
        except BaseException:
            partial.suspend()
            raise

    def _fill(self, partial: Partial, max_length: int, progress: Progress | None) -> int:
        hint = partial.total if partial.have else None
        if hint is not None and hint > max_length:  # local state only: let the registry decide
            raise PartialMismatch(f"partial download is of a {hint}-byte file; starting over")
        t = Transfer(self, partial.path, partial.have, limit=max_length, total_hint=hint)
        for _, data in t.run():
            partial.append(data, t.total or 0, self.checkpoint_bytes)
            if progress is not None:
                progress(partial.have, t.total or 0)
        total = t.total or 0
        partial.finish(total)
        return total
