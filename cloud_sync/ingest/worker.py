"""Adapter: ``edgefleet ingest`` — MQTT → contract validation → the ingest store.

Telemetry and events (the volume) come through shared subscriptions, so several workers split
them; state and reported (retained, low volume, idempotent upserts) through plain
subscriptions, because brokers do not send retained messages on shared ones. paho's thread
only queues; one writer thread validates each payload against the wire contract and writes in
batches (one transaction per batch). State and reported messages jump the queue: a telemetry
backlog must not hide from a rollout controller that devices committed. A payload that does
not validate goes to the dead-letter table with the reason and never stops the worker.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.errors import BadDataError, TransportError
from agent.protocol.fetch import BadMessage
from agent.protocol.state import DeviceState, ReportedState
from agent.protocol.telemetry import InferenceEvent, Snapshot, Telemetry
from agent.protocol.topics import DEFAULT_ROOT, Topics
from agent.sync.mqtt import parse_broker_url, service_client
from cloud_sync.ingest.store import Store

log = logging.getLogger(__name__)
SHARE_GROUP = "ingest"
VOLUME_KINDS = ("telemetry", "events", "snapshots")  # through shared subscriptions
CONTROL_SUFFIXES = ("/state", "/reported")  # written before any queued volume
_WAKE = ("", b"")  # tells an idle writer that a control message is waiting
MODELS: dict[str, Any] = {
    "state": DeviceState,
    "reported": ReportedState,
    "telemetry": Telemetry,
    "events": InferenceEvent,
    "snapshots": Snapshot,
}


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

    ``persistent`` keeps the MQTT session (``clean_session=False``) under ``client_id``, so
    the broker queues QoS 1 messages while the worker restarts. Mosquitto 2.0 keeps a *plain*
    subscription of a persistent session across its own restart (with ``persistence true``)
    but not a shared one: a single worker with ``share_group=None`` loses nothing across broker
    restarts; shared workers can miss what devices flush in the moments after a broker
    restart, before they resubscribe.
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
        batch_size: int = 500,
        flush_s: float = 0.2,
    ) -> None:
        self.store = store
        self.topics = Topics(topic_root)
        self.share_group = share_group
        self.batch_size = batch_size
        self.flush_s = flush_s
        self.counts: Counter[str] = Counter()
        # SimpleQueue: put and get are C code, a few µs less per message than queue.Queue
        self._queue: queue.SimpleQueue[tuple[str, bytes] | None] = queue.SimpleQueue()
        self._control: queue.SimpleQueue[tuple[str, bytes]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.host, self.port, _tls = parse_broker_url(broker_url)
        self.client = service_client(client_id, broker_url, clean=not persistent)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.subscribed = threading.Event()

    def _on_connect(self, client: mqtt.Client, u: Any, flags: Any, rc: Any, p: Any = None) -> None:
        if rc.is_failure:
            log.error("ingest: broker refused the connection: %s", rc)
            return
        subs = [(self.topics.all_devices(k), 1) for k in ("state", "reported")]
        subs += [(self.topics.shared(self.share_group, k), 1) for k in VOLUME_KINDS]
        client.subscribe(subs)
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        self.enqueue(msg.topic, bytes(msg.payload))

    def enqueue(self, topic: str, payload: bytes) -> None:
        """Hand one message to the writer (paho's thread calls this)."""
        if topic.endswith(CONTROL_SUFFIXES):
            self._control.put((topic, payload))
            self._queue.put(_WAKE)
        else:
            self._queue.put((topic, payload))

    def backlog(self) -> int:
        """Messages waiting for the writer (approximate)."""
        return self._queue.qsize() + self._control.qsize()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-writer", daemon=True)
        self._thread.start()
        self.client.connect_async(self.host, self.port, keepalive=30)
        self.client.loop_start()

    def stop(self, timeout: float = 10.0) -> None:
        self.client.disconnect()
        self.client.loop_stop()
        self.client.disconnect()
        self._stop.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            batch: list[tuple[str, bytes]] = []
            deadline = time.monotonic() + self.flush_s
            while len(batch) < self.batch_size:
                if not self._control.empty():  # state/reported first, whatever is queued
                    batch.append(self._control.get())
                    continue
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if item is None:
                    while not self._control.empty():
                        batch.append(self._control.get())
                    self._write(batch)
                    return
                if item is not _WAKE:
                    batch.append(item)
            if batch:
                self._write(batch)

    def _decode(self, topic: str, payload: bytes) -> tuple[str, dict[str, Any]]:
        """``(kind, message dict)`` of one payload, validated against the contract.

        Raises:
            BadMessage: not an ingest topic, not the contract, or another device's topic.
        """
        parsed = self.topics.parse(topic)
        kind = parsed[1] if parsed else ""
        model = MODELS.get(kind)
        if model is None:
            raise BadMessage(f"topic {topic!r} is not an ingest topic")
        # Telemetry rows take the validated values as they are (datetime ts, numbers): a
        # python-mode dump skips formatting the time to text and parsing it back; the rest
        # keep JSON mode, as their dicts go to JSON columns whole.
        msg = model.decode(payload).model_dump(mode="python" if kind == "telemetry" else "json")
        if parsed and msg.get("device_id") != parsed[0]:
            raise BadMessage(
                f"payload says device {msg.get('device_id')!r}, topic says {parsed[0]!r}"
            )
        return kind, msg

    def _dead(self, topic: str, payload: bytes, why: BaseException) -> None:
        self.counts["dead_letters"] += 1
        self.store.dead_letter(topic, payload, str(why)[:500])

    def _write(self, batch: list[tuple[str, bytes]]) -> None:
        """Store one batch: state upserts, then reported upserts (one transaction for all of
        them), then the volume kinds in batched inserts.

        A message the contract or the database refuses is dead-lettered (a refused group is
        retried one message at a time to find it); when the database is unreachable the whole
        batch is queued again (writes are idempotent, so what was stored is not doubled).
        """
        try:
            groups: dict[str, list[tuple[str, bytes, dict[str, Any]]]] = {}
            for topic, payload in batch:
                try:
                    kind, msg = self._decode(topic, payload)
                except BadDataError as e:
                    self._dead(topic, payload, e)
                    continue
                groups.setdefault(kind, []).append((topic, payload, msg))
            for kind in ("state", "reported", *VOLUME_KINDS):
                if kind in groups:
                    self._write_group(kind, groups[kind])
        except TransportError as e:  # database gone: keep the batch for the next round
            log.error("ingest: store unavailable, %d messages requeued: %s", len(batch), e)
            for topic, payload in batch:
                self.enqueue(topic, payload)
            time.sleep(1.0)

    def _write_group(self, kind: str, items: list[tuple[str, bytes, dict[str, Any]]]) -> None:
        def states(msgs: list[dict[str, Any]]) -> None:
            for m in msgs:
                self.store.upsert_state(m)

        writers: dict[str, Callable[[list[dict[str, Any]]], object]] = {
            "state": states,
            "reported": self.store.upsert_reported_batch,
            "telemetry": self.store.add_telemetry_batch,
            "events": self.store.add_events,
            "snapshots": self.store.add_snapshots,
        }
        write = writers[kind]
        try:
            write([m for _, _, m in items])
            self.counts[kind] += len(items)
            return
        except BadDataError as e:
            if len(items) == 1:
                self._dead(items[0][0], items[0][1], e)
                return
        for topic, payload, msg in items:  # find the message the database refuses
            try:
                write([msg])
                self.counts[kind] += 1
            except BadDataError as e:
                self._dead(topic, payload, e)
