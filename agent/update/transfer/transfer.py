"""Adapter: one windowed download of a registry file, behind the ``Link`` to its client.

A ``Transfer`` asks for ``(path, offset, length)`` windows through its ``Link`` (a
``ChunkClient``) and matches the answers routed to its queue by request id: several windows
in flight, answers in any order, each window timed out and re-sent with backoff, a
minimum-rate guard, a size cap learnt from the first answer (the endless-data defence), and
the waits in the registry's line (``busy``). The arithmetic of all that is ``flow``'s; this
module holds the state machine and talks to the network only through ``Link``.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from agent.common.errors import BadDataError
from agent.common.interrupt import StopFlag
from agent.protocol.fetch import _PATH_PATTERN, FetchHeader, FetchRequest
from agent.update.transfer import flow
from agent.update.transfer.errors import (
    ChunkProtocolError,
    ChunkTimeoutError,
    FetchStoppedError,
    FileTooLargeError,
    PartialMismatch,
    RemoteNotFoundError,
    RequestRefusedError,
    SlowTransferError,
)

log = logging.getLogger(__name__)

_PATH_RE = re.compile(_PATH_PATTERN)
_POLL_S = 0.1  # how often an idle transfer looks at the connection state and stop event
# ... and one waiting in the registry's line (``busy``): nothing is due before its probe, so
# it wakes less often (a fleet parks hundreds of transfers; each wake-up costs a thread switch)
_PARKED_POLL_S = 0.5

Answers = queue.SimpleQueue[tuple[FetchHeader, bytes]]


def check_path(path: str) -> None:
    """Raises: BadDataError for a path the contract does not allow."""
    if not _PATH_RE.match(path) or ".." in path.split("/"):
        raise BadDataError(f"{path!r} is not a registry path (metadata/… or targets/…)")


class Link(Protocol):
    """What a transfer needs from its client (``ChunkClient``): its settings, clock and stop
    event, the request route, publishing, counters and the shared flow control.

    Settings are read at each use (``flow_fields`` is also turned off by a transfer that finds
    a registry which predates the flow-control fields). ``on_*`` update the flow state shared
    by every transfer of the client; ``rto`` and ``current_window()`` read it.
    """

    flow_fields: bool

    @property
    def chunk_size(self) -> int: ...
    @property
    def retries(self) -> int: ...
    @property
    def min_rate_bps(self) -> int: ...
    @property
    def rate_span_s(self) -> float: ...
    @property
    def backoff_s(self) -> float: ...
    @property
    def backoff_max_s(self) -> float: ...
    @property
    def max_busy_wait_s(self) -> float: ...
    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def stop_event(self) -> StopFlag | None: ...
    @property
    def rng(self) -> random.Random: ...
    @property
    def rto(self) -> float: ...

    def connected(self) -> bool:
        """True while the MQTT connection is up."""
        ...

    def resubscribe(self) -> None:
        """(Re)subscribe to the response topic (cheap, idempotent)."""
        ...

    def open_route(self, answers: Answers) -> str:
        """A new request id whose answers go to ``answers``."""
        ...

    def close_route(self, rid: str) -> None:
        """Forget request id ``rid`` (later answers to it are stale)."""
        ...

    def publish(self, req: FetchRequest, replica: str | None) -> None:
        """Send ``req`` (to ``replica``'s own topic when not None)."""
        ...

    def count(self, **deltas: int) -> None:
        """Add to the client's counters (``bytes_requested=…``)."""
        ...

    def current_window(self) -> int:
        """Windows allowed in flight now."""
        ...

    def on_rtt(self, rtt: float) -> None:
        """A round trip measured on a first attempt (Karn)."""
        ...

    def on_window_done(self) -> None:
        """A window was answered."""
        ...

    def on_timeout(self, sent: float, now: float) -> None:
        """A window sent at ``sent`` was not answered by ``now``."""
        ...


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


class Transfer:
    """One windowed download of ``[start, min(end, total))`` of a registry file.

    Until the first answer tells the file size, one window is in flight (nothing is asked
    past what the caller would accept); then ``window`` of them. Answers are matched by id
    and released in order; windows that arrive early wait in memory, and count against the
    window, so memory stays under ``window * chunk_size``.
    """

    def __init__(
        self,
        link: Link,
        path: str,
        start: int,
        *,
        end: int | None = None,
        limit: int | None = None,
        total_hint: int | None = None,
    ) -> None:
        check_path(path)
        self.link = link
        self.path = path
        self.start = start
        self.end = end
        self.limit = limit
        self.total_hint = total_hint
        self.total: int | None = None
        self.q: Answers = queue.SimpleQueue()
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
            PartialMismatch, ChunkTimeoutError, SlowTransferError.
        """
        pos = self.start
        rate_t, rate_b = self.link.clock(), 0
        connected = self.link.connected()
        try:
            while (stop := self._stop_at()) is None or pos < stop:
                now = self.link.clock()
                if self.link.stop_event is not None and self.link.stop_event.is_set():
                    raise FetchStoppedError(f"{self.path}: fetch stopped (partial kept)")
                if self.waiting_since is not None:  # the guard runs only while admitted
                    self._check_wait(now)
                    rate_t, rate_b = now, self.got
                if self.link.min_rate_bps and now - rate_t >= self.link.rate_span_s:
                    self._check_rate(self.got - rate_b, now - rate_t)
                    rate_t, rate_b = now, self.got
                # A reconnect may have lost the subscription and every answer in flight.
                was, connected = connected, self.link.connected()
                if connected and not was:
                    self.link.resubscribe()
                    for slot in self.inflight.values():
                        slot.resend_at = now
                self._send_due(now, connected)
                try:
                    header, data = self.q.get(timeout=self._wait_s(now))
                except queue.Empty:
                    self._expire(self.link.clock())
                    continue
                if self._accept(header, data):
                    while pos in self.ready:
                        chunk = self.ready.pop(pos)
                        yield pos, chunk
                        pos += len(chunk)
        finally:
            for rid in self.inflight:
                self.link.close_route(rid)

    def _check_rate(self, nbytes: int, span: float) -> None:
        if flow.too_slow(nbytes, self.link.min_rate_bps, self.link.rate_span_s):
            raise SlowTransferError(
                f"{self.path}: {nbytes} bytes in {span:.1f} s, below {self.link.min_rate_bps} B/s;"
                " giving up (a partial download is kept for resume)",
                path=self.path,
            )

    def _check_wait(self, now: float) -> None:
        """Raises: ChunkTimeoutError after ``max_busy_wait_s`` in the registry's line."""
        since = self.waiting_since
        if since is not None and flow.waited_too_long(since, now, self.link.max_busy_wait_s):
            raise ChunkTimeoutError(
                f"{self.path}: registry busy for {now - since:.0f} s; giving up "
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
                length = self.link.chunk_size
                # Nothing past what the caller accepts; at least 1 byte, so that a resumed
                # complete file is confirmed by an empty answer at its end.
                for bound in (self.end, self.limit, self.total_hint):
                    if bound is not None:
                        length = min(length, bound - self.start)
                length = max(1, length)
            elif (
                self.next_off < stop
                and len(self.inflight) + len(self.ready) < self.link.current_window()
            ):
                length = min(self.link.chunk_size, stop - self.next_off)
            else:
                break
            slot = _Slot(self.link.open_route(self.q), self.next_off, length)
            self.inflight[slot.rid] = slot
            self.next_off += length
            slot.resend_at = now
        for slot in self.inflight.values():
            if slot.resend_at is not None and slot.resend_at <= now:
                self._send(slot, now, connected)

    def _send(self, slot: _Slot, now: float, connected: bool) -> None:
        """Publish (or, while disconnected, only count) one attempt of a window."""
        slot.attempts += 1
        timeout = self.link.rto
        slot.deadline = now + timeout
        slot.sent = now
        slot.resend_at = None
        self.link.count(bytes_requested=slot.length)
        if slot.attempts > 1 and not slot.after_busy:
            self.link.count(bytes_refetched=slot.length)
        slot.after_busy = False
        if connected:
            # Not queued while disconnected: a pile of stale requests would all be answered.
            if self.link.flow_fields:
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
            self.link.publish(req, self.replica)

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
        self.link.count(busy_responses=1)
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
        self.probe_at = now + flow.busy_wait_s(retry_after, self.link.rng)

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
            self.link.resubscribe()  # cheap; the cure when a broker restart lost the subscription
            self.replica = None  # a replica that stopped answering may be gone: ask them all
        for slot in expired:
            self.link.on_timeout(slot.sent, now)
            self._retry_later(slot, now, "timed out")

    def _retry_later(self, slot: _Slot, now: float, why: str) -> None:
        if slot.attempts > self.link.retries:
            raise ChunkTimeoutError(
                f"{self.path}: window at {slot.offset} {why} after {slot.attempts} attempts "
                f"(timeout now {self.link.rto:.2f} s); giving up (a partial download is kept)",
                path=self.path,
                offset=slot.offset,
            )
        delay = flow.backoff_s(slot.attempts, self.link.backoff_s, self.link.backoff_max_s)
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
            PartialMismatch, ChunkTimeoutError.
        """
        slot = self.inflight.get(header.id)
        if slot is None:
            self.link.count(duplicate_responses=1)
            return False
        if header.status == "not_found":
            raise RemoteNotFoundError(f"registry has no {self.path}", path=self.path)
        now = self.link.clock()
        if header.status == "busy":
            self._on_busy(slot, flow.retry_after_s(header.retry_after_s), now)
            return False
        if header.status == "bad_request":
            if self.link.flow_fields and "extra inputs" in header.error.lower():
                # A registry that predates flow control: ask again the old way.
                log.info("fetch: registry refuses flow-control fields; not sending them")
                self.link.flow_fields = False
                slot.attempts = max(0, slot.attempts - 1)
                slot.after_busy = True
                slot.resend_at = now
                return False
            raise RequestRefusedError(f"registry refused {self.path}: {header.error}")
        if header.status != "ok":  # "error": the registry could not read it right now
            log.warning("fetch %s: registry error at %d: %s", self.path, slot.offset, header.error)
            self._retry_later(slot, self.link.clock(), "failed on the registry")
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
        self.link.close_route(slot.rid)
        if self.replica is None and header.replica is not None:
            self.replica = header.replica  # the rest of the transfer goes to this replica
        if slot.attempts == 1 and slot.deadline != math.inf:
            self.link.on_rtt(now - slot.sent)
        self.link.on_window_done()
        self._admitted(now)
        self.got += len(data)
        self.link.count(bytes_received=len(data))
        if data:
            self.ready[slot.offset] = data
        return True

    def _learn_total(self, total: int) -> None:
        """Raises: FileTooLargeError, PartialMismatch."""
        if self.limit is not None and total > self.limit:
            raise FileTooLargeError(
                f"{self.path} is {total} bytes, more than the {self.limit} allowed; "
                "not downloading it",
                path=self.path,
                total=total,
                max_length=self.limit,
            )
        if self.total_hint is not None and total != self.total_hint:
            raise PartialMismatch(
                f"registry says {total} bytes, the partial download expected "
                f"{self.total_hint}; starting over"
            )
        self.total = total
