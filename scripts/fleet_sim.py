"""Fleet simulator: N devices running the agent's real sync/update/telemetry code.

Against an existing broker and registry (deploy with ``edgefleet deploy`` or ``--deploy``)::

    python -m scripts.fleet_sim --devices 200 --broker mqtt://127.0.0.1:1883 --repo REG \\
        [--groups canary main] [--tag site=lab] [--bad 1.1.0 --bad-devices 5%] [--duration 60]

Self-test: its own Mosquitto, registry (two ~2 MB ONNX versions), chunk server in a child
process (``--server-workers``), the fleet; then ``deploy()`` of 1.0.0 to every device (first
install) and of 1.1.0 (upgrade; ``--bad`` devices should roll it back), timing each round until
every device is terminal, with the broker's and chunk server's CPU and memory
(``/proc/PID/stat`` and ``status``) and the chunk server's and devices' counters::

    python -m scripts.fleet_sim --self-test --devices 1000 [--json]

Only the camera and the inference are simulated (``agent/sim/engine.py``).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from agent.config import UpdateConfig
from tests.harness.sim import SimFleet, SimProfile, make_profile_fn
from tests.harness.sim.registry import make_sim_registry

log = logging.getLogger("fleet_sim")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _serve(repo_dir: str, url: str, workers: int, stop: Any, out: Any) -> None:
    """Child process: a chunk server until ``stop`` is set; its stats go to ``out``."""
    from cloud_sync.registry.serve import ChunkServer

    server = ChunkServer(Path(repo_dir), url, client_id="registry-sim", workers=workers)
    server.start()
    out.put("ready")
    stop.wait()
    stats = server.stats()
    server.stop()
    out.put({k: v for k, v in asdict(stats).items() if not k.endswith("by_device")})


@contextmanager
def chunk_server_process(repo_dir: Path, url: str, workers: int) -> Iterator[dict[str, Any]]:
    """A ``ChunkServer`` in its own process (its own GIL); yields ``{"pid", "stats"}``,
    ``stats`` filled in on exit."""
    ctx = mp.get_context("spawn")
    stop, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=_serve, args=(str(repo_dir), url, workers, stop, out), daemon=True)
    proc.start()
    info: dict[str, Any] = {"pid": proc.pid, "stats": {}}
    try:
        if out.get(timeout=30) != "ready":
            raise RuntimeError("chunk server did not start")
        yield info
    finally:
        stop.set()
        try:
            info["stats"] = out.get(timeout=30)
        except Exception as e:  # the stats are a nice-to-have; the process must still end
            info["stats"] = {"error": str(e)}
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join()
        out.close()
        out.join_thread()


def deploy_all(
    repo_dir: Path,
    url: str,
    ids: Sequence[str],
    ref: str,
    *,
    workers: int = 16,
    rate: float = 0.0,
    in_subprocess: bool = False,
) -> list[str]:
    """``deploy()`` to every device (``workers`` at a time); returns the failures in words.

    ``rate``: at most this many deploys per second (0: as fast as the workers go) — operator-side
    flow control, the only kind available without changing the registry.
    ``in_subprocess``: run the deploys in a child process, as an operator's would be. Needed
    beside a large fleet: ``deploy()`` drives its paho client with ``loop_start``, whose
    ``select.select`` fails on file descriptors above 1023, and 1,000 simulated devices push
    every new socket of this process above that (their own loops use epoll).
    """
    if in_subprocess:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            fut = pool.submit(deploy_all, repo_dir, url, ids, ref, workers=workers, rate=rate)
            return fut.result()
    from cloud_sync.deploy import deploy

    t0 = time.monotonic()

    def one(item: tuple[int, str]) -> str | None:
        i, dev = item
        if rate > 0:
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        try:
            deploy(repo_dir, url, dev, ref, pipeline="front")
            return None
        except Exception as e:  # counted and reported, the others go on
            return f"{dev}: {e}"

    with ThreadPoolExecutor(workers) as pool:
        return [f for f in pool.map(one, enumerate(ids)) if f]


# --- measuring a process ------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, float]:
    """CPU seconds (user+system) and memory (RSS, peak RSS in MiB) of ``pid`` from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)
    mem = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, val = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            mem[key] = int(val.split()[0]) / 1024
    return {"cpu_s": cpu, "rss_mb": mem.get("VmRSS", 0.0), "peak_rss_mb": mem.get("VmHWM", 0.0)}


class Usage:
    """CPU use and memory of processes over a span: ``start()``, then ``result()``."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = 0.0
        self.first: dict[str, dict[str, float]] = {}

    def start(self) -> Usage:
        self.t0 = time.monotonic()
        self.first = {k: proc_sample(p) for k, p in self.pids.items()}
        return self

    def result(self) -> dict[str, dict[str, float]]:
        dt = max(1e-6, time.monotonic() - self.t0)
        out = {}
        for k, p in self.pids.items():
            s = proc_sample(p)
            out[k] = {
                "cpu_pct": round(100 * (s["cpu_s"] - self.first[k]["cpu_s"]) / dt, 1),
                "rss_mb": round(s["rss_mb"], 1),
                "peak_rss_mb": round(s["peak_rss_mb"], 1),
            }
        return out


# --- the fleet ------------------------------------------------------------------------------


def pick(ids: Sequence[str], share: float, salt: str = "bad") -> set[str]:
    """A stable ``share`` (0..1) of ``ids``: the same devices on every run."""
    ranked = sorted(ids, key=lambda d: hashlib.sha256(f"{salt}:{d}".encode()).digest())
    return set(ranked[: round(len(ids) * share)])


def parse_pct(text: str) -> float:
    """``"5%"`` or ``"5"`` → 0.05."""
    value = float(text.rstrip("%")) / 100
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a percentage in 0..100")
    return value


def line(summary: dict[str, Any], t: float) -> str:
    """One compact status line."""
    return (
        f"[{t:6.1f}s] online {summary['online']}/{summary['devices']} "
        f"versions {summary['versions']} phases {summary['phases']}"
    )


def wait_round(
    fleet: SimFleet,
    done: Callable[[dict[str, Any]], bool],
    timeout_s: float,
    every_s: float,
    t0: float,
    quiet: bool,
) -> tuple[bool, dict[str, Any]]:
    """Poll the fleet until ``done(summary)`` or timeout; print a line every ``every_s``."""
    next_print = time.monotonic()
    while True:
        summary = fleet.summary()
        now = time.monotonic()
        if done(summary):
            return True, summary
        if now - t0 > timeout_s:
            return False, summary
        if not quiet and now >= next_print:
            print(line(summary, now - t0), file=sys.stderr, flush=True)
            next_print = now + every_s
        time.sleep(0.5)


def rollout_round(
    fleet: SimFleet, repo_dir: Path, url: str, ref: str, bad: set[str], args: argparse.Namespace,
    pids: dict[str, int],
) -> dict[str, Any]:  # fmt: skip
    """Deploy ``ref`` to every device; wait until every device is terminal for it."""
    version = ref.split("@", 1)[1]
    ids = list(fleet.devices)
    good = [d for d in ids if d not in bad]
    usage = Usage(pids).start()
    t0 = time.monotonic()
    failures = deploy_all(
        repo_dir, url, ids, ref, workers=args.deploy_workers, rate=args.deploy_rate,
        in_subprocess=True,
    )  # fmt: skip
    t_deployed = time.monotonic() - t0

    def finished(_s: dict[str, Any]) -> bool:
        return fleet.all_in("committed", version, good) and (
            not bad or fleet.all_in("rolled_back", None, bad)
        )

    ok, summary = wait_round(fleet, finished, args.timeout, args.every, t0, args.quiet)
    took = time.monotonic() - t0
    return {
        "ref": ref,
        "devices": len(ids),
        "bad_devices": len(bad),
        "all_done": ok,
        "deploy_s": round(t_deployed, 2),
        "deploy_failures": len(failures),
        "deploy_failure_examples": failures[:3],
        "to_all_terminal_s": round(took, 2),
        "usage": usage.result(),
        "summary": summary,
    }


def self_test(args: argparse.Namespace) -> dict[str, Any]:
    """Broker, registry, chunk server and fleet on this machine; two rollout rounds."""
    from cloud_sync.localbroker import MosquittoBroker

    results: dict[str, Any] = {
        "devices": args.devices,
        "model_mb": args.model_mb,
        "deploy_rate": args.deploy_rate,
        "server_workers": args.server_workers,
    }
    with tempfile.TemporaryDirectory(prefix="edgefleet-fleet-sim-") as tmp:
        work = Path(tmp)
        broker = MosquittoBroker(work)
        broker.start()
        try:
            repo_dir = work / "registry"
            t = time.monotonic()
            size = int(args.model_mb * 2**20)
            make_sim_registry(repo_dir, work / "src", ["1.0.0", "1.1.0"], size)
            results["publish_s"] = round(time.monotonic() - t, 2)
            with chunk_server_process(repo_dir, broker.url, args.server_workers) as server:
                assert broker.proc is not None
                pids = {
                    "broker": broker.proc.pid,
                    "chunk_server": server["pid"],
                    "fleet": os.getpid(),
                }
                results["rounds"] = run_fleet(args, broker.url, repo_dir, pids)
            results["chunk_server"] = server["stats"]
        finally:
            broker.stop()
    return results


def run_fleet(
    args: argparse.Namespace, url: str, repo_dir: Path, pids: dict[str, int]
) -> list[dict[str, Any]]:
    """Start the fleet, wait until online, then the rollout rounds."""
    ids = [f"sim-{i:04d}" for i in range(args.devices)]
    bad = pick(ids, args.bad_devices) if args.bad else set()
    fleet = build_fleet(args, url, repo_dir, bad)
    rounds = []
    try:
        usage = Usage(pids).start()
        t0 = time.monotonic()
        fleet.start()
        ok, summary = wait_round(
            fleet, lambda s: s["online"] == s["devices"], args.timeout, args.every, t0, args.quiet
        )
        took = round(time.monotonic() - t0, 2)
        rounds.append(
            {
                "ref": "(connect)",
                "all_done": ok,
                "to_all_terminal_s": took,
                "usage": usage.result(),
                "summary": summary,
            }
        )
        rounds.append(rollout_round(fleet, repo_dir, url, "sim@1.0.0", set(), args, pids))
        rounds.append(rollout_round(fleet, repo_dir, url, "sim@1.1.0", bad, args, pids))
    finally:
        fleet.stop()
    return rounds


def build_fleet(args: argparse.Namespace, url: str, repo_dir: Path, bad: set[str]) -> SimFleet:
    base = SimProfile(fps=args.fps, p50_ms=args.p50, p95_ms=args.p95)
    groups = args.groups or []
    tags = dict(t.split("=", 1) for t in args.tag)
    update = UpdateConfig(
        health_window_s=args.health_window,
        health_min_frames=args.health_min_frames,
        retry_s=args.retry_s,
    )
    return SimFleet(
        url,
        repo_dir / "root.json",
        args.devices,
        groups_fn=lambda d: [groups[int(d.rsplit("-", 1)[1]) % len(groups)]] if groups else [],
        tags=tags,
        profile_fn=make_profile_fn(base, args.bad, bad, args.bad_latency, args.bad_error_rate),
        update=update,
        telemetry_interval_s=args.telemetry_interval,
        loops=args.loops,
        connect_rate=args.connect_rate,
    )


def run_existing(args: argparse.Namespace) -> dict[str, Any]:
    """A fleet against an existing broker and registry, with a live summary."""
    repo_dir = Path(args.repo)
    ids = [f"sim-{i:04d}" for i in range(args.devices)]
    bad = pick(ids, args.bad_devices) if args.bad else set()
    fleet = build_fleet(args, args.broker, repo_dir, bad)
    t0 = time.monotonic()
    fleet.start()
    try:
        if args.deploy:
            wait_round(fleet, lambda s: s["online"] == s["devices"], 60, args.every, t0, True)
            failures = deploy_all(
                repo_dir, args.broker, ids, args.deploy, rate=args.deploy_rate, in_subprocess=True
            )
            print(f"deployed {args.deploy}: {len(failures)} failures", file=sys.stderr)
        stop = threading.Event()
        while not stop.wait(args.every):
            summary = fleet.summary()
            print(line(summary, time.monotonic() - t0), file=sys.stderr, flush=True)
            if args.duration and time.monotonic() - t0 >= args.duration:
                break
        return {"summary": fleet.summary(), "bad_devices": sorted(bad)}
    finally:
        fleet.stop()


def table(results: dict[str, Any]) -> str:
    """The self-test's results as a text table."""
    rows = [("round", "done", "time s", "broker cpu% / RSS (peak) MB", "server ...", "fleet ...",
             "waiting entries", "refetched MB")]  # fmt: skip
    for r in results["rounds"]:
        u = r["usage"]
        s = r["summary"]
        rows.append(
            (
                r["ref"],
                "yes" if r["all_done"] else "NO",
                f"{r['to_all_terminal_s']:.1f}",
                *(
                    f"{u[k]['cpu_pct']:.0f} / {u[k]['peak_rss_mb']:.0f}"
                    for k in ("broker", "chunk_server", "fleet")
                ),
                str(s["phase_entries"].get("waiting", 0)),
                f"{s['chunks'].get('bytes_refetched', 0) / 2**20:.1f}",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    out.append(f"chunk server: {results.get('chunk_server')}")
    for r in results["rounds"]:
        out.append(
            f"{r['ref']}: phases {r['summary']['phases']} versions {r['summary']['versions']}"
        )
    return "\n".join(out)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--devices", type=int, default=50)
    p.add_argument("--broker", help="mqtt://host:port (not with --self-test)")
    p.add_argument("--repo", help="registry dir (its root.json is the devices' trust root)")
    p.add_argument("--groups", nargs="*", help="groups, assigned to devices round-robin")
    p.add_argument("--tag", action="append", default=[], help="k=v on every device")
    p.add_argument(
        "--bad", metavar="VERSION", help="a model version that misbehaves on some devices"
    )
    p.add_argument("--bad-devices", type=parse_pct, default=0.05, help="share, e.g. 5%%")
    p.add_argument("--bad-latency", type=float, default=3.0, help="latency factor when bad")
    p.add_argument("--bad-error-rate", type=float, default=0.05, help="error rate when bad")
    p.add_argument("--duration", type=float, default=0, help="seconds to run (0: until Ctrl-C)")
    p.add_argument("--deploy", metavar="NAME@VERSION", help="deploy this to every device")
    p.add_argument("--self-test", action="store_true")
    p.add_argument("--model-mb", type=float, default=2.0)
    p.add_argument("--server-workers", type=int, default=4)
    p.add_argument("--deploy-workers", type=int, default=16)
    p.add_argument("--deploy-rate", type=float, default=0.0, help="deploys/s (0: unpaced)")
    p.add_argument("--loops", type=int, default=4, help="MQTT loop threads")
    p.add_argument("--connect-rate", type=float, default=200.0, help="connects per second")
    p.add_argument("--fps", type=float, default=5.0)
    p.add_argument("--p50", type=float, default=20.0)
    p.add_argument("--p95", type=float, default=30.0)
    p.add_argument("--health-window", type=float, default=5.0)
    p.add_argument("--health-min-frames", type=int, default=10)
    p.add_argument("--retry-s", type=float, default=10.0)
    p.add_argument("--telemetry-interval", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=900.0, help="per round")
    p.add_argument("--every", type=float, default=5.0, help="seconds between status lines")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 PID: every thread's stack on stderr
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so the broker and server are stopped
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    if args.self_test:
        results = self_test(args)
        print(json.dumps(results, indent=2) if args.json else table(results))
        return 0 if all(r["all_done"] for r in results["rounds"]) else 1
    if not args.broker or not args.repo:
        p.error("--broker and --repo are needed (or --self-test)")
    print(json.dumps(run_existing(args), indent=2 if args.json else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
