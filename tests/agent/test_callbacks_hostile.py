"""Every MQTT callback survives any payload (issue 14, item 3).

One chunk answer with a header nested 1,500 levels deep made ``json.loads`` raise
``RecursionError`` in paho's network thread, which ended the thread: no MQTT until a restart,
while ``status.json`` still said connected. Here: the parsers refuse such payloads with
``BadMessage``; ``CallbackGuard`` keeps whatever a callback raises out of paho's thread; and a
session whose network thread ended all the same no longer reports itself connected. Real parts
throughout the broker tests: Mosquitto, a signed TUF registry and its chunk server, the
agent's session, chunk client and update manager (on a simulated camera), the rollout's
desired-state publisher.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import scripts.fuzz_parsers
from agent.common.mqtt import MAX_GUARD_REASONS, CallbackGuard, make_client
from agent.config import UpdateConfig, parse_config
from agent.protocol.fetch import MAX_HEADER, FetchRequest, decode_response
from agent.protocol.schema import MESSAGES
from agent.protocol.state import PipelineTarget
from agent.protocol.topics import Topics
from agent.protocol.wire import BadMessage
from agent.service import Agent, read_status
from cloud_sync.deploy import DesiredPublisher, deploy
from cloud_sync.registry.serve import ChunkServer
from tests.harness.broker import Mosquitto
from tests.harness.fetch import chunk_server
from tests.harness.sim.device import SimDevice
from tests.harness.sim.registry import make_sim_registry
from tests.harness.util import wait_for

TOPICS = Topics()
MB = 1 << 20
FUZZ = scripts.fuzz_parsers

DEEP_LIST = b"[" * 1500 + b"]" * 1500  # the chunk header of the issue
HOSTILE = {
    "1,500 nested lists": DEEP_LIST,
    "1,500 nested dicts": b'{"a":' * 1500 + b"0" + b"}" * 1500,
    "5,000 levels, both": FUZZ._deep(5000, "mixed"),
    "10**5000": b"1" + b"0" * 5000,
    "1e999": b"1e999",
    "5 MB string": b'"' + b"A" * (5 * MB) + b'"',
    "invalid UTF-8": b'{"id": "\xff\xfe", "path": "\xc0\x80"}',
    "empty": b"",
}


def framed(header: bytes, data: bytes = b"") -> bytes:
    return len(header).to_bytes(4, "big") + header + data


def honest_header(**fields: Any) -> bytes:
    doc = {"id": "r-1", "path": "targets/m", "offset": 0, "total": 3, **fields}
    return json.dumps(doc).encode()


# -- the parsers --------------------------------------------------------------------------


def test_the_issue_header_broke_json_loads() -> None:
    """Why: the standard library's parser gives up on this depth with RecursionError."""
    with pytest.raises(RecursionError):
        json.loads(DEEP_LIST)


@pytest.mark.parametrize(
    "payload",
    [
        framed(DEEP_LIST),
        framed(b"[" * (MAX_HEADER // 2) + b"]" * (MAX_HEADER // 2)),
        framed(b'{"":' * 800 + b"0" + b"}" * 800),
        framed(honest_header(total=10**4000)),
        framed(honest_header(offset=2**41)),
        framed(honest_header(status="busy").replace(b"}", b', "retry_after_s": 1e999}')),
        framed(honest_header().replace(b"r-1", b"\xff\xfe")),
        framed(honest_header(), b"\0" * (5 * MB)),
        framed(b"x" * (MAX_HEADER + 1)),
    ],
    ids=[
        "1500-deep",
        "2048-deep",
        "800-deep-dicts",
        "4000-digit-total",
        "offset-past-1TiB",
        "retry-1e999",
        "invalid-utf8",
        "5MB-data",
        "long-header",
    ],
)
def test_chunk_answers_that_break_limits_are_bad_messages(payload: bytes) -> None:
    with pytest.raises(BadMessage):
        decode_response(payload)


@pytest.mark.parametrize("name", list(MESSAGES))
@pytest.mark.parametrize("hostile", list(HOSTILE))
def test_every_wire_message_refuses_hostile_payloads(name: str, hostile: str) -> None:
    decode = getattr(MESSAGES[name], "decode", None) or FetchRequest.decode
    with pytest.raises(BadMessage):
        decode(HOSTILE[hostile])


# -- the guard ----------------------------------------------------------------------------


def test_guard_swallows_counts_and_logs_each_reason_once(caplog: pytest.LogCaptureFixture) -> None:
    guard = CallbackGuard("device=cam-1")
    calls: list[int] = []

    def on_thing(n: int) -> None:
        calls.append(n)
        if n % 2:
            raise RecursionError("maximum recursion depth exceeded")
        raise BadMessage(f"payload {n} is bad")

    wrapped = guard.wrap(on_thing)
    assert wrapped.__name__ == "on_thing"  # paho names the callback in its own log lines
    with caplog.at_level(logging.DEBUG, logger="agent.common.mqtt"):
        for n in range(6):
            wrapped(n)
    assert calls == list(range(6))
    assert (guard.failed, guard.rejected, guard.total) == (3, 3, 6)
    assert guard.reasons == {"on_thing: RecursionError": 3, "on_thing: BadMessage": 3}
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.levelname for r in loud] == ["WARNING", "ERROR"]  # once per reason
    assert "device=cam-1" in loud[1].getMessage() and loud[1].exc_info is not None
    assert "connection kept" in loud[0].getMessage()


def test_guard_lets_keyboard_interrupt_through() -> None:
    def stop() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        CallbackGuard("x").wrap(stop)()


def test_guard_refuses_topics_that_are_not_utf8_before_the_callback() -> None:
    guard = CallbackGuard("x")
    seen: list[str] = []
    on_message = guard.wrap(lambda c, u, msg: seen.append(msg.topic))
    on_message(None, None, mqtt.MQTTMessage(topic=b"devices/\xff/desired"))
    on_message(None, None, mqtt.MQTTMessage(topic=b"devices/ok/desired"))
    assert seen == ["devices/ok/desired"]
    assert guard.rejected == 1 and guard.failed == 0


def test_guard_names_a_bounded_number_of_reasons() -> None:
    guard = CallbackGuard("x")
    kinds = [type(f"E{i}", (ValueError,), {}) for i in range(MAX_GUARD_REASONS + 10)]
    for kind in kinds:

        def raise_it(k: type[Exception] = kind) -> None:
            raise k()

        guard.wrap(raise_it)()
    assert len(guard.reasons) == MAX_GUARD_REASONS + 1 and guard.reasons["other"] == 10


def test_clients_log_and_swallow_callback_exceptions_that_nobody_guarded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The last line of defence of every client make_client builds (the registry's chunk
    server and the ingest worker use it too): paho logs the exception and carries on. Its
    other ERROR lines (a lost connection, on every try to reconnect) stay out of the log."""
    client = make_client("x")

    def unguarded(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        json.loads(msg.payload)

    client.message_callback_add("t", unguarded)
    msg = mqtt.MQTTMessage(topic=b"t")
    msg.payload = DEEP_LIST
    with caplog.at_level(logging.DEBUG):
        client._handle_on_message(msg)  # what paho's network thread calls; nothing gets out
        client._easy_log(mqtt.MQTT_LOG_ERR, "failed to receive on socket: %s", "reset")
        client._easy_log(mqtt.MQTT_LOG_DEBUG, "Sending PINGREQ")
    paho = [r for r in caplog.records if r.name == "agent.common.mqtt.paho"]
    assert [r.levelname for r in paho] == ["ERROR"]
    assert "Caught exception" in paho[0].getMessage() and "recursion" in paho[0].getMessage()


# -- the real callback objects, through paho's own dispatch (no broker) --------------------


@pytest.fixture(scope="module")
def callback_targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("targets")
    return {
        t.name: t
        for t in (FUZZ._session_target(), FUZZ._fetcher_target(), FUZZ._publisher_target(tmp))
    }


@pytest.mark.parametrize("hostile", [*HOSTILE, "non-UTF-8 topic"])
@pytest.mark.parametrize("target", ["callback:session", "callback:fetcher", "callback:publisher"])
def test_each_callback_drops_a_hostile_message_and_takes_the_next_honest_one(
    callback_targets: dict[str, Any], target: str, hostile: str
) -> None:
    """paho's dispatch with its exception suppression off: nothing gets out, the guard has
    caught no bug, and an honest message works next (``Dropped``: the hostile one was not
    taken)."""
    t = callback_targets[target]
    own = {
        "callback:session": TOPICS.device(FUZZ.DEVICE, "desired"),
        "callback:fetcher": TOPICS.device(FUZZ.DEVICE, "fetch/resp"),
        "callback:publisher": TOPICS.device(FUZZ.DEVICE, "desired"),
    }[target].encode()
    if hostile == "non-UTF-8 topic":
        case = (own + b"\xff", b"{}")
    elif target == "callback:fetcher":
        case = (own, framed(HOSTILE[hostile]) if len(HOSTILE[hostile]) < MB else HOSTILE[hostile])
    else:
        case = (own, HOSTILE[hostile])
    with pytest.raises(FUZZ.Dropped):
        t.fn(case)


# -- with a real broker ---------------------------------------------------------------------


class Injector:
    """A client that publishes whatever it is given, as an attacker with topic access would."""

    def __init__(self, broker: Mosquitto, client_id: str = "injector") -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def hostile_answers() -> list[bytes]:
    """Chunk answers: the issue's, other deep and huge ones, and one honest-looking answer to a
    request nobody made."""
    return [
        framed(DEEP_LIST),
        framed(DEEP_LIST, b"data"),
        framed(honest_header(total=10**4000)),
        framed(b"1" + b"0" * 4000),
        framed(honest_header(), b"\0" * (5 * MB)),
        framed(b'{"id": "\xff"}'),
        b"\0\0",
        framed(honest_header(id="nobody-1")),
    ]


def hostile_desired() -> list[bytes]:
    return [DEEP_LIST, HOSTILE["1,500 nested dicts"], HOSTILE["10**5000"], HOSTILE["5 MB string"]]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A signed registry with sim@1.0.0 and sim@1.1.0 (96 KB models: 12 windows of 8 KiB)."""
    tmp = tmp_path_factory.mktemp("hostile-registry")
    make_sim_registry(tmp / "registry", tmp / "src", ["1.0.0", "1.1.0"], 96 << 10)
    return tmp / "registry"


@pytest.fixture
def server(broker: Mosquitto, registry: Path) -> Iterator[ChunkServer]:
    with chunk_server(registry, broker) as srv:
        yield srv


@pytest.fixture
def device(broker: Mosquitto, registry: Path, tmp_path: Path) -> Iterator[SimDevice]:
    """The agent's real session, chunk client and update manager on a simulated camera, with
    paho's own network thread (as the agent runs it)."""
    dev = SimDevice(
        "cam-h1", broker.url, registry / "root.json", tmp_path / "cam-h1",
        update=UpdateConfig(chunk_kb=8, window=4, request_timeout_s=2.0, retry_s=1.0,
                            health_window_s=0.3, health_min_frames=3),
        telemetry_interval_s=3600,
    )  # fmt: skip
    stop = threading.Event()

    def frames() -> None:
        while not stop.wait(0.05):
            dev.advance(time.monotonic())

    ticker = threading.Thread(target=frames, name="test-frames", daemon=True)
    dev.start()
    ticker.start()
    assert wait_for(dev.session.connected.is_set, 10)  # type: ignore[union-attr]
    yield dev
    stop.set()
    ticker.join(5)
    dev.stop()


def phase(dev: SimDevice) -> tuple[str, str | None]:
    p = dev.status()["pipelines"][0]
    return p["phase"], p["active"]


def last_error(dev: SimDevice) -> str:
    return str(dev.status()["pipelines"][0]["last_error"] or "")


def network_alive(dev: SimDevice) -> bool:
    assert dev.session is not None and dev.session.connected.thread is not None
    return dev.session.connected.thread.is_alive()


@pytest.mark.broker
def test_device_survives_hostile_chunk_answers_and_desired_states_then_updates(
    broker: Mosquitto, registry: Path, server: ChunkServer, device: SimDevice
) -> None:
    dev, bad = device, Injector(broker)
    session, chunks = dev.session, dev.chunks
    assert session is not None and chunks is not None
    resp = TOPICS.device(dev.device_id, "fetch/resp")
    desired = TOPICS.device(dev.device_id, "desired")
    try:
        answers = hostile_answers()
        for payload in answers:
            bad.send(resp, payload)
        for payload in hostile_desired():
            bad.send(desired, payload)
        bad.send(desired, DEEP_LIST, retain=True)  # deploy's retained-state probe reads it too
        # the last undecodable answer and desired state went through the same thread after
        # the first: the thread is alive and every one of them was dropped and counted
        undecodable = len(answers) - 1
        assert wait_for(lambda: chunks.bad_responses >= undecodable, 10)
        assert wait_for(lambda: chunks.stale_responses >= 1, 10)
        assert wait_for(lambda: session.guard.rejected >= 1, 10)  # the 5 MB desired state
        assert wait_for(lambda: "malformed desired state" in last_error(dev), 10)
        assert chunks.guard.failed == 0 and session.guard.failed == 0
        assert network_alive(dev) and session.connected.is_set() and dev.status()["online"]

        # an honest signed desired state and an honest download, with junk still arriving
        spam_stop = threading.Event()

        def spam() -> None:
            while not spam_stop.wait(0.05):
                for payload in answers[:4]:
                    bad.send(resp, payload)

        spammer = threading.Thread(target=spam, name="test-spam", daemon=True)
        spammer.start()
        try:
            deploy(registry, broker.url, dev.device_id, "sim@1.0.0", pipeline="front")
            assert wait_for(lambda: phase(dev) == ("committed", "sim@1.0.0"), 60), dev.status()
        finally:
            spam_stop.set()
            spammer.join(10)
        assert chunks.bad_responses > undecodable + 4
        assert network_alive(dev) and session.connected.is_set()
        assert chunks.guard.failed == 0 and session.guard.failed == 0
    finally:
        bad.close()


@pytest.mark.broker
def test_rollout_publisher_survives_hostile_retained_states_and_still_delivers(
    broker: Mosquitto, registry: Path, server: ChunkServer, device: SimDevice
) -> None:
    """The rollout controller's publisher subscribes to every device's retained desired
    state: hostile ones (other devices', this device's) must not end its thread or its
    probe, and what it publishes must still reach the device."""
    bad = Injector(broker)
    try:
        for i, payload in enumerate([*hostile_desired(), DEEP_LIST]):
            bad.send(TOPICS.device(f"junk-{i}", "desired"), payload, retain=True)
        bad.send(TOPICS.device(device.device_id, "desired"), DEEP_LIST, retain=True)
        with DesiredPublisher(registry, broker.url, retained_wait_s=10) as pub:
            assert pub.guard.failed == 0
            for payload in hostile_desired():  # while connected, too
                bad.send(TOPICS.device("junk-live", "desired"), payload)
            target = PipelineTarget(model="sim", version="1.1.0")
            sent = pub.publish({device.device_id: {"front": target}})
            assert sent[device.device_id].signed.revision >= 1
            assert wait_for(lambda: phase(device) == ("committed", "sim@1.1.0"), 60), (
                device.status()
            )
            assert pub.guard.failed == 0 and pub.base("junk-0") is None
    finally:
        bad.close()


@pytest.fixture
def agent(broker: Mosquitto, tmp_path: Path) -> Iterator[Agent]:
    """The real agent, with a broker and no pipelines: its session and status.json."""
    cfg = parse_config(
        {"device_id": "cam-s1", "data_dir": str(tmp_path / "data"), "profile": "x86-cpu",
         "broker": {"url": broker.url, "keepalive_s": 5}}
    )  # fmt: skip
    a = Agent(cfg)
    a.start()
    assert wait_for(a.session.connected.is_set, 10)
    yield a
    a.stop()


def connected_in_status_json(agent: Agent) -> bool:
    agent.write_status()
    status = read_status(agent.cfg.data_dir)
    assert status is not None
    return bool(status["broker"]["connected"])


@pytest.mark.broker
def test_status_json_follows_the_broker(broker: Mosquitto, agent: Agent) -> None:
    assert connected_in_status_json(agent)
    broker.stop()
    assert wait_for(lambda: not connected_in_status_json(agent), 10)
    broker.start()
    assert wait_for(lambda: connected_in_status_json(agent), 20)


@pytest.mark.broker
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_network_thread_is_not_reported_as_connected(
    broker: Mosquitto, agent: Agent
) -> None:
    """Should paho's thread end all the same (both defences off here, as before the fix), the
    agent must stop claiming a connection that nothing serves any more: paho still says
    connected, status.json must not."""
    session = agent.session
    bad = Injector(broker)
    try:
        bad.send("test/boom", b"x", retain=True)
        session.client.suppress_exceptions = False

        def unguarded(c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")

        session.client.message_callback_add("test/boom", unguarded)
        session.client.subscribe("test/boom", qos=1)
        assert wait_for(lambda: not session.connected.thread.is_alive(), 10)
        assert session.client.is_connected()  # paho's stale state: what status.json used
        assert not connected_in_status_json(agent)
        status = read_status(agent.cfg.data_dir)
        assert status is not None and "network thread" in status["broker"]["last_error"]
    finally:
        bad.send("test/boom", b"", retain=True)
        bad.close()
