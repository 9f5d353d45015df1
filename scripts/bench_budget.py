"""Benchmark: what one device costs the cloud — messages, bytes and database rows per second.

One Mosquitto, one chunk server, one ingest worker (SQLite, or ``--db URL``), a counting
subscriber on ``ROOT/devices/#`` and ``--devices`` simulated devices (``tests.harness.sim``:
the agent's real session, telemetry message, TUF fetch and update code)::

    python -m scripts.bench_budget --devices 20 --seconds 60 [--interval 10] [--model-mb 2]

1. steady state: every device online, telemetry every ``--interval`` s, for ``--seconds``:
   messages, payload bytes and MQTT bytes per device per second by topic kind, and the rows the
   ingest worker inserted per device per second by table;
2. one model update: ``deploy()`` of ``sim@1.0.0`` (a ``--model-mb`` model) to every device,
   until every device committed it: per device, the fetch requests and answers (count, bytes,
   bytes / model size), reported and desired messages;
3. computed with the contract's own models (the simulator sends neither): an inference event
   (0, 5, 20 detections) and a telemetry message with one zone and one line of two classes
   each, with the ``region_counts`` rows ``rows.region_count_rows`` makes of it.

MQTT bytes count one leg (device → broker, or broker → device): fixed header, topic, packet id
and payload of each PUBLISH plus the 4-byte PUBACK; not TCP/IP or TLS framing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from scripts import fleet_sim as fs

log = logging.getLogger("bench_budget")
KINDS = ("state", "reported", "desired", "telemetry", "events", "fetch/req", "fetch/resp")


def mqtt_bytes(topic: str, payload_len: int, qos: int = 1) -> int:
    """Bytes of one PUBLISH on the wire (MQTT 3.1.1 §3.3) plus its PUBACK (§3.4)."""
    rest = 2 + len(topic.encode()) + (2 if qos else 0) + payload_len
    varint = 1 if rest < 128 else 2 if rest < 16_384 else 3 if rest < 2_097_152 else 4
    return 1 + varint + rest + (4 if qos else 0)


def topic_kind(topic: str) -> str:
    """``ROOT/devices/D/fetch/req/REPLICA`` → ``fetch/req``; ``…/D/telemetry`` → ``telemetry``."""
    parts = topic.split("/")
    try:
        i = parts.index("devices")
    except ValueError:
        return "other"
    return "/".join(parts[i + 2 : i + 4])


class Tap:
    """A QoS 1 subscriber to every device topic: messages, payload and MQTT bytes by kind."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.msgs: Counter[str] = Counter()
        self.payload: Counter[str] = Counter()
        self.wire: Counter[str] = Counter()
        self.lock = threading.Lock()

    def start(self) -> Tap:
        from agent.common.mqtt import make_client, parse_broker_url
        from agent.protocol.topics import Topics

        host, port, _tls = parse_broker_url(self.url)
        acked = threading.Event()
        self.client = make_client("bench-budget-tap")
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: acked.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(f"{Topics().root}/devices/#", 1)
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not acked.wait(10):
            raise RuntimeError("tap not subscribed")
        return self

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        kind = topic_kind(msg.topic)
        with self.lock:
            self.msgs[kind] += 1
            self.payload[kind] += len(msg.payload)
            self.wire[kind] += mqtt_bytes(msg.topic, len(msg.payload), msg.qos)

    def snapshot(self) -> dict[str, Counter[str]]:
        with self.lock:
            return {"msgs": self.msgs.copy(), "payload": self.payload.copy(),
                    "wire": self.wire.copy()}  # fmt: skip

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def per_device(a: dict[str, Counter[str]], b: dict[str, Counter[str]], n: int,
               seconds: float | None) -> dict[str, dict[str, float]]:  # fmt: skip
    """What the tap counted between snapshots ``a`` and ``b``, per device (per second)."""
    div = n * (seconds or 1.0)
    out = {}
    for kind in sorted(set(b["msgs"]) | set(a["msgs"])):
        m = b["msgs"][kind] - a["msgs"][kind]
        if m:
            out[kind] = {
                "messages": round(m / div, 4),
                "payload_bytes": round((b["payload"][kind] - a["payload"][kind]) / div, 1),
                "mqtt_bytes": round((b["wire"][kind] - a["wire"][kind]) / div, 1),
                "bytes_per_message": round((b["payload"][kind] - a["payload"][kind]) / m, 1),
            }
    return out


def computed() -> dict[str, Any]:
    """Sizes and rows of what the simulator does not send, built from the contract's models."""
    from agent.protocol.analytics import LineCount, ZoneCount
    from agent.protocol.schema import EXAMPLES
    from agent.protocol.telemetry import Detection, InferenceEvent, Telemetry
    from cloud_sync.ingest.rows import region_count_rows, telemetry_rows

    out: dict[str, Any] = {"events": {}}
    ev = cast(InferenceEvent, EXAMPLES["inference_event"])
    for n in (0, 5, 20):
        dets = [Detection(box=(10.0 + i, 20.0, 110.5 + i, 220.25), score=0.87, label_id=i % 3,
                          label=("person", "car", "bicycle")[i % 3], track_id=i + 1)
                for i in range(n)]  # fmt: skip
        e = ev.model_copy(update={"detections": dets, "classifications": []})
        topic = "edgefleet/v1/devices/cam-017/events"
        out["events"][f"{n} detections"] = {
            "payload_bytes": len(e.encode()),
            "mqtt_bytes": mqtt_bytes(topic, len(e.encode())),
        }
    t = cast(Telemetry, EXAMPLES["telemetry"])
    pipe = t.pipelines[0].model_copy(update={
        "zones": [ZoneCount(zone="door", label=lb, entered=812, left=809, dwell=14, inside=3)
                  for lb in ("person", "car")],
        "lines": [LineCount(line="gate", label=lb, crossed_in=1204, crossed_out=1187)
                  for lb in ("person", "car")],
    })  # fmt: skip
    plain = t.encode()
    zoned = t.model_copy(update={"pipelines": [pipe]}).encode()
    msg = json.loads(zoned)
    rows, _device = telemetry_rows(msg)
    out["telemetry"] = {
        "plain_payload_bytes": len(plain),
        "zone_line_payload_bytes": len(zoned),
        "rows_per_message": {"telemetry": len(rows), "device_telemetry": 1,
                             "region_counts": len(region_count_rows(msg))},
        "zones_lines": "1 zone and 1 line, 2 classes each",
    }  # fmt: skip
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole benchmark; returns the figures."""
    from cloud_sync.deploy import deploy
    from cloud_sync.ingest.store import open_store
    from cloud_sync.ingest.worker import IngestWorker
    from cloud_sync.localbroker import MosquittoBroker
    from cloud_sync.registry.serve import ChunkServer
    from tests.harness.sim import SimFleet
    from tests.harness.sim.registry import make_sim_registry
    from tests.harness.util import wait_for

    res: dict[str, Any] = {"devices": args.devices, "interval_s": args.interval,
                           "seconds": args.seconds, "model_mb": args.model_mb,
                           "load_avg_start": os.getloadavg()}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="edgefleet-budget-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work)
        broker.start()
        try:
            repo = work / "registry"
            size = int(args.model_mb * 2**20)
            make_sim_registry(repo, work / "src", ["1.0.0"], size)
            server = ChunkServer(repo, broker.url, client_id="registry-budget")
            server.start()
            store = open_store(args.db or f"sqlite:///{work / 'fleet.db'}")
            worker = IngestWorker(broker.url, store, flush_s=0.2)
            worker.start()
            tap = Tap(broker.url).start()
            fleet = SimFleet(broker.url, repo / "root.json", args.devices,
                             base_dir=work / "devices", telemetry_interval_s=args.interval,
                             loops=2, tick_s=min(0.2, args.interval / 2))  # fmt: skip
            try:
                fleet.start()
                if not wait_for(lambda: fleet.summary()["online"] == args.devices, 60, 0.5):
                    raise RuntimeError("devices did not all come online")
                res["connect"] = per_device(
                    {"msgs": Counter(), "payload": Counter(), "wire": Counter()},
                    tap.snapshot(), args.devices, None,
                )  # fmt: skip
                time.sleep(2.0)
                assert broker.proc is not None
                usage = fs.Usage({"broker": broker.proc.pid}).start()
                a, rows_a, t0 = tap.snapshot(), store.counts(), time.monotonic()
                time.sleep(args.seconds)
                wait_for(lambda: worker.backlog() == 0, 10, 0.1)
                b, rows_b, dt = tap.snapshot(), store.counts(), time.monotonic() - t0
                res["steady"] = per_device(a, b, args.devices, dt)
                res["steady_rows_per_device_s"] = {
                    k: round((rows_b[k] - rows_a[k]) / args.devices / dt, 4)
                    for k in rows_b
                    if rows_b[k] != rows_a[k]
                }
                res["steady_usage"] = usage.result()
                res["update"] = update_round(fleet, tap, repo, broker.url, args, deploy, size)
            finally:
                fleet.stop()
                tap.stop()
                worker.stop()
                res["ingest_counts"] = dict(worker.counts)
                store.close()
                server.stop()
        finally:
            broker.stop()
    res["computed"] = computed()
    res["load_avg_end"] = os.getloadavg()
    return res


def update_round(fleet: Any, tap: Tap, repo: Path, url: str, args: argparse.Namespace,
                 deploy: Any, size: int) -> dict[str, Any]:  # fmt: skip
    """Deploy ``sim@1.0.0`` everywhere; per-device messages and bytes of the update."""
    from tests.harness.util import wait_for

    ids = list(fleet.devices)
    a, t0 = tap.snapshot(), time.monotonic()
    for dev in ids:
        deploy(repo, url, dev, "sim@1.0.0", pipeline="front")
    done = wait_for(lambda: fleet.all_in("committed", "1.0.0", ids), args.timeout, 0.5)
    took = time.monotonic() - t0
    time.sleep(2.0)  # the last reported states reach the tap
    b = tap.snapshot()
    out: dict[str, Any] = {"all_committed": done, "wall_s": round(took, 1),
                           "model_bytes": size,
                           "chunk_client_counters": fleet.summary()["chunks"]}  # fmt: skip
    # the update's own traffic: subtract the telemetry the devices sent meanwhile
    out["per_device"] = {k: v for k, v in per_device(a, b, len(ids), None).items()
                         if k != "telemetry"}  # fmt: skip
    resp = out["per_device"].get("fetch/resp", {})
    req = out["per_device"].get("fetch/req", {})
    if resp:
        out["fetch_payload_over_model"] = round(resp["payload_bytes"] / size, 4)
        out["fetch_mqtt_both_ways_over_model"] = round(
            (resp["mqtt_bytes"] + req.get("mqtt_bytes", 0)) / size, 4
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--seconds", type=float, default=60.0, help="steady-state window")
    p.add_argument("--interval", type=float, default=10.0, help="telemetry interval, seconds")
    p.add_argument("--model-mb", type=float, default=2.0, help="model size, MiB")
    p.add_argument("--db", help="ingest database URL (default: a SQLite file)")
    p.add_argument("--timeout", type=float, default=300.0, help="for the update round")
    p.add_argument("--computed-only", action="store_true", help="only part 3 (no broker)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    res = computed() if args.computed_only else run(args)
    res["at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
