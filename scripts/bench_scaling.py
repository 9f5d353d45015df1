"""Benchmark: does the load split across ingest workers and registry replicas as planned?

Ingest: ``--workers 1 2 3`` runs, for each count, that many ingest worker processes in one
``$share`` group writing to one database (PostgreSQL from Debian's binaries by default,
``--db sqlite`` for one SQLite file), and publishes ``--messages`` distinct telemetry messages
from ``--senders`` devices at ``--rate`` per second (0: as fast as one paho client goes).
``--preload`` publishes everything while the workers are stopped (SIGSTOP) and times how fast
they drain it (SIGCONT): the workers' capacity without the publisher competing for the CPU.
Reports each worker's stored count, the split (max / mean), rows in the database (must equal
the messages: none lost, none stored twice), end-to-end throughput and CPU per message of the
broker, the workers and PostgreSQL::

    python -m scripts.bench_scaling ingest --workers 1 2 3 --messages 20000 [--rate 0]

Registry: ``--replicas 1 2 3`` runs that many chunk-server replicas (processes, one ``$share``
group, as ``scripts.bench_rollout``) and ``--devices`` devices each downloading one
``--model-mb`` file at once with the agent's ``ChunkClient`` (its defaults: 64 KiB windows, 32
in flight, sticky transfers). Reports requests, bytes and devices per replica, the split,
MB/s and CPU per MB::

    python -m scripts.bench_scaling registry --replicas 1 2 3 --devices 30 --model-mb 2

Everything on this machine: on 2 cores more processes add no CPU, so throughput is not
expected to grow with workers here; the split and the CPU per message are what carry over.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

from scripts import fleet_sim as fs
from scripts.bench_rollout import ReadyChild

log = logging.getLogger("bench_scaling")
INGEST_GROUP = "bench-ingest"


def split(values: Sequence[float]) -> dict[str, Any]:
    """``values`` per worker/replica and how evenly they split: max / mean (1.0 = even)."""
    mean = sum(values) / len(values) if values else 0.0
    return {"each": list(values), "max_over_mean": round(max(values) / mean, 3) if mean else None}


def tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (PostgreSQL's backends are its children)."""
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(entry.name) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / fs.CLK_TCK
    return total


# --- ingest ---------------------------------------------------------------------------------


def ingest_child(name: str, url: str, db: str, out: str) -> int:
    """Child: one ingest worker in ``INGEST_GROUP`` until SIGTERM; its counts go to ``out``."""
    from cloud_sync.ingest.store import open_store
    from cloud_sync.ingest.worker import IngestWorker, freeze_startup_heap

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    store = open_store(db)
    worker = IngestWorker(url, store, client_id=name, share_group=INGEST_GROUP, flush_s=0.2)
    acked = threading.Event()
    worker.client.on_subscribe = lambda *_a: acked.set()
    freeze_startup_heap()  # as `edgefleet ingest` does
    worker.start()
    if acked.wait(20):
        Path(out + ".ready").write_text("ready")
    stop.wait()
    worker.stop()
    Path(out).write_text(json.dumps(dict(worker.counts)))
    store.close()
    return 0


class Child(ReadyChild):
    """A ``python -m scripts.bench_scaling`` child process that writes ``out`` when done."""

    def __init__(self, args: list[str], out: Path) -> None:
        super().__init__(out.stem, [sys.executable, "-m", "scripts.bench_scaling", *args,
                                    "--out", str(out)], out)  # fmt: skip


def telemetry_payloads(n: int, senders: int) -> list[tuple[str, bytes]]:
    """``n`` distinct, valid telemetry messages from ``senders`` devices: (topic, payload)."""
    from agent.protocol.schema import EXAMPLES
    from agent.protocol.telemetry import Telemetry
    from agent.protocol.topics import Topics

    topics = Topics()
    base = cast(Telemetry, EXAMPLES["telemetry"])
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    out = []
    for i in range(n):
        dev = f"load-{i % senders:05d}"
        msg = base.model_copy(update={"device_id": dev, "ts": t0 + timedelta(seconds=i)})
        out.append((topics.device(dev, "telemetry"), msg.encode()))
    return out


def publish_all(url: str, payloads: list[tuple[str, bytes]], rate: float) -> float:
    """Publish every payload at QoS 1 (``rate`` per second, 0 = as fast as possible); returns
    the seconds it took until the broker acknowledged the last one."""
    from agent.common.mqtt import make_client, parse_broker_url

    host, port, _tls = parse_broker_url(url)
    client = make_client("bench-scaling-load")
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    t0 = time.monotonic()
    infos = []
    for i, (topic, payload) in enumerate(payloads):
        if rate > 0:
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        infos.append(client.publish(topic, payload, qos=1))
    for info in infos:
        info.wait_for_publish(60)
    took = time.monotonic() - t0
    client.disconnect()
    client.loop_stop()
    return took


@contextmanager
def database(kind: str, work: Path) -> Iterator[tuple[str, int | None]]:
    """(URL, server pid or None): a fresh PostgreSQL database, or a SQLite file."""
    if kind == "sqlite":
        yield f"sqlite:///{work / 'fleet.db'}", None
        return
    from tests.harness.postgres import Postgres

    pg = Postgres()
    try:
        pg.start()
        pid = int((pg.data / "postmaster.pid").read_text().split("\n", 1)[0])
        yield pg.new_database(), pid
    finally:
        pg.stop()


def pg_bytes(store: Any) -> int:
    """Bytes of the telemetry tables in PostgreSQL, indexes and TOAST included (of every day
    partition: a partitioned table itself has no storage)."""
    import sqlalchemy as sa

    one = (
        "COALESCE((SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('{t}')),"
        " pg_total_relation_size('{t}'))"
    )
    with store.engine.connect() as conn:
        q = f"SELECT {one.format(t='telemetry')} + {one.format(t='device_telemetry')}"
        return int(conn.execute(sa.text(q)).scalar() or 0)


def ingest_run(k: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``k`` workers, one database, one broker: the split and the throughput."""
    from cloud_sync.ingest.store import open_store
    from cloud_sync.localbroker import MosquittoBroker
    from tests.harness.util import wait_for

    payloads = telemetry_payloads(args.messages, args.senders)
    run_dir = work / f"ingest-{k}"
    run_dir.mkdir()
    broker = MosquittoBroker(run_dir)
    broker.start()
    res: dict[str, Any] = {"workers": k, "preload": args.preload}
    with ExitStack() as stack, database(args.db, run_dir) as (db, db_pid):
        stack.callback(broker.stop)
        store = open_store(db)  # migrates before the workers start
        stack.callback(store.close)
        kids = [Child(["ingest-child", "--name", f"ingest-{i}", "--broker", broker.url,
                       "--db", db], run_dir / f"ingest-{i}.json") for i in range(k)]  # fmt: skip
        for c in kids:
            c.wait_ready()
        assert broker.proc is not None
        pids = {
            "broker": broker.proc.pid,
            **{f"ingest-{i}": c.proc.pid for i, c in enumerate(kids)},
        }
        if args.preload:  # the broker holds it all, then the workers drain it
            for c in kids:
                c.proc.send_signal(signal.SIGSTOP)
            res["publish_s"] = round(publish_all(broker.url, payloads, args.rate), 2)
        usage = fs.Usage(pids).start()
        db_cpu0 = tree_cpu(db_pid) if db_pid else 0.0
        t0 = time.monotonic()
        if args.preload:
            for c in kids:
                c.proc.send_signal(signal.SIGCONT)
        else:
            res["publish_s"] = round(publish_all(broker.url, payloads, args.rate), 2)

        def stored() -> int:
            return store.counts()["device_telemetry"]

        done = wait_for(lambda: stored() >= args.messages, args.timeout, 0.1)
        took = time.monotonic() - t0
        u = usage.result()
        db_cpu = tree_cpu(db_pid) - db_cpu0 if db_pid else 0.0
        time.sleep(0.5)  # a late duplicate would show up here
        rows = store.counts()
        per = [c.stop().get("telemetry", 0) for c in kids]
        if db_pid:
            res["pg_bytes_per_message"] = pg_bytes(store) / args.messages
    n = args.messages
    res.update({
        "messages": n, "all_stored": done, "rows": rows["device_telemetry"],
        "dead_letters": rows["dead_letters"], "per_worker": split(per),
        "stored_by_workers": sum(per), "wall_s": round(took, 2),
        "msg_per_s": round(n / took, 1), "publish_msg_per_s": round(n / res["publish_s"], 1),
        "cpu_us_per_msg": {name: round(v["cpu_pct"] / 100 * took / n * 1e6, 1)
                           for name, v in u.items()},
        "db_cpu_us_per_msg": round(db_cpu / n * 1e6, 1) if db_pid else None,
        "load_avg": os.getloadavg()[0],
    })  # fmt: skip
    return res


# --- registry -------------------------------------------------------------------------------


def download(url: str, device: str, path: str, size: int) -> dict[str, Any]:
    """One device downloads ``path`` with the agent's ``ChunkClient`` (default settings)."""
    from agent.common.mqtt import make_client, parse_broker_url
    from agent.config import UpdateConfig
    from agent.update.transfer.client import ChunkClient

    cfg = UpdateConfig()
    host, port, _tls = parse_broker_url(url)
    client = make_client(f"bench-dev-{device}")
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        cc = ChunkClient(client, device, chunk_size=cfg.chunk_kb * 1024, window=cfg.window,
                         rng=random.Random(device))  # fmt: skip
        got = sum(len(b) for b in cc.iter_file(path))
        return {"ok": got == size, "busy": cc.busy_responses, "timeouts": cc.timeouts}
    except Exception as e:  # counted: a failed download is a finding, the others go on
        return {"ok": False, "error": repr(e)}
    finally:
        client.disconnect()
        client.loop_stop()


def registry_run(r: int, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``r`` replicas, ``--devices`` downloads at once."""
    from concurrent.futures import ThreadPoolExecutor

    from cloud_sync.localbroker import MosquittoBroker
    from scripts.bench_rollout import Replica

    run_dir = work / f"registry-{r}"
    repo = run_dir / "repo"
    (repo / "metadata").mkdir(parents=True)
    (repo / "targets").mkdir()
    size = int(args.model_mb * 2**20)
    (repo / "targets" / "blob.bin").write_bytes(random.Random(r).randbytes(size))
    broker = MosquittoBroker(run_dir)
    broker.start()
    replicas: list[Replica] = []
    try:
        replicas = [Replica(f"registry-{i}", repo, broker.url, 4, run_dir) for i in range(r)]
        for rep in replicas:
            rep.wait_ready()
        assert broker.proc is not None
        pids = {"broker": broker.proc.pid, **{x.name: x.proc.pid for x in replicas}}
        usage = fs.Usage(pids).start()
        t0 = time.monotonic()
        devs = [f"dev-{i:04d}" for i in range(args.devices)]
        with ThreadPoolExecutor(len(devs)) as pool:
            results = list(pool.map(lambda d: download(broker.url, d, "targets/blob.bin",
                                                       size), devs))  # fmt: skip
        took = time.monotonic() - t0
        u = usage.result()
    finally:
        stats = [x.stop() for x in replicas]
        broker.stop()
    mb = size * args.devices / 1e6
    return {
        "replicas": r, "devices": args.devices, "model_mb": args.model_mb,
        "downloads_ok": sum(1 for x in results if x["ok"]),
        "errors": [x["error"] for x in results if "error" in x][:3],
        "busy": sum(x.get("busy", 0) for x in results),
        "requests": split([s.get("answered", 0) for s in stats]),
        "mb_sent": split([round(s.get("bytes_sent", 0) / 1e6, 1) for s in stats]),
        "devices_served": split([s.get("devices_served", 0) for s in stats]),
        "wall_s": round(took, 2), "mb_per_s": round(mb / took, 1),
        "cpu_ms_per_mb": {k: round(v["cpu_pct"] / 100 * took / mb * 1e3, 2)
                          for k, v in u.items()},
        "load_avg": os.getloadavg()[0],
    }  # fmt: skip


# --- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    ing = sub.add_parser("ingest", help="ingest workers in one share group")
    ing.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    ing.add_argument("--messages", type=int, default=20_000)
    ing.add_argument("--senders", type=int, default=200, help="devices the messages come from")
    ing.add_argument("--rate", type=float, default=0.0, help="messages/s (0: unpaced)")
    ing.add_argument(
        "--preload",
        action="store_true",
        help="publish while the workers are stopped (SIGSTOP), then time the drain",
    )
    ing.add_argument("--db", choices=("postgresql", "sqlite"), default="postgresql")
    ing.add_argument("--timeout", type=float, default=300.0)
    reg = sub.add_parser("registry", help="registry replicas in one share group")
    reg.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 3])
    reg.add_argument("--devices", type=int, default=30)
    reg.add_argument("--model-mb", type=float, default=2.0)
    child = sub.add_parser("ingest-child", help=argparse.SUPPRESS)
    for a in ("--name", "--broker", "--db", "--out"):
        child.add_argument(a, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    if args.cmd == "ingest-child":
        return ingest_child(args.name, args.broker, args.db, args.out)
    runs = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-scaling-") as tmp:
        for n in args.workers if args.cmd == "ingest" else args.replicas:
            one = ingest_run if args.cmd == "ingest" else registry_run
            runs.append(one(n, args, Path(tmp)))
            print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    print(json.dumps({"cmd": args.cmd, "cpus": os.cpu_count(), "runs": runs}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
