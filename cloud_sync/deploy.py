"""Adapter: ``edgefleet deploy`` — write a device's signed, retained desired state.

The new revision is one above the highest the registry has issued to that device (its record
under ``REPO/desired/``) or that the broker still retains, so revisions only go up even when
one of the two was lost. Pipelines not named keep their previous target, and the pipeline
configuration (``config``) the registry last issued is carried over unchanged.

``DesiredPublisher`` does the same for many devices over one connection (the rollout
controller's path): it merges with the state the registry last issued and needs no probe per
device.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

from agent.common.errors import BadDataError, TransportError
from agent.common.fsutil import atomic_write_bytes
from agent.common.mqtt import CallbackGuard, connect_service, service_client
from agent.protocol.desired import sign_desired, verify_desired
from agent.protocol.state import (
    MAX_REVISION,
    ConfigTarget,
    DesiredState,
    DeviceState,
    PipelineTarget,
    SignedDesired,
)
from agent.protocol.topics import DEFAULT_ROOT, Topics
from agent.protocol.wire import BadMessage
from cloud_sync.registry.keys import RegistryError
from cloud_sync.registry.repo import Repository

_REF = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<version>[0-9][0-9A-Za-z.+-]*)\Z")


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

    client.on_message = CallbackGuard(f"deploy probe={probe}").wrap(on_message)
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
    client_id = f"edgefleet-deploy-{device_id}-{int(time.time() * 1000) % 10**9}"
    client = service_client(client_id, broker_url)
    connect_service(client, broker_url)
    try:
        probe = f"{topic_root}/operators/{client_id}/probe"
        retained = _retained(client, [desired_topic, state_topic], probe, retained_wait_s)
        trust = repo.desired_trust()
        # the retained message is whatever the broker holds: only a validly signed one counts
        held = retained_desired(
            retained.get(desired_topic, b""), desired_topic, topics, dict(trust.keys),
            trust.threshold,
        )  # fmt: skip
        prev = newest(last_issued(repo_dir, device_id), held)
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
        state = DesiredState(
            device_id=device_id,
            revision=next_revision(device_id, prev),
            issued_at=now or datetime.now(timezone.utc),
            pipelines=pipelines,
            config=prev.config if prev else None,
        )
        envelope = sign_desired(state, [repo.desired_signer()])
        payload = envelope.encode()
        info = client.publish(desired_topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)
        if not info.is_published():
            raise TransportError(f"broker {broker_url} did not acknowledge the desired state")
        atomic_write_bytes(_record_path(repo_dir, device_id), payload)
        return envelope
    finally:
        client.disconnect()
        client.loop_stop()


def _record_path(repo_dir: Path, device_id: str) -> Path:
    return repo_dir / "desired" / f"{device_id}.json"


def last_issued(repo_dir: Path, device_id: str) -> DesiredState | None:
    """The last desired state this registry issued to ``device_id`` (its record), if any."""
    record = _record_path(repo_dir, device_id)
    if not record.is_file():
        return None
    try:
        return SignedDesired.decode(record.read_bytes()).signed
    except (BadMessage, OSError):
        return None


def retained_desired(
    payload: bytes, topic: str, topics: Topics, keys: Mapping[str, Any], threshold: int
) -> DesiredState | None:
    """The body of a retained desired state if it is validly signed for the device its topic
    names, else ``None``: what ``deploy`` and the rollout publisher may build on.

    Anyone who can write the topic could have planted it; merging an unsigned message's
    pipelines or revision would make the registry sign them.
    """
    if not payload:
        return None
    try:
        envelope = SignedDesired.decode(payload)
    except BadMessage:
        return None
    device_id = envelope.signed.device_id
    if topic != topics.device(device_id, "desired"):
        return None
    try:
        verify_desired(
            envelope, trusted_keys=keys, threshold=threshold, device_id=device_id,
            last_revision=None,
        )  # fmt: skip
    except BadDataError:
        return None
    return envelope.signed


def newest(record: DesiredState | None, retained: DesiredState | None) -> DesiredState | None:
    """The higher revision of our record and the verified retained state."""
    if record is None or (retained is not None and retained.revision > record.revision):
        return retained
    return record


def next_revision(device_id: str, prev: DesiredState | None) -> int:
    """One above ``prev``.

    Raises:
        RegistryError: the revision space is used up (only possible with a key that signed
            far past what this registry issues).
    """
    revision = (prev.revision if prev else 0) + 1
    if revision > MAX_REVISION:
        raise RegistryError(
            f"device {device_id} is at desired revision {revision - 1}, the maximum; "
            "re-enroll the device to start its revisions again",
            reason="revision",
        )
    return revision


class DesiredPublisher:
    """Adapter: one MQTT connection that signs and publishes desired states for many devices.

    Each device's next state is the last one *we issued* (``REPO/desired/DEVICE.json``) with
    the given pipelines changed, so deploying one pipeline keeps the others. Revisions go one
    above the higher of that record and what the broker retains for the device: the publisher
    subscribes once to every device's ``desired`` topic (one probe for the whole fleet, not one
    per device) and keeps the highest *validly signed* revision it sees, so a lost record cannot
    make a revision go backwards and a forged retained message cannot inject targets.

    Use as a context manager, or ``connect()`` / ``close()``.
    """

    def __init__(
        self,
        repo_dir: Path,
        broker_url: str,
        *,
        topic_root: str = DEFAULT_ROOT,
        client_id: str | None = None,
        ack_timeout_s: float = 10.0,
        retained_wait_s: float = 5.0,
    ) -> None:
        self.repo_dir = Path(repo_dir)
        self.broker_url = broker_url
        self.topics = Topics(topic_root)
        self.topic_root = topic_root
        self.client_id = client_id or f"edgefleet-desired-{int(time.time() * 1000) % 10**9}"
        self.ack_timeout_s = ack_timeout_s
        self.retained_wait_s = retained_wait_s
        self._lock = threading.Lock()
        self._retained: dict[str, DesiredState] = {}
        self._probe = f"{topic_root}/operators/{self.client_id}/probe"
        self._probed = threading.Event()
        self._client: mqtt.Client | None = None
        self._keys: tuple[dict[str, Any], int] | None = None
        self.guard = CallbackGuard(f"desired-publisher={self.client_id}")

    # --- connection ----------------------------------------------------------------------

    def __enter__(self) -> DesiredPublisher:
        self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def connect(self) -> None:
        """Connect, subscribe to every device's desired topic and wait for the retained ones.

        Raises:
            TransportError: the broker cannot be reached.
        """
        client = service_client(self.client_id, self.broker_url)
        self.attach(client)
        connect_service(client, self.broker_url)
        self._client = client
        if not self._probed.wait(self.retained_wait_s):
            self.close()
            raise TransportError(
                f"broker {self.broker_url} did not answer the retained-state probe in "
                f"{self.retained_wait_s:g} s"
            )

    def attach(self, client: mqtt.Client) -> None:
        """Load the desired-state trust and set this publisher's callbacks, guarded (nothing
        a retained message holds ends paho's thread), on ``client`` (``connect`` does this;
        the fuzzer drives the callbacks through a client of its own)."""
        trust = Repository(self.repo_dir).desired_trust()
        self._keys = (dict(trust.keys), trust.threshold)
        client.on_message = self.guard.wrap(self._on_message)
        client.on_connect = self.guard.wrap(self._on_connect)

    def close(self) -> None:
        """Disconnect (idempotent)."""
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _on_connect(self, client: mqtt.Client, u: object, f: object, rc: Any, p: object) -> None:
        if rc.is_failure:
            return
        # clean session: subscribe again after every reconnect; the probe answers after the
        # retained desired states, which the broker sends with the subscription
        client.subscribe(self.topics.all_devices("desired"), qos=1)
        client.subscribe(self._probe, qos=1)
        client.publish(self._probe, b"probe", qos=1)

    def _on_message(self, c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        if msg.topic == self._probe:
            self._probed.set()
            return
        if not msg.payload:
            return
        if self._keys is None:
            return
        body = retained_desired(bytes(msg.payload), msg.topic, self.topics, *self._keys)
        if body is None:
            return
        with self._lock:
            seen = self._retained.get(body.device_id)
            if seen is None or body.revision > seen.revision:
                self._retained[body.device_id] = body

    # --- publishing ----------------------------------------------------------------------

    def base(self, device_id: str) -> DesiredState | None:
        """The newest of our record and the broker's validly signed retained state."""
        with self._lock:
            retained = self._retained.get(device_id)
        return newest(last_issued(self.repo_dir, device_id), retained)

    def next_state(
        self,
        device_id: str,
        changes: Mapping[str, PipelineTarget],
        now: datetime,
        config: ConfigTarget | None = None,
    ) -> DesiredState:
        """The device's next desired state: the base with ``changes`` applied (and ``config``
        when given, else the base's configuration), revision + 1."""
        prev = self.base(device_id)
        return DesiredState(
            device_id=device_id,
            revision=next_revision(device_id, prev),
            issued_at=now,
            pipelines={**(prev.pipelines if prev else {}), **changes},
            config=config or (prev.config if prev else None),
        )

    def publish(
        self,
        changes: Mapping[str, Mapping[str, PipelineTarget]],
        *,
        now: datetime | None = None,
        configs: Mapping[str, ConfigTarget] | None = None,
    ) -> dict[str, SignedDesired]:
        """Publish the next desired state of each device (device → pipeline → target; and
        device → pipeline configuration in ``configs``).

        All messages go out before waiting for the acknowledgements; a device's record is
        written once the broker acknowledged its message.

        Raises:
            RegistryError: a target is not published in the registry; nothing was sent.
            TransportError: not connected, or the broker did not acknowledge in time; some
                devices may have received theirs (publishing again is harmless: a device
                ignores a target it already runs or installs).
        """
        client = self._client
        if client is None:
            raise TransportError("desired-state publisher is not connected")
        now = now or datetime.now(timezone.utc)
        repo = Repository(self.repo_dir)
        check_published(repo, [t for c in changes.values() for t in c.values()])
        signer = repo.desired_signer()
        sent: list[tuple[SignedDesired, bytes, mqtt.MQTTMessageInfo]] = []
        configs = configs or {}
        for device_id in dict.fromkeys([*changes, *configs]):
            state = self.next_state(
                device_id, changes.get(device_id, {}), now, configs.get(device_id)
            )
            envelope = sign_desired(state, [signer])
            payload = envelope.encode()
            topic = self.topics.device(device_id, "desired")
            sent.append((envelope, payload, client.publish(topic, payload, qos=1, retain=True)))
        deadline = time.monotonic() + self.ack_timeout_s
        out: dict[str, SignedDesired] = {}
        for envelope, payload, info in sent:
            info.wait_for_publish(max(0.0, deadline - time.monotonic()))
            if not info.is_published():
                raise TransportError(
                    f"broker {self.broker_url} did not acknowledge the desired state of "
                    f"{envelope.signed.device_id} in {self.ack_timeout_s:g} s"
                )
            device_id = envelope.signed.device_id
            atomic_write_bytes(_record_path(self.repo_dir, device_id), payload)
            with self._lock:
                self._retained[device_id] = envelope.signed
            out[device_id] = envelope
        return out


def check_published(repo: Repository, refs: Iterable[PipelineTarget]) -> None:
    """Make sure every ``model@version`` is in the registry's targets.

    Raises:
        RegistryError: one is not; the message names it.
    """
    targets = repo.targets()
    for ref in refs:
        if f"models/{ref.model}/{ref.version}/model.onnx" not in targets:
            raise RegistryError(
                f"{ref} is not published in {repo.path}; `edgefleet model list --repo {repo.path}`",
                reason="model",
            )
