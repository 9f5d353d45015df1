"""Adapter: serves the registry's TUF repository to devices as byte windows over MQTT.

A device publishes a ``FetchRequest`` on ``ROOT/devices/D/fetch/req``; every replica of the
registry subscribes to the *shared* subscription ``$share/GROUP/ROOT/devices/+/fetch/req``, so
the broker hands each request to exactly one replica, which answers on
``ROOT/devices/D/fetch/resp`` (QoS 1) with the window ``[offset, offset + length)`` of
``repo_dir/<path>`` and the file's total size.

The server trusts nothing in a request. The path must match the contract's pattern and
normalise (``canonical_path``: ``targets/./x`` and ``targets//x`` are ``targets/x``; ``..``
and hidden segments are refused), and once resolved, symlinks included, it must still lie in
``repo_dir/metadata`` or ``repo_dir/targets``: nothing else below ``repo_dir`` is served, so
a link ``targets/k -> ../keys`` is refused. Refusals are answered ``bad_request`` with the
reason when an id can be recovered, counted and dropped otherwise. Content is never checked
here: devices verify every byte against signed TUF metadata. Every paho callback catches
whatever it raises (a request must cost at most itself, never paho's network thread).

Requests are served on paho's network thread by default: a window is one ``pread`` from the
page cache, and handing it to a pool only adds thread switches (``scripts/bench_transfer.py``:
196 MB/s on paho's thread against 169 MB/s with a pool of 4, 10 MB file, 64 KiB windows,
8 in flight); ``workers=N`` turns the pool on for slow disks.

Admission (``cloud_sync.registry.admission``), for every request, in this order:

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

What this cannot do: every request still costs the replica its reading. Measured here under
a flood, 9 in 10 requests dropped over the rate: ~70 µs of CPU per request, most of it paho's,
about 15,000 requests/s per core. A flood faster than that delays everyone's requests in the
broker and must be stopped there (Mosquitto 2.0 has no per-client rate limit: revoke the device
the rate-limit log line names, or run more replicas, which split the flood).

Requests that waited longer than the device's ``timeout_s`` are dropped unanswered: the device
has asked again already. Replicas admit on their own, so a device that understands it
(``sticky_ok``) is told which replica answered and sends the rest of the transfer to that
replica's own topic (``ROOT/devices/+/fetch/req/CLIENT_ID``, subscribed next to the shared
one): the replica that admitted a transfer sees all its windows, the last one included.
Without that, a transfer needed a place on every replica (its requests alternated between
them) and held each for ``IDLE_S`` after it ended on another (measured at 1,000 devices, two
replicas: 68,000 busy answers in one rollout).
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from agent.common.errors import TransportError
from agent.common.mqtt import configure_service_tls, make_client, parse_broker_url
from agent.protocol.fetch import (
    MAX_CHUNK,
    FetchHeader,
    FetchRequest,
    encode_response,
)
from agent.protocol.topics import DEFAULT_ROOT, REGISTRY_SHARE_GROUP, Topics, valid_device_id
from agent.protocol.wire import BadMessage
from cloud_sync.registry.admission import (
    ANSWER_OVERHEAD,
    GRACE_S,
    HOLD_TTL_S,
    IDLE_S,
    MAX_RETRY_S,
    MIN_RETRY_S,
    Admission,
    Decision,
    DeviceAccounts,
    DeviceUsage,
    PathError,
    ServeLimits,
    TransferKey,
    _Clocks,
    canonical_path,
)
from cloud_sync.registry.answer_queue import AnswerQueue, Outcome
from cloud_sync.registry.fair import FairPool
from cloud_sync.registry.served_tree import (
    ServedTree,
    fits_one_window,
    read_window,
    resolve_repo_path,
)

__all__ = [
    "GRACE_S",
    "IDLE_S",
    "MAX_REQUEST_BYTES",
    "Admission",
    "ChunkServer",
    "DeviceUsage",
    "ServeLimits",
    "ServerStats",
    "_Clocks",
    "read_window",
    "resolve_repo_path",
]

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096  # a valid request is < 700 bytes; bigger ones are not even parsed
# QoS 1 answers awaiting PUBACK: no count limit (0), the byte bounds decide. A count shared by
# all devices lets one device's unacknowledged answers hold everyone's back in paho's queue
# (paho's default of 20 also throttled windows).
MAX_INFLIGHT = 0
MAX_TRANSFERS = ServeLimits().max_transfers
LOG_EVERY_S = 10.0  # one log line per kind of refusal this often (a flood must not flood logs)


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


def _recover_id(payload: bytes) -> tuple[str, str] | None:
    """``(id, path)`` of a request that failed validation, if the id can be trusted to echo."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays
        return None
    if not isinstance(obj, dict):
        return None
    rid, path = obj.get("id"), obj.get("path")
    if not isinstance(rid, str) or not 1 <= len(rid) <= 64:
        return None
    return rid, path[:600] if isinstance(path, str) else ""


def _charge(req: FetchRequest) -> int:
    """Queue bytes to reserve for the answer to ``req`` (the largest it can be)."""
    return 4 + 300 + 2 * len(req.path) + min(req.length, MAX_CHUNK) + ANSWER_OVERHEAD


class _LogLimiter:
    """At most one log line per kind every ``every_s``; tells how many were left out."""

    def __init__(self, every_s: float = LOG_EVERY_S) -> None:
        self.every_s = every_s
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, kind: str, now: float) -> int | None:
        """None: stay silent; else log now, mentioning the returned count left out."""
        at, skipped = self._last.get(kind, (-self.every_s, 0))
        if now - at < self.every_s:
            self._last[kind] = (at, skipped + 1)
            return None
        self._last[kind] = (now, 0)
        return skipped


@dataclass
class _Job:
    """An accepted request waiting to be read and answered."""

    device_id: str
    req: FetchRequest
    file: Path
    key: TransferKey | None  # the admitted transfer, released at its last window
    reserved: int = 0  # queue bytes reserved for the answer


class ChunkServer:
    """One registry replica answering chunk requests for every device.

    Args:
        repo_dir: the TUF repository (``metadata/`` and ``targets/`` below it are served).
        broker_url: ``mqtt://host:port`` or ``mqtts://host:port``.
        root: topic root.
        client_id: MQTT client id, unique per replica.
        share_group: shared-subscription group; replicas in one group split the requests.
            None subscribes without ``$share`` (a broker without shared subscriptions; then
            run a single replica).
        on_tick: called with ``time.time()`` about every second from ``serve_forever`` (the
            registry re-signs timestamp metadata there before it expires).
        workers: 0 serves on paho's thread; N > 0 uses a pool of N threads.
        max_transfers: transfers served at once (overrides ``limits.max_transfers``); 0: no
            fleet-wide limit (the per-device limits still apply).
        limits: per-device and fleet-wide limits (default ``ServeLimits()``).
        tls_context: for ``mqtts://``; default: from the environment (``EDGEFLEET_TLS_*``,
            see ``agent.common.mqtt.configure_service_tls``).

    Raises:
        ValueError: a bad broker URL, ``workers < 0`` or ``max_transfers < 0``.
    """

    def __init__(
        self,
        repo_dir: Path,
        broker_url: str,
        *,
        root: str = DEFAULT_ROOT,
        client_id: str,
        share_group: str | None = REGISTRY_SHARE_GROUP,
        on_tick: Callable[[float], None] | None = None,
        workers: int = 0,
        max_transfers: int | None = None,
        limits: ServeLimits | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if workers < 0 or (max_transfers is not None and max_transfers < 0):
            raise ValueError(
                f"workers and max_transfers must be >= 0, got {workers}, {max_transfers}"
            )
        limits = limits or ServeLimits()
        if max_transfers is not None:
            limits = limits.model_copy(update={"max_transfers": max_transfers})
        self.limits = limits
        self._admission = Admission(
            limits.max_transfers,
            device_transfers=limits.device_transfers,
            device_waiting=limits.device_waiting,
        )
        self._accounts = DeviceAccounts(limits)
        self._clocks = _Clocks()
        self._tree = ServedTree(Path(repo_dir))
        self.repo_root = self._tree.repo_root
        self.host, self.port, tls = parse_broker_url(broker_url)
        self.topics = Topics(root)
        self.subscription = self.topics.shared(share_group, "fetch/req")
        # sticky transfers: this replica's own request topic (needs a topic-safe client id)
        self.replica = client_id if share_group is not None and valid_device_id(client_id) else None
        self.direct = self.topics.all_replica_requests(self.replica) if self.replica else None
        self.client_id = client_id
        self.on_tick = on_tick
        self._stats = ServerStats()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._sub_mid: int | None = None
        self._sub_failure = ""
        # devices served in turn, not in arrival order (fair.py: one device's backlog does
        # not hold up everyone else's next window)
        self._pool: FairPool[_Job] | None = FairPool(workers, self._finish) if workers else None
        self._log_limit = _LogLimiter()
        self.client = make_client(client_id, clean=True)
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
        # A backstop only: the byte bound (each answer charged >= ANSWER_OVERHEAD) is tighter.
        self.client.max_queued_messages_set(limits.max_queued_bytes // ANSWER_OVERHEAD + 16)
        if tls and tls_context is not None:
            self.client.tls_set_context(tls_context)
        elif tls:
            configure_service_tls(self.client)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self._answers = AnswerQueue(self.client, self._accounts, self._lock)
        # Every subscription of this client is a request topic: one callback for all, without
        # paho's per-message topic matching (~10 % of a flood's cost; _intake parses anyway).
        self.client.on_message = self._on_message

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout_s: float = 10.0) -> None:
        """Connect and start paho's thread (it reconnects and resubscribes on its own).

        Args:
            wait: block until the shared subscription is acknowledged.
            timeout_s: how long to wait.

        Raises:
            TransportError: with ``wait``, not subscribed within ``timeout_s`` (broker down or
                the subscription refused); the client keeps retrying until ``stop()``.
        """
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()
        if wait and not self._ready.wait(timeout_s):
            why = self._sub_failure or "no CONNACK/SUBACK"
            raise TransportError(
                f"chunk server {self.client_id} not serving {self.subscription} on "
                f"{self.host}:{self.port} after {timeout_s} s ({why}); still retrying"
            )
        log.info(
            "chunk server %s serving %s from %s", self.client_id, self.subscription, self.repo_root
        )

    def stop(self) -> None:
        """Disconnect, stop paho's thread and the pool (pending answers are dropped)."""
        self.client.disconnect()
        self.client.loop_stop()
        if self.client.is_connected() or self.client.socket() is not None:
            # paho race: a disconnect() while its thread is inside reconnect() is lost
            # (reconnect() resets the state to CONNECTING, and the CONNACK may follow). With
            # the thread gone, this one is written at once and closes the socket.
            self.client.disconnect()
        if self._pool is not None:
            for job in self._pool.shutdown():
                self._unreserve(job)
        self._ready.clear()

    def serve_forever(self, stop_event: threading.Event, *, tick_s: float = 1.0) -> None:
        """``start()``; ``on_tick(now)`` about every ``tick_s`` until ``stop_event``; ``stop()``.

        Raises:
            Exception: whatever ``on_tick`` raises, after stopping (a registry that cannot
                re-sign its timestamp must not keep serving as if it could).
        """
        self.start(wait=False)
        try:
            next_tick = time.monotonic()
            while not stop_event.is_set():
                if self.on_tick is not None and time.monotonic() >= next_tick:
                    self.on_tick(time.time())
                    next_tick = time.monotonic() + tick_s
                stop_event.wait(max(0.0, min(tick_s, next_tick - time.monotonic())))
        finally:
            self.stop()

    def ready(self) -> bool:
        """True while connected with the shared subscription acknowledged."""
        return self._ready.is_set()

    def stats(self) -> ServerStats:
        """A copy of the counters."""
        with self._lock:
            return replace(
                self._stats,
                queued_bytes=self._accounts.queued_bytes,
                peak_queued_bytes=self._accounts.peak_queued_bytes,
                by_device=dict(self._stats.by_device),
                bytes_by_device=dict(self._stats.bytes_by_device),
            )

    def usage(self, device_id: str) -> DeviceUsage | None:
        """A copy of one device's usage (rate, transfers, line, queued bytes, peaks)."""
        with self._lock:
            return self._accounts.usage(device_id)

    # -- paho callbacks (network thread): none lets an exception reach paho ------------------

    def _on_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        try:
            if reason.is_failure:
                self._sub_failure = f"CONNACK {reason}"
                log.warning(
                    "chunk server %s: broker refused connection: %s", self.client_id, reason
                )
                return
            subs = [(self.subscription, 1)] + ([(self.direct, 1)] if self.direct else [])
            rc, mid = client.subscribe(subs)
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._sub_failure = f"subscribe rc={rc}"
                log.warning("chunk server %s: subscribe failed rc=%s", self.client_id, rc)
                return
            self._sub_mid = mid
        except Exception:
            log.exception("chunk server %s: on_connect failed; paho reconnects", self.client_id)

    def _on_subscribe(
        self, _c: mqtt.Client, _ud: Any, mid: int, reasons: list[Any], _props: Any
    ) -> None:
        try:
            if mid != self._sub_mid:
                return
            if any(r.is_failure for r in reasons):
                self._sub_failure = f"SUBACK {[str(r) for r in reasons]}"
                log.error(
                    "chunk server %s: broker refused %s: %s",
                    self.client_id,
                    self.subscription,
                    self._sub_failure,
                )
                return
            self._sub_failure = ""
            self._ready.set()
        except Exception:
            log.exception("chunk server %s: on_subscribe failed", self.client_id)

    def _on_disconnect(
        self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._ready.clear()
        try:
            if reason.is_failure:
                log.warning(
                    "chunk server %s: disconnected (%s); paho reconnects", self.client_id, reason
                )
        except Exception:
            log.exception("chunk server %s: on_disconnect failed", self.client_id)

    def _on_publish(self, _c: mqtt.Client, _ud: Any, mid: int, _rc: Any, _props: Any) -> None:
        """The broker acknowledged an answer: its bytes leave the outgoing queue."""
        try:
            self._answers.acknowledged(mid)
        except Exception:
            log.exception("chunk server %s: on_publish failed", self.client_id)

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            try:
                topic = msg.topic  # decodes UTF-8
            except UnicodeDecodeError:
                self._count(requests=1, dropped=1)
                self._log("topic", time.monotonic(), "chunk request on a non-UTF-8 topic dropped")
                return
            payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
            job = self._intake(topic, payload)
            if job is not None:
                self._dispatch(job)
        except Exception:  # a bug here must cost one request, not the replica
            log.exception("chunk request crashed the handler; dropped")
            self._count(errors=1, dropped=1)

    # -- serving ------------------------------------------------------------------------

    def _dispatch(self, job: _Job) -> None:
        """Answer ``job`` on this thread, or hand it to the pool; never raises."""
        if self._pool is None:
            self._finish(job)
            return
        try:
            self._pool.submit(job.device_id, job)
        except RuntimeError:  # the pool is shut down: stop() is under way
            self._unreserve(job)

    def _intake(self, topic: str, payload: bytes) -> _Job | None:
        """Rate-limit, parse, check and admit one request (cheap: no file reads).

        Bad, forbidden, expired, over-rate and not-admitted requests are answered (or dropped)
        here; the rest come back as a ``_Job`` for ``_finish``, with queue bytes reserved.
        """
        now = time.monotonic()
        parsed = self.topics.parse(topic)
        device_id = parsed[0] if parsed is not None and parsed[1] == "fetch/req" else None
        with self._lock:
            self._stats.requests += 1
            allowed = True
            if device_id is not None:
                by = self._stats.by_device
                by[device_id] = by.get(device_id, 0) + 1
                allowed = self._accounts.request(device_id, now)
                if not allowed:
                    self._stats.rate_limited += 1
        if device_id is None:
            self._count(dropped=1)
            self._log("topic", now, "chunk request on unexpected topic %r dropped", topic[:200])
            return None
        if not allowed:
            self._log(
                "rate",
                now,
                "chunk requests from %s over its rate (%s/s); dropped. A device that keeps on is "
                "broken or hostile: revoke it (edgefleet ca revoke %s --dir CA)",
                device_id,
                self.limits.device_rate,
                device_id,
            )
            return None
        decoded = self._decode(payload)
        if decoded is None:
            return None
        if isinstance(decoded, FetchHeader):
            self._publish(device_id, decoded, b"")
            return None
        req, file = decoded
        if self._expired(device_id, req, learn=True):
            return None
        return self._admit(device_id, req, file, now)

    def _admit(self, device_id: str, req: FetchRequest, file: Path, now: float) -> _Job | None:
        """Admission for one valid request: a ``_Job``, or None (answered busy or dropped).

        In order: the transfer's place (or a single-window file's exemption), the device's
        data rate, the queue bytes for the answer.
        """
        key = (device_id, str(file))
        # A single-window file is cheaper to serve than to queue: no admission.
        single = req.offset == 0 and fits_one_window(file, req.length)
        with self._lock:
            adm = self._admission
            if single and not adm.is_served(key, now):
                decision = Decision(True)
                self._stats.exempt += 1
            else:
                was_active = key in adm.active
                decision = adm.check(key, now, ttl_s=None if req.busy_ok else HOLD_TTL_S)
                if decision.admitted and not was_active and key in adm.active:
                    self._stats.admitted += 1
            self._accounts.note_transfers(
                device_id, adm.active_of(device_id), adm.waiting_of(device_id)
            )
            if decision.admitted:
                wait = self._accounts.draw(device_id, min(req.length, MAX_CHUNK), now)
                if wait is not None:
                    self._stats.throttled += 1
                    retry = min(MAX_RETRY_S, max(MIN_RETRY_S, wait))
                    decision = Decision(False, retry, in_line=True)
            if decision.admitted:
                reserved = _charge(req)
                if not self._accounts.reserve(device_id, reserved):
                    self._stats.shed += 1
                    return None
                admitted = key in adm.active
                return _Job(device_id, req, file, key if admitted else None, reserved)
            if not decision.in_line:
                self._stats.refused += 1
                self._accounts.count(device_id, "refused")
            if not req.busy_ok:
                if decision.in_line:
                    self._stats.held += 1
                    self._accounts.count(device_id, "held")
                return None  # no answer it understands: it asks again after its timeout
            self._stats.busy += 1
            self._accounts.count(device_id, "busy")
        busy = FetchHeader(
            id=req.id,
            path=req.path,
            offset=req.offset,
            total=0,
            status="busy",
            retry_after_s=round(decision.retry_after_s, 3),
            error="" if decision.in_line else "the registry's line is full for this device",
        )
        self._publish(device_id, busy, b"")
        return None

    def _finish(self, job: _Job) -> None:
        """Read and answer an accepted request; never raises."""
        try:
            if self._expired(job.device_id, job.req, learn=False):
                self._unreserve(job)
                return
            header, data = self._read(job.req, job.file)
            if job.key is not None and (
                header.status != "ok" or job.req.offset + len(data) >= header.total
            ):
                self._release(job.key)
        except Exception:  # a bug here must cost one request, not the replica
            log.exception("chunk request from %s crashed the handler; dropped", job.device_id)
            self._count(errors=1, dropped=1)
            self._unreserve(job)
            return
        self._publish(job.device_id, header, data, reserved=job.reserved)

    def _unreserve(self, job: _Job) -> None:
        self._answers.release(job.device_id, job.reserved)

    def _release(self, key: TransferKey) -> None:
        with self._lock:
            if key in self._admission.active:
                self._admission.done(key, time.monotonic())
                dev = key[0]
                self._accounts.note_transfers(
                    dev, self._admission.active_of(dev), self._admission.waiting_of(dev)
                )

    def _expired(self, device_id: str, req: FetchRequest, *, learn: bool) -> bool:
        """True (counted) when the request waited longer than the device waits for it."""
        if req.sent_at is None or req.timeout_s is None:
            return False
        with self._lock:
            waited = self._clocks.delay(device_id, req.sent_at, time.time(), learn=learn)
        if waited <= req.timeout_s:
            return False
        self._count(expired=1)
        return True

    def _decode(self, payload: bytes) -> tuple[FetchRequest, Path] | FetchHeader | None:
        """The request and its file; or the ``bad_request`` answer; or None (drop). Counts."""
        if len(payload) > MAX_REQUEST_BYTES:
            self._count(bad_requests=1, dropped=1)
            return None
        try:
            req = FetchRequest.decode(payload)
        except BadMessage as e:
            self._count(bad_requests=1)
            recovered = _recover_id(payload)
            if recovered is None:
                self._count(dropped=1)
                return None
            rid, path = recovered
            return self._status(rid, path, 0, "bad_request", str(e))
        try:
            canon = canonical_path(req.path)
        except PathError as e:
            self._count(bad_requests=1)
            return self._status(req.id, req.path, req.offset, "bad_request", f"{e}; refused")
        if canon != req.path:
            self._count(aliases=1)
        file = self._tree.resolve(canon)
        if file is None:
            self._count(bad_requests=1)
            self._log(
                "escape",
                time.monotonic(),
                "chunk request %s for %r leads out of metadata/ and targets/; refused",
                req.id,
                req.path,
            )
            return self._status(
                req.id,
                req.path,
                req.offset,
                "bad_request",
                f"path {req.path!r} is outside the served metadata/ and targets/",
            )
        return req, file

    def answer(self, payload: bytes) -> tuple[FetchHeader | None, bytes]:
        """The answer to one request payload, or ``(None, b"")`` when none can be sent.

        No admission, rate or queue bound (for tests and tools answering one request at a
        time). Counts into ``stats()``; never raises for bad input (malformed, forbidden,
        missing).
        """
        decoded = self._decode(payload)
        if decoded is None:
            return None, b""
        if isinstance(decoded, FetchHeader):
            return decoded, b""
        return self._read(*decoded)

    def _read(self, req: FetchRequest, file: Path) -> tuple[FetchHeader, bytes]:
        """The answer to a valid request for ``file`` (``ok``, ``not_found`` or ``error``)."""
        try:
            total, data = read_window(file, req.offset, req.length)
        except FileNotFoundError:
            self._count(not_found=1)
            return self._status(req.id, req.path, req.offset, "not_found", ""), b""
        except OSError as e:
            self._count(errors=1)
            log.error("chunk request %s: reading %s failed: %s", req.id, file, e)
            return self._status(
                req.id,
                req.path,
                req.offset,
                "error",
                f"registry could not read the file: {e.strerror}",
            ), b""
        replica = self.replica if req.sticky_ok else None
        return FetchHeader(
            id=req.id, path=req.path, offset=req.offset, total=total, replica=replica
        ), data

    @staticmethod
    def _status(rid: str, path: str, offset: int, status: Any, error: str) -> FetchHeader:
        return FetchHeader(
            id=rid, path=path, offset=offset, total=0, status=status, error=error[:500]
        )

    def _publish(self, device_id: str, header: FetchHeader, data: bytes, reserved: int = 0) -> None:
        """Queue one answer within the byte bounds (``reserved`` exchanged); never raises."""
        topic = self.topics.device(device_id, "fetch/resp")
        outcome, rc = self._answers.send(
            device_id, topic, encode_response(header, data), reserved=reserved
        )
        if outcome is Outcome.SHED:
            self._count(shed=1)
            return
        if outcome is Outcome.FAILED:
            self._count(errors=1, dropped=1)
            self._log(
                "queue",
                time.monotonic(),
                "chunk response %s to %s not queued (rc=%s); the device will retry",
                header.id,
                device_id,
                rc,
            )
            return
        with self._lock:
            self._stats.answered += 1
            self._stats.bytes_sent += len(data)
            by = self._stats.bytes_by_device
            by[device_id] = by.get(device_id, 0) + len(data)

    def _log(self, kind: str, now: float, msg: str, *args: Any) -> None:
        """A warning, at most one per ``kind`` every ``LOG_EVERY_S``."""
        with self._lock:
            skipped = self._log_limit(kind, now)
        if skipped is None:
            return
        if skipped:
            log.warning(msg + " (%d more like it not logged)", *args, skipped)
        else:
            log.warning(msg, *args)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + n)
