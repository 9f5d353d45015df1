"""The ingest worker's database outage: real outages (another SQLite connection holds the
write lock, or PostgreSQL refuses connections), devices publishing telemetry at a rate, and
``outage_run``, the scenario ``tests/cloud_sync/ingest/test_ingest_backpressure.py`` runs for
seconds and
``scripts/ingest_outage.py`` for an hour."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol, cast

import paho.mqtt.client as mqtt
import sqlalchemy as sa
from paho.mqtt.enums import CallbackAPIVersion

from agent.protocol.schema import EXAMPLES
from agent.protocol.telemetry import Telemetry
from agent.protocol.topics import Topics
from cloud_sync.ingest.db import make_engine
from cloud_sync.ingest.schema import DEVICE_TELEMETRY
from cloud_sync.ingest.store import Store
from tests.harness.util import ROOT, free_port, terminate, wait_for

TOPICS = Topics()
TEL = cast(Telemetry, EXAMPLES["telemetry"])
T0 = datetime(2026, 3, 1, tzinfo=timezone.utc)
_ids = itertools.count()


def telemetry(device: str, i: int) -> tuple[str, bytes]:
    """The ``i``-th telemetry message of ``device`` (its ``ts`` is T0 + i ms: unique)."""
    msg = TEL.model_copy(update={"device_id": device, "ts": T0 + timedelta(milliseconds=i)})
    return TOPICS.device(device, "telemetry"), msg.encode()


def stored_keys(store_or_url: Store | str, prefix: str) -> list[tuple[str, datetime]]:
    """(device, ts) of every device_telemetry row of devices named ``prefix…``."""
    # a plain engine: open_store would migrate, a write transaction each time
    store = Store(make_engine(store_or_url)) if isinstance(store_or_url, str) else store_or_url
    try:
        q = sa.select(DEVICE_TELEMETRY.c.device_id, DEVICE_TELEMETRY.c.ts).where(
            DEVICE_TELEMETRY.c.device_id.like(f"{prefix}%")
        )
        with store.engine.connect() as conn:
            return [(r[0], r[1]) for r in conn.execute(q)]
    finally:
        if isinstance(store_or_url, str):
            store.close()


class Outage(Protocol):
    """A real database outage: ``begin`` makes every write fail, ``end`` lets them through."""

    url: str  # the database, as the worker is to open it

    def begin(self) -> None: ...

    def end(self) -> None: ...


class SqliteLock:
    """Another connection holds SQLite's write lock; the worker's busy timeout is 0.2 s."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.url = f"sqlite:///{path}?timeout=0.2"
        self._conn: sqlite3.Connection | None = None

    def begin(self) -> None:
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self._conn.execute("BEGIN EXCLUSIVE")

    def end(self) -> None:
        if self._conn is not None:
            self._conn.execute("ROLLBACK")
            self._conn.close()
            self._conn = None


class PostgresRefuses:
    """PostgreSQL refuses new connections to the database and ends the open ones."""

    def __init__(self, url: str) -> None:
        self.url = url
        u = sa.engine.make_url(url)
        self.db = u.database
        self._admin = sa.create_engine(u.set(database="postgres"), isolation_level="AUTOCOMMIT",
                                       poolclass=sa.pool.NullPool)  # fmt: skip

    def _run(self, *sql: str) -> None:
        with self._admin.connect() as c:
            for q in sql:
                c.execute(sa.text(q))

    def begin(self) -> None:
        self._run(f"ALTER DATABASE {self.db} ALLOW_CONNECTIONS false",
                  "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                  f" WHERE datname = '{self.db}' AND pid <> pg_backend_pid()")  # fmt: skip

    def end(self) -> None:
        self._run(f"ALTER DATABASE {self.db} ALLOW_CONNECTIONS true")


class Devices:
    """Devices publishing telemetry QoS 1 at ``rate_hz`` in all, round robin, from a thread.

    ``sent`` counts the messages the broker acknowledged to them: those must all be stored.
    """

    def __init__(self, broker_url: str, prefix: str, devices: int, rate_hz: float) -> None:
        host, port = broker_url.rsplit("/", 1)[1].rsplit(":", 1)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{prefix}-pub")
        self.client.max_inflight_messages_set(100)
        self.client.connect(host, int(port))
        self.client.loop_start()
        self.prefix, self.devices, self.rate_hz = prefix, devices, rate_hz
        self.infos: list[tuple[str, datetime, mqtt.MQTTMessageInfo]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        period, t0 = 1.0 / self.rate_hz, time.monotonic()
        for n in itertools.count():
            if self._stop.is_set():
                return
            dev = f"{self.prefix}-{n % self.devices:04d}"
            topic, payload = telemetry(dev, n)
            info = self.client.publish(topic, payload, qos=1)
            self.infos.append((dev, T0 + timedelta(milliseconds=n), info))
            delay = t0 + (n + 1) * period - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for _, _, info in self.infos[-200:]:
            if not info.is_published():
                info.wait_for_publish(10)
        self.client.loop_stop()
        self.client.disconnect()

    def sent(self) -> set[tuple[str, datetime]]:
        return {(d, ts) for d, ts, info in self.infos if info.is_published()}


def ingest_process(broker_url: str, db_url: str, metrics_port: int, max_unacked: int,
                   log: Path) -> subprocess.Popen[bytes]:  # fmt: skip
    """``edgefleet ingest`` as production runs it, in a child process."""
    cmd = [sys.executable, "-m", "cloud_sync.cli", "ingest", "--broker", broker_url,
           "--db", db_url, "--worker", "outage", "--metrics-port", str(metrics_port),
           "--max-unacked", str(max_unacked)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def scrape(port: int) -> dict[str, float]:
    """The unlabelled metrics of a worker, or {} while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name and not line.startswith("#") and "{" not in name:
            out[name] = float(value)
    return out


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Sampler:
    """Every ``every_s``: the worker's RSS and unacknowledged messages, kept per phase."""

    def __init__(self, port: int, every_s: float) -> None:
        self.port, self.every_s = port, every_s
        self.pid = 0
        self.phase = "start"
        self.peaks: dict[str, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            m = scrape(self.port)
            peak = self.peaks.setdefault(self.phase, {"rss_mb": 0.0, "unacked": 0.0})
            peak["rss_mb"] = max(peak["rss_mb"], rss_mb(self.pid) if self.pid else 0.0)
            peak["unacked"] = max(peak["unacked"], m.get("edgefleet_ingest_unacked_messages", 0))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def outage_run(
    broker_url: str,
    outage: Outage,
    workdir: Path,
    *,
    devices: int = 20,
    rate_hz: float = 200.0,
    before_s: float = 1.0,
    outage_s: float = 4.0,
    after_s: float = 1.0,
    max_unacked: int = 100,
    kill: bool = True,
    drain_s: float = 60.0,
    say: Callable[[str], None] = lambda _line: None,
) -> dict[str, Any]:
    """Devices publish while ``edgefleet ingest`` writes; the database is out for
    ``outage_s``; with ``kill`` the worker is SIGKILLed halfway through the outage and started
    again once the database is back. Returns what was sent, stored, and the worker's peaks.
    """
    prefix = f"out{os.getpid()}x{next(_ids)}"
    port = free_port()
    log = workdir / "ingest.log"
    proc = ingest_process(broker_url, outage.url, port, max_unacked, log)
    sampler = Sampler(port, every_s=min(1.0, max(0.2, outage_s / 50)))
    sampler.pid = proc.pid
    pub = Devices(broker_url, prefix, devices, rate_hz)
    result: dict[str, Any] = {"devices": devices, "rate_hz": rate_hz, "outage_s": outage_s,
                              "max_unacked": max_unacked, "killed": kill}  # fmt: skip
    try:
        if not wait_for(lambda: "edgefleet_ingest_store_up" in scrape(port), 60, 0.2):
            raise RuntimeError(f"edgefleet ingest did not start:\n{log.read_text()[-2000:]}")
        time.sleep(1.0)  # subscribed (a persistent session from then on)
        pub.start()
        sampler.phase = "before"
        time.sleep(before_s)
        say(f"outage: database out for {outage_s:g} s")
        outage.begin()
        sampler.phase = "outage"
        t_end = time.monotonic() + outage_s
        if kill:
            time.sleep(outage_s / 2)
            result["unacked_when_killed"] = scrape(port).get("edgefleet_ingest_unacked_messages")
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            say(f"outage: worker SIGKILLed holding {result['unacked_when_killed']} unacked")
        time.sleep(max(0.0, t_end - time.monotonic()))
        outage.end()
        sampler.phase = "after"
        if kill:
            proc = ingest_process(broker_url, outage.url, port, max_unacked, log)
            sampler.pid = proc.pid
        t_back = time.monotonic()
        time.sleep(after_s)
        pub.stop()
        sent = pub.sent()
        say(f"outage: {len(pub.infos)} published, {len(sent)} acknowledged by the broker")
        caught_up = wait_for(lambda: set(stored_keys(outage.url, prefix)) >= sent, drain_s, 0.5)
        result["drain_s"] = round(time.monotonic() - t_back, 1)
        time.sleep(0.5)
        rows = stored_keys(outage.url, prefix)
        result.update({
            "published": len(pub.infos), "acknowledged_by_broker": len(sent),
            "stored": len(set(rows)), "stored_rows": len(rows),
            "missing": len(sent - set(rows)), "caught_up": caught_up,
            "peaks": sampler.peaks, "worker_metrics_end": scrape(port),
        })  # fmt: skip
        return result
    finally:
        sampler.stop()
        if pub._thread.is_alive():
            pub.stop()
        if proc.poll() is None:
            terminate(proc, 30)
        outage.end()
