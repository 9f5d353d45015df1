"""Adapter: an MQTT broker on loopback for the demo and for tests — Mosquitto when it is
installed, else amqtt running in-process.

Production fleets run a real broker (Mosquitto, EMQX, a cloud IoT hub); this module exists so
``edgefleet demo`` runs on a fresh machine with nothing installed. amqtt speaks MQTT 3.1.1
but has no shared subscriptions (``$share/…``), so ``shared_subscriptions`` tells the cloud
workers to subscribe to plain topics (one worker of each kind) when it is the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

MOSQUITTO_CONF = (
    "listener {port} {host}\n"
    "allow_anonymous true\n"
    "persistence false\n"
    # The default max_queued_messages (1000) silently drops QoS 1 messages for a subscriber
    # that falls behind (an ingest worker catching up after an outage).
    "max_queued_messages 100000\n"
    "max_inflight_messages 100\n"
    # Without it the last segment of every burst of chunk answers waits for the client's
    # delayed ACK (~40 ms per window): 10x slower model transfers.
    "set_tcp_nodelay true\n"
    "log_dest stderr\n"
    "log_type error\n"
)


class BrokerError(RuntimeError):
    """The local broker could not start."""


class LocalBroker(Protocol):
    host: str
    port: int
    kind: str
    shared_subscriptions: bool

    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(host: str, port: int, timeout_s: float, alive: Any = None) -> None:
    """Return once ``host:port`` accepts connections; ``alive()`` false aborts early."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if alive is not None and not alive():
                raise BrokerError(f"the broker exited before listening on {port}") from None
            time.sleep(0.05)
    raise BrokerError(f"the broker did not listen on {host}:{port} within {timeout_s:.0f} s")


def mosquitto_path() -> str | None:
    """The mosquitto binary (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    exe = shutil.which("mosquitto")
    if exe:
        return exe
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


class MosquittoBroker:
    """A Mosquitto child process on a loopback port; ``stop``/``start`` keep the port."""

    kind = "mosquitto"
    shared_subscriptions = True

    def __init__(self, workdir: Path, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.workdir = workdir
        self.host = host
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(MOSQUITTO_CONF.format(port=self.port, host=self.host))

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        exe = mosquitto_path()
        if exe is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto)")
        self.proc = subprocess.Popen([exe, "-c", str(self.conf)], stdin=subprocess.DEVNULL)
        proc = self.proc
        wait_listening(self.host, self.port, 10, alive=lambda: proc.poll() is None)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class AmqttBroker:
    """amqtt's broker on its own asyncio loop in a daemon thread."""

    kind = "amqtt (in-process)"
    shared_subscriptions = False

    def __init__(self, port: int | None = None, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def _config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}
            },
        }

    def start(self) -> None:
        try:
            from amqtt.broker import Broker
        except ImportError as e:
            raise BrokerError(
                "no MQTT broker: install Mosquitto (apt-get install mosquitto) or amqtt "
                "(pip install 'edgefleet[demo]')"
            ) from e
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="amqtt", daemon=True)
        self._thread.start()

        async def _start() -> Any:
            broker = Broker(self._config(), loop=loop)
            await broker.start()
            return broker

        fut: Future[Any] = asyncio.run_coroutine_threadsafe(_start(), loop)
        try:
            self._broker = fut.result(15)
        except Exception as e:
            self.stop()
            raise BrokerError(f"amqtt did not start on {self.host}:{self.port}: {e}") from e
        # (no connect probe: start() returns once it listens, and amqtt logs empty connections)

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._broker is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), loop).result(10)
            self._broker = None
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        if not loop.is_running():
            loop.close()


@contextlib.contextmanager
def local_broker(prefer: str = "auto") -> Iterator[LocalBroker]:
    """Start a broker for the demo: ``prefer`` is "auto" (Mosquitto when installed), "mosquitto"
    or "amqtt"; stops it on exit."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-broker-") as tmp:
        use_mosquitto = prefer == "mosquitto" or (prefer == "auto" and mosquitto_path())
        broker: LocalBroker = MosquittoBroker(Path(tmp)) if use_mosquitto else AmqttBroker()
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()
