"""The simulated fleet (``SimFleet``) in child processes, driven by JSON-line commands.

A benchmark's own process cannot hold a thousand devices' MQTT sockets (they would push its
file descriptors past ``select``'s 1023), and one process has one GIL where devices would have
their own CPU: ``ShardedSimFleet`` splits the fleet over ``procs`` children, each run as
``python -m tests.harness.sim.shards CONFIG_JSON`` and answering ``summary``, ``all_in``,
``active`` and ``stop`` on its stdin. The config is a JSON object: ``devices``, ``prefix``,
``url``, ``repo``, ``dir``, ``fps``, ``health_window_s``, ``health_min_frames``, ``retry_s``,
``telemetry_s``, ``loops``, ``connect_rate``, and ``bad_version``, ``bad_latency``,
``bad_error_rate`` (what every device shows while it runs ``bad_version``).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from tests.harness.util import ROOT, reap

log = logging.getLogger(__name__)


def shard_child(cfg_json: str) -> int:
    """Child: one shard of the fleet; answers JSON-line commands on stdin until ``stop``."""
    from agent.config import UpdateConfig
    from tests.harness.sim import SimFleet, SimProfile, make_profile_fn

    c = json.loads(cfg_json)
    ids = [f"{c['prefix']}-{i:04d}" for i in range(c["devices"])]
    base = SimProfile(fps=c["fps"], p50_ms=20.0, p95_ms=30.0)
    fleet = SimFleet(
        c["url"], Path(c["repo"]) / "root.json", c["devices"], base_dir=Path(c["dir"]),
        prefix=c["prefix"],
        profile_fn=make_profile_fn(
            base, c["bad_version"], set(ids), c["bad_latency"], c["bad_error_rate"]
        ),
        update=UpdateConfig(
            health_window_s=c["health_window_s"], health_min_frames=c["health_min_frames"],
            retry_s=c["retry_s"],
        ),
        telemetry_interval_s=c["telemetry_s"], loops=c["loops"], connect_rate=c["connect_rate"],
    )  # fmt: skip
    fleet.start()
    out = sys.stdout
    try:
        for raw in sys.stdin:
            cmd = json.loads(raw)
            op = cmd["op"]
            if op == "stop":
                break
            answer: Any
            if op == "summary":
                answer = fleet.summary()
            elif op == "all_in":
                answer = fleet.all_in(cmd["phase"], cmd.get("version"), cmd.get("ids"))
            elif op == "active":  # device → (idle, active versions of its pipelines)
                answer = {
                    s["device_id"]: [s["idle"], [p["active"] for p in s["pipelines"]]]
                    for s in fleet.status()
                }
            else:
                answer = {"error": f"unknown op {op!r}"}
            out.write(json.dumps(answer) + "\n")
            out.flush()
    finally:
        fleet.stop()
    out.write(json.dumps("stopped") + "\n")
    out.flush()
    return 0


class SimShardProcess:
    """The parent's handle on one ``shard_child``: one command at a time."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.harness.sim.shards", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        )  # fmt: skip
        self._lock = threading.Lock()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ask(self, op: str, **kw: Any) -> Any:
        """Send one command, return its answer.

        Raises:
            RuntimeError: the child has gone.
        """
        stdin: IO[str] | None = self.proc.stdin
        stdout: IO[str] | None = self.proc.stdout
        if stdin is None or stdout is None:
            raise RuntimeError("fleet child has no pipes")
        with self._lock:
            stdin.write(json.dumps({"op": op, **kw}) + "\n")
            stdin.flush()
            line = stdout.readline()
        if not line:
            raise RuntimeError(f"fleet child exited (rc={self.proc.poll()}) during {op!r}")
        return json.loads(line)

    def stop(self) -> None:
        """Ask the child to stop its devices; kill it if it does not end."""
        if self.proc.poll() is None:
            try:
                self.ask("stop")
            except (RuntimeError, OSError, ValueError) as e:
                log.warning("fleet child did not stop cleanly: %s", e)
            reap(self.proc, 60)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


def _merge(a: Any, b: Any) -> Any:
    """Summaries of two shards: numbers added, dicts merged key by key."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a.get(k), b.get(k)) for k in {*a, *b}}
    if a is None:
        return b
    if b is None:
        return a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    return a


class ShardedSimFleet:
    """``devices`` simulated devices split over ``procs`` child processes (device ids
    ``sim-NNNN`` with one, ``simK-NNNN`` with several); ``cfg`` is every shard's config but
    ``devices`` and ``prefix`` (see the module's docstring)."""

    def __init__(self, cfg: dict[str, Any], devices: int, procs: int = 1) -> None:
        k = max(1, procs)
        sizes = [devices // k + (1 if i < devices % k else 0) for i in range(k)]
        prefixes = ["sim"] if k == 1 else [f"sim{i}" for i in range(k)]
        self.ids = [f"{p}-{i:04d}" for p, n in zip(prefixes, sizes, strict=True) for i in range(n)]
        self.shards = [SimShardProcess({**cfg, "devices": n, "prefix": p})
                       for p, n in zip(prefixes, sizes, strict=True)]  # fmt: skip

    def pids(self) -> dict[str, int]:
        """``fleet`` (first shard), ``fleet-1`` … for the others."""
        return {("fleet" if i == 0 else f"fleet-{i}"): s.pid for i, s in enumerate(self.shards)}

    def ask(self, op: str, **kw: Any) -> Any:
        """The command on every shard, answers merged (``all_in``: all of them)."""
        answers = [s.ask(op, **kw) for s in self.shards]
        if op == "all_in":
            return all(answers)
        out = answers[0]
        for a in answers[1:]:
            out = _merge(out, a)
        return out

    def stop(self) -> None:
        """Stop every shard."""
        for s in self.shards:
            s.stop()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m tests.harness.sim.shards CONFIG_JSON (see the docstring)")
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    sys.exit(shard_child(sys.argv[1]))
