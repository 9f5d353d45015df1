"""Adapter: the device's MQTT session — birth/LWT, desired state in, reported state out.

paho runs its network loop in its own thread and reconnects by itself (exponential delay with
a per-device random floor, so a fleet that lost the broker together does not return in
lock-step). Incoming desired-state payloads are handed to a callback without any work done in
paho's thread. The session is connected only after the broker *accepted* the connection
(Frigate's MQTT client marks itself connected even after a refusal: not here), and only while
paho's network thread runs: every callback is guarded (``agent.common.mqtt.CallbackGuard``), and
should that thread end all the same, ``connected`` says so instead of paho's stale state.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from agent.common.mqtt import CallbackGuard, make_client, parse_broker_url
from agent.config import BrokerConfig
from agent.protocol.state import DeviceState, ReportedState, SignedDesired
from agent.protocol.topics import Topics
from agent.protocol.wire import BadMessage

log = logging.getLogger(__name__)


class LinkState(threading.Event):
    """Set while the session is connected: after the broker accepted the connection, until it
    is lost, and only while the network thread that serves it is alive.

    paho keeps its state "connected" when its network thread ends on an exception (nothing
    then reads the socket, sends keepalives or reconnects), so ``is_set()`` also asks whether
    that thread still runs and calls ``on_dead`` when it does not; ``thread`` is None before
    ``start``, after ``stop`` and when the client is driven by an outside loop (the fleet
    simulator's, ``tests/harness/sim/netloop.py``), which leaves no thread of the client's own
    to lose.
    """

    def __init__(self, on_dead: Callable[[], None]) -> None:
        super().__init__()
        self.thread: threading.Thread | None = None
        self._on_dead = on_dead

    def is_set(self) -> bool:
        if self.thread is not None and not self.thread.is_alive():
            self._on_dead()
            return False
        return super().is_set()


class DeviceSession:
    """One device's connection to the broker."""

    def __init__(
        self,
        cfg: BrokerConfig,
        device_id: str,
        birth: DeviceState,
        on_desired: Callable[[bytes], None],
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.device_id = device_id
        self.topics = Topics(cfg.topic_root)
        self.birth = birth
        self.on_desired = on_desired
        self.connected = LinkState(self._network_thread_died)
        self.guard = CallbackGuard(f"device={device_id}")
        # Called from paho's thread after each accepted (re)connect, e.g. to resubscribe.
        self.on_connected: list[Callable[[], None]] = []
        self.last_error = ""
        self.connects = 0
        host, port, tls = parse_broker_url(cfg.url)
        self._host, self._port = host, port
        self.client = make_client(f"edgefleet-{device_id}", clean=True)
        floor = (rng or random.Random()).uniform(0.5, 2.0)
        self.client.reconnect_delay_set(min_delay=max(1, round(floor)), max_delay=30)
        if cfg.username:
            self.client.username_pw_set(cfg.username, cfg.password)
        if tls:
            self.client.tls_set(
                ca_certs=str(cfg.ca_file) if cfg.ca_file else None,
                certfile=str(cfg.cert_file) if cfg.cert_file else None,
                keyfile=str(cfg.key_file) if cfg.key_file else None,
            )
        offline = birth.model_copy(update={"online": False})
        self.client.will_set(
            self.topics.device(device_id, "state"), offline.encode(), qos=1, retain=True
        )
        self.client.on_connect = self.guard.wrap(self._on_connect)
        self.client.on_disconnect = self.guard.wrap(self._on_disconnect)
        self.client.message_callback_add(
            self.topics.device(device_id, "desired"), self.guard.wrap(self._on_desired)
        )

    def set_pipelines(self, names: list[str]) -> None:
        """The running pipelines changed (remote configuration): the retained birth state
        says so at once when connected, and the last will from the next connect on."""
        self.birth = self.birth.model_copy(update={"pipelines": names})
        topic = self.topics.device(self.device_id, "state")
        offline = self.birth.model_copy(update={"online": False})
        self.client.will_set(topic, offline.encode(), qos=1, retain=True)
        if self.connected.is_set():
            self.client.publish(topic, self.birth.encode(), qos=1, retain=True)

    def start(self) -> None:
        """Connect in the background; paho keeps reconnecting until ``stop``."""
        self.client.connect_async(self._host, self._port, keepalive=self.cfg.keepalive_s)
        self.client.loop_start()
        # paho names no accessor for its network thread; it is the one loop_start just made
        self.connected.thread = getattr(self.client, "_thread", None)

    def _network_thread_died(self) -> None:
        """Said once ``connected`` finds paho's thread gone (paho itself still says connected)."""
        if not self.last_error.startswith("MQTT network thread"):
            self.last_error = (
                f"MQTT network thread ended (broker {self.cfg.url}); no MQTT until the agent"
                " restarts"
            )
            log.error("device=%s %s", self.device_id, self.last_error)

    def stop(self, timeout: float = 5.0) -> None:
        """Publish the offline state (a clean exit sends no LWT) and disconnect."""
        if self.connected.is_set():
            offline = self.birth.model_copy(update={"online": False})
            info = self.client.publish(
                self.topics.device(self.device_id, "state"), offline.encode(), qos=1, retain=True
            )
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(timeout)
        self.client.disconnect()
        self.client.loop_stop()
        # paho loses a disconnect() issued while its thread is inside reconnect(); repeat it
        # now that the thread is gone so no connection attempt survives stop().
        self.client.disconnect()
        self.connected.clear()
        self.connected.thread = None

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None
    ) -> None:
        if rc.is_failure:
            self.last_error = f"broker {self.cfg.url} refused the connection: {rc}"
            log.error("device=%s mqtt connect refused: %s", self.device_id, rc)
            self.connected.clear()
            return
        self.connects += 1
        # Subscribe on every (re)connect: a clean session forgets subscriptions.
        client.subscribe(self.topics.device(self.device_id, "desired"), qos=1)
        client.publish(
            self.topics.device(self.device_id, "state"), self.birth.encode(), qos=1, retain=True
        )
        self.last_error = ""
        self.connected.set()
        for callback in self.on_connected:
            self.guard.wrap(callback)()  # one that fails does not keep the others from running
        log.info(
            "device=%s mqtt connected to %s (connect #%d)",
            self.device_id,
            self.cfg.url,
            self.connects,
        )

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, rc: Any, props: Any = None
    ) -> None:
        self.connected.clear()
        if rc.is_failure:
            self.last_error = f"lost broker {self.cfg.url}: {rc}"
            log.warning("device=%s mqtt disconnected: %s; paho reconnects", self.device_id, rc)

    def _on_desired(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        """Hand the payload on; an oversized one is refused here, before it is queued (the
        update manager holds messages while it works)."""
        if len(msg.payload) > SignedDesired.max_bytes:
            raise BadMessage(
                f"desired state of {len(msg.payload)} bytes is over the"
                f" {SignedDesired.max_bytes}-byte limit; dropped"
            )
        self.on_desired(bytes(msg.payload))

    def publish_reported(self, reported: ReportedState) -> None:
        """Retained, QoS 1: the broker keeps the latest for dashboards and the controller."""
        self.client.publish(
            self.topics.device(self.device_id, "reported"), reported.encode(), qos=1, retain=True
        )
