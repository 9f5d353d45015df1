"""Adapter: serves the registry's TUF repository to devices as byte windows over MQTT.

A device publishes a ``FetchRequest`` on ``ROOT/devices/D/fetch/req``; every replica of the
registry subscribes to the *shared* subscription ``$share/GROUP/ROOT/devices/+/fetch/req``, so
the broker hands each request to exactly one replica, which answers on
``ROOT/devices/D/fetch/resp`` (QoS 1) with the window ``[offset, offset + length)`` of
``repo_dir/<path>`` and the file's total size.

The server trusts nothing in a request: the path must match the contract's pattern, contain no
``..``, and still lie inside ``repo_dir`` once resolved (symlinks included); anything else is
answered ``bad_request`` when an id can be recovered, counted and dropped otherwise. Content is
never checked here: devices verify every byte against signed TUF metadata.

Requests are served on paho's network thread by default: a window is one ``pread`` from the
page cache, and handing it to a pool only adds thread switches (``scripts/bench_transfer.py``:
196 MB/s on paho's thread against 169 MB/s with a pool of 4, 10 MB file, 64 KiB windows,
8 in flight); ``workers=N`` turns the pool on for slow disks.

Flow control (requests with ``busy_ok``, see ``agent.protocol.fetch``): at most
``max_transfers`` transfers — a (device, path) pair — are served at once; the others get a
cheap ``busy`` answer with ``retry_after_s`` and wait in a first-come-first-served line
(``Admission``). A transfer is released when the window holding the end of its file is
served, or after ``IDLE_S`` without a request. A single-window file (metadata) needs no
admission. Replicas admit on their own, so a device that understands it (``sticky_ok``) is told
which replica answered and sends the rest of the transfer to that replica's own topic
(``ROOT/devices/+/fetch/req/CLIENT_ID``, subscribed next to the shared one): the replica that
admitted a transfer sees all its windows, the last one included. Without that, a transfer
needed a place on every replica (its requests alternated between them) and held each for
``IDLE_S`` after it ended on another (measured at 1,000 devices, two replicas: 68,000 busy
answers in one rollout). Requests that waited longer than the device's ``timeout_s`` are dropped
unanswered: the device has asked again already. Admission runs on paho's thread before the
pool, so neither the pool's queue nor paho's outgoing queue grows with the number of devices:
``max_transfers x window`` answers at most (32 x 32 by default, against
``MAX_QUEUED_RESPONSES``). Requests without ``busy_ok`` (older devices) are served as before.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode

from agent.errors import TransportError
from agent.protocol.fetch import (
    MAX_CHUNK,
    BadMessage,
    FetchHeader,
    FetchRequest,
    encode_response,
)
from agent.protocol.topics import DEFAULT_ROOT, REGISTRY_SHARE_GROUP, Topics, valid_device_id
from agent.sync.mqtt import configure_service_tls, make_client, parse_broker_url

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096  # a valid request is < 700 bytes; bigger ones are not even parsed
# paho's outgoing queue (x 64 KB: 128 MB at most): bounded memory under a flood; it sets the
# transfers served at once (32 x the largest window, 64). Since transfers stick to the replica
# that admitted them, two replicas serve 64 transfers between them.
MAX_QUEUED_RESPONSES = 2048
RESOLVE_TTL_S = 1.0  # how long a resolved request path is reused
RESOLVE_CACHE = 256  # resolved request paths kept
MAX_INFLIGHT = 100  # QoS 1 responses awaiting PUBACK (paho's default of 20 throttles windows)
MAX_TRANSFERS = MAX_QUEUED_RESPONSES // 64  # 64 = the largest device window (agent config)
IDLE_S = 5.0  # an admitted transfer without a request for this long is released
GRACE_S = 5.0  # after a transfer's last window, its late re-sends are served without admission
MIN_RETRY_S = 0.25  # bounds of the retry_after_s hint in busy answers
MAX_RETRY_S = 10.0
MAX_WAITING = 100_000  # transfers kept in line; beyond, busy without a place in line
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
    by_device: dict[str, int] = field(default_factory=dict)
    bytes_by_device: dict[str, int] = field(default_factory=dict)


def resolve_repo_path(repo_root: Path, path: str) -> Path | None:
    """The file ``path`` names inside ``repo_root`` (already resolved), or None if it escapes.

    ``path`` is a validated contract path (``metadata/…`` or ``targets/…``). Symlinks are
    followed before the check, so a link pointing out of the repository is refused too.
    """
    try:
        candidate = (repo_root / path).resolve()
    except (OSError, RuntimeError):  # a symlink loop (RuntimeError up to Python 3.12)
        return None
    if candidate == repo_root or not candidate.is_relative_to(repo_root):
        return None
    return candidate


def read_window(file: Path, offset: int, length: int) -> tuple[int, bytes]:
    """``(file size, bytes [offset, offset + length))``; empty data at or past the end.

    Raises:
        FileNotFoundError: no such file, or not a regular file.
        OSError: the file cannot be read.
    """
    # O_NOFOLLOW: ``file`` is already resolved, so a symlink here was swapped in after the check.
    fd = os.open(file, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileNotFoundError(f"{file} is not a regular file")
        total = st.st_size
        if offset >= total:
            return total, b""
        return total, os.pread(fd, min(length, MAX_CHUNK, total - offset), offset)
    finally:
        os.close(fd)


def _fits(file: Path, length: int) -> bool:
    """True when ``file`` is at most ``length`` bytes (one window holds all of it)."""
    try:
        return os.stat(file).st_size <= length
    except OSError:
        return True  # answered not_found/error at once: nothing to queue


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


TransferKey = tuple[str, str]  # (device id, path)


@dataclass
class _Waiter:
    last: float  # last request seen
    ttl: float  # gone from the line when not seen for this long


class Admission:
    """Pure: which transfers are served now, and a first-come-first-served line for the rest.

    Not thread-safe (the server holds its lock). Every method takes ``now`` (monotonic s).

    Args:
        max_transfers: transfers served at once (>= 1).
        idle_s: an admitted transfer not heard from for this long is released.
        grace_s: a finished transfer's late requests are served without admission this long.
    """

    def __init__(
        self, max_transfers: int, *, idle_s: float = IDLE_S, grace_s: float = GRACE_S
    ) -> None:
        if max_transfers < 1:
            raise ValueError(f"max_transfers must be >= 1, got {max_transfers}")
        self.max_transfers = max_transfers
        self.idle_s = idle_s
        self.grace_s = grace_s
        self.active: dict[TransferKey, list[float]] = {}  # key -> [admitted at, last seen]
        self.finished: OrderedDict[TransferKey, float] = OrderedDict()  # key -> grace until
        self.waiting: OrderedDict[TransferKey, _Waiter] = OrderedDict()
        self.avg_s = 1.0  # moving average of an admitted transfer's duration

    def is_served(self, key: TransferKey, now: float) -> bool:
        """True when ``key`` is admitted (or just finished); refreshes it."""
        act = self.active.get(key)
        if act is not None:
            act[1] = now
            return True
        until = self.finished.get(key)
        return until is not None and until > now

    def check(self, key: TransferKey, now: float) -> float | None:
        """None: serve ``key`` now (admitting it if needed); else the ``retry_after_s`` hint."""
        if self.is_served(key, now):
            return None
        self._expire(now)
        free = self.max_transfers - len(self.active)
        w = self.waiting.get(key)
        if w is None:
            if len(self.waiting) >= MAX_WAITING:
                return MAX_RETRY_S
            w = self.waiting[key] = _Waiter(now, 0.0)
        w.last = now
        pos = 0
        for k in self.waiting:  # expired entries were removed by _expire
            if k == key:
                break
            pos += 1
        if pos < free:
            del self.waiting[key]
            self.active[key] = [now, now]
            return None
        ahead = pos - max(free, 0) + 1
        retry = min(MAX_RETRY_S, max(MIN_RETRY_S, ahead * self.avg_s / self.max_transfers))
        w.ttl = 2 * retry + 2.0
        return retry

    def done(self, key: TransferKey, now: float) -> None:
        """``key`` served its last window (or failed): free its place."""
        act = self.active.pop(key, None)
        if act is None:
            return
        self.avg_s = 0.8 * self.avg_s + 0.2 * max(0.0, now - act[0])
        self.finished[key] = now + self.grace_s
        self.finished.move_to_end(key)

    def _expire(self, now: float) -> None:
        for key in [k for k, a in self.active.items() if now - a[1] > self.idle_s]:
            del self.active[key]
        while self.finished and next(iter(self.finished.values())) <= now:
            self.finished.popitem(last=False)
        for key in [k for k, w in self.waiting.items() if now - w.last > w.ttl]:
            del self.waiting[key]


class _Clocks:
    """Pure: per device, the floor of ``receive wall time - sent_at`` (delay + clock offset).

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


@dataclass
class _Job:
    """An accepted request waiting to be read and answered."""

    device_id: str
    req: FetchRequest
    file: Path
    admitted: bool


class ChunkServer:
    """One registry replica answering chunk requests for every device.

    Args:
        repo_dir: the TUF repository (``metadata/`` and ``targets/`` below it).
        broker_url: ``mqtt://host:port`` or ``mqtts://host:port``.
        root: topic root.
        client_id: MQTT client id, unique per replica.
        share_group: shared-subscription group; replicas in one group split the requests.
            None subscribes without ``$share`` (a broker without shared subscriptions; then
            run a single replica).
        on_tick: called with ``time.time()`` about every second from ``serve_forever`` (the
            registry re-signs timestamp metadata there before it expires).
        workers: 0 serves on paho's thread; N > 0 uses a pool of N threads.
        max_transfers: transfers (device, path) served at once for devices that understand
            ``busy``; 0 turns admission control off.
        tls_context: for ``mqtts://``; default: from the environment (``EDGEFLEET_TLS_*``,
            see ``agent.sync.mqtt.configure_service_tls``).

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
        max_transfers: int = MAX_TRANSFERS,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        if workers < 0 or max_transfers < 0:
            raise ValueError(
                f"workers and max_transfers must be >= 0, got {workers}, {max_transfers}"
            )
        self._admission = Admission(max_transfers) if max_transfers else None
        self._clocks = _Clocks()
        self.repo_root = Path(repo_dir).resolve()
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
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="chunk") if workers else None
        self._resolved: OrderedDict[str, tuple[Path | None, float]] = OrderedDict()
        self.client = make_client(client_id, clean=True)
        self.client.max_inflight_messages_set(MAX_INFLIGHT)
        self.client.max_queued_messages_set(MAX_QUEUED_RESPONSES)
        if tls and tls_context is not None:
            self.client.tls_set_context(tls_context)
        elif tls:
            configure_service_tls(self.client)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.message_callback_add(self.topics.all_devices("fetch/req"), self._on_message)
        if self.direct is not None:
            self.client.message_callback_add(self.direct, self._on_message)

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
            self._pool.shutdown(wait=True, cancel_futures=True)
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
                by_device=dict(self._stats.by_device),
                bytes_by_device=dict(self._stats.bytes_by_device),
            )

    # -- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        if reason.is_failure:
            self._sub_failure = f"CONNACK {reason}"
            log.warning("chunk server %s: broker refused connection: %s", self.client_id, reason)
            return
        subs = [(self.subscription, 1)] + ([(self.direct, 1)] if self.direct else [])
        rc, mid = client.subscribe(subs)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._sub_failure = f"subscribe rc={rc}"
            log.warning("chunk server %s: subscribe failed rc=%s", self.client_id, rc)
            return
        self._sub_mid = mid

    def _on_subscribe(
        self, _c: mqtt.Client, _ud: Any, mid: int, reasons: list[Any], _props: Any
    ) -> None:
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

    def _on_disconnect(
        self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any
    ) -> None:
        self._ready.clear()
        if reason.is_failure:
            log.warning(
                "chunk server %s: disconnected (%s); paho reconnects", self.client_id, reason
            )

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        payload = msg.payload if isinstance(msg.payload, bytes) else bytes(msg.payload)
        try:
            job = self._intake(msg.topic, payload)
        except Exception:  # a bug here must cost one request, not the replica
            log.exception("chunk request on %s crashed the handler; dropped", msg.topic)
            self._count(errors=1, dropped=1)
            return
        if job is None:
            return
        if self._pool is None:
            self._finish(job)
        else:
            self._pool.submit(self._finish, job)

    # -- serving ------------------------------------------------------------------------

    def _serve(self, topic: str, payload: bytes) -> None:
        """Answer one request on this thread; never raises."""
        try:
            job = self._intake(topic, payload)
        except Exception:
            log.exception("chunk request on %s crashed the handler; dropped", topic)
            self._count(errors=1, dropped=1)
            return
        if job is not None:
            self._finish(job)

    def _intake(self, topic: str, payload: bytes) -> _Job | None:
        """Parse, check and admit one request (paho's thread: cheap, no file reads).

        Bad, forbidden, expired and not-admitted requests are answered (or dropped) here;
        the rest come back as a ``_Job`` for ``_finish``.
        """
        parsed = self.topics.parse(topic)
        with self._lock:
            self._stats.requests += 1
            if parsed is not None:
                dev = parsed[0]
                self._stats.by_device[dev] = self._stats.by_device.get(dev, 0) + 1
        if parsed is None or parsed[1] != "fetch/req":
            self._count(dropped=1)
            log.warning("chunk request on unexpected topic %r dropped", topic)
            return None
        device_id = parsed[0]
        req_or_header = self._decode(payload)
        if req_or_header is None:
            return None
        if isinstance(req_or_header, FetchHeader):
            self._publish(device_id, req_or_header, b"")
            return None
        req, file = req_or_header
        if self._expired(device_id, req, learn=True):
            return None
        admitted = False
        if req.busy_ok and self._admission is not None:
            key = (device_id, req.path)
            with self._lock:
                was_active = key in self._admission.active
                retry = self._admission.check(key, time.monotonic())
                admitted = retry is None and key in self._admission.active
                if admitted and not was_active:
                    self._stats.admitted += 1
            if retry is not None and req.offset == 0 and _fits(file, req.length):
                self._count(exempt=1)  # a single-window file: cheaper to serve than to queue
                with self._lock:
                    self._admission.waiting.pop(key, None)
            elif retry is not None:
                self._count(busy=1)
                busy = FetchHeader(
                    id=req.id,
                    path=req.path,
                    offset=req.offset,
                    total=0,
                    status="busy",
                    retry_after_s=round(retry, 3),
                )
                self._publish(device_id, busy, b"")
                return None
        return _Job(device_id, req, file, admitted)

    def _finish(self, job: _Job) -> None:
        """Read and answer an accepted request; never raises."""
        try:
            if self._expired(job.device_id, job.req, learn=False):
                return
            header, data = self._read(job.req, job.file)
            if job.admitted and (
                header.status != "ok" or job.req.offset + len(data) >= header.total
            ):
                self._release((job.device_id, job.req.path))
        except Exception:  # a bug here must cost one request, not the replica
            log.exception("chunk request from %s crashed the handler; dropped", job.device_id)
            self._count(errors=1, dropped=1)
            return
        self._publish(job.device_id, header, data)

    def _release(self, key: TransferKey) -> None:
        if self._admission is None:
            return
        with self._lock:
            if key in self._admission.active:
                self._admission.done(key, time.monotonic())

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
        file = self._resolve(req.path)
        if file is None:
            self._count(bad_requests=1)
            log.warning("chunk request %s for %r escapes the repository; refused", req.id, req.path)
            return self._status(
                req.id,
                req.path,
                req.offset,
                "bad_request",
                f"path {req.path!r} is outside the repository",
            )
        return req, file

    def answer(self, payload: bytes) -> tuple[FetchHeader | None, bytes]:
        """The answer to one request payload, or ``(None, b"")`` when none can be sent.

        Counts into ``stats()``; never raises for bad input (malformed, forbidden, missing).
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

    def _resolve(self, path: str) -> Path | None:
        """``resolve_repo_path`` with a small cache of recent answers.

        Resolving walks every component with ``lstat`` (5 calls here, ~90 µs, more than the
        read itself) and a transfer asks for one path many times.
        An entry lives ``RESOLVE_TTL_S``: a symlink the operator re-points inside the
        repository takes effect that much later; the final ``open`` uses ``O_NOFOLLOW`` anyway.
        """
        now = time.monotonic()
        with self._lock:
            hit = self._resolved.get(path)
            if hit is not None and now - hit[1] < RESOLVE_TTL_S:
                return hit[0]
        file = resolve_repo_path(self.repo_root, path)
        with self._lock:
            self._resolved[path] = (file, now)
            self._resolved.move_to_end(path)
            while len(self._resolved) > RESOLVE_CACHE:
                self._resolved.popitem(last=False)
        return file

    @staticmethod
    def _status(rid: str, path: str, offset: int, status: Any, error: str) -> FetchHeader:
        return FetchHeader(
            id=rid, path=path, offset=offset, total=0, status=status, error=error[:500]
        )

    def _publish(self, device_id: str, header: FetchHeader, data: bytes) -> None:
        info = self.client.publish(
            self.topics.device(device_id, "fetch/resp"), encode_response(header, data), qos=1
        )
        # NO_CONN: paho keeps the QoS 1 message and sends it after reconnecting.
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            self._count(errors=1, dropped=1)
            log.warning(
                "chunk response %s to %s not queued (rc=%s); the device will retry",
                header.id,
                device_id,
                info.rc,
            )
            return
        with self._lock:
            self._stats.answered += 1
            self._stats.bytes_sent += len(data)
            by = self._stats.bytes_by_device
            by[device_id] = by.get(device_id, 0) + len(data)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self._stats, name, getattr(self._stats, name) + n)
