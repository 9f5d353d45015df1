"""Adapter: the paho-mqtt helpers every MQTT user in edgefleet shares.

``parse_broker_url`` turns ``mqtt://host:port`` / ``mqtts://host:port`` into connect arguments;
``make_client`` builds a paho 2.x client with the callback API version 2 (version 1 is
deprecated and warns), MQTT 3.1.1 (works on every broker, AWS IoT included) and a bounded
exponential reconnect delay. ``CallbackGuard`` wraps callbacks so that no payload, however
hostile, ends paho's network thread. Sessions, subscriptions and TLS material stay with the
caller.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any, ParamSpec
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.common.errors import BadDataError, TransportError

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
RECONNECT_MIN_DELAY_S = 0.5
RECONNECT_MAX_DELAY_S = 30
MAX_GUARD_REASONS = 64  # distinct reasons a guard counts by name; later ones count as "other"

log = logging.getLogger(__name__)
P = ParamSpec("P")


class _CallbackErrorsOnly(logging.Filter):
    """Passes paho's line about a callback's exception only: paho logs a lost connection at
    ERROR too (``failed to receive on socket``, ``Client is not connected``, on every try to
    reconnect), which the session reports in its own words."""

    def filter(self, record: logging.LogRecord) -> bool:
        return str(record.msg).startswith("Caught exception")


# paho's own log: its line when a callback nobody guarded raises (see make_client). paho logs
# every packet at DEBUG; that level stays off whatever the root logger's (each such call then
# costs ~0.3 µs, against some 30 µs that paho spends on a message)
_paho_log = logging.getLogger(f"{__name__}.paho")
_paho_log.setLevel(logging.WARNING)
_paho_log.addFilter(_CallbackErrorsOnly())


def parse_broker_url(url: str) -> tuple[str, int, bool]:
    """``(host, port, tls)`` of ``mqtt://host[:port]`` or ``mqtts://host[:port]``.

    The port defaults to 1883 (``mqtt``) or 8883 (``mqtts``); an IPv6 host goes in brackets
    (``mqtt://[::1]:1883``).

    Raises:
        ValueError: another scheme, no host, a port outside 1..65535, or a path, query,
            fragment or credentials in the URL (credentials belong in the config, not here).
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://, not {scheme!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"broker URL {url!r}: put credentials in the config, not in the URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r}: expected no path, query or fragment")
    host = parts.hostname
    if not host:
        raise ValueError(f"broker URL {url!r} has no host; expected mqtt://host:port")
    try:
        port = parts.port
    except ValueError as e:
        raise ValueError(f"broker URL {url!r}: port is not a number in 0..65535") from e
    if port is None:
        port = DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError(f"broker URL {url!r}: port {port} is outside 1..65535")
    return host, port, scheme == "mqtts"


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Disable Nagle on the broker socket (paho does not).

    Chunk requests are small and wait for an answer; with Nagle on, each of them can sit behind
    the peer's delayed ACK (~40 ms on Linux): measured here, a one-window round trip through a
    local Mosquitto took 88 ms with Nagle and well under a millisecond without.
    """
    setsockopt = getattr(sock, "setsockopt", None)  # websockets wrap the socket
    if setsockopt is not None:
        setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(client_id: str, *, clean: bool = True) -> mqtt.Client:
    """A paho client with callback API v2, MQTT 3.1.1 and reconnect backoff 0.5 s → 30 s.

    Callbacks take the v2 signatures, e.g. ``on_connect(client, userdata, flags,
    reason_code, properties)``, ``on_disconnect(client, userdata, flags, reason_code,
    properties)``, ``on_message(client, userdata, message)``; ``reason_code`` is a
    ``ReasonCode`` (``.is_failure``) on 3.1.1 too. The caller connects (``connect`` or
    ``connect_async``), then runs ``loop_start``; paho then reconnects on its own with the delay
    doubling from 0.5 s up to 30 s and reset by a successful CONNACK. ``on_socket_open`` is
    taken: it sets ``TCP_NODELAY`` on every new socket (request/answer traffic; see
    ``_no_delay``).

    Args:
        client_id: MQTT client id; must be unique on the broker (a second connection with the
            same id kicks the first off).
        clean: clean session (subscriptions and queued QoS 1 messages dropped on disconnect).
            A persistent session (``clean=False``) needs a non-empty ``client_id``.

    Raises:
        ValueError: ``clean=False`` with an empty ``client_id``.
    """
    if not clean and not client_id:
        raise ValueError("a persistent MQTT session (clean=False) needs a non-empty client id")
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean,
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    # paho annotates the delays as int but sleeps on them as floats; 0.5 s gets a broker that
    # restarts quickly back without a full second of dead air.
    client.reconnect_delay_set(
        min_delay=RECONNECT_MIN_DELAY_S,  # type: ignore[arg-type]
        max_delay=RECONNECT_MAX_DELAY_S,
    )
    client.on_socket_open = _no_delay
    # The last line of defence behind CallbackGuard: paho re-raises a callback's exception
    # in its network thread, which ends the thread and every MQTT exchange of the client while
    # is_connected() still says True. With this, paho logs the exception (to _paho_log) and
    # carries on, for callbacks that are not guarded too.
    client.suppress_exceptions = True
    client.enable_logger(_paho_log)
    return client


class CallbackGuard:
    """Keeps every exception of the MQTT callbacks it wraps out of paho's network thread.

    paho calls callbacks on its network thread and re-raises what they raise; the exception
    ends the thread, and with it reading, keepalive and reconnecting, until the process
    restarts. A wrapped callback that raises has its message dropped instead: the failure is
    counted under its reason (callback and exception type) and logged once per reason, so a
    sender that repeats one bad message cannot flood the log. A ``BadDataError`` is input the
    callback refused (a warning); any other exception is a bug, logged with its traceback. A
    message whose topic is not UTF-8 (MQTT forbids it; paho raises on reading ``msg.topic``)
    is refused before the callback runs.
    What is not an ``Exception`` (``KeyboardInterrupt``, ``SystemExit``) passes through.

    One guard per owner (a device session, a chunk client, a registry replica, an ingest
    worker): ``client.on_message = guard.wrap(self._on_message)``,
    ``client.message_callback_add(topic, guard.wrap(self._on_resp))``.

    Args:
        owner: who the callbacks belong to, for the log lines, e.g. ``"device=cam-1"``.

    Attributes (read any time): ``rejected`` (callbacks ended by a ``BadDataError``),
    ``failed`` (by another exception), ``reasons`` (``"callback: ExceptionType"`` → count).
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.rejected = 0
        self.failed = 0
        self.reasons: Counter[str] = Counter()
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[P, None]) -> Callable[P, None]:
        """``fn`` with every ``Exception`` it raises counted, logged once and swallowed."""

        @functools.wraps(fn)
        def guarded(*args: P.args, **kwargs: P.kwargs) -> None:
            try:
                msg = _message_of(args)
                if msg is not None:
                    _check_topic(msg)
                fn(*args, **kwargs)
            except Exception as e:  # the point: nothing may reach paho's thread
                self._record(fn.__name__, e, args)

        return guarded

    @property
    def total(self) -> int:
        """Callbacks that ended in an exception, of any kind."""
        return self.rejected + self.failed

    def _record(self, callback: str, e: Exception, args: tuple[Any, ...]) -> None:
        bad_data = isinstance(e, BadDataError)
        reason = f"{callback}: {type(e).__name__}"
        with self._lock:
            if bad_data:
                self.rejected += 1
            else:
                self.failed += 1
            if reason not in self.reasons and len(self.reasons) >= MAX_GUARD_REASONS:
                reason = "other"
            self.reasons[reason] += 1
            first = self.reasons[reason] == 1
        if not first:
            log.debug("%s mqtt %s dropped a message again: %s", self.owner, callback, e)
            return
        what = _describe_message(args)
        text = str(e)[:300]
        if bad_data:
            log.warning(
                "%s mqtt %s refused %s: %s; message dropped, connection kept (more of this "
                "kind are counted, not logged)", self.owner, callback, what, text,
            )  # fmt: skip
        else:
            log.error(
                "%s mqtt %s failed on %s: %s: %s; message dropped, connection kept (more of "
                "this kind are counted, not logged)", self.owner, callback, what,
                type(e).__name__, text, exc_info=e,
            )  # fmt: skip


def _message_of(args: tuple[Any, ...]) -> mqtt.MQTTMessage | None:
    """The message of an ``on_message`` call (its third argument), else None."""
    msg = args[2] if len(args) == 3 else None
    return msg if isinstance(msg, mqtt.MQTTMessage) else None


def _check_topic(msg: mqtt.MQTTMessage) -> None:
    """Raises: BadDataError when the topic is not UTF-8 (brokers should refuse those; not all
    do, and paho delivers them to ``on_message``)."""
    try:
        msg.topic  # noqa: B018 - decoding it is the check
    except UnicodeDecodeError as e:
        raise BadDataError(f"topic is not UTF-8 ({e.reason} at byte {e.start})") from e


def _describe_message(args: tuple[Any, ...]) -> str:
    """``a message of N bytes on TOPIC`` for an ``on_message`` call, else ``an event``."""
    msg = _message_of(args)
    if msg is None:
        return "an event"
    try:
        topic = msg.topic[:200]
    except UnicodeDecodeError:  # brokers should refuse such topics; not all do
        topic = "a topic that is not UTF-8"
    return f"a message of {len(msg.payload)} bytes on {topic}"


TLS_ENV = ("EDGEFLEET_TLS_CA", "EDGEFLEET_TLS_CERT", "EDGEFLEET_TLS_KEY")


def configure_service_tls(client: mqtt.Client, env: Mapping[str, str] | None = None) -> None:
    """TLS for a cloud service's client on an ``mqtts://`` broker, from the environment.

    ``EDGEFLEET_TLS_CA`` (default: the system's trust store), and for mutual TLS
    ``EDGEFLEET_TLS_CERT`` + ``EDGEFLEET_TLS_KEY`` (an identity from ``edgefleet ca identity``;
    the systemd units read them from their ``EnvironmentFile``).

    Raises:
        ValueError: a certificate without its key or the other way round.
    """
    env = os.environ if env is None else env
    ca, cert, key = (env.get(k) or None for k in TLS_ENV)
    if (cert is None) != (key is None):
        raise ValueError("EDGEFLEET_TLS_CERT and EDGEFLEET_TLS_KEY go together")
    client.tls_set(ca_certs=ca, certfile=cert, keyfile=key)


def service_client(client_id: str, broker_url: str, *, clean: bool = True) -> mqtt.Client:
    """``make_client`` plus TLS from the environment when ``broker_url`` is ``mqtts://``."""
    client = make_client(client_id, clean=clean)
    if parse_broker_url(broker_url)[2]:
        configure_service_tls(client)
    return client


def connect_service(client: mqtt.Client, broker_url: str, *, keepalive: int = 30) -> None:
    """Connect ``client`` (from ``service_client``) to ``broker_url`` and start its network
    thread; a one-shot operator command's connection.

    Raises:
        TransportError: the broker cannot be reached.
    """
    host, port, _tls = parse_broker_url(broker_url)
    try:
        client.connect(host, port, keepalive=keepalive)
    except OSError as e:
        raise TransportError(f"cannot reach broker {broker_url}: {e}") from e
    client.loop_start()
