"""Adapter: serves the registry's TUF repository to devices as byte windows over MQTT.

A device publishes a ``FetchRequest`` on ``ROOT/devices/D/fetch/req``; every replica of the
registry subscribes to the *shared* subscription ``$share/GROUP/ROOT/devices/+/fetch/req``, so
the broker hands each request to exactly one replica, which answers on
``ROOT/devices/D/fetch/resp`` (QoS 1) with the window ``[offset, offset + length)`` of
``repo_dir/<path>`` and the file's total size.

The checks of a request and the reading of its window are ``reader``'s (nothing in a
request is trusted; the path must stay in ``metadata/`` or ``targets/``); the admission of
each valid request and the counters are ``gate``'s. Every paho callback catches whatever it
raises (a request must cost at most itself, never paho's network thread).

Requests are served on paho's network thread by default: a window is one ``pread`` from the
page cache, and handing it to a pool only adds thread switches (``scripts/bench_transfer.py``:
196 MB/s on paho's thread against 169 MB/s with a pool of 4, 10 MB file, 64 KiB windows,
8 in flight); ``workers=N`` turns the pool on for slow disks.

Admission (``cloud_sync.registry.gate``, ``cloud_sync.registry.admission``), for every
request, in this order: the device's request rate (dropped unread), the transfer's place in
a first-come-first-served line (``busy`` with ``retry_after_s``, or no answer for an old
device), the device's data rate, the bytes of answers queued (``shed``).

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

import logging
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from agent.common.errors import TransportError
from agent.common.mqtt import configure_service_tls, make_client, parse_broker_url
from agent.protocol.fetch import FetchHeader, FetchRequest, encode_response
from agent.protocol.topics import DEFAULT_ROOT, REGISTRY_SHARE_GROUP, Topics, valid_device_id
from cloud_sync.registry.admission import (
    ANSWER_OVERHEAD,
    GRACE_S,
    IDLE_S,
    Admission,
    DeviceUsage,
    ServeLimits,
    TransferKey,
)
from cloud_sync.registry.answer_queue import AnswerQueue, Outcome
from cloud_sync.registry.fair import FairPool
from cloud_sync.registry.gate import Gate, Job, ServerStats
from cloud_sync.registry.reader import RequestReader
from cloud_sync.registry.served_tree import (
    ServedTree,
    fits_one_window,
    read_window,
    resolve_repo_path,
)

__all__ = [
    "GRACE_S",
    "IDLE_S",
    "Admission",
    "ChunkServer",
    "DeviceUsage",
    "ServeLimits",
    "read_window",
    "resolve_repo_path",
]

log = logging.getLogger(__name__)

# QoS 1 answers awaiting PUBACK: no count limit (0), the byte bounds decide. A count shared by
# all devices lets one device's unacknowledged answers hold everyone's back in paho's queue
# (paho's default of 20 also throttled windows).
MAX_INFLIGHT = 0
LOG_EVERY_S = 10.0  # one log line per kind of refusal this often (a flood must not flood logs)


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
        self._gate = Gate(limits)
        tree = ServedTree(Path(repo_dir))
        self.repo_root = tree.repo_root
        self.host, self.port, tls = parse_broker_url(broker_url)
        self.topics = Topics(root)
        self.subscription = self.topics.shared(share_group, "fetch/req")
        # sticky transfers: this replica's own request topic (needs a topic-safe client id)
        self.replica = client_id if share_group is not None and valid_device_id(client_id) else None
        self.direct = self.topics.all_replica_requests(self.replica) if self.replica else None
        self.client_id = client_id
        self.on_tick = on_tick
        self._reader = RequestReader(tree, self.replica, self._count, self._log)
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._sub_mid: int | None = None
        self._sub_failure = ""
        # devices served in turn, not in arrival order (fair.py: one device's backlog does
        # not hold up everyone else's next window)
        self._pool: FairPool[Job] | None = FairPool(workers, self._finish) if workers else None
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
        self._answers = AnswerQueue(self.client, self._gate.accounts, self._lock)
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
            return self._gate.snapshot()

    def usage(self, device_id: str) -> DeviceUsage | None:
        """A copy of one device's usage (rate, transfers, line, queued bytes, peaks)."""
        with self._lock:
            return self._gate.accounts.usage(device_id)

    @property
    def _admission(self) -> Admission:
        """The replica's transfers and line (hold ``_lock`` to use it)."""
        return self._gate.admission

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

    def _dispatch(self, job: Job) -> None:
        """Answer ``job`` on this thread, or hand it to the pool; never raises."""
        if self._pool is None:
            self._finish(job)
            return
        try:
            self._pool.submit(job.device_id, job)
        except RuntimeError:  # the pool is shut down: stop() is under way
            self._unreserve(job)

    def _intake(self, topic: str, payload: bytes) -> Job | None:
        """Rate-limit, parse, check and admit one request (cheap: no file reads).

        Bad, forbidden, expired, over-rate and not-admitted requests are answered (or dropped)
        here; the rest come back as a ``Job`` for ``_finish``, with queue bytes reserved.
        """
        now = time.monotonic()
        parsed = self.topics.parse(topic)
        device_id = parsed[0] if parsed is not None and parsed[1] == "fetch/req" else None
        with self._lock:
            allowed = self._gate.request(device_id, now)
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
        decoded = self._reader.decode(payload)
        if decoded is None:
            return None
        if isinstance(decoded, FetchHeader):
            self._publish(device_id, decoded, b"")
            return None
        req, file = decoded
        if self._expired(device_id, req, learn=True):
            return None
        return self._admit(device_id, req, file, now)

    def _admit(self, device_id: str, req: FetchRequest, file: Path, now: float) -> Job | None:
        """Admission for one valid request (``Gate.admit``): a ``Job``, or None (answered
        busy or dropped)."""
        # A single-window file is cheaper to serve than to queue: no admission.
        single = req.offset == 0 and fits_one_window(file, req.length)
        with self._lock:
            outcome = self._gate.admit(device_id, req, file, single=single, now=now)
        if isinstance(outcome, FetchHeader):
            self._publish(device_id, outcome, b"")
            return None
        return outcome

    def _finish(self, job: Job) -> None:
        """Read and answer an accepted request; never raises."""
        try:
            if self._expired(job.device_id, job.req, learn=False):
                self._unreserve(job)
                return
            header, data = self._reader.read(job.req, job.file)
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

    def _unreserve(self, job: Job) -> None:
        self._answers.release(job.device_id, job.reserved)

    def _release(self, key: TransferKey) -> None:
        with self._lock:
            self._gate.release(key, time.monotonic())

    def _expired(self, device_id: str, req: FetchRequest, *, learn: bool) -> bool:
        """True (counted) when the request waited longer than the device waits for it."""
        with self._lock:
            return self._gate.expired(device_id, req, time.time(), learn=learn)

    def answer(self, payload: bytes) -> tuple[FetchHeader | None, bytes]:
        """The answer to one request payload, or ``(None, b"")`` when none can be sent.

        No admission, rate or queue bound (for tests and tools answering one request at a
        time). Counts into ``stats()``; never raises for bad input (malformed, forbidden,
        missing).
        """
        decoded = self._reader.decode(payload)
        if decoded is None:
            return None, b""
        if isinstance(decoded, FetchHeader):
            return decoded, b""
        return self._reader.read(*decoded)

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
            stats = self._gate.stats
            stats.answered += 1
            stats.bytes_sent += len(data)
            by = stats.bytes_by_device
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
            self._gate.count(**deltas)
