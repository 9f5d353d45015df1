"""Adapter: the two paho-mqtt helpers every MQTT user in edgefleet shares.

``parse_broker_url`` turns ``mqtt://host:port`` / ``mqtts://host:port`` into connect arguments;
``make_client`` builds a paho 2.x client with the callback API version 2 (version 1 is
deprecated and warns), MQTT 3.1.1 (works on every broker, AWS IoT included) and a bounded
exponential reconnect delay. Sessions, subscriptions and TLS material stay with the caller.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
RECONNECT_MIN_DELAY_S = 0.5
RECONNECT_MAX_DELAY_S = 30


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
    return client


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
