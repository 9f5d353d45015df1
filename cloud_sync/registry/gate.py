"""Pure: a registry replica's decision for each valid chunk request, and its counters.

``Gate`` holds the replica's ``Admission``, ``DeviceAccounts``, ``Clocks`` and
``ServerStats``; the chunk server (``cloud_sync.registry.serve``) holds its lock around every
call and does the reading and the MQTT. Admission, for every request, in this order:

1. Rate: a device (the id in the topic) may send ``device_rate`` requests per second
   (bucket ``device_burst``); the rest are dropped before they are parsed, and count against
   it: a device that keeps flooding is not served at all until it slows down.
2. Transfers: a transfer is a (device, resolved file) pair, so aliases of one file are one
   transfer. At most ``max_transfers`` are served at once, at most ``device_transfers`` of
   one device; the others wait in a first-come-first-served line where a device holds at
   most ``device_waiting`` places. A transfer is released when the window holding the end of
   its file is served, or after ``IDLE_S`` without a request. A single-window file (metadata)
   needs no admission. A device that understands ``busy`` (``busy_ok``) is answered ``busy``
   with ``retry_after_s``; an older one gets no answer while it waits (its place is kept
   ``HOLD_TTL_S`` after each request) and is served when it asks again after its own
   timeout, which every fetcher version does. With the line full, ``busy`` for the first and
   nothing for the second, without a place.
3. Data rate: a device may draw ``device_byte_rate`` bytes per second (bucket
   ``device_byte_burst``, so a whole model of that size comes at full speed); beyond, it is
   told ``busy`` until its share is back (or, without ``busy_ok``, not answered).
4. Queue: an answer is queued only while the bytes of answers not yet acknowledged by the
   broker stay within ``device_queued_bytes`` for its device and ``max_queued_bytes`` for all
   (each answer counts its payload + 1 KiB, ``answer_queue``); otherwise it is dropped
   (``shed``) and the device asks again. paho keeps a payload and, until written, its
   packet: memory stays under twice the bound.

Requests that waited longer than the device's ``timeout_s`` are dropped unanswered (the
device has asked again already); ``Clocks`` measures that wait with clock skew cancelled.
Everything takes ``now`` from the caller.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path

from agent.protocol.fetch import MAX_CHUNK, FetchHeader, FetchRequest
from cloud_sync.registry.admission import (
    ANSWER_OVERHEAD,
    HOLD_TTL_S,
    MAX_RETRY_S,
    MIN_RETRY_S,
    Admission,
    Decision,
    DeviceAccounts,
    ServeLimits,
    TransferKey,
)

__all__ = ["Clocks", "Gate", "Job", "ServerStats", "charge"]

BASE_DRIFT = 0.01  # s/s: how fast a device's clock-offset floor may rise (clock drift)
MAX_CLOCKS = 100_000  # devices whose clock offset is remembered


@dataclass
class ServerStats:
    """Counters since start (a snapshot; ``ChunkServer.stats()`` returns a copy).

    Attributes:
        requests: request messages received (valid or not).
        answered: responses handed to paho, any status.
        bytes_sent: data bytes in ``ok`` responses.
        not_found: answered ``not_found``.
        bad_requests: malformed or forbidden requests (answered ``bad_request`` when possible).
        errors: local read errors (answered ``error``) and responses paho refused to queue.
        dropped: requests that could not be answered at all (no id, unknown topic).
        busy: answered ``busy`` (admission control).
        expired: dropped unanswered because they waited longer than the device's timeout.
        admitted: transfers admitted.
        exempt: single-window files served without admission.
        rate_limited: dropped unread: the device was over its request rate.
        throttled: not served now: the device was over its data rate (``busy``, or held).
        held: unanswered while their transfer waits in line or the device is over its data rate
            (devices without ``busy_ok``).
        refused: transfers refused a place in line (the device's or the fleet's line full).
        shed: answers not queued: a queued-bytes bound (the device's or the fleet's) was hit.
        aliases: requests whose path was not in its canonical form (served as that form).
        queued_bytes: bytes of answers in paho's outgoing queue now (see ``ServeLimits``).
        peak_queued_bytes: the most there ever were.
        by_device: requests per device id.
        bytes_by_device: data bytes per device id.
    """

    requests: int = 0
    answered: int = 0
    bytes_sent: int = 0
    not_found: int = 0
    bad_requests: int = 0
    errors: int = 0
    dropped: int = 0
    busy: int = 0
    expired: int = 0
    admitted: int = 0
    exempt: int = 0
    rate_limited: int = 0
    throttled: int = 0
    held: int = 0
    refused: int = 0
    shed: int = 0
    aliases: int = 0
    queued_bytes: int = 0
    peak_queued_bytes: int = 0
    by_device: dict[str, int] = field(default_factory=dict)
    bytes_by_device: dict[str, int] = field(default_factory=dict)


@dataclass
class Job:
    """An accepted request waiting to be read and answered."""

    device_id: str
    req: FetchRequest
    file: Path
    key: TransferKey | None  # the admitted transfer, released at its last window
    reserved: int = 0  # queue bytes reserved for the answer


def charge(req: FetchRequest) -> int:
    """Queue bytes to reserve for the answer to ``req`` (the largest it can be)."""
    return 4 + 300 + 2 * len(req.path) + min(req.length, MAX_CHUNK) + ANSWER_OVERHEAD


class Clocks:
    """Per device, the floor of ``receive wall time - sent_at`` (delay + clock offset).

    A request's queueing delay is its own ``receive - sent_at`` minus that floor, so the two
    clocks need not agree. The floor may rise ``BASE_DRIFT`` s per s (clock drift).
    """

    def __init__(self) -> None:
        self.floor: OrderedDict[str, tuple[float, float]] = OrderedDict()  # dev -> (floor, at)

    def delay(self, device_id: str, sent_at: float, now_wall: float, *, learn: bool) -> float:
        """Seconds the request has waited beyond the fastest one seen from this device."""
        sample = now_wall - sent_at
        old = self.floor.get(device_id)
        floor = sample if old is None else min(sample, old[0] + BASE_DRIFT * (now_wall - old[1]))
        if learn:
            self.floor[device_id] = (floor, now_wall)
            self.floor.move_to_end(device_id)
            if len(self.floor) > MAX_CLOCKS:
                self.floor.popitem(last=False)
        return sample - floor


class Gate:
    """Admission, accounts, clocks and counters of one replica (not thread-safe: the server
    holds its lock around every call).

    Args:
        limits: the replica's limits.
    """

    def __init__(self, limits: ServeLimits) -> None:
        self.limits = limits
        self.admission = Admission(
            limits.max_transfers,
            device_transfers=limits.device_transfers,
            device_waiting=limits.device_waiting,
        )
        self.accounts = DeviceAccounts(limits)
        self.clocks = Clocks()
        self.stats = ServerStats()

    def count(self, **deltas: int) -> None:
        """Add to ``stats`` counters by name."""
        for name, n in deltas.items():
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def snapshot(self) -> ServerStats:
        """A copy of the counters, with the queued bytes of now."""
        return replace(
            self.stats,
            queued_bytes=self.accounts.queued_bytes,
            peak_queued_bytes=self.accounts.peak_queued_bytes,
            by_device=dict(self.stats.by_device),
            bytes_by_device=dict(self.stats.bytes_by_device),
        )

    def request(self, device_id: str | None, now: float) -> bool:
        """Count one request message (``device_id`` None: on an unexpected topic); False
        (counted ``rate_limited``) when its device is over its request rate."""
        self.stats.requests += 1
        if device_id is None:
            return True
        by = self.stats.by_device
        by[device_id] = by.get(device_id, 0) + 1
        allowed = self.accounts.request(device_id, now)
        if not allowed:
            self.stats.rate_limited += 1
        return allowed

    def expired(self, device_id: str, req: FetchRequest, now_wall: float, *, learn: bool) -> bool:
        """True (counted) when the request waited longer than the device waits for it."""
        if req.sent_at is None or req.timeout_s is None:
            return False
        waited = self.clocks.delay(device_id, req.sent_at, now_wall, learn=learn)
        if waited <= req.timeout_s:
            return False
        self.stats.expired += 1
        return True

    def admit(
        self, device_id: str, req: FetchRequest, file: Path, *, single: bool, now: float
    ) -> Job | FetchHeader | None:
        """Admission of one valid request for ``file``: a ``Job`` with its queue bytes
        reserved; or the ``busy`` answer to send; or None (shed, refused or held: no answer).

        In order: the transfer's place (or, ``single``, a single-window file's exemption),
        the device's data rate, the queue bytes for the answer.
        """
        key = (device_id, str(file))
        adm = self.admission
        if single and not adm.is_served(key, now):
            decision = Decision(True)
            self.stats.exempt += 1
        else:
            was_active = key in adm.active
            decision = adm.check(key, now, ttl_s=None if req.busy_ok else HOLD_TTL_S)
            if decision.admitted and not was_active and key in adm.active:
                self.stats.admitted += 1
        self.accounts.note_transfers(device_id, adm.active_of(device_id), adm.waiting_of(device_id))
        if decision.admitted:
            wait = self.accounts.draw(device_id, min(req.length, MAX_CHUNK), now)
            if wait is not None:
                self.stats.throttled += 1
                retry = min(MAX_RETRY_S, max(MIN_RETRY_S, wait))
                decision = Decision(False, retry, in_line=True)
        if decision.admitted:
            reserved = charge(req)
            if not self.accounts.reserve(device_id, reserved):
                self.stats.shed += 1
                return None
            admitted = key in adm.active
            return Job(device_id, req, file, key if admitted else None, reserved)
        return self._not_admitted(device_id, req, decision)

    def _not_admitted(
        self, device_id: str, req: FetchRequest, decision: Decision
    ) -> FetchHeader | None:
        """Count a request that waits or was refused; its ``busy`` answer, if it reads one."""
        if not decision.in_line:
            self.stats.refused += 1
            self.accounts.count(device_id, "refused")
        if not req.busy_ok:
            if decision.in_line:
                self.stats.held += 1
                self.accounts.count(device_id, "held")
            return None  # no answer it understands: it asks again after its timeout
        self.stats.busy += 1
        self.accounts.count(device_id, "busy")
        return FetchHeader(
            id=req.id,
            path=req.path,
            offset=req.offset,
            total=0,
            status="busy",
            retry_after_s=round(decision.retry_after_s, 3),
            error="" if decision.in_line else "the registry's line is full for this device",
        )

    def release(self, key: TransferKey, now: float) -> None:
        """The transfer ``key`` served its last window (or failed): free its place."""
        if key in self.admission.active:
            self.admission.done(key, now)
            dev = key[0]
            self.accounts.note_transfers(
                dev, self.admission.active_of(dev), self.admission.waiting_of(dev)
            )
