"""Pure: what a registry replica serves now, and how much any one device may take of it.

The chunk server asks these classes (through ``cloud_sync.registry.gate``) before it reads a byte:

- ``Admission``: which transfers — a (device, file) pair — are served at once, fleet-wide
  (``max_transfers``) and per device (``device_transfers``), and a first-come-first-served
  line for the rest, with at most ``device_waiting`` places per device.
- ``DeviceAccounts``: per device, a request-rate token bucket and the bytes of its answers
  still in the outgoing queue; the fleet-wide queued bytes. An answer is queued only while
  both byte bounds hold.

Everything takes ``now`` (monotonic seconds) from the caller and nothing here is thread-safe:
the server holds its lock around every call.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, replace
from typing import Protocol

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.protocol.fetch import MAX_CHUNK, MAX_HEADER

__all__ = [
    "ANSWER_OVERHEAD",
    "MAX_ANSWER_CHARGE",
    "Admission",
    "Decision",
    "DeviceAccounts",
    "DeviceUsage",
    "ServeLimits",
    "TransferKey",
]

KiB = 1024
MiB = 1024 * KiB
IDLE_S = 5.0  # an admitted transfer without a request for this long is released
GRACE_S = 5.0  # after a transfer's last window, its late re-sends are served without admission
MIN_RETRY_S = 0.25  # bounds of the retry_after_s hint in busy answers
MAX_RETRY_S = 10.0
MAX_WAITING = 100_000  # places in line, all devices together
MAX_FINISHED = 100_000  # finished transfers remembered for their grace period
# A device that does not understand ``busy`` gets no answer while it waits; it asks again after
# its own timeout (5 s and a backoff of up to 5 s in the oldest fetcher), so its place in line
# is kept this long after each request.
HOLD_TTL_S = 30.0
MAX_DEVICES = 100_000  # devices whose rate and queued bytes are tracked (idle ones are evicted)
# What one queued answer costs beyond its payload: paho's message and packet objects, the
# topic. A flood of tiny answers (busy, bad_request) is bounded by this too, not only by bytes.
ANSWER_OVERHEAD = 1024
MAX_ANSWER_CHARGE = 4 + MAX_HEADER + MAX_CHUNK + ANSWER_OVERHEAD  # the largest answer, charged


class ServeLimits(BaseModel):
    """How much a replica serves at once, and how much of that one device may take."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_transfers: int = Field(
        32,
        ge=0,
        le=100_000,
        description="Transfers (device, file) served at once by this replica; the others wait "
        "in line. 0: no fleet-wide limit (the per-device limits still apply)",
    )
    device_transfers: int = Field(
        2, ge=1, le=1000, description="Transfers one device is served at once"
    )
    device_waiting: int = Field(
        2, ge=0, le=1000, description="Places one device may hold in the line"
    )
    device_rate: float = Field(
        1000.0,
        gt=0,
        le=1_000_000,
        description="Requests per second one device may send, sustained (token bucket). "
        "Requests over it are dropped unread and still count: a device that keeps sending "
        "faster is not served at all until it slows down. 1000/s is twice what the data rate "
        "allows in 32 KiB windows",
    )
    device_burst: int = Field(
        2000,
        ge=1,
        le=1_000_000,
        description="Requests one device may send at once (bucket size)",
    )
    device_byte_rate: int = Field(
        16 * MiB,
        ge=MAX_CHUNK,
        le=100 * 1024 * MiB,
        description="Data bytes per second one device may draw, sustained (134 Mbit/s): a device "
        "that asks for more is told busy until its share is back (without busy_ok: not "
        "answered). It binds only a device drawing far more than its share",
    )
    device_byte_burst: int = Field(
        64 * MiB,
        ge=MAX_CHUNK,
        le=100 * 1024 * MiB,
        description="Data bytes one device may draw at once before device_byte_rate applies "
        "(a whole model of that size downloads at full speed)",
    )
    max_queued_bytes: int = Field(
        64 * MiB,
        ge=MAX_ANSWER_CHARGE,
        le=16 * 1024 * MiB,
        description="Bytes of answers in the outgoing queue (sent but not acknowledged, or not "
        "sent yet), all devices together; each answer counts its payload + 1 KiB",
    )
    device_queued_bytes: int = Field(
        8 * MiB,
        ge=MAX_ANSWER_CHARGE,
        le=16 * 1024 * MiB,
        description="Bytes of one device's answers in the outgoing queue (the agent's default "
        "window, 32 x 64 KiB, needs 2 MiB)",
    )

    @model_validator(mode="after")
    def _device_within_fleet(self) -> ServeLimits:
        if self.device_queued_bytes > self.max_queued_bytes:
            raise ValueError(
                f"device_queued_bytes ({self.device_queued_bytes}) is larger than "
                f"max_queued_bytes ({self.max_queued_bytes})"
            )
        return self


TransferKey = tuple[str, str]  # (device id, canonical file)


@dataclass(frozen=True)
class Decision:
    """``Admission.check``'s answer.

    Attributes:
        admitted: serve the request now.
        retry_after_s: when not admitted, when to ask again.
        in_line: when not admitted, whether the transfer holds a place in line (False: the
            line, the device's or the fleet's, was full).
    """

    admitted: bool
    retry_after_s: float = 0.0
    in_line: bool = False


SERVE = Decision(True)


@dataclass
class _Waiter:
    last: float  # last request seen
    ttl: float  # gone from the line when not seen for this long


class Admission:
    """Which transfers are served now, and a first-come-first-served line for the rest.

    Args:
        max_transfers: transfers served at once, all devices together; 0: no such limit.
        device_transfers: transfers one device is served at once (>= 1).
        device_waiting: places one device may hold in line (>= 0).
        max_waiting: places in line, all devices together.
        idle_s: an admitted transfer not heard from for this long is released.
        grace_s: a finished transfer's late requests are served without admission this long.

    Raises:
        ValueError: a limit out of range.
    """

    def __init__(
        self,
        max_transfers: int,
        *,
        device_transfers: int = 2,
        device_waiting: int = 2,
        max_waiting: int = MAX_WAITING,
        idle_s: float = IDLE_S,
        grace_s: float = GRACE_S,
    ) -> None:
        if max_transfers < 0 or device_transfers < 1 or device_waiting < 0 or max_waiting < 0:
            raise ValueError(
                "max_transfers >= 0, device_transfers >= 1, device_waiting >= 0 and "
                f"max_waiting >= 0, got {max_transfers}, {device_transfers}, {device_waiting}, "
                f"{max_waiting}"
            )
        self.max_transfers = max_transfers
        self.device_transfers = device_transfers
        self.device_waiting = device_waiting
        self.max_waiting = max_waiting
        self.idle_s = idle_s
        self.grace_s = grace_s
        self.active: dict[TransferKey, list[float]] = {}  # key -> [admitted at, last seen]
        self.finished: OrderedDict[TransferKey, float] = OrderedDict()  # key -> grace until
        self.waiting: OrderedDict[TransferKey, _Waiter] = OrderedDict()
        self.avg_s = 1.0  # moving average of an admitted transfer's duration
        self._active_of: Counter[str] = Counter()
        self._waiting_of: Counter[str] = Counter()

    def active_of(self, device_id: str) -> int:
        """Transfers of ``device_id`` served now."""
        return self._active_of[device_id]

    def waiting_of(self, device_id: str) -> int:
        """Places ``device_id`` holds in line."""
        return self._waiting_of[device_id]

    def is_served(self, key: TransferKey, now: float) -> bool:
        """True when ``key`` is admitted (or just finished); refreshes it."""
        act = self.active.get(key)
        if act is not None:
            act[1] = now
            return True
        until = self.finished.get(key)
        return until is not None and until > now

    def check(self, key: TransferKey, now: float, *, ttl_s: float | None = None) -> Decision:
        """Serve ``key`` now (admitting it if needed), or keep or refuse it a place in line.

        Args:
            key: (device id, canonical file).
            now: monotonic seconds.
            ttl_s: how long its place in line survives without a new request; default twice
                the retry hint + 2 s (a device that understands ``busy`` asks at that pace).
        """
        if self.is_served(key, now):
            return SERVE
        self._expire(now)
        dev = key[0]
        room = self._active_of[dev] < self.device_transfers
        free = (
            len(self.waiting) + 1  # more than anyone can be ahead
            if self.max_transfers == 0
            else self.max_transfers - len(self.active)
        )
        w = self.waiting.get(key)
        ahead = self._eligible_ahead(key if w is not None else None)
        if room and ahead < free:
            if w is not None:
                self._leave_line(key)
            self.active[key] = [now, now]
            self._active_of[dev] += 1
            return SERVE
        if room:  # others are first in line
            per_slot = self.avg_s / max(1, self.max_transfers)
            retry = (ahead - max(free, 0) + 1) * per_slot
        else:  # the device's own transfers hold its places
            retry = self.avg_s
        retry = min(MAX_RETRY_S, max(MIN_RETRY_S, retry))
        if w is None:
            if (
                len(self.waiting) >= self.max_waiting
                or self._waiting_of[dev] >= self.device_waiting
            ):
                return Decision(False, MAX_RETRY_S if room else retry, in_line=False)
            w = self.waiting[key] = _Waiter(now, 0.0)
            self._waiting_of[dev] += 1
        w.last = now
        w.ttl = ttl_s if ttl_s is not None else 2 * retry + 2.0
        return Decision(False, retry, in_line=True)

    def done(self, key: TransferKey, now: float) -> None:
        """``key`` served its last window (or failed): free its place."""
        act = self.active.pop(key, None)
        if act is None:
            return
        self._active_of[key[0]] -= 1
        if not self._active_of[key[0]]:
            del self._active_of[key[0]]
        self.avg_s = 0.8 * self.avg_s + 0.2 * max(0.0, now - act[0])
        self.finished[key] = now + self.grace_s
        self.finished.move_to_end(key)
        while len(self.finished) > MAX_FINISHED:
            self.finished.popitem(last=False)

    def _eligible_ahead(self, key: TransferKey | None) -> int:
        """Waiting transfers ahead of ``key`` (all of them for None) whose device has room."""
        n = 0
        for k in self.waiting:  # expired entries were removed by _expire
            if k == key:
                break
            if self._active_of[k[0]] < self.device_transfers:
                n += 1
        return n

    def _leave_line(self, key: TransferKey) -> None:
        del self.waiting[key]
        self._waiting_of[key[0]] -= 1
        if not self._waiting_of[key[0]]:
            del self._waiting_of[key[0]]

    def _expire(self, now: float) -> None:
        for key in [k for k, a in self.active.items() if now - a[1] > self.idle_s]:
            del self.active[key]
            self._active_of[key[0]] -= 1
            if not self._active_of[key[0]]:
                del self._active_of[key[0]]
        while self.finished and next(iter(self.finished.values())) <= now:
            self.finished.popitem(last=False)
        for key in [k for k, w in self.waiting.items() if now - w.last > w.ttl]:
            self._leave_line(key)


@dataclass
class DeviceUsage:
    """One device's share of a replica (counters since it was first seen, and peaks).

    Attributes:
        requests: request messages from it (valid or not).
        rate_limited: dropped unread: over ``device_rate``.
        throttled: not served now: over ``device_byte_rate``.
        shed: answers not queued: its or the fleet's queued-bytes bound was reached.
        refused: transfers refused a place in line (its ``device_waiting`` or the fleet's line
            was full).
        held: requests left unanswered while their transfer waits in line or the device is
            over its data rate (a device without ``busy_ok``: it asks again after its timeout).
        busy: answered ``busy``.
        transfers: transfers served now.
        waiting: places held in line now.
        queued_bytes: bytes of its answers in the outgoing queue now.
        peak_transfers: most transfers served at once.
        peak_waiting: most places held in line at once.
        peak_queued_bytes: most bytes of its answers queued at once.
    """

    requests: int = 0
    rate_limited: int = 0
    throttled: int = 0
    shed: int = 0
    refused: int = 0
    held: int = 0
    busy: int = 0
    transfers: int = 0
    waiting: int = 0
    queued_bytes: int = 0
    peak_transfers: int = 0
    peak_waiting: int = 0
    peak_queued_bytes: int = 0


_COUNTERS = frozenset(("requests", "rate_limited", "throttled", "shed", "refused", "held", "busy"))


class _Queued(Protocol):
    """Queued answer bytes and their peak: of one device (``DeviceUsage``) or of the fleet
    (``DeviceAccounts``); both bounds are checked and kept alike."""

    queued_bytes: int
    peak_queued_bytes: int


def _add_queued(q: _Queued, nbytes: int) -> None:
    """Add ``nbytes`` to ``q``'s queued bytes (negative: give back; never below 0), and keep
    its peak."""
    q.queued_bytes = max(0, q.queued_bytes + nbytes)
    q.peak_queued_bytes = max(q.peak_queued_bytes, q.queued_bytes)


@dataclass
class _Account:
    usage: DeviceUsage
    tokens: float  # requests
    at: float
    byte_tokens: float  # data bytes
    byte_at: float


class DeviceAccounts:
    """Per device: a request-rate token bucket and its queued answer bytes; and the fleet's.

    Args:
        limits: ``device_rate``, ``device_burst``, ``device_queued_bytes`` and
            ``max_queued_bytes`` are used.
        max_devices: devices tracked; beyond, the least recently seen one with nothing queued
            is forgotten (its counters start again if it comes back).
    """

    def __init__(self, limits: ServeLimits, *, max_devices: int = MAX_DEVICES) -> None:
        self.limits = limits
        self.max_devices = max_devices
        self.queued_bytes = 0
        self.peak_queued_bytes = 0
        self._accounts: OrderedDict[str, _Account] = OrderedDict()

    def _account(self, device_id: str, now: float) -> _Account:
        acc = self._accounts.get(device_id)
        if acc is not None:
            self._accounts.move_to_end(device_id)
            return acc
        lim = self.limits
        acc = self._accounts[device_id] = _Account(
            DeviceUsage(), float(lim.device_burst), now, float(lim.device_byte_burst), now
        )
        if len(self._accounts) > self.max_devices:
            for dev in list(self._accounts)[:64]:  # a device with queued bytes must stay
                if self._accounts[dev].usage.queued_bytes == 0 and dev != device_id:
                    del self._accounts[dev]
                    break
        return acc

    def request(self, device_id: str, now: float) -> bool:
        """Count one request; False (counted ``rate_limited``) when over the device's rate.

        Every request takes a token, refused ones too (down to ``-device_burst``): a device
        that keeps sending faster than ``device_rate`` stays refused until it slows down.
        """
        acc = self._account(device_id, now)
        acc.usage.requests += 1
        lim = self.limits
        acc.tokens = min(
            float(lim.device_burst), acc.tokens + max(0.0, now - acc.at) * lim.device_rate
        )
        acc.at = now
        allowed = acc.tokens >= 1.0
        acc.tokens = max(-float(lim.device_burst), acc.tokens - 1.0)
        if not allowed:
            acc.usage.rate_limited += 1
        return allowed

    def draw(self, device_id: str, nbytes: int, now: float) -> float | None:
        """Take ``nbytes`` of the device's data rate: None when granted, else the seconds until
        they would be (counted ``throttled``; nothing is taken)."""
        acc = self._account(device_id, now)
        lim = self.limits
        acc.byte_tokens = min(
            float(lim.device_byte_burst),
            acc.byte_tokens + max(0.0, now - acc.byte_at) * lim.device_byte_rate,
        )
        acc.byte_at = now
        if acc.byte_tokens >= nbytes:
            acc.byte_tokens -= nbytes
            return None
        acc.usage.throttled += 1
        return (nbytes - acc.byte_tokens) / lim.device_byte_rate

    def reserve(self, device_id: str, nbytes: int) -> bool:
        """Take ``nbytes`` of queue for one answer; False (counted ``shed``) past a bound."""
        u = self._account(device_id, 0.0).usage
        bounds: tuple[tuple[_Queued, int], ...] = (
            (u, self.limits.device_queued_bytes),
            (self, self.limits.max_queued_bytes),
        )
        if any(q.queued_bytes + nbytes > bound for q, bound in bounds):
            u.shed += 1
            return False
        for q, _ in bounds:
            _add_queued(q, nbytes)
        return True

    def release(self, device_id: str, nbytes: int) -> None:
        """Give back ``nbytes`` taken by ``reserve`` (the answer left the queue, or never went)."""
        acc = self._accounts.get(device_id)
        if acc is not None:
            _add_queued(acc.usage, -nbytes)
        _add_queued(self, -nbytes)

    def count(self, device_id: str, name: str, n: int = 1) -> None:
        """Add ``n`` to one of the counters of ``DeviceUsage`` (``busy``, ``held``, …)."""
        if name not in _COUNTERS:
            raise ValueError(f"{name!r} is not a DeviceUsage counter")
        u = self._account(device_id, 0.0).usage
        setattr(u, name, getattr(u, name) + n)

    def note_transfers(self, device_id: str, transfers: int, waiting: int) -> None:
        """Record the device's transfers served and places in line now (for the peaks)."""
        acc = self._accounts.get(device_id)
        if acc is None:
            return
        u = acc.usage
        u.transfers, u.waiting = transfers, waiting
        u.peak_transfers = max(u.peak_transfers, transfers)
        u.peak_waiting = max(u.peak_waiting, waiting)

    def usage(self, device_id: str) -> DeviceUsage | None:
        """A copy of the device's usage, or None for a device not (or no longer) tracked."""
        acc = self._accounts.get(device_id)
        return None if acc is None else replace(acc.usage)

    def devices(self) -> list[str]:
        """Tracked devices, least recently seen first."""
        return list(self._accounts)
