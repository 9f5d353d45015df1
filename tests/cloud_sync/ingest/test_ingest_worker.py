"""The ingest worker on a real Mosquitto and a real store (SQLite file and PostgreSQL server).

Every message kind makes the round trip publisher → broker → ``IngestWorker`` → database and
is compared field by field; malformed payloads made by hypothesis end up in ``dead_letters``
with their topic and a reason, and the worker goes on storing what comes after them.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, cast

import paho.mqtt.client as mqtt
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion
from pydantic import BaseModel

from agent.protocol.schema import EXAMPLES, EXTRA_EXAMPLES
from agent.protocol.state import DeviceState, ReportedState, UpdatePhase
from agent.protocol.telemetry import InferenceEvent, Telemetry
from agent.protocol.topics import Topics
from agent.protocol.wire import BadMessage
from cloud_sync.ingest.flow import Received
from cloud_sync.ingest.schema import (
    DEAD_LETTERS,
    DEVICE_TELEMETRY,
    DEVICES,
    EVENTS,
    PIPELINE_STATE,
    TELEMETRY,
)
from cloud_sync.ingest.store import Store
from cloud_sync.ingest.worker import IngestWorker
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for

pytestmark = pytest.mark.broker

TOPICS = Topics()
DEVICE = "cam-017"  # the device of every example in agent/protocol/schema.py
OTHER = "cam-9"
KINDS = ("state", "reported", "telemetry", "events")
MODEL_OF: dict[str, type[Any]] = {
    "state": DeviceState,
    "reported": ReportedState,
    "telemetry": Telemetry,
    "events": InferenceEvent,
}
STATE = cast(DeviceState, EXAMPLES["device_state"])
REPORTED = cast(ReportedState, EXAMPLES["reported_state"])
TELEMETRY_EX = cast(Telemetry, EXAMPLES["telemetry"])
EVENT = cast(InferenceEvent, EXAMPLES["inference_event"])
CLS_EVENT = cast(InferenceEvent, EXTRA_EXAMPLES["inference_event (classification)"])
EXAMPLE_OF: dict[str, BaseModel] = {
    "state": STATE,
    "reported": REPORTED,
    "telemetry": TELEMETRY_EX,
    "events": EVENT,
}
_ids = itertools.count()


@dataclass
class Ingest:
    """A worker on the broker, and a publisher client standing in for the devices."""

    broker: Mosquitto
    store: Store
    pub: mqtt.Client
    worker: IngestWorker | None = None
    _canaries: Iterator[int] = field(default_factory=itertools.count)

    def start_worker(self) -> IngestWorker:
        worker = IngestWorker(
            self.broker.url, self.store, client_id=f"ingest-t{next(_ids)}", flush_s=0.05
        )
        subacked = threading.Event()
        # IngestWorker leaves on_subscribe free: the SUBACK tells that messages published from
        # now on reach it ('subscribed' is set when the SUBSCRIBE is only sent)
        worker.client.on_subscribe = lambda *_a: subacked.set()
        worker.start()
        self.worker = worker
        assert subacked.wait(10), "the worker's subscriptions were not acknowledged"
        return worker

    def publish(
        self,
        kind: str,
        payload: bytes,
        *,
        device: str = DEVICE,
        retain: bool = False,
        topic: str | None = None,
    ) -> str:
        topic = topic or TOPICS.device(device, kind)
        self.pub.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)
        return topic

    def canary(self) -> datetime:
        """Publish a fresh valid telemetry message; returns its ts (its row proves progress)."""
        ts = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=next(self._canaries))
        self.publish("telemetry", TELEMETRY_EX.model_copy(update={"ts": ts}).encode())
        return ts

    def stored(self, ts: datetime) -> bool:
        q = sa.select(sa.func.count()).where(DEVICE_TELEMETRY.c.ts == ts)
        with self.store.engine.connect() as conn:
            return bool(conn.execute(q).scalar())


@pytest.fixture
def ingest(broker: Mosquitto, store: Store) -> Iterator[Ingest]:
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"devices-t{next(_ids)}")
    pub.connect(broker.host, broker.port)
    pub.loop_start()
    h = Ingest(broker, store, pub)
    try:
        yield h
    finally:
        pub.disconnect()
        pub.loop_stop()
        if h.worker is not None:
            h.worker.stop()
            assert h.worker._thread is not None and not h.worker._thread.is_alive()


def rows(store: Store, table: sa.Table, *order: Any) -> list[dict[str, Any]]:
    with store.engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(*order))]


def wire(model: BaseModel) -> dict[str, Any]:
    """The message as JSON on the wire."""
    out: dict[str, Any] = json.loads(model.model_dump_json())
    return out


# --- round trip ------------------------------------------------------------------------------


def test_every_message_kind_round_trip(ingest: Ingest) -> None:
    """state, reported, telemetry and events (detection and classification) stored as sent."""
    t0 = datetime.now(timezone.utc)
    # state and reported are retained and may be published before any worker runs: the worker's
    # plain subscriptions get them from the broker (shared ones would not)
    ingest.publish("state", EXAMPLE_OF["state"].model_dump_json().encode(), retain=True)
    ingest.publish("reported", EXAMPLE_OF["reported"].model_dump_json().encode(), retain=True)
    worker = ingest.start_worker()
    events = [EVENT, CLS_EVENT]
    ingest.publish("telemetry", EXAMPLE_OF["telemetry"].model_dump_json().encode())
    for ev in events:
        ingest.publish("events", ev.model_dump_json().encode())
    want = {"devices": 1, "pipeline_state": 1, "telemetry": 1, "device_telemetry": 1, "events": 2}

    def arrived() -> bool:
        counts = ingest.store.counts()
        return all(counts[k] == n for k, n in want.items())

    assert wait_for(arrived, 15), ingest.store.counts()
    t1 = datetime.now(timezone.utc)
    assert ingest.store.counts()["dead_letters"] == 0 and worker.counts["dead_letters"] == 0
    # the worker counts a batch once its transaction committed: a moment after the rows show
    want_counts = {k: 2 if k == "events" else 1 for k in KINDS}
    assert wait_for(lambda: {k: worker.counts[k] for k in KINDS} == want_counts, 5), worker.counts

    sent = wire(EXAMPLE_OF["state"])
    [dev] = rows(ingest.store, DEVICES)
    del sent["type"]
    assert {k: dev[k] for k in sent} == sent
    assert t0 <= dev["first_seen"] <= dev["last_seen"] <= t1

    rep = wire(EXAMPLE_OF["reported"])
    [p] = rep["pipelines"]
    [ps] = rows(ingest.store, PIPELINE_STATE)
    assert (ps["device_id"], ps["pipeline"], ps["desired_revision"]) == (DEVICE, p["name"], 42)
    for k in (
        "phase",
        "active_model",
        "active_version",
        "target_model",
        "target_version",
        "backend",
        "precision",
        "last_error",
    ):
        assert ps[k] == p[k], k
    assert ps["phase"] == "building" and ps["updated_at"] == REPORTED.pipelines[0].updated_at

    tel = wire(EXAMPLE_OF["telemetry"])
    [tp] = tel["pipelines"]
    [tr] = rows(ingest.store, TELEMETRY)
    assert tr["device_id"] == DEVICE and tr["ts"] == TELEMETRY_EX.ts
    for k in (
        "model",
        "version",
        "backend",
        "precision",
        "fps_in",
        "fps_out",
        "frames_dropped",
        "errors",
    ):
        assert tr[k] == tp[k], k
    assert tr["pipeline"] == tp["name"]
    for q in ("p50", "p95", "p99"):  # no 'total' stage: preprocess + infer + postprocess
        assert tr[f"{q}_ms"] == pytest.approx(sum(s[q] for s in tp["latency_ms"].values()))
    [dt] = rows(ingest.store, DEVICE_TELEMETRY)
    d = tel["device"]
    assert dt["ts"] == tr["ts"] and dt["device_id"] == DEVICE
    for k in ("cpu_percent", "mem_used_mb", "mem_total_mb", "disk_used_pct", "gpu_load_pct"):
        assert dt[k] == d[k], k
    assert (dt["temperatures"], dt["power"]) == (d["temperatures_c"], d["power_mw"])
    assert (dt["outbox_depth"], dt["outbox_dropped"]) == (
        tel["outbox"]["depth"],
        tel["outbox"]["dropped"],
    )

    stored = rows(ingest.store, EVENTS, EVENTS.c.frame_seq)
    for row, model, top in zip(
        stored,
        sorted(events, key=lambda e: e.frame_seq),
        [("truck", 0.8811, 0), ("person", 0.9132, 1)],
        strict=True,
    ):
        sent_ev = wire(model)
        assert row["payload"] == sent_ev  # the whole validated message, as sent
        for k in ("device_id", "pipeline", "model", "version", "frame_seq"):
            assert row[k] == sent_ev[k], k
        assert row["ts"] == datetime.fromtimestamp(sent_ev["frame_time"], timezone.utc)
        assert (row["top_label"], row["top_score"], row["n_detections"]) == top

    # QoS 1 is at-least-once: a redelivered telemetry message or event is stored once
    ingest.publish("telemetry", EXAMPLE_OF["telemetry"].model_dump_json().encode())
    ingest.publish("events", events[0].model_dump_json().encode())
    canary = ingest.canary()
    assert wait_for(lambda: ingest.stored(canary), 10)
    counts = ingest.store.counts()
    assert (counts["telemetry"], counts["device_telemetry"], counts["events"]) == (2, 2, 2)
    assert wait_for(lambda: worker.counts["telemetry"] == 3 and worker.counts["events"] == 3, 5)


# --- dead letters ----------------------------------------------------------------------------

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
# keys the messages use, so that random objects come near to valid ones now and then
KEYS = st.sampled_from(
    [
        "type",
        "device_id",
        "online",
        "ts",
        "pipelines",
        "device",
        "outbox",
        "frame_seq",
        "frame_time",
        "contract",
        "agent_version",
    ]
) | st.text(max_size=10)


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value in a JSON document (summary holds any JSON: not mutated)."""
    if prefix:
        yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            if k != "summary":
                yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


def replaced(doc: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    out = dict(doc) if isinstance(doc, dict) else list(doc)
    out[path[0]] = replaced(doc[path[0]], path[1:], new)
    return out


def get(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, str, bytes, str]:
    """A valid example with one field, at any depth, given a value of a wrong type."""
    kind = draw(st.sampled_from(KINDS))
    doc = wire(EXAMPLE_OF[kind])
    path = draw(st.sampled_from(sorted(paths(doc), key=repr)))
    old = get(doc, path)
    # a list is never a valid scalar or object, an object never a valid scalar or list; a dict
    # field gets a list (an object could be a valid map of sensors)
    new = [1, "x"] if isinstance(old, dict) else draw(st.sampled_from([{"wrong": [1]}, [1, "x"]]))
    device = draw(st.sampled_from([DEVICE, OTHER]))
    return kind, device, json.dumps(replaced(doc, path, new)).encode(), f"mutated {path}"


CASES = st.one_of(
    st.tuples(
        st.sampled_from(KINDS),
        st.sampled_from([DEVICE, OTHER]),
        st.binary(max_size=200),
        st.just("binary"),
    ),
    st.tuples(
        st.sampled_from(KINDS),
        st.sampled_from([DEVICE, OTHER]),
        st.dictionaries(KEYS, JSON_VALUES, max_size=6).map(lambda d: json.dumps(d).encode()),
        st.just("json object"),
    ),
    mutated(),
    # a valid message on another device's topic: a device must not speak for another one
    st.tuples(
        st.sampled_from(KINDS),
        st.just(OTHER),
        st.sampled_from(KINDS).map(lambda k: EXAMPLE_OF[k].model_dump_json().encode()),
        st.just("device mismatch"),
    ),
)


def refused(kind: str, device: str, payload: bytes) -> bool:
    """The contract's verdict: not a valid message of ``kind`` from ``device``."""
    try:
        msg = MODEL_OF[kind].decode(payload)
    except BadMessage:
        return True
    return bool(msg.device_id != device)


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(cases=st.lists(CASES, min_size=1, max_size=12))
def test_malformed_payloads_become_dead_letters(
    ingest: Ingest, cases: list[tuple[str, str, bytes, str]]
) -> None:
    """Each bad payload: counted, kept with its topic and a reason; the worker keeps going."""
    worker = ingest.worker or ingest.start_worker()  # one worker for all hypothesis examples
    cases = [c for c in cases if c[3] != "json object" or refused(*c[:3])]
    for kind, device, payload, what in cases:
        assert refused(kind, device, payload), f"{what} on {kind} is a valid message: {payload!r}"
    with ingest.store.engine.connect() as conn:
        last_id = conn.execute(sa.select(sa.func.max(DEAD_LETTERS.c.id))).scalar() or 0
    counted = worker.counts["dead_letters"]
    sent = Counter((ingest.publish(k, payload, device=d), payload) for k, d, payload, _ in cases)
    canary = ingest.canary()  # valid, published after the bad ones

    def new_letters() -> list[dict[str, Any]]:
        q = sa.select(DEAD_LETTERS).where(DEAD_LETTERS.c.id > last_id)
        with ingest.store.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    assert wait_for(lambda: ingest.stored(canary) and len(new_letters()) >= len(cases), 15), (
        f"{len(new_letters())} of {len(cases)} dead letters, canary stored: {ingest.stored(canary)}"
    )
    letters = new_letters()
    assert Counter((d["topic"], bytes(d["payload"])) for d in letters) == sent
    assert wait_for(lambda: worker.counts["dead_letters"] == counted + len(cases), 5)
    for d in letters:
        assert d["received_at"].tzinfo is not None, d
        parsed = TOPICS.parse(d["topic"])
        assert parsed is not None
        device, kind = parsed
        model = MODEL_OF[kind]
        try:
            msg = model.decode(bytes(d["payload"]))
        except BadMessage:  # "bad Telemetry: field 'ts': …", as the contract's decode says
            assert d["reason"].startswith(f"bad {model.__name__}: "), d["reason"]
        else:
            assert d["reason"] == f"payload says device {msg.device_id!r}, topic says {device!r}"


def test_dead_letter_reasons_name_the_problem(ingest: Ingest) -> None:
    """One of each, with the reason an operator reads in the dashboard."""
    ingest.start_worker()
    ingest.publish("telemetry", b"\xff\x00not json")
    ingest.publish("state", json.dumps({**wire(EXAMPLE_OF["state"]), "online": "maybe"}).encode())
    ingest.publish("events", EXAMPLE_OF["events"].model_dump_json().encode(), device=OTHER)
    ingest.publish("reported", b'{"type": "reported"}')
    canary = ingest.canary()
    assert wait_for(lambda: ingest.stored(canary) and ingest.store.counts()["dead_letters"] == 4)
    by_topic = {d["topic"].rsplit("/", 1)[1]: d["reason"] for d in ingest.store.dead_letters()}
    assert by_topic["telemetry"].startswith("bad Telemetry: ")
    assert by_topic["state"].startswith("bad DeviceState: field 'online'")
    assert by_topic["events"] == f"payload says device {DEVICE!r}, topic says {OTHER!r}"
    assert by_topic["reported"].startswith("bad ReportedState: field 'device_id'")
    assert ingest.store.counts()["events"] == 0 and ingest.store.counts()["devices"] == 1


def test_a_message_the_database_refuses_does_not_stop_the_worker(ingest: Ingest) -> None:
    """Valid on the wire, refused by the database: dead-lettered, later messages still stored.

    PostgreSQL text and JSONB cannot hold U+0000, which JSON and the contract allow in a label.
    """
    worker = ingest.start_worker()
    det = EVENT.detections[0].model_copy(update={"label": "per\x00son"})
    bad = EVENT.model_copy(update={"detections": [det], "frame_seq": 1})
    assert InferenceEvent.decode(bad.encode()) == bad  # the contract takes it
    ingest.publish("events", bad.encode())
    ingest.publish("events", EVENT.encode())
    first = ingest.canary()
    assert wait_for(lambda: ingest.stored(first), 5), "the batch with the bad event was lost"
    later = ingest.canary()  # after the bad event was written (or refused)
    assert wait_for(lambda: ingest.stored(later), 3), "the worker stopped storing"
    counts = ingest.store.counts()
    if ingest.store.engine.dialect.name == "sqlite":
        assert counts["events"] == 2 and counts["dead_letters"] == 0
    else:
        assert counts["events"] == 1 and counts["dead_letters"] == 1
        [letter] = ingest.store.dead_letters()
        assert letter["topic"] == TOPICS.device(DEVICE, "events") and "database" in letter["reason"]
    assert wait_for(lambda: worker.counts["dead_letters"] == counts["dead_letters"], 5)


def test_reported_states_are_written_as_one_group_and_a_refused_one_is_found(
    broker: Mosquitto, store: Store
) -> None:
    """The writer stores a batch's reported states in one transaction; when the database
    refuses the group (PostgreSQL: U+0000 in a text column), it retries them one by one, so
    only the refused one is dead-lettered."""
    worker = IngestWorker(broker.url, store)
    topics = Topics()

    def rep(device: str, phase: str, error: str | None = None) -> Received:
        p = REPORTED.pipelines[0].model_copy(
            update={"phase": UpdatePhase(phase), "last_error": error}
        )
        msg = REPORTED.model_copy(update={"device_id": device, "pipelines": [p]})
        return Received(topics.device(device, "reported"), msg.encode())

    worker._write([rep("d1", "fetching"), rep("d2", "rejected", "bad\x00byte"),
                   rep("d3", "trial"), rep("d1", "committed")])  # fmt: skip
    phases = {r["device_id"]: r["phase"] for r in rows(store, PIPELINE_STATE)}
    if store.engine.dialect.name == "sqlite":
        assert phases == {"d1": "committed", "d2": "rejected", "d3": "trial"}
        assert worker.counts["reported"] == 4 and store.counts()["dead_letters"] == 0
    else:
        assert phases == {"d1": "committed", "d3": "trial"}
        [letter] = store.dead_letters()
        assert letter["topic"] == topics.device("d2", "reported")
        assert worker.counts["reported"] == 3 and worker.counts["dead_letters"] == 1


def test_state_and_reported_jump_a_telemetry_backlog(tmp_path: Any) -> None:
    """A rollout controller reads commits from the ingest store: with thousands of telemetry
    messages queued, a reported state queued after them is still in the next batch written."""
    from cloud_sync.ingest.store import open_store
    from cloud_sync.ingest.worker import IngestWorker

    store = open_store(f"sqlite:///{tmp_path / 'i.db'}")
    worker = IngestWorker("mqtt://127.0.0.1:1", store, batch_size=500)
    batches: list[list[str]] = []
    worker._write = lambda batch: batches.append([r.topic for r in batch])  # type: ignore[method-assign]
    topics = Topics()
    for i in range(2000):
        worker._enqueue(Received(topics.device(f"d{i % 50}", "telemetry"), b"{}"))
    worker._enqueue(Received(topics.device("d7", "reported"), b"{}"))
    worker._enqueue(Received(topics.device("d8", "state"), b"{}"))
    assert worker._queue.qsize() == 2000 + 2  # each control message also queues a wake-up
    worker._thread = threading.Thread(target=worker._run, daemon=True)
    worker._thread.start()
    worker._queue.put(None)
    worker._thread.join(10)
    store.close()
    assert batches[0][:2] == [topics.device("d7", "reported"), topics.device("d8", "state")]
    assert sum(len(b) for b in batches) == 2002  # wake-ups are not messages
