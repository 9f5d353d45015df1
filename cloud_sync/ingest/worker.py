"""Adapter: ``edgefleet ingest`` — MQTT → contract validation → the ingest store.

Telemetry and events (the volume) come through shared subscriptions, so several workers split
them; state and reported (retained, low volume, idempotent upserts) through plain
subscriptions, because brokers do not send retained messages on shared ones. paho's thread
only queues; one writer thread validates each payload against the wire contract and writes in
batches (one transaction per batch). State and reported messages jump the queue: a telemetry
backlog must not hide from a rollout controller that devices committed. A payload that does
not validate goes to the dead-letter table with the reason and never stops the worker.

Nothing is acknowledged before it is in the database. paho acknowledges manually
(``manual_ack``): the writer sends each PUBACK once the message is committed or dead-lettered,
in the order the messages arrived (``flow.AckWindow``). What is received and not yet
acknowledged is bounded in messages and bytes; when that window is full, paho's thread waits
in ``on_message`` and so stops reading the socket, and the broker's persistent session keeps
the rest. While the database is down the writer retries with backoff and holds its batch: the
window fills, reading stops, memory stays bounded, and after the database is back everything
arrives. A worker killed meanwhile loses nothing acknowledged: the broker sends again what it
had not acknowledged.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import paho.mqtt.client as mqtt

from agent.common.backoff import Backoff
from agent.common.errors import BadDataError, TransportError
from agent.common.mqtt import parse_broker_url, service_client
from agent.protocol.state import DeviceState, ReportedState
from agent.protocol.telemetry import InferenceEvent, Snapshot, Telemetry
from agent.protocol.topics import DEFAULT_ROOT, Topics
from agent.protocol.wire import BadMessage
from cloud_sync.ingest.flow import AckWindow, Received
from cloud_sync.ingest.rows import DEAD_LETTER_KEEP
from cloud_sync.ingest.store import Store

log = logging.getLogger(__name__)
SHARE_GROUP = "ingest"
VOLUME_KINDS = ("telemetry", "events", "snapshots")  # through shared subscriptions
CONTROL_SUFFIXES = ("/state", "/reported")  # written before any queued volume
MAX_UNACKED = 10_000  # messages received and not yet acknowledged, by default
MAX_UNACKED_BYTES = 64 * 1024 * 1024  # and their bytes (payload, topic, bookkeeping)
_WAKE = Received("", b"")  # tells an idle writer that a control message is waiting
MODELS: dict[str, Any] = {
    "state": DeviceState,
    "reported": ReportedState,
    "telemetry": Telemetry,
    "events": InferenceEvent,
    "snapshots": Snapshot,
}
T = TypeVar("T")
Entries = list[tuple[Received, dict[str, Any]]]


class _Stopping(BaseException):
    """The worker stops while the store is down: what is not written stays unacknowledged.

    A BaseException, so that the writer's ``except Exception`` (a message's own fault) never
    takes it for one.
    """


def freeze_startup_heap() -> None:
    """For a process that is an ingest worker (``edgefleet ingest``), call once at start-up.

    Moves what exists now (modules, pydantic and SQLAlchemy schemas, the engine) to the
    permanent generation: every message allocates, and each full collection would walk all of
    it again (measured: ~15 % of the writer's CPU). Collected first, so no garbage is frozen.
    Process-wide, hence not done by ``IngestWorker`` itself (the demo and tests embed it).
    """
    gc.collect()
    gc.freeze()


class IngestWorker:
    """One ingest worker; run several for more throughput.

    ``share_group`` None subscribes without ``$share`` (for a broker without shared
    subscriptions, such as the demo's amqtt); then run a single worker.

    ``control`` False leaves state and reported to other workers: they are plain
    subscriptions (retained messages are not sent on shared ones), so every worker that takes
    them writes each of them; in a group of K workers, one or two with ``control`` suffice.

    ``persistent`` keeps the MQTT session (``clean_session=False``) under ``client_id``, so
    the broker queues QoS 1 messages while the worker restarts or waits for the database.
    Mosquitto 2.0 keeps a *plain* subscription of a persistent session across its own restart
    (with ``persistence true``) but not a shared one: a single worker with ``share_group=None``
    loses nothing across broker restarts; shared workers can miss what devices flush in the
    moments after a broker restart, before they resubscribe. Without ``persistent`` the broker
    drops what it had sent and not had acknowledged when the connection ends.

    Args:
        batch_size: messages per write, at most.
        flush_s: a batch waits at most this long for more messages after its first one.
        idle_s: and writes as soon as no message came for this long (a broker that sends only
            ``max_inflight_messages`` before it waits for acknowledgements is not kept waiting
            for ``flush_s``).
        max_unacked: messages received and not yet acknowledged, at most; then paho's thread
            waits (stops reading the socket) until the writer has caught up.
        max_unacked_bytes: the same bound in bytes (payload, topic and ~256 bytes of
            bookkeeping each); one larger message is still taken when nothing else waits.
        dead_letter_keep: bytes of a dead letter's payload kept (with its length and SHA-256).
        retry_s: first delay after the store failed; doubles (jittered) up to ``retry_max_s``.
    """

    def __init__(
        self,
        broker_url: str,
        store: Store,
        *,
        topic_root: str = DEFAULT_ROOT,
        client_id: str = "edgefleet-ingest-1",
        share_group: str | None = SHARE_GROUP,
        persistent: bool = True,
        control: bool = True,
        batch_size: int = 500,
        flush_s: float = 0.2,
        idle_s: float = 0.005,
        max_unacked: int = MAX_UNACKED,
        max_unacked_bytes: int = MAX_UNACKED_BYTES,
        dead_letter_keep: int = DEAD_LETTER_KEEP,
        retry_s: float = 0.5,
        retry_max_s: float = 10.0,
    ) -> None:
        self.store = store
        self.client_id = client_id
        self.topics = Topics(topic_root)
        self.share_group = share_group
        self.control = control
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.idle_s = idle_s
        self.dead_letter_keep = dead_letter_keep
        self.counts: Counter[str] = Counter()  # messages stored, dead-lettered, dropped by kind
        self.window = AckWindow(max_unacked, max_unacked_bytes)
        self.store_failures = 0  # failed attempts to write, in all
        self.store_down_since: float | None = None  # monotonic, while the store fails
        self.stale_acks = 0  # handled after their connection ended: the broker sends them again
        self.error: BaseException | None = None  # what stopped the writer, if it died
        # SimpleQueue: put and get are C code, a few µs less per message than queue.Queue
        self._queue: queue.SimpleQueue[Received | None] = queue.SimpleQueue()
        self._control: queue.SimpleQueue[Received] = queue.SimpleQueue()
        self._abort = threading.Event()
        self._backoff = Backoff(base_s=retry_s, cap_s=retry_max_s, jitter=0.5)
        self._thread: threading.Thread | None = None
        self._epoch = 0  # connection count: an acknowledgement belongs to one connection
        self._ack_lock = threading.Lock()
        self._writers: dict[str, Callable[[list[dict[str, Any]]], object]] = {
            "state": self._upsert_states,
            "reported": store.upsert_reported_batch,
            "telemetry": store.add_telemetry_batch,
            "events": store.add_events,
            "snapshots": store.add_snapshots,
        }
        self.host, self.port, _tls = parse_broker_url(broker_url)
        self.client = service_client(client_id, broker_url, clean=not persistent)
        self.client.manual_ack_set(True)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.subscribed = threading.Event()  # set when the broker acknowledged (SUBACK)
        self._connected_before = False
        self.persistent = persistent

    # --- paho's thread ---------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, u: Any, flags: Any, rc: Any, p: Any = None) -> None:
        try:
            with self._ack_lock:
                self._epoch += 1
            if rc.is_failure:
                log.error("ingest: broker refused the connection: %s", rc)
                return
            if self._connected_before and self.persistent and not flags.session_present:
                log.warning(
                    "ingest: the broker kept no session for %s (restarted without persistence"
                    " or expired): what it held for this worker is gone",
                    self.client_id,
                )
            self._connected_before = True
            subs = [(self.topics.shared(self.share_group, k), 1) for k in VOLUME_KINDS]
            if self.control:
                subs += [(self.topics.all_devices(k), 1) for k in ("state", "reported")]
            client.subscribe(subs)
        except Exception:  # never into paho's thread: it would end the network loop
            log.exception("ingest: handling the connection failed")

    def _on_subscribe(self, client: mqtt.Client, u: Any, mid: int, codes: Any, p: Any) -> None:
        # only a SUBACK proves the broker holds the subscriptions (and so queues for the
        # session); before it, a broker that stops at once may never have read the SUBSCRIBE
        refused = [c for c in codes if c.is_failure]
        if refused:
            log.error("ingest: the broker refused %d subscription(s): %s", len(refused), refused)
        self.subscribed.set()

    def _on_disconnect(
        self, client: mqtt.Client, u: Any, flags: Any, rc: Any, p: Any = None
    ) -> None:
        # Acknowledgements of messages from the connection that ended must not go out on the
        # next one: a new session numbers its messages afresh, and a kept one sends them again.
        with self._ack_lock:
            self._epoch += 1
        if not self.window.closed:
            log.warning(
                "ingest: disconnected from the broker (%s); %d messages unacknowledged",
                rc,
                self.window.messages,
            )

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            try:
                topic = msg.topic
            except UnicodeDecodeError:  # paho raises on a topic that is not UTF-8
                raw = getattr(msg, "_topic", b"")  # paho keeps the bytes; no public accessor
                topic = f"(topic not UTF-8) {raw!r}"
            item = Received(topic, bytes(msg.payload), msg.mid, msg.qos, self._epoch)
            if self.window.admit(item):  # waits while the window is full: back-pressure
                self._enqueue(item)
        except Exception:  # never into paho's thread: it would end the network loop
            log.exception(
                "ingest: message mid=%s not queued; not acknowledged, the broker sends"
                " it again after a reconnect",
                getattr(msg, "mid", "?"),
            )

    def _enqueue(self, item: Received) -> None:
        if item.topic.endswith(CONTROL_SUFFIXES):
            self._control.put(item)
            self._queue.put(_WAKE)
        else:
            self._queue.put(item)

    # --- life cycle ------------------------------------------------------------------------

    def backlog(self) -> int:
        """Messages received and not yet acknowledged (queued, being written, or waiting for an
        earlier one to be acknowledged first)."""
        return self.window.messages

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write and acknowledge what is queued (for up to ``timeout``), then disconnect.

        With the store down, what is not written stays unacknowledged: the broker sends it
        again to the next worker of the session.
        """
        self.window.close()  # paho's thread takes nothing more (and stops waiting for room)
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._abort.set()
                self._thread.join(timeout)
        self.client.disconnect()
        self.client.loop_stop()

    # --- the writer ------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                batch, last = self._collect()
                if batch:
                    self._write(batch)
                if last:
                    return
        except _Stopping:
            log.warning(
                "ingest: stopped with the store unavailable; %d messages left"
                " unacknowledged for the broker to send again",
                self.window.messages,
            )
        except BaseException as e:  # a bug: the window fills and nothing is acknowledged
            self.error = e
            log.critical(
                "ingest: the writer died; nothing more is stored or acknowledged", exc_info=True
            )
            raise

    def _collect(self) -> tuple[list[Received], bool]:
        """The next batch: control messages first, then volume, until ``batch_size`` messages,
        ``flush_s`` after the first or ``idle_s`` without a new one; True once stopping."""
        batch: list[Received] = []
        deadline = 0.0
        while len(batch) < self.batch_size:
            if not self._control.empty():  # state/reported first, whatever is queued
                batch.append(self._control.get())
                continue
            wait = min(self.idle_s, deadline - time.monotonic()) if batch else self.flush_s
            try:
                item = self._queue.get(timeout=max(0.0, wait))
            except queue.Empty:
                break
            if item is None:
                while not self._control.empty():
                    batch.append(self._control.get())
                return batch, True
            if item is _WAKE:
                continue
            if not batch:
                deadline = time.monotonic() + self.flush_s
            batch.append(item)
        return batch, False

    def _decode(self, topic: str, payload: bytes) -> tuple[str, dict[str, Any]]:
        """``(kind, message dict)`` of one payload, validated against the contract.

        Raises:
            BadMessage: not an ingest topic, not the contract, or another device's topic.
        """
        parsed = self.topics.parse(topic)
        kind = parsed[1] if parsed else ""
        model = MODELS.get(kind)
        if model is None:
            raise BadMessage(f"topic {topic[:200]!r} is not an ingest topic")
        # Telemetry rows take the validated values as they are (datetime ts, numbers): a
        # python-mode dump skips formatting the time to text and parsing it back; the rest
        # keep JSON mode, as their dicts go to JSON columns whole.
        msg = model.decode(payload).model_dump(mode="python" if kind == "telemetry" else "json")
        if parsed and msg.get("device_id") != parsed[0]:
            raise BadMessage(
                f"payload says device {msg.get('device_id')!r}, topic says {parsed[0]!r}"
            )
        return kind, msg

    def _write(self, batch: list[Received]) -> None:
        """Store one batch, then acknowledge what is due: state upserts, reported upserts (one
        transaction for all of them), the volume kinds in batched inserts, dead letters.

        A message the contract or the database refuses is dead-lettered (a refused group is
        retried one message at a time to find it). While the database is unreachable each
        write is retried with backoff (writes are idempotent, so a retry doubles nothing).

        Raises:
            _Stopping: the worker stops while the store is down; nothing more is acknowledged.
        """
        groups: dict[str, Entries] = {}
        dead: list[tuple[Received, str]] = []
        for item in batch:
            try:
                kind, msg = self._decode(item.topic, item.payload)
            except BadDataError as e:
                dead.append((item, str(e)))
                continue
            except Exception as e:  # a parser limit the contract did not foresee: bad data too
                dead.append((item, f"undecodable: {type(e).__name__}: {str(e)[:200]}"))
                continue
            groups.setdefault(kind, []).append((item, msg))
        for kind in ("state", "reported", *VOLUME_KINDS):
            if kind in groups:
                dead += self._write_group(kind, groups[kind])
        self._bury(dead)
        self._ack(self.window.settle(batch))

    def _upsert_states(self, msgs: list[dict[str, Any]]) -> None:
        for m in msgs:
            self.store.upsert_state(m)

    def _write_group(self, kind: str, entries: Entries) -> list[tuple[Received, str]]:
        """Write one kind's messages; returns those the database refused, with why."""
        write = self._writers[kind]
        try:
            self._retrying(partial(write, [m for _, m in entries]))
        except Exception as e:  # bad data, or an error of the driver on some value
            if len(entries) == 1:
                return [(entries[0][0], _why(e))]
        else:
            self.counts[kind] += len(entries)
            return []
        refused = []
        for item, msg in entries:  # find the messages the database refuses
            try:
                self._retrying(partial(write, [msg]))
                self.counts[kind] += 1
            except Exception as e:
                refused.append((item, _why(e)))
        return refused

    def _bury(self, dead: list[tuple[Received, str]]) -> None:
        """Store dead letters (one transaction; one by one if the database refuses that)."""
        if not dead:
            return
        keep = self.dead_letter_keep
        if len(dead) > 1:
            letters = [(it.topic, it.payload, why) for it, why in dead]
            try:
                self._retrying(partial(self.store.add_dead_letters, letters, keep=keep))
                self.counts["dead_letters"] += len(dead)
                return
            except Exception as e:  # one of them is refused: one by one, to find it
                log.warning(
                    "ingest: %d dead letters refused as one batch (%s); one by one",
                    len(dead),
                    _why(e),
                )
        for it, why in dead:
            try:
                letter = [(it.topic, it.payload, why)]
                self._retrying(partial(self.store.add_dead_letters, letter, keep=keep))
                self.counts["dead_letters"] += 1
            except Exception as e:
                self.counts["dropped"] += 1
                log.error(
                    "ingest: dropped a message the database refuses even as a dead letter:"
                    " topic=%s bytes=%d reason=%s; storing the dead letter failed: %s",
                    it.topic[:200],
                    len(it.payload),
                    why[:200],
                    _why(e),
                )

    def _retrying(self, write: Callable[[], T]) -> T:
        """``write()``, again and again while the store is unavailable (backoff, capped).

        Raises:
            _Stopping: the worker stops meanwhile.
            BadDataError: the database refuses the data (not retried).
        """
        while True:
            try:
                result = write()
            except TransportError as e:
                now = time.monotonic()
                if self.store_down_since is None:
                    self.store_down_since = now
                self.store_failures += 1
                delay = self._backoff.failed(now)
                log.error(
                    "ingest: store unavailable for %.1f s (attempt %d); %d messages"
                    " (%d bytes) wait unacknowledged; retrying in %.1f s: %s",
                    now - self.store_down_since,
                    self._backoff.failures,
                    self.window.messages,
                    self.window.bytes,
                    delay,
                    e,
                )
                if self._abort.wait(delay):
                    raise _Stopping from e
                continue
            if self.store_down_since is not None:
                log.warning(
                    "ingest: store back after %.1f s and %d failed attempts",
                    time.monotonic() - self.store_down_since,
                    self._backoff.failures,
                )
                self.store_down_since = None
                self._backoff.succeeded()
            return result

    def _ack(self, due: list[Received]) -> None:
        """Acknowledge ``due`` (in order) on the connection each arrived on, if still up."""
        if not due:
            return
        with self._ack_lock:
            epoch = self._epoch
            for it in due:
                if it.qos == 0:
                    continue
                if it.epoch == epoch:
                    self.client.ack(it.mid, it.qos)
                else:
                    self.stale_acks += 1


def _why(e: BaseException) -> str:
    """A dead letter's reason for ``e``: the message of our own errors, else type and text."""
    if isinstance(e, BadDataError):
        return str(e)[:500]
    log.error("ingest: unexpected %s while writing a message: %s", type(e).__name__, e)
    return f"{type(e).__name__}: {str(e)[:400]}"
