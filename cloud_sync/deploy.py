"""Adapter: ``edgefleet deploy`` — write a device's signed, retained desired state.

The new revision is one above the highest the registry has issued to that device (its record
under ``REPO/desired/``) or that the broker still retains, so revisions only go up even when
one of the two was lost. Pipelines not named keep their previous target.
"""

from __future__ import annotations

import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.errors import TransportError
from agent.fsutil import atomic_write_bytes
from agent.protocol.fetch import BadMessage
from agent.protocol.state import DesiredState, DeviceState, PipelineTarget, SignedDesired
from agent.protocol.topics import DEFAULT_ROOT, Topics
from agent.sync.mqtt import make_client, parse_broker_url
from agent.update.desired import sign_desired
from cloud_sync.registry.keys import RegistryError
from cloud_sync.registry.repo import Repository

_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<version>[0-9][0-9A-Za-z.+-]*)$")


def parse_ref(ref: str) -> PipelineTarget:
    """``name@version``.

    Raises:
        RegistryError: not of that form.
    """
    m = _REF.match(ref)
    if not m:
        raise RegistryError(f"expected NAME@VERSION (e.g. det@1.4.0), got {ref!r}")
    return PipelineTarget(model=m["name"], version=m["version"])


def _retained(
    client: mqtt.Client, topics: list[str], probe: str, wait_s: float
) -> dict[str, bytes]:
    """The retained messages on ``topics`` (absent ones are simply missing).

    MQTT gives no "nothing retained" answer, so instead of waiting out a timeout: subscribe to
    the topics, then to a private probe topic, and publish to it. The broker sends a
    subscription's retained message in its SUBACK flow and delivers one connection's messages
    in order, so when the probe comes back nothing retained is still on its way.
    """
    got: dict[str, bytes] = {}
    done = threading.Event()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == probe:
            done.set()
        elif msg.retain:
            got[msg.topic] = bytes(msg.payload)

    client.on_message = on_message
    for t in topics:
        client.subscribe(t, qos=1)
    client.subscribe(probe, qos=1)
    client.publish(probe, b"probe", qos=1)
    done.wait(wait_s)
    for t in [*topics, probe]:
        client.unsubscribe(t)
    return got


def deploy(
    repo_dir: Path,
    broker_url: str,
    device_id: str,
    ref: str,
    *,
    pipeline: str | None = None,
    topic_root: str = DEFAULT_ROOT,
    retained_wait_s: float = 5.0,
    now: datetime | None = None,
) -> SignedDesired:
    """Publish the device's next desired state; returns what was published.

    Raises:
        RegistryError: unknown model version, or no pipeline to target.
        TransportError: the broker could not be reached or did not acknowledge.
    """
    repo = Repository(repo_dir)
    target = parse_ref(ref)
    if f"models/{target.model}/{target.version}/model.onnx" not in repo.targets():
        raise RegistryError(
            f"{ref} is not published in {repo_dir}; `edgefleet model list --repo {repo_dir}`"
        )
    topics = Topics(topic_root)
    desired_topic = topics.device(device_id, "desired")
    state_topic = topics.device(device_id, "state")
    host, port, _tls = parse_broker_url(broker_url)
    client_id = f"edgefleet-deploy-{device_id}-{int(time.time() * 1000) % 10**9}"
    client = make_client(client_id)
    try:
        client.connect(host, port, keepalive=30)
    except OSError as e:
        raise TransportError(f"cannot reach broker {broker_url}: {e}") from e
    client.loop_start()
    try:
        probe = f"{topic_root}/operators/{client_id}/probe"
        retained = _retained(client, [desired_topic, state_topic], probe, retained_wait_s)
        prev: DesiredState | None = None
        if retained.get(desired_topic):
            try:
                prev = SignedDesired.decode(retained[desired_topic]).signed
            except BadMessage:
                prev = None
        record = repo_dir / "desired" / f"{device_id}.json"
        last_issued = 0
        if record.is_file():
            try:
                last_issued = SignedDesired.decode(record.read_bytes()).signed.revision
            except BadMessage:
                last_issued = 0
        pipelines = dict(prev.pipelines) if prev else {}
        if pipeline is not None:
            names = [pipeline]
        elif pipelines:
            names = list(pipelines)
        else:
            names = []
            if retained.get(state_topic):
                try:
                    names = list(DeviceState.decode(retained[state_topic]).pipelines)
                except BadMessage:
                    names = []
            if not names:
                raise RegistryError(
                    f"device {device_id} has no desired state and has not announced its "
                    "pipelines; name one with --pipeline"
                )
        for n in names:
            pipelines[n] = target
        revision = max(prev.revision if prev else 0, last_issued) + 1
        state = DesiredState(
            device_id=device_id,
            revision=revision,
            issued_at=now or datetime.now(timezone.utc),
            pipelines=pipelines,
        )
        envelope = sign_desired(state, [repo.desired_signer()])
        payload = envelope.encode()
        info = client.publish(desired_topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)
        if not info.is_published():
            raise TransportError(f"broker {broker_url} did not acknowledge the desired state")
        atomic_write_bytes(record, payload)
        return envelope
    finally:
        client.disconnect()
        client.loop_stop()
