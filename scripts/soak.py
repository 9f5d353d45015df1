"""Memory soak: a real agent process on a stream that drops every few minutes; RSS growth.

Mosquitto, a TUF registry with its MQTT chunk server, an ffmpeg process streaming the digit
video as MPEG-TS over UDP on loopback, and ``edgefleet-agent run`` in a subprocess with
telemetry and inference events on. During the run:

* every ``--drop-every`` seconds the stream sender is stopped for ``--drop-for`` seconds (the
  agent's reader sees a dead stream, backs off, reconnects);
* every ``--update-every`` seconds a new model version is published and deployed (download,
  verify, build, trial, hot swap, commit, garbage collection of the old version).

The agent's RSS (``/proc/PID/status`` VmRSS) is sampled every ``--sample-every`` seconds.
Growth compares the median RSS of the last ``--window`` seconds with the median over the
``--window`` seconds after the warm-up (``--warmup``: ONNX Runtime's arenas, the engine cache
and Python's own caches fill during the first minutes), so one sample's noise cannot decide it.

    python -m scripts.soak --duration 3600 [--json] [--workdir DIR]

Exit status 1 when the growth is >= ``--max-growth`` percent (default 5) or the agent died,
stopped inferring, or an update did not commit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.harness.agent_process import AgentProcess
from tests.harness.fleet import close_local_fleet, local_fleet
from tests.harness.util import UdpStream, free_port, script_workdir, wait_for


@dataclass
class Sample:
    t_s: float
    rss_kb: int
    frames_inferred: int
    reconnects: int
    source_state: str
    model: str | None


@dataclass
class SoakResult:
    duration_s: float
    samples: list[Sample] = field(default_factory=list)
    drops: int = 0
    updates: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS), 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def growth(samples: list[tuple[float, int]], warmup_s: float, window_s: float) -> dict[str, Any]:
    """RSS growth in percent: median of the last ``window_s`` against the median of the
    ``window_s`` after ``warmup_s``. ``samples`` are ``(t_s, rss_kb)`` in time order."""
    if not samples:
        raise ValueError("no samples")
    end = samples[-1][0]
    base = [r for t, r in samples if warmup_s <= t < warmup_s + window_s]
    last = [r for t, r in samples if t >= end - window_s]
    if not base or not last or end - window_s < warmup_s + window_s:
        raise ValueError(
            f"run too short: {end:.0f} s of samples for a {warmup_s:.0f} s warm-up and two"
            f" {window_s:.0f} s windows"
        )
    b, e = statistics.median(base), statistics.median(last)
    return {
        "baseline_kb": int(b),
        "final_kb": int(e),
        "growth_pct": round(100.0 * (e - b) / b, 2),
        "min_kb": min(r for _, r in samples),
        "max_kb": max(r for _, r in samples),
    }


def _pipeline(agent: AgentProcess) -> dict[str, Any]:
    pipes = agent.status().get("pipelines") or [{}]
    return pipes[0]  # type: ignore[no-any-return]


def write_config(agent: AgentProcess, stream: UdpStream) -> None:
    """The crash suite's agent config with the UDP stream as source, events and telemetry."""
    agent.write_config(
        f"{stream.url}?timeout=2000000",
        pipeline='open_timeout_s = 2.0\n[pipelines.events]\npolicy = "rate"\nmax_per_s = 2.0\n',
        sections="[telemetry]\ninterval_s = 5.0\n",
    )


def run_soak(
    duration_s: float,
    workdir: Path,
    *,
    drop_every_s: float = 180.0,
    drop_for_s: float = 20.0,
    update_every_s: float = 600.0,
    sample_every_s: float = 10.0,
    health_window_s: float = 3.0,
    log: Any = None,
) -> SoakResult:
    say = log or (lambda msg: None)
    fleet = local_fleet(workdir)
    stream = UdpStream(fleet.video, free_port(socket.SOCK_DGRAM))
    agent = AgentProcess(fleet, health_window_s=health_window_s)
    write_config(agent, stream)
    result = SoakResult(duration_s=duration_s)
    versions = 0
    try:
        stream.start()
        fleet.publish("digits", "1.0.0")
        fleet.deploy("digits@1.0.0")
        agent.start()
        assert agent.proc is not None
        if not wait_for(lambda: agent.running() == "digits@1.0.0", 120, interval=0.5):
            raise RuntimeError(f"the agent never ran digits@1.0.0: {agent.status()}")
        t0 = time.monotonic()
        next_drop = drop_every_s
        next_update = update_every_s
        next_sample = 0.0
        while (now := time.monotonic() - t0) < duration_s:
            if agent.proc.poll() is not None:
                result.problems.append(f"agent exited with {agent.proc.returncode} at {now:.0f} s")
                break
            if now >= next_sample:
                p = _pipeline(agent)
                s = Sample(
                    t_s=round(now, 1),
                    rss_kb=rss_kb(agent.proc.pid),
                    frames_inferred=int(p.get("frames_inferred", 0)),
                    reconnects=int(p.get("reconnects", 0)),
                    source_state=str(p.get("source_state")),
                    model=p.get("model"),
                )
                result.samples.append(s)
                say(
                    f"{now:7.0f} s  rss {s.rss_kb / 1024:6.1f} MiB  frames {s.frames_inferred}"
                    f"  reconnects {s.reconnects}  {s.source_state}  {s.model}"
                )
                next_sample += sample_every_s
            if drop_every_s > 0 and now >= next_drop:
                stream.stop()
                result.drops += 1
                say(f"{now:7.0f} s  stream dropped for {drop_for_s:.0f} s")
                time.sleep(drop_for_s)
                stream.start()
                next_drop += drop_every_s
                continue
            if update_every_s > 0 and now >= next_update:
                versions += 1
                version = f"1.{versions}.0"
                fleet.publish("digits", version)
                fleet.deploy(f"digits@{version}")
                ok = wait_for(lambda v=version: agent.running() == f"digits@{v}", 120, 0.5)
                result.updates.append({"version": version, "at_s": round(now, 1), "committed": ok})
                if not ok:
                    result.problems.append(f"update to {version} did not take: {agent.running()}")
                say(f"{now:7.0f} s  update to {version}: {'ok' if ok else 'FAILED'}")
                next_update += update_every_s
                continue
            time.sleep(min(1.0, max(0.0, next_sample - (time.monotonic() - t0))))
        frames = [s.frames_inferred for s in result.samples]
        if len(frames) >= 2 and frames[-1] <= frames[len(frames) // 2]:
            result.problems.append("no frames inferred in the second half of the run")
    finally:
        agent.stop()
        stream.stop()
        close_local_fleet(fleet)
    return result


def summarize(
    result: SoakResult, warmup_s: float, window_s: float, max_growth: float
) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "duration_s": result.duration_s,
        "drops": result.drops,
        "updates": len(result.updates),
        "updates_committed": sum(1 for u in result.updates if u["committed"]),
        "reconnects": result.samples[-1].reconnects if result.samples else 0,
        "frames_inferred": result.samples[-1].frames_inferred if result.samples else 0,
        "problems": list(result.problems),
    }
    try:
        summary["rss"] = growth([(s.t_s, s.rss_kb) for s in result.samples], warmup_s, window_s)
        if summary["rss"]["growth_pct"] >= max_growth:
            summary["problems"].append(
                f"RSS grew {summary['rss']['growth_pct']} % (limit {max_growth} %)"
            )
    except ValueError as e:
        summary["problems"].append(str(e))
    if result.drops and summary["reconnects"] < 1:
        summary["problems"].append(f"{result.drops} drops but no reconnect counted")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--duration", type=float, default=3600.0, help="seconds (default 3600)")
    ap.add_argument("--drop-every", type=float, default=180.0, help="seconds between drops")
    ap.add_argument("--drop-for", type=float, default=20.0, help="seconds each drop lasts")
    ap.add_argument(
        "--update-every", type=float, default=600.0, help="seconds between model updates (0: none)"
    )
    ap.add_argument("--sample-every", type=float, default=10.0, help="RSS sampling period")
    ap.add_argument("--warmup", type=float, default=300.0, help="seconds before the baseline")
    ap.add_argument("--window", type=float, default=300.0, help="baseline/final window, s")
    ap.add_argument("--max-growth", type=float, default=5.0, help="percent (default 5)")
    ap.add_argument("--workdir", type=Path, help="keep registry, data dir and logs here")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    workdir = script_workdir(args.workdir, "soak-")
    result = run_soak(
        args.duration,
        workdir,
        drop_every_s=args.drop_every,
        drop_for_s=args.drop_for,
        update_every_s=args.update_every,
        sample_every_s=args.sample_every,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    summary = summarize(result, args.warmup, args.window, args.max_growth)
    summary["workdir"] = str(workdir)
    (workdir / "soak.json").write_text(
        json.dumps(
            {
                **summary,
                "samples": [asdict(s) for s in result.samples],
                "update_log": result.updates,
            },
            indent=2,
        )
    )
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        rss = summary.get("rss", {})
        print(
            f"{summary['duration_s']:.0f} s, {summary['drops']} drops, {summary['reconnects']}"
            f" reconnects, {summary['updates_committed']}/{summary['updates']} updates;"
            f" RSS {rss.get('baseline_kb', 0) / 1024:.1f} -> {rss.get('final_kb', 0) / 1024:.1f}"
            f" MiB ({rss.get('growth_pct')} %)"
        )
        for p in summary["problems"]:
            print(f"  PROBLEM: {p}")
    if args.workdir is None and not summary["problems"]:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
