"""Benchmark: telemetry end to end on this machine (agent → outbox → Mosquitto → ingest → SQLite).

Starts its own Mosquitto on a free loopback port and real components, all in a temporary
folder, and measures three things against the issue's goals:

1. ``outage``: two real ``Agent`` objects in this process (session, outbox, outbox sender,
   telemetry reporter, one pipeline decoding a looping 160x160 MJPEG video at ``--fps`` with
   the digits sample model, events off so the outbox holds telemetry only) report every
   ``--interval-s`` to an ``IngestWorker`` writing SQLite. The broker is stopped for
   ``--outage-s`` (default 300 s) and restarted on the same port. One agent has the default
   outbox bound, the other ``--small-rows``. Goal: every message produced within the bound is
   stored, in order, once; the bounded agent drops the oldest and counts them. The agents
   reach the broker through a loopback relay that is reopened only once the worker has
   resubscribed after the restart: Mosquitto does not keep a shared subscription across a
   restart (seen with 2.0.11 even with ``persistence true``), so a device that reconnects
   first would have its backlog acknowledged and discarded by the broker. That is the
   broker's behaviour, not the outbox's; the time the worker needed is reported.
2. ``rate``: ``--messages`` real ``Telemetry`` messages (distinct device/ts) published QoS 1 by
   one paho client in this process; baseline: one paho subscriber on the same shared
   subscription counting them; then the same publisher into an ``IngestWorker`` + SQLite. Each
   subscriber side runs in its own child process (as ``edgefleet ingest`` does in production,
   so it does not share the publisher's GIL). Both rates are from this process's first publish
   to the child's last message received / last batch committed (``time.monotonic``, one clock
   for all processes on Linux); ``--reps`` alternating pairs, median ratio (goal ≥ 0.60) and
   zero loss.
3. ``cpu``: the agent (one pipeline as above) in a subprocess with telemetry on vs off
   (``--interval-s`` 1), ``--seconds`` of steady state each, alternately ``--cpu-reps`` times;
   whole-process CPU from ``time.process_time`` in the child. Cost = (on − off) / wall as % of
   one core (goal ≤ 1 %). Also the direct figure: thread CPU time inside the reporter's tick
   (collect + validate + encode + outbox put) per interval.

Without ``--json`` prints one line per measure with PASS/FAIL; with ``--json`` prints one JSON
document on stdout and the lines on stderr.

    python -m scripts.bench_telemetry [all|outage|rate|cpu] [--outage-s 300] [--messages 20000]
        [--reps 3] [--seconds 60] [--cpu-reps 2] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import platform
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

import agent.telemetry.reporter as reporter_mod
from agent.common.mqtt import make_client
from agent.config import parse_config
from agent.protocol.telemetry import Telemetry
from agent.protocol.topics import Topics
from agent.service import Agent
from cloud_sync.ingest.flow import Received
from cloud_sync.ingest.schema import DEVICE_TELEMETRY, TELEMETRY
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.ingest.worker import SHARE_GROUP, IngestWorker, freeze_startup_heap
from tests.harness.broker import Mosquitto
from tests.harness.util import ROOT, stable_port, wait_for

GOAL_OUTAGE_S = 300.0
GOAL_RATIO = 0.60
GOAL_CPU_PCT = 1.0
PIPELINE = "front"
TOPICS = Topics()
log = logging.getLogger("bench_telemetry")


# ------------------------------------------------------------------------------ helpers


class Relay:
    """The devices' link: a loopback TCP relay to the broker that can be cut and restored.

    While closed, its port refuses connections (as a broker that is down) and every relayed
    connection is closed.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.port = stable_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def open(self) -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", self.port))
        ls.listen(16)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()

    def close(self) -> None:
        ls, self._listener = self._listener, None
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                down, _ = ls.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=2)
            except OSError:
                down.close()
                continue
            for s in (down, up):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns += [down, up]
            threading.Thread(target=self._pump, args=(down, up), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select():
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            sel.close()
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def connect_client(port: int, client_id: str, inflight: int = 20) -> Any:
    c = make_client(client_id)
    c.max_inflight_messages_set(inflight)  # paho refuses this once connected
    c.connect("127.0.0.1", port)
    c.loop_start()
    if not wait_for(c.is_connected, 10, 0.005):
        raise RuntimeError(f"{client_id} did not connect")
    return c


def close_client(c: Any) -> None:
    c.disconnect()
    c.loop_stop()


def suback_event(client: Any) -> threading.Event:
    """An event set on every SUBACK the client receives (paho v2 ``on_subscribe``)."""
    ev = threading.Event()
    client.on_subscribe = lambda *_a: ev.set()
    return ev


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ------------------------------------------------------------------------------ assets


def make_assets(tmp: Path, model: str | None, fps: float) -> tuple[Path, Path]:
    """(video, model.onnx): a looping 160x160 MJPEG video and the digits sample model."""
    from agent.pipeline.synthetic import write_synthetic_video

    video = write_synthetic_video(tmp / "loop.avi", frames=20, size=(160, 160), fps=fps)
    if model:
        return video, Path(model)
    from cloud_sync.samples import build_model

    return video, build_model("digits", tmp / "models") / "model.onnx"


def agent_config(
    device_id: str,
    data_dir: Path,
    url: str,
    video: Path,
    model: Path,
    interval_s: float,
    **tel: Any,
) -> Any:
    return parse_config(
        {
            "device_id": device_id,
            "data_dir": str(data_dir),
            "profile": "x86-cpu",
            "pipelines": [
                {
                    "name": PIPELINE,
                    "source": str(video),
                    "model": str(model),
                    "loop": True,
                    # telemetry only: events would share the outbox and its bound
                    "events": {"policy": "off"},
                }
            ],
            "broker": {"url": url},
            "telemetry": {"interval_s": interval_s, **tel},
        }
    )


class RecordingReporter(reporter_mod.TelemetryReporter):
    """The real reporter, remembering the ``ts`` of every message it built (for the audit)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.built: list[datetime] = []

    def build(self) -> Telemetry:
        msg = super().build()
        self.built.append(msg.ts)
        return msg


class TimedReporter(reporter_mod.TelemetryReporter):
    """The real reporter, summing the thread CPU time of each tick (collect, encode, put)."""

    enabled = True

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.tick_cpu_s = 0.0
        self.tick_wall_s = 0.0
        self.ticks = 0

    def tick(self) -> None:
        c, w = time.thread_time(), time.perf_counter()
        super().tick()
        self.tick_cpu_s += time.thread_time() - c
        self.tick_wall_s += time.perf_counter() - w
        self.ticks += 1

    def start(self) -> None:
        if self.enabled:
            super().start()


@contextlib.contextmanager
def reporter_class(cls: type[reporter_mod.TelemetryReporter]) -> Any:
    """Make ``Agent._start_cloud`` (which imports the class at call time) use ``cls``."""
    orig = reporter_mod.TelemetryReporter
    reporter_mod.TelemetryReporter = cls  # type: ignore[misc]
    try:
        yield
    finally:
        reporter_mod.TelemetryReporter = orig  # type: ignore[misc]


class TallyWorker(IngestWorker):
    """The real ingest worker, tallying the telemetry ``ts`` it receives per device."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.received: dict[str, list[str]] = {}
        self.suback = suback_event(self.client)

    def _on_message(self, client: Any, u: Any, msg: Any) -> None:
        parsed = self.topics.parse(msg.topic)
        if parsed and parsed[1] == "telemetry":
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.received.setdefault(parsed[0], []).append(json.loads(msg.payload)["ts"])
        super()._on_message(client, u, msg)


def stored_ts(store: Store, device_id: str) -> tuple[list[datetime], list[datetime]]:
    """(telemetry ts of the pipeline, device_telemetry ts), each in row-id order."""
    with store.engine.connect() as conn:
        t = TELEMETRY
        pipe = conn.execute(
            sa.select(t.c.ts)
            .where(t.c.device_id == device_id, t.c.pipeline == PIPELINE)
            .order_by(t.c.id)
        ).scalars()
        d = DEVICE_TELEMETRY
        dev = conn.execute(
            sa.select(d.c.ts).where(d.c.device_id == device_id).order_by(d.c.id)
        ).scalars()
        return list(pipe), list(dev)


# ------------------------------------------------------------------------------ 1. outage


def audit(name: str, agent: Agent, store: Store, worker: TallyWorker, bound: int) -> dict[str, Any]:
    """Compare what the agent produced with what the worker received and the store holds."""
    rep: RecordingReporter = agent.telemetry
    dev = agent.cfg.device_id
    produced = list(rep.built)
    stats = agent.outbox.stats()
    pipe, devrows = stored_ts(store, dev)
    got = set(pipe)
    missing_idx = [i for i, ts in enumerate(produced) if ts not in got]
    contiguous = not missing_idx or missing_idx == list(
        range(missing_idx[0], missing_idx[0] + len(missing_idx))
    )
    received = worker.received.get(dev, [])
    order_violations = sum(1 for a, b in itertools.pairwise(pipe) if b <= a)
    order_violations += sum(1 for a, b in itertools.pairwise(devrows) if b <= a)
    return {
        "device_id": dev,
        "outbox_max_rows": bound,
        "produced": len(produced),
        "queued_ok": rep.sent,
        "dropped_counted": stats["dropped"],
        "expected": len(produced) - stats["dropped"],
        "stored_rows": len(pipe),
        "stored_device_rows": len(devrows),
        "stored_distinct_ts": len(got),
        "duplicates_stored": len(pipe) - len(got),
        "missing": len(missing_idx),
        "missing_are_one_oldest_block": contiguous,
        "unknown_stored": len(got - set(produced)),
        "order_violations": order_violations,
        "worker_received": len(received),
        "worker_received_distinct": len(set(received)),
        "redelivered_absorbed": len(received) - len(set(received)),
        "outbox_depth_end": stats["depth"],
    }


def outage_ok(r: dict[str, Any], bounded: bool) -> bool:
    ok = (
        r["produced"] == r["queued_ok"]
        and r["missing"] == r["dropped_counted"]
        and r["stored_rows"] == r["expected"] == r["stored_device_rows"]
        and r["duplicates_stored"] == 0
        and r["unknown_stored"] == 0
        and r["order_violations"] == 0
        and r["missing_are_one_oldest_block"]
        and r["worker_received_distinct"] >= r["stored_rows"]
    )
    return bool(ok and (r["dropped_counted"] > 0 if bounded else r["dropped_counted"] == 0))


def bench_outage(args: argparse.Namespace, tmp: Path, video: Path, model: Path) -> dict[str, Any]:
    broker = Mosquitto(tmp, stable_port())
    broker.start()
    relay = Relay(broker.port)
    relay.open()
    store = open_store(f"sqlite:///{tmp / 'outage.db'}")
    worker = TallyWorker(broker.url, store, client_id="bench-ingest-outage")
    agents: list[Agent] = []
    try:
        worker.start()
        if not worker.suback.wait(10):
            raise RuntimeError("ingest worker did not subscribe")
        variants = {"full": {}, "bounded": {"outbox_max_rows": args.small_rows}}
        with reporter_class(RecordingReporter):
            for name, tel in variants.items():
                cfg = agent_config(
                    f"outage-{name}", tmp / f"data-{name}", relay.url, video, model,
                    args.interval_s, **tel,
                )  # fmt: skip
                agents.append(Agent(cfg))
                agents[-1].start()
        for a in agents:
            if not a.session.connected.wait(20):
                raise RuntimeError(f"{a.cfg.device_id} did not connect")

        def n_stored(a: Agent) -> int:
            return len(stored_ts(store, a.cfg.device_id)[0])

        if not wait_for(lambda: all(n_stored(a) >= 3 for a in agents), 30, 0.1):
            raise RuntimeError("telemetry did not reach the store before the outage")
        before = {a.cfg.device_id: len(a.telemetry.built) for a in agents}

        say(f"outage: broker down for {args.outage_s:g} s…")
        worker.suback.clear()
        relay.close()
        broker.stop()
        t_down = time.monotonic()
        time.sleep(args.outage_s)
        depth_at_end = {a.cfg.device_id: a.outbox.depth() for a in agents}
        broker.start()
        t_broker = time.monotonic()
        if not worker.suback.wait(60):
            raise RuntimeError("ingest worker did not resubscribe after the restart")
        t_worker = time.monotonic()
        relay.open()  # the devices' link is back
        t_up = time.monotonic()
        full = agents[0]
        backlog = set(full.telemetry.built)
        wait_for(full.session.connected.is_set, 120, 0.01)
        t_conn = time.monotonic()
        drained = wait_for(lambda: backlog <= set(stored_ts(store, "outage-full")[0]), 120, 0.05)
        t_drained = time.monotonic()

        # stop producing, let everything queued arrive, then audit
        for a in agents:
            a.telemetry.stop()
        wait_for(lambda: all(a.outbox.depth() == 0 for a in agents), 60, 0.05)
        wait_for(
            lambda: all(
                n_stored(a) >= len(a.telemetry.built) - a.outbox.stats()["dropped"] for a in agents
            ),
            30,
            0.05,
        )
        time.sleep(0.5)  # a late redelivery would show up in the tally
        results: dict[str, Any] = {}
        for (name, tel), a in zip(variants.items(), agents, strict=True):
            r = audit(name, a, store, worker, tel.get("outbox_max_rows", 100_000))
            r["produced_before_outage"] = before[a.cfg.device_id]
            r["outbox_depth_at_outage_end"] = depth_at_end[a.cfg.device_id]
            r["pass"] = outage_ok(r, bounded=name == "bounded")
            results[name] = r
        results["timing"] = {
            "outage_s": round(t_broker - t_down, 1),
            "broker_restart_to_worker_resubscribed_s": round(t_worker - t_broker, 2),
            "link_up_to_agent_reconnected_s": round(t_conn - t_up, 2),
            "agent_reconnected_to_backlog_stored_s": round(t_drained - t_conn, 2),
            "link_up_to_backlog_stored_s": round(t_drained - t_up, 2),
            "backlog_messages": depth_at_end["outage-full"],
            "drained": drained,
        }
        results["goal"] = "all messages within the bound stored, in order, once"
        results["pass"] = results["full"]["pass"] and results["bounded"]["pass"] and drained
        return results
    finally:
        for a in agents:
            with contextlib.suppress(Exception):
                a.stop()
        relay.close()
        worker.stop()
        store.close()
        broker.stop()


# ------------------------------------------------------------------------------ 2. ingest rate


def make_messages(n: int, tag: str) -> list[tuple[str, bytes]]:
    """``n`` real Telemetry messages, 100 devices, distinct (device, ts)."""
    base = Telemetry.model_validate(
        {
            "device_id": "x",
            "ts": "2026-01-01T00:00:00Z",
            "interval_s": 1.0,
            "pipelines": [
                {
                    "name": PIPELINE, "model": "digits", "version": "1.0.0",
                    "backend": "onnxruntime", "precision": "fp32", "source_state": "streaming",
                    "fps_in": 30.0, "fps_out": 29.9, "frames_read": 123456,
                    "frames_inferred": 123400, "frames_dropped": 56, "reconnects": 0,
                    "errors": 0,
                    "latency_ms": {
                        s: {"p50": 1.25, "p95": 2.5, "p99": 3.75}
                        for s in ("capture_wait", "preprocess", "infer", "postprocess", "sink",
                                  "overhead", "age")
                    },
                }
            ],
            "device": {
                "cpu_percent": 37.5, "load1": 1.2, "mem_used_mb": 812.0,
                "mem_total_mb": 3956.0, "disk_used_pct": 41.0,
                "temperatures_c": {"CPU-therm": 48.5, "GPU-therm": 46.0},
                "gpu_load_pct": 63.0, "power_mw": {"VDD_IN": 5120.0},
            },
            "outbox": {"depth": 0, "bytes": 0, "dropped": 0},
        }
    )  # fmt: skip
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        dev = f"rate-{tag}-{i % 100:03d}"
        msg = base.model_copy(update={"device_id": dev, "ts": t0 + timedelta(seconds=i // 100)})
        out.append((TOPICS.device(dev, "telemetry"), msg.encode()))
    return out


def publish_all(port: int, msgs: list[tuple[str, bytes]], client_id: str) -> tuple[Any, float]:
    """The one publisher both paths use: all messages QoS 1 as fast as paho takes them.

    Returns the client (still connected: the caller closes it once the subscriber side is
    done, so its in-flight QoS 1 messages are acknowledged) and ``time.monotonic()`` at the
    first publish (system-wide on Linux, so the child's timestamps compare with it).
    """
    pub = connect_client(port, client_id, inflight=100)
    t0 = time.monotonic()
    for topic, payload in msgs:
        pub.publish(topic, payload, qos=1)
    return pub, t0


def raw_side(port: int, n: int, tag: str, ready: Callable[[], None]) -> dict[str, Any]:
    """Rate child, baseline: one paho subscriber on the shared subscription counting messages."""
    got = [0]
    first = [0.0]
    last = [0.0]
    done = threading.Event()
    sub = connect_client(port, f"bench-raw-sub-{tag}")
    subscribed = suback_event(sub)

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        got[0] += 1
        now = time.monotonic()
        if got[0] == 1:
            first[0] = now
        last[0] = now
        if got[0] >= n:
            done.set()

    sub.on_message = on_message
    sub.subscribe(TOPICS.shared(SHARE_GROUP, "telemetry"), qos=1)
    if not subscribed.wait(10):
        raise RuntimeError("raw subscriber got no SUBACK")
    ready()
    done.wait(300)
    time.sleep(0.2)  # count anything beyond n (duplicates)
    close_client(sub)
    return {"received": got[0], "first": first[0], "last": last[0]}


class TimingWorker(IngestWorker):
    """The real ingest worker, noting when each batch has been committed."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.written = 0
        self.last_commit = 0.0
        self.all_done = threading.Event()
        self.target = 0
        self.suback = suback_event(self.client)

    def _write(self, batch: list[Received]) -> None:
        super()._write(batch)
        self.last_commit = time.monotonic()
        self.written += len(batch)
        if self.written >= self.target:
            self.all_done.set()


def ingest_side(port: int, n: int, tag: str, db: Path, ready: Callable[[], None]) -> dict[str, Any]:
    """Rate child, ingest: the real ``IngestWorker`` writing SQLite, as ``edgefleet ingest``."""
    store = open_store(f"sqlite:///{db}")
    worker = TimingWorker(f"mqtt://127.0.0.1:{port}", store, client_id=f"bench-ingest-{tag}")
    worker.target = n
    try:
        freeze_startup_heap()  # as `edgefleet ingest` does at start-up
        worker.start()
        if not worker.suback.wait(10):
            raise RuntimeError("ingest worker got no SUBACK")
        ready()
        worker.all_done.wait(300)
        last = worker.last_commit
        time.sleep(0.3)  # anything beyond n (redeliveries) is written, and must not double
        counts = store.counts()
        return {
            "received": worker.counts["telemetry"],
            "stored": counts["telemetry"],
            "stored_device_rows": counts["device_telemetry"],
            "dead_letters": counts.get("dead_letters", 0),
            "last": last,
        }
    finally:
        worker.stop()
        store.close()


def rate_child(args: argparse.Namespace) -> None:
    """The subscriber side of one rate run, in its own process as ``edgefleet ingest`` is.

    Prints ``ready`` once subscribed, then one JSON line with the counts and ``last`` (the
    ``time.monotonic()`` of the last message received / the last batch committed).
    """
    logging.basicConfig(level=logging.ERROR)
    port = int(args.broker_url.rsplit(":", 1)[1])

    def ready() -> None:
        print("ready", flush=True)

    if args.side == "raw":
        out = raw_side(port, args.messages, args.tag, ready)
    else:
        out = ingest_side(port, args.messages, args.tag, Path(args.data), ready)
    print(json.dumps(out), flush=True)


def run_side(
    side: str, broker: Mosquitto, msgs: list[tuple[str, bytes]], tag: str, db: Path
) -> dict[str, Any]:
    """One rate run: the ``side`` child subscribes, this process publishes ``msgs``.

    Timed from this process's first publish to the child's last receive / commit.
    """
    n = len(msgs)
    cmd = [
        sys.executable, "-m", "scripts.bench_telemetry", "rate-child", "--side", side,
        "--broker-url", broker.url, "--messages", str(n), "--tag", tag, "--data", str(db),
    ]  # fmt: skip
    errf = db.with_suffix(f".{side}.stderr")
    with errf.open("w+") as err:
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT)
        try:
            line = child.stdout.readline() if child.stdout is not None else ""
            if line.strip() != "ready":
                child.wait(30)
                err.seek(0)
                raise RuntimeError(f"rate child ({side}) did not start:\n{err.read()[-2000:]}")
            pub, t0 = publish_all(broker.port, msgs, f"bench-{side}-pub-{tag}")
            try:
                out_s, _ = child.communicate(timeout=600)
            finally:
                close_client(pub)
            if child.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"rate child ({side}) failed:\n{err.read()[-2000:]}")
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    r: dict[str, Any] = json.loads(out_s.strip().splitlines()[-1])
    span = r.pop("last") - t0
    done = r["received"] if side == "raw" else r["stored"]
    r = {"sent": n, **r, "seconds": round(span, 3)}
    r["msg_per_s"] = round(done / span, 1) if span > 0 else 0.0
    if side == "raw":
        first = r.pop("first")
        r["first_to_last_msg_per_s"] = (
            round((r["received"] - 1) / (t0 + span - first), 1) if t0 + span > first else 0.0
        )
    return r


def bench_rate(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    pairs: list[dict[str, Any]] = []
    for rep in range(args.reps):
        # A fresh broker per rep: the ingest worker's session is persistent, and an offline
        # persistent member of the shared subscription would take its share of the next rep's
        # messages, so that rep's subscriber never saw them all (it waited out its timeouts).
        (tmp / f"broker-{rep}").mkdir(exist_ok=True)
        broker = Mosquitto(tmp / f"broker-{rep}", stable_port())
        broker.start()
        try:
            msgs = make_messages(args.messages, f"r{rep}")
            load = os.getloadavg()[0]
            raw = run_side("raw", broker, msgs, f"r{rep}", tmp / f"rate-{rep}.db")
            ing = run_side("ingest", broker, msgs, f"r{rep}", tmp / f"rate-{rep}.db")
            ratio = ing["msg_per_s"] / raw["msg_per_s"] if raw["msg_per_s"] else 0.0
            pairs.append({"raw": raw, "ingest": ing, "ratio": round(ratio, 3), "load1": load})
            say(
                f"rate rep {rep + 1}: raw {raw['msg_per_s']:.0f} msg/s, "
                f"ingest {ing['msg_per_s']:.0f} msg/s, ratio {ratio:.2f} (load1 {load:.2f})"
            )
        finally:
            broker.stop()
    no_loss = all(
        p["raw"]["received"] == p["raw"]["sent"]
        and p["ingest"]["stored"] == p["ingest"]["sent"] == p["ingest"]["stored_device_rows"]
        for p in pairs
    )
    med = median([p["ratio"] for p in pairs])
    return {
        "messages": args.messages,
        "payload_bytes": len(make_messages(1, "x")[0][1]),
        "subscriber": "child process (raw paho / IngestWorker + SQLite), publisher here",
        "runs": pairs,
        "raw_msg_per_s_median": median([p["raw"]["msg_per_s"] for p in pairs]),
        "ingest_msg_per_s_median": median([p["ingest"]["msg_per_s"] for p in pairs]),
        "ratio_median": round(med, 3),
        "no_loss": no_loss,
        "goal_ratio": GOAL_RATIO,
        "pass_ratio": med >= GOAL_RATIO,
        "pass": no_loss and med >= GOAL_RATIO,
    }


# ------------------------------------------------------------------------------ 3. CPU


def cpu_child(args: argparse.Namespace) -> None:
    """Run one agent with telemetry on or off; print its steady-state CPU as JSON."""
    logging.basicConfig(level=logging.ERROR)
    TimedReporter.enabled = args.mode == "on"
    cfg = agent_config(
        f"cpu-{args.mode}", Path(args.data), args.broker_url, Path(args.video),
        Path(args.model), args.interval_s,
    )  # fmt: skip
    with reporter_class(TimedReporter):
        agent = Agent(cfg)
        agent.start()
    try:
        if not wait_for(agent.session.connected.is_set, 20, 0.02):
            raise RuntimeError("agent did not connect")
        time.sleep(args.warmup_s)  # model load, precision check, first frames
        rep: TimedReporter = agent.telemetry
        c0, w0, k0, t0 = time.process_time(), time.perf_counter(), rep.tick_cpu_s, rep.ticks
        f0 = agent.pipelines[0].status(time.monotonic()).get("frames_inferred", 0)
        time.sleep(args.seconds)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        status = agent.pipelines[0].status(time.monotonic())
        out = {
            "mode": args.mode,
            "cpu_s": cpu,
            "wall_s": wall,
            "ticks": rep.ticks - t0,
            "tick_cpu_s": rep.tick_cpu_s - k0,
            "frames_inferred": int(status.get("frames_inferred", 0)) - int(f0),
            "outbox_depth": agent.outbox.depth(),
        }
    finally:
        agent.stop()
    print(json.dumps(out), flush=True)


def bench_cpu(args: argparse.Namespace, tmp: Path, video: Path, model: Path) -> dict[str, Any]:
    broker = Mosquitto(tmp, stable_port())
    broker.start()
    runs: list[dict[str, Any]] = []
    try:
        for rep in range(args.cpu_reps):
            order = ("off", "on") if rep % 2 == 0 else ("on", "off")
            for mode in order:
                data = tmp / f"cpu-{mode}-{rep}"
                cmd = [
                    sys.executable, "-m", "scripts.bench_telemetry", "cpu-child", "--mode", mode,
                    "--broker-url", broker.url, "--video", str(video), "--model", str(model),
                    "--data", str(data), "--seconds", str(args.seconds),
                    "--interval-s", str(args.interval_s), "--warmup-s", str(args.warmup_s),
                ]  # fmt: skip
                env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "cache")}
                p = subprocess.run(
                    cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT
                )
                if p.returncode != 0:
                    raise RuntimeError(f"cpu child ({mode}) failed:\n{p.stderr[-2000:]}")
                r = json.loads(p.stdout.strip().splitlines()[-1])
                r["rep"] = rep
                runs.append(r)
                say(
                    f"cpu rep {rep + 1} {mode}: {r['cpu_s']:.3f} s CPU over {r['wall_s']:.1f} s "
                    f"({100 * r['cpu_s'] / r['wall_s']:.2f} % of a core), {r['ticks']} ticks"
                )
                shutil.rmtree(data, ignore_errors=True)
    finally:
        broker.stop()
    costs = []
    for rep in range(args.cpu_reps):
        on = next(r for r in runs if r["rep"] == rep and r["mode"] == "on")
        off = next(r for r in runs if r["rep"] == rep and r["mode"] == "off")
        wall = (on["wall_s"] + off["wall_s"]) / 2
        costs.append(100 * (on["cpu_s"] - off["cpu_s"]) / wall)
    on_runs = [r for r in runs if r["mode"] == "on"]
    ticks = sum(r["ticks"] for r in on_runs)
    tick_cpu = sum(r["tick_cpu_s"] for r in on_runs)
    per_tick_ms = 1000 * tick_cpu / ticks if ticks else float("nan")
    direct_pct = 100 * (tick_cpu / ticks) / args.interval_s if ticks else float("nan")
    cost = median(costs)
    return {
        "seconds": args.seconds,
        "interval_s": args.interval_s,
        "runs": runs,
        "cost_pct_of_core_per_rep": [round(c, 3) for c in costs],
        "cost_pct_of_core_median": round(cost, 3),
        "agent_cpu_pct_off_median": round(
            median([100 * r["cpu_s"] / r["wall_s"] for r in runs if r["mode"] == "off"]), 2
        ),
        "agent_cpu_pct_on_median": round(
            median([100 * r["cpu_s"] / r["wall_s"] for r in runs if r["mode"] == "on"]), 2
        ),
        "tick_cpu_ms_per_interval": round(per_tick_ms, 3),
        "tick_cpu_pct_of_core": round(direct_pct, 4),
        "goal_pct": GOAL_CPU_PCT,
        "pass": cost <= GOAL_CPU_PCT and direct_pct <= GOAL_CPU_PCT,
    }


# ------------------------------------------------------------------------------ main

_JSON = [False]


def say(line: str) -> None:
    print(line, file=sys.stderr if _JSON[0] else sys.stdout, flush=True)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report_outage(r: dict[str, Any]) -> None:
    t = r["timing"]
    for name in ("full", "bounded"):
        v = r[name]
        say(
            f"outage {name} (outbox_max_rows={v['outbox_max_rows']}): produced {v['produced']}, "
            f"stored {v['stored_rows']}, dropped (counted) {v['dropped_counted']}, missing "
            f"{v['missing']}, duplicates stored {v['duplicates_stored']}, redeliveries absorbed "
            f"{v['redelivered_absorbed']}, order violations {v['order_violations']}: "
            f"{verdict(v['pass'])}"
        )
    say(
        f"outage drain: {t['backlog_messages']} queued over {t['outage_s']} s; worker back "
        f"{t['broker_restart_to_worker_resubscribed_s']} s after restart; agent reconnected "
        f"{t['link_up_to_agent_reconnected_s']} s after link up, backlog stored "
        f"{t['agent_reconnected_to_backlog_stored_s']} s later: {verdict(r['pass'])}"
    )


def report_rate(r: dict[str, Any]) -> None:
    say(
        f"ingest rate ({r['messages']} msgs, {r['payload_bytes']} B): raw paho "
        f"{r['raw_msg_per_s_median']:.0f} msg/s, ingest→SQLite {r['ingest_msg_per_s_median']:.0f}"
        f" msg/s, ratio median {r['ratio_median']:.2f} (goal ≥ {GOAL_RATIO}), "
        f"no loss {r['no_loss']}: {verdict(r['pass'])}"
    )


def report_cpu(r: dict[str, Any]) -> None:
    say(
        f"telemetry CPU at {r['interval_s']:g} s: on−off {r['cost_pct_of_core_median']:.3f} % "
        f"of a core (per rep {r['cost_pct_of_core_per_rep']}; agent {r['agent_cpu_pct_off_median']}"
        f" % off / {r['agent_cpu_pct_on_median']} % on); tick {r['tick_cpu_ms_per_interval']:.2f}"
        f" ms CPU = {r['tick_cpu_pct_of_core']:.3f} % (goal ≤ {GOAL_CPU_PCT} %): "
        f"{verdict(r['pass'])}"
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "bench",
        nargs="?",
        default="all",
        choices=("all", "outage", "rate", "cpu", "cpu-child", "rate-child"),
    )
    ap.add_argument("--json", action="store_true", help="JSON on stdout, lines on stderr")
    ap.add_argument("--model", help="model.onnx to run (default: build the digits sample)")
    ap.add_argument(
        "--fps", type=float, default=5.0, help="agents' video frame rate (lower: less CPU noise)"
    )
    ap.add_argument("--interval-s", type=float, default=1.0, help="telemetry interval")
    ap.add_argument("--outage-s", type=float, default=GOAL_OUTAGE_S, help="broker down time")
    ap.add_argument("--small-rows", type=int, default=60, help="bounded variant's max rows")
    ap.add_argument("--messages", type=int, default=20_000, help="messages per rate run")
    ap.add_argument("--reps", type=int, default=3, help="raw/ingest rate pairs")
    ap.add_argument("--seconds", type=float, default=60.0, help="CPU window per run")
    ap.add_argument("--cpu-reps", type=int, default=2, help="on/off CPU pairs")
    ap.add_argument("--warmup-s", type=float, default=5.0, help="CPU runs: settle first")
    # cpu-child only
    ap.add_argument("--mode", choices=("on", "off"), help=argparse.SUPPRESS)
    ap.add_argument("--broker-url", help=argparse.SUPPRESS)
    ap.add_argument("--video", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    # rate-child only
    ap.add_argument("--side", choices=("raw", "ingest"), help=argparse.SUPPRESS)
    ap.add_argument("--tag", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.bench == "cpu-child":
        cpu_child(args)
        return
    if args.bench == "rate-child":
        rate_child(args)
        return
    _JSON[0] = args.json
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    signal.signal(signal.SIGTERM, _interrupt)  # unwind so every ``finally`` runs
    out: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "mosquitto": subprocess.run(
                [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
                capture_output=True,
                text=True,
            ).stdout.splitlines()[0],
        },
        "config": {k: v for k, v in vars(args).items() if v is not None and k != "json"},
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    m = out["machine"]
    say(f"machine: {m['cpus']} cores, Python {m['python']}, {m['platform']}, {m['mosquitto']}")
    which = ("outage", "rate", "cpu") if args.bench == "all" else (args.bench,)
    tmp = Path(tempfile.mkdtemp(prefix="bench-telemetry-"))
    os.environ["XDG_CACHE_HOME"] = str(tmp / "cache")
    try:
        assets = make_assets(tmp, args.model, args.fps) if {"outage", "cpu"} & set(which) else None
        if "outage" in which and assets is not None:
            out["outage"] = bench_outage(args, tmp, *assets)
            report_outage(out["outage"])
        if "rate" in which:
            out["rate"] = bench_rate(args, tmp)
            report_rate(out["rate"])
        if "cpu" in which and assets is not None:
            out["cpu"] = bench_cpu(args, tmp, *assets)
            report_cpu(out["cpu"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    out["pass"] = all(out[k]["pass"] for k in which)
    if args.json:
        print(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
