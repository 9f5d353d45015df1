"""Benchmark: a staged rollout on N simulated devices, good version then bad version.

Everything runs on this machine: Mosquitto, a TUF registry with ``sim@1.0.0`` (installed on
every device first, timed separately), ``sim@1.1.0`` (good) and ``sim@1.2.0`` (bad: p95 x3 and
5 % inference errors on every device), two chunk-server replicas in their own processes
sharing one ``$share`` group, the ingest worker into SQLite, the rollout controller ticking
every ``--tick`` seconds, and the fleet in child processes of its own
(``tests.harness.sim.shards``: its MQTT sockets would push this process's file descriptors past
``select``'s 1023)::

    python -m scripts.bench_rollout --devices 1000 [--json]

1. good: ``sim@1.1.0 --target '*' --stage 5% --stage 100% --soak S`` with gates
   ``failures<2%``, ``p95_latency<+20%``, ``error_rate<1%``: time from start to ``completed``,
   every device must run 1.1.0, desired-state messages per device;
2. bad: ``sim@1.2.0``, same spec, ``--on-fail rollback``: must stop at the canary stage with a
   failing gate, canaries back on 1.1.0, and no device outside the canaries ever sent a
   desired state naming 1.2.0 (a subscriber decodes every ``SignedDesired`` of the run).

Reports wall times, broker/replica/simulator/controller CPU and memory (from /proc), the load
average and each replica's request count. ``run_bench()`` is what
``tests/cloud_sync/rollout/test_rollout_scale.py`` calls with a small fleet.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scripts import fleet_sim as fs
from tests.harness.sim.registry import make_sim_registry
from tests.harness.sim.shards import ShardedSimFleet
from tests.harness.util import ROOT, terminate, wait_for

log = logging.getLogger("bench_rollout")
SHARE_GROUP = "registry"
GATES = ("failures<2%", "p95_latency<+20%", "error_rate<1%")


@dataclass
class BenchConfig:
    """What to run; the defaults are the issue's benchmark."""

    devices: int = 1000
    model_mb: float = 2.0
    stages: tuple[str, ...] = ("5%", "100%")
    soak_s: float = 15.0
    max_concurrent: int | None = None
    telemetry_s: float = 3.0
    tick_s: float = 1.0
    fps: float = 5.0
    health_window_s: float = 5.0
    health_min_frames: int = 10
    retry_s: float = 5.0
    server_workers: int = 4
    loops: int = 4
    connect_rate: float = 200.0
    timeout_s: float = 600.0
    fleet_procs: int = 1
    install_rate: float = 20.0
    quiet: bool = False


# --- child processes: chunk-server replica, fleet shards ---------------------------------


def serve_replica(name: str, repo: str, url: str, workers: int, out: str) -> int:
    """Child: one ``ChunkServer`` replica in the shared group until SIGTERM; stats to ``out``."""
    from cloud_sync.registry.serve import ChunkServer

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    server = ChunkServer(Path(repo), url, client_id=name, share_group=SHARE_GROUP, workers=workers)
    server.start()
    Path(out + ".ready").write_text("ready")
    stop.wait()
    stats = server.stats()
    server.stop()
    data = {k: v for k, v in asdict(stats).items() if not k.endswith("by_device")}
    data["devices_served"] = len(stats.by_device)
    Path(out).write_text(json.dumps(data))
    return 0


def shard_config(cfg: BenchConfig, url: str, repo: Path, work: Path) -> dict[str, Any]:
    """What every fleet shard runs (``tests.harness.sim.shards``): ``sim@1.2.0`` is the bad
    version, p95 x3 and 5 % inference errors on every device."""
    return {
        "url": url, "repo": str(repo), "dir": str(work / "devices"),
        "fps": cfg.fps, "health_window_s": cfg.health_window_s,
        "health_min_frames": cfg.health_min_frames, "retry_s": cfg.retry_s,
        "telemetry_s": cfg.telemetry_s, "loops": cfg.loops, "connect_rate": cfg.connect_rate,
        "bad_version": "1.2.0", "bad_latency": 3.0, "bad_error_rate": 0.05,
    }  # fmt: skip


class ReadyChild:
    """A benchmark child process: touches ``OUT.ready`` once serving, writes its counters to
    ``OUT`` (JSON) when stopped."""

    def __init__(self, name: str, argv: list[str], out: Path) -> None:
        self.name = name
        self.out = out
        self.proc = subprocess.Popen(argv, cwd=ROOT)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Raises: RuntimeError when the child is not serving in time."""
        deadline = time.monotonic() + timeout_s
        while not Path(str(self.out) + ".ready").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start")
            time.sleep(0.1)

    def stop(self) -> dict[str, Any]:
        """SIGTERM, wait, return its counters."""
        if self.proc.poll() is None:
            terminate(self.proc, 30)
        try:
            data: dict[str, Any] = json.loads(self.out.read_text())
            return data
        except (OSError, ValueError) as e:
            return {"error": str(e)}


class Replica(ReadyChild):
    """A chunk-server replica child process (``serve_replica``)."""

    def __init__(self, name: str, repo: Path, url: str, workers: int, work: Path) -> None:
        out = work / f"{name}.json"
        super().__init__(name, [
            sys.executable, "-m", "scripts.bench_rollout", "--serve-replica", name,
            "--repo", str(repo), "--broker", url, "--server-workers", str(workers),
            "--stats-out", str(out),
        ], out)  # fmt: skip


# --- watching desired states ------------------------------------------------------------------


@dataclass
class DesiredWatch:
    """Every ``SignedDesired`` on ``ROOT/devices/+/desired``: (monotonic time, device, refs)."""

    url: str
    seen: list[tuple[float, str, tuple[str, ...]]] = field(default_factory=list)
    bad_messages: int = 0

    def start(self) -> None:
        """Connect and subscribe (blocks until the SUBACK)."""
        from agent.common.mqtt import make_client, parse_broker_url
        from agent.protocol.state import SignedDesired
        from agent.protocol.topics import Topics

        host, port, _tls = parse_broker_url(self.url)
        topics = Topics()
        subscribed = threading.Event()
        lock = threading.Lock()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            dev = msg.topic.split("/")[-2]
            try:
                env = SignedDesired.decode(msg.payload)
            except Exception:  # counted: a bad message on this topic is a finding
                self.bad_messages += 1
                return
            refs = tuple(str(t) for t in env.signed.pipelines.values())
            with lock:
                self.seen.append((time.monotonic(), dev, refs))

        self.client = make_client("bench-desired-watch")
        self.client.on_message = on_message
        self.client.on_subscribe = lambda *_a: subscribed.set()
        self.client.on_connect = lambda c, *_a: c.subscribe(topics.all_devices("desired"), 1)
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("desired watcher not subscribed")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def devices_sent(self, ref: str) -> set[str]:
        """Devices that were ever sent a desired state naming ``ref``."""
        return {d for _t, d, refs in list(self.seen) if ref in refs}

    def per_device(self, t0: float, t1: float) -> Counter[str]:
        """Desired-state messages per device between ``t0`` and ``t1``."""
        return Counter(d for t, d, _r in list(self.seen) if t0 <= t <= t1)


# --- the run ----------------------------------------------------------------------------------


def _gate(g: Any) -> dict[str, Any]:
    """A ``GateResult`` as a dict."""
    return {"name": g.name, "ok": g.ok, "value": g.value, "threshold": g.threshold,
            "detail": g.detail}  # fmt: skip


def run_rollout(
    store: Any, fleet: ShardedSimFleet, watch: DesiredWatch, usage_pids: dict[str, int],
    cfg: BenchConfig, rid: str, version: str, on_fail: str, ingest: Any = None,
) -> dict[str, Any]:  # fmt: skip
    """Record one rollout, wait until the controller ends it; figures and the final row."""
    from cloud_sync.rollout import RolloutSpec, db, start

    spec = RolloutSpec(
        id=rid, model="sim", version=version, target="*", pipeline="front",
        stages=list(cfg.stages), soak_s=cfg.soak_s, gates=list(GATES),
        max_concurrent=cfg.max_concurrent, on_fail=on_fail,
    )  # fmt: skip
    usage = fs.Usage(usage_pids).start()
    load0 = os.getloadavg()
    t0 = time.monotonic()
    now = datetime.now(timezone.utc)
    db.create(store, spec, start(spec, now), now)
    last_print = 0.0

    def ended() -> bool:
        nonlocal last_print
        _rev, status = db.head(store, rid)  # cheap: the state's JSON is read every 10 s only
        if not cfg.quiet and time.monotonic() - last_print > 10:
            last_print = time.monotonic()
            row = db.get(store, rid)
            counts = dict(row.state.counts())
            # what the devices themselves report, and the ingest backlog: a gap between the
            # controller's "committed" and the fleet's shows the cloud's loop lagging
            summary = fleet.ask("summary")
            backlog = ingest.backlog() if ingest is not None else -1
            print(f"[{time.monotonic() - t0:6.1f}s] {rid}: {row.state.status} stage "
                  f"{row.state.stage} {counts}; fleet {summary['phases']} "
                  f"{summary['versions']}; ingest backlog {backlog}",
                  file=sys.stderr, flush=True)  # fmt: skip
        return status != "running"

    done = wait_for(ended, cfg.timeout_s, 0.5)
    t_end = time.monotonic()
    row = db.get(store, rid)
    stage_times = [
        (round((e.at - now).total_seconds(), 1), e.kind, e.message) for e in row.state.history
    ]
    return {
        "id": rid, "version": version, "ended": done, "status": row.state.status,
        "stage": row.state.stage, "wall_s": round(t_end - t0, 1),
        "counts": dict(row.state.counts()), "selected": sorted(row.state.devices),
        "gates": [_gate(g) for g in row.state.last_gates],
        "history": stage_times, "usage": usage.result(),
        "load_avg": [round(x, 2) for x in (*load0, *os.getloadavg())],
        "t0": t0, "t1": t_end,
    }  # fmt: skip


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """The whole benchmark; returns the figures and ``checks`` (name → passed)."""
    from cloud_sync.ingest.store import open_store
    from cloud_sync.ingest.worker import IngestWorker
    from cloud_sync.localbroker import MosquittoBroker
    from cloud_sync.rollout.controller import RolloutController

    res: dict[str, Any] = {"config": asdict(cfg), "cpus": os.cpu_count()}
    checks: dict[str, bool] = {}
    res["checks"] = checks
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-rollout-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work)
        broker.start()
        stop_ctl = threading.Event()
        replicas: list[Replica] = []
        fleet: ShardedSimFleet | None = None
        worker = watch = store = ctl_thread = None
        try:
            if broker.proc is None:
                raise RuntimeError("mosquitto did not start")
            repo = work / "registry"
            t = time.monotonic()
            size = int(cfg.model_mb * 2**20)
            make_sim_registry(repo, work / "src", ["1.0.0", "1.1.0", "1.2.0"], size)
            res["publish_s"] = round(time.monotonic() - t, 1)
            replicas = [Replica(n, repo, broker.url, cfg.server_workers, work)
                        for n in ("registry-a", "registry-b")]  # fmt: skip
            for r in replicas:
                r.wait_ready()
            store = open_store(f"sqlite:///{work / 'fleet.db'}")
            worker = IngestWorker(broker.url, store, flush_s=0.2)
            worker.start()
            watch = DesiredWatch(broker.url)
            watch.start()
            ctl = RolloutController(store, repo, broker.url)
            fleet = ShardedSimFleet(shard_config(cfg, broker.url, repo, work), cfg.devices,
                                    cfg.fleet_procs)  # fmt: skip
            pids = {"broker": broker.proc.pid, "registry-a": replicas[0].proc.pid,
                    "registry-b": replicas[1].proc.pid, **fleet.pids(),
                    "cloud": os.getpid()}  # fmt: skip
            ids = fleet.ids

            # round 0: connect and install 1.0.0 everywhere (timed, not part of the goal)
            t = time.monotonic()
            online = wait_for(
                lambda: fleet is not None and fleet.ask("summary")["online"] == cfg.devices,
                120,
                0.5,
            )
            res["connect_s"] = round(time.monotonic() - t, 1)
            checks["all online"] = online
            usage = fs.Usage(pids).start()
            t = time.monotonic()
            failures = fs.deploy_all(repo, broker.url, ids, "sim@1.0.0", rate=cfg.install_rate)
            installed = wait_for(lambda: bool(fleet and fleet.ask("all_in", phase="committed",
                                   version="1.0.0")), cfg.timeout_s, 1.0)  # fmt: skip
            res["install"] = {"wall_s": round(time.monotonic() - t, 1),
                              "deploy_failures": len(failures), "usage": usage.result(),
                              "load_avg": [round(x, 2) for x in os.getloadavg() * 2]}  # fmt: skip
            checks["1.0.0 installed everywhere"] = installed and not failures
            time.sleep(2 * cfg.telemetry_s + 1)  # every device's 1.0.0 figures in the DB

            ctl_thread = threading.Thread(target=ctl.run, args=(stop_ctl, cfg.tick_s), daemon=True)
            ctl_thread.start()

            good = run_rollout(store, fleet, watch, pids, cfg, "good", "1.1.0", "pause", worker)
            per_dev = watch.per_device(good["t0"], good["t1"] + 1)
            good["desired_per_device"] = {
                "max": max(per_dev.values(), default=0),
                "mean": round(sum(per_dev.values()) / max(1, cfg.devices), 2),
                "devices_without": cfg.devices - len(per_dev),
            }
            everyone = wait_for(lambda: bool(fleet and fleet.ask("all_in", phase="committed",
                                  version="1.1.0")), 30, 1.0)  # fmt: skip
            summary = fleet.ask("summary")
            good["fleet_versions"] = summary["versions"]
            res["good"] = good
            checks["good: completed"] = good["status"] == "completed"
            checks["good: <=120 s"] = good["wall_s"] <= 120
            checks["good: nobody left behind (all run 1.1.0)"] = everyone
            checks["good: rollout counted every device committed"] = (
                good["counts"].get("committed", 0) == cfg.devices
            )

            bad = run_rollout(store, fleet, watch, pids, cfg, "bad", "1.2.0", "rollback", worker)
            canaries = set(bad["selected"])

            def canaries_back() -> bool:
                active = fleet.ask("active") if fleet else {}
                return all(active[d][0] and active[d][1] == ["sim@1.1.0"] for d in ids)

            back = wait_for(canaries_back, 60, 1.0)
            time.sleep(2 * cfg.tick_s + 1)  # a late publish would show up here
            got_bad = watch.devices_sent("sim@1.2.0")
            bad["canaries"] = len(canaries)
            bad["devices_sent_1.2.0"] = len(got_bad)
            bad["outside_canaries_sent_1.2.0"] = sorted(got_bad - canaries)
            bad["failing_gates"] = [g for g in bad["gates"] if not g.get("ok")]
            res["bad"] = bad
            checks["bad: stopped (failed)"] = bad["status"] == "failed"
            checks["bad: stopped at the canary stage"] = bad["stage"] == 0
            checks["bad: a gate failed"] = bool(bad["failing_gates"]) or any(
                "fail" in h[2] for h in bad["history"]
            )
            checks["bad: every device back on / still on 1.1.0"] = back
            checks["bad: nobody outside the canaries got 1.2.0"] = not (got_bad - canaries)
            checks["bad: canaries are a small share"] = 0 < len(canaries) < cfg.devices
            res["desired_messages_total"] = len(watch.seen)
            res["desired_bad_messages"] = watch.bad_messages
            res["fleet_summary"] = summary
        finally:
            stop_ctl.set()
            if ctl_thread is not None:
                ctl_thread.join(10)
            if fleet is not None:
                fleet.stop()
            res["replicas"] = {r.name: r.stop() for r in replicas}
            for o in (watch, worker):
                if o is not None:
                    o.stop()
            if store is not None:
                store.close()
            broker.stop()
    served = [r.get("answered", 0) for r in res["replicas"].values()]
    checks["both replicas served"] = len(served) == 2 and all(s > 0 for s in served)
    for k in ("good", "bad"):
        if k in res:
            res[k].pop("t0", None)
            res[k].pop("t1", None)
            res[k].pop("selected", None)
    return res


# --- output -----------------------------------------------------------------------------------


def table(res: dict[str, Any]) -> str:
    """Results as text: one row per round, then replicas, checks."""
    rows = [("round", "result", "wall s", "broker cpu% / peak MB", "replica a / b cpu%",
             "fleet cpu% / peak MB", "cloud cpu%", "load avg (end)")]  # fmt: skip
    for name in ("install", "good", "bad"):
        r = res.get(name)
        if not r:
            continue
        u = r["usage"]
        result = r.get("status", "done")
        if name == "bad":
            result += f" at stage {r['stage'] + 1}, {r['canaries']} canaries"
        rows.append((
            name, result, f"{r['wall_s']:.1f}",
            f"{u['broker']['cpu_pct']:.0f} / {u['broker']['peak_rss_mb']:.0f}",
            f"{u['registry-a']['cpu_pct']:.0f} / {u['registry-b']['cpu_pct']:.0f}",
            f"{sum(v['cpu_pct'] for k, v in u.items() if k.startswith('fleet')):.0f} / "
            f"{sum(v['peak_rss_mb'] for k, v in u.items() if k.startswith('fleet')):.0f}",
            f"{u['cloud']['cpu_pct']:.0f}",
            " ".join(f"{x:.1f}" for x in r.get("load_avg", [])[3:]) or "-",
        ))  # fmt: skip
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    for name, st in res.get("replicas", {}).items():
        out.append(f"{name}: answered {st.get('answered')} requests, "
                   f"{st.get('bytes_sent', 0) / 2**20:.0f} MiB, {st.get('devices_served')} "
                   f"devices, errors {st.get('errors')}")  # fmt: skip
    if "good" in res:
        out.append(f"good: desired states per device {res['good']['desired_per_device']}")
        out.append(f"good: history {[h[:2] for h in res['good']['history']]}")
    if "bad" in res:
        b = res["bad"]
        out.append(f"bad: failing gates {[g['detail'] for g in b['failing_gates']]}")
        out.append(f"bad: history {[h[2][:160] for h in b['history']]}")
        out.append(f"bad: sent 1.2.0 to {b['devices_sent_1.2.0']} devices, outside canaries: "
                   f"{b['outside_canaries_sent_1.2.0']}")  # fmt: skip
    for k, ok in res["checks"].items():
        out.append(f"{'PASS' if ok else 'FAIL'}  {k}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    d = BenchConfig()
    p.add_argument("--devices", type=int, default=d.devices)
    p.add_argument("--model-mb", type=float, default=d.model_mb)
    p.add_argument("--stage", action="append", help="default: 5%% then 100%%")
    p.add_argument("--soak", type=float, default=d.soak_s, help="seconds per stage")
    p.add_argument("--max-concurrent", type=int, default=None)
    p.add_argument("--telemetry", type=float, default=d.telemetry_s, help="seconds")
    p.add_argument("--tick", type=float, default=d.tick_s, help="controller tick, seconds")
    p.add_argument("--server-workers", type=int, default=d.server_workers)
    p.add_argument("--loops", type=int, default=d.loops, help="fleet MQTT loop threads")
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="per rollout, seconds")
    p.add_argument("--fleet-procs", type=int, default=d.fleet_procs, help="simulator processes")
    p.add_argument("--install-rate", type=float, default=d.install_rate,
                   help="deploys/s of the untimed 1.0.0 install round (0: unpaced)")  # fmt: skip
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--serve-replica", help=argparse.SUPPRESS)
    p.add_argument("--repo", help=argparse.SUPPRESS)
    p.add_argument("--broker", help=argparse.SUPPRESS)
    p.add_argument("--stats-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    if args.serve_replica:
        return serve_replica(args.serve_replica, args.repo, args.broker, args.server_workers,
                             args.stats_out)  # fmt: skip
    cfg = BenchConfig(
        devices=args.devices, model_mb=args.model_mb, stages=tuple(args.stage or d.stages),
        soak_s=args.soak, max_concurrent=args.max_concurrent, telemetry_s=args.telemetry,
        tick_s=args.tick, server_workers=args.server_workers, loops=args.loops,
        timeout_s=args.timeout, fleet_procs=args.fleet_procs,
        install_rate=args.install_rate, quiet=args.quiet,
    )  # fmt: skip
    res = run_bench(cfg)
    print(json.dumps(res, indent=2, default=str) if args.json else table(res))
    return 0 if all(v for k, v in res["checks"].items() if "120 s" not in k) else 1


if __name__ == "__main__":
    sys.exit(main())
