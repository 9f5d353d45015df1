"""Crash consistency: kill -9 a real agent at random moments of model updates, check recovery.

A real TUF registry with its MQTT chunk server, a Mosquitto broker and ``edgefleet-agent run``
in a subprocess (as ``tests/agent/update/test_delivery_crash.py`` starts it). Each round
publishes and
deploys a new version, SIGKILLs the agent at a moment drawn uniformly over the measured update
duration (so kills land in fetching, verified, building, trial, active and after commit:
each version carries ``--model-mb`` of padding so its download lasts, and the test-only hooks
``EDGEFLEET_TEST_BUILD_SLEEP_S``/``EDGEFLEET_TEST_TRIAL_SLEEP_S`` stretch build and trial),
records the phase it was in (its last reported state, and ``status.json``), restarts it and
checks, once the restarted agent settled:

* it runs a model, and that model is the committed one of ``models/state.json``; the attempt
  for the round's version ended ``committed``, ``rolled_back`` or ``rejected``;
* ``state.json`` parses (``UpdateState``);
* every object in the model store hashes to its name, every version record parses and names
  existing objects, every materialized file matches its object;
* no ``.tmp``/``.part`` file (nor python-tuf's ``tmpXXXXXXXX``) older than a few seconds
  anywhere in the data dir outside the resume dir ``tuf/partial`` (the running agent's own
  atomic writes live milliseconds).

    python -m scripts.crash_suite --kills 50 [--json] [--seed N] [--workdir DIR]

Exit status 1 when any round broke an invariant.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.common.fsutil import TUF_TEMP
from agent.update.machine import UpdateState
from tests.harness.agent_process import AgentProcess
from tests.harness.fleet import Fleet, close_local_fleet, local_fleet
from tests.harness.util import script_workdir, wait_for

TERMINAL = ("committed", "rolled_back", "rejected")
STALE_TMP_S = 5.0


@dataclass
class Round:
    """One kill and what the restarted agent looked like."""

    index: int
    version: str
    delay_s: float
    phase: str  # from the last reported state for this version ("queued": none yet)
    status_phase: str | None  # from status.json at kill time
    outcome: str | None = None
    running: str | None = None
    recovery_s: float = 0.0
    problems: list[str] = field(default_factory=list)


def publish_padded(fleet: Fleet, version: str, model_mb: int) -> None:
    """Publish the digits model grown by ``model_mb`` MiB of initializer (unused by the graph),
    so the download lasts long enough for kills to land in it; each version's bytes differ,
    so each has its own engine to build."""
    import onnx
    from onnx import numpy_helper

    from cloud_sync.registry.publish import publish

    d = fleet.tmp / "src" / f"digits-{version}"
    shutil.copytree(fleet.models["digits"], d)
    m = onnx.load(str(d / "model.onnx"))
    m.doc_string = f"digits {version}"
    if model_mb:
        pad = np.random.default_rng(len(version)).standard_normal(model_mb << 18)
        m.graph.initializer.append(numpy_helper.from_array(pad.astype(np.float32), "padding"))
    onnx.save(m, str(d / "model.onnx"))
    publish(fleet.repo, d / "model.onnx", name="digits", version=version)


def last_for(fleet: Fleet, version: str) -> str | None:
    """Phase of the newest reported state whose attempt targets ``version``."""
    for r in reversed(fleet.reported):
        if r.pipelines and r.pipelines[0].target_version == version:
            return str(r.pipelines[0].phase.value)
    return None


def status_phase(agent: AgentProcess, version: str) -> str | None:
    rep = agent.status().get("reported") or {}
    pipes = rep.get("pipelines") or [{}]
    if pipes[0].get("target_version") != version:
        return None
    return pipes[0].get("phase")  # type: ignore[no-any-return]


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_data_dir(data: Path, running: str | None) -> list[str]:
    """The invariants over the data dir of a settled agent; one line per problem."""
    problems: list[str] = []
    models = data / "models"
    try:
        state = UpdateState.model_validate_json((models / "state.json").read_bytes())
    except (OSError, ValueError) as e:
        return [f"state.json unreadable: {e}"]
    slot = state.pipelines.get("front")
    committed = (
        f"{slot.committed.model}@{slot.committed.version}" if slot and slot.committed else None
    )
    if running is None:
        problems.append("no model running")
    elif running != committed:
        problems.append(f"running {running}, state.json says committed {committed}")
    objects = models / "objects"
    for obj in sorted(objects.iterdir()) if objects.is_dir() else []:
        try:
            actual = _sha(obj)
        except FileNotFoundError:  # removed by the agent's gc meanwhile
            continue
        if actual != obj.name:
            problems.append(f"object {obj.name[:12]}… hashes to {actual[:12]}…")
    for rec in sorted((models / "versions").glob("*/*.json")):
        try:
            files: dict[str, str] = json.loads(rec.read_text())["files"]
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"version record {rec} damaged: {e}")
            continue
        mat = rec.with_suffix("")
        for fname, sha in files.items():
            if not (objects / sha).is_file():
                problems.append(f"{rec.name}: object of {fname} missing")
            if mat.is_dir() and (m := mat / fname).is_file() and _sha(m) != sha:
                problems.append(f"{mat}/{fname} does not hash to its object")
    partial = data / "tuf" / "partial"
    now = time.time()
    for p in data.rglob("*"):
        temp = p.name.endswith((".tmp", ".part")) or TUF_TEMP.match(p.name)
        if partial in p.parents or not temp:
            continue
        try:
            age = now - p.stat().st_mtime
        except FileNotFoundError:
            continue
        if age > STALE_TMP_S:
            problems.append(f"left-over temporary {p.relative_to(data)} ({age:.0f} s old)")
    return problems


def run_suite(
    kills: int,
    workdir: Path,
    *,
    seed: int = 0,
    build_sleep_s: float = 1.5,
    trial_sleep_s: float = 1.0,
    model_mb: int = 16,
    health_window_s: float = 1.5,
    settle_timeout_s: float = 120.0,
    retry_s: float = 10.0,
    log: Any = None,
) -> dict[str, Any]:
    """Run ``kills`` kill/restart rounds; return the summary (see ``main``)."""
    rng = random.Random(seed)
    say = log or (lambda msg: None)
    fleet = local_fleet(workdir)
    env = {
        "EDGEFLEET_TEST_BUILD_SLEEP_S": str(build_sleep_s),
        "EDGEFLEET_TEST_TRIAL_SLEEP_S": str(trial_sleep_s),
    }
    rounds: list[Round] = []
    agent = AgentProcess(fleet, health_window_s=health_window_s, retry_s=retry_s)
    t_start = time.monotonic()
    try:
        publish_padded(fleet, "1.0.0", model_mb)
        agent.start(**env)
        # calibration: the second of two undisturbed updates (the first includes start-up)
        for version in ("1.0.0", "1.0.1"):
            if version != "1.0.0":
                publish_padded(fleet, version, model_mb)
            t0 = time.monotonic()
            fleet.deploy(f"digits@{version}")
            if not wait_for(lambda v=version: last_for(fleet, v) == "committed", settle_timeout_s):
                raise RuntimeError(
                    f"update to {version} did not commit: {last_for(fleet, version)}"
                )
            update_s = time.monotonic() - t0
        say(f"calibration: one update takes {update_s:.1f} s")
        for i in range(kills):
            version = f"1.{i + 1}.0"
            publish_padded(fleet, version, model_mb)
            delay = rng.uniform(0.0, update_s * 1.15)
            fleet.deploy(f"digits@{version}")
            time.sleep(delay)
            rnd = Round(
                index=i,
                version=version,
                delay_s=round(delay, 2),
                phase=last_for(fleet, version) or "queued",
                status_phase=status_phase(agent, version),
            )
            agent.kill9()
            # the dead agent's status.json would answer for the new one until it writes its own
            (agent.data / "status.json").unlink(missing_ok=True)
            agent = AgentProcess(fleet, health_window_s=health_window_s, retry_s=retry_s)
            t_restart = time.monotonic()
            agent.start(**env)
            settled = wait_for(
                lambda v=version, a=agent: (
                    last_for(fleet, v) in TERMINAL
                    and a.running() is not None
                    and status_phase(a, v) in TERMINAL
                ),
                settle_timeout_s,
                interval=0.2,
            )
            rnd.recovery_s = round(time.monotonic() - t_restart, 2)
            rnd.outcome = last_for(fleet, version)
            rnd.running = agent.running()
            if not settled:
                rnd.problems.append(
                    f"not settled after {settle_timeout_s:.0f} s: phase {rnd.outcome},"
                    f" running {rnd.running}"
                )
            rnd.problems += check_data_dir(agent.data, rnd.running)
            rounds.append(rnd)
            say(
                f"kill {i + 1}/{kills} at {delay:.1f} s in {rnd.phase}"
                f" (status.json: {rnd.status_phase}) -> {rnd.outcome}, running {rnd.running},"
                f" recovered in {rnd.recovery_s:.1f} s"
                + (f"; PROBLEMS: {rnd.problems}" if rnd.problems else "")
            )
    finally:
        agent.stop()
        close_local_fleet(fleet)
    failures = [r for r in rounds if r.problems]
    return {
        "kills": len(rounds),
        "failures": len(failures),
        "update_s": round(update_s, 2),
        "phases": dict(Counter(r.phase for r in rounds)),
        "status_phases": dict(Counter(str(r.status_phase) for r in rounds)),
        "outcomes": dict(Counter(str(r.outcome) for r in rounds)),
        "recovery_s_max": max((r.recovery_s for r in rounds), default=0.0),
        "wall_s": round(time.monotonic() - t_start, 1),
        "seed": seed,
        "failed_rounds": [asdict(r) for r in failures],
        "rounds": [asdict(r) for r in rounds],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--kills", type=int, default=50, help="kill/restart rounds (default 50)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    ap.add_argument("--build-sleep", type=float, default=1.5, help="extra seconds per build")
    ap.add_argument("--trial-sleep", type=float, default=1.0, help="extra seconds per trial")
    ap.add_argument("--model-mb", type=int, default=16, help="MiB of padding per model version")
    ap.add_argument("--health-window", type=float, default=1.5, help="health window, seconds")
    ap.add_argument("--workdir", type=Path, help="keep registry, data dir and logs here")
    ap.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time())
    workdir = script_workdir(args.workdir, "crash-suite-")
    summary = run_suite(
        args.kills,
        workdir,
        seed=seed,
        build_sleep_s=args.build_sleep,
        trial_sleep_s=args.trial_sleep,
        model_mb=args.model_mb,
        health_window_s=args.health_window,
        log=lambda msg: print(msg, file=sys.stderr, flush=True),
    )
    summary["workdir"] = str(workdir)
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=2))
    else:
        print(
            f"{summary['kills']} kills, {summary['failures']} failures,"
            f" phases {summary['phases']}, outcomes {summary['outcomes']}"
        )
        for r in summary["failed_rounds"]:
            print(f"  round {r['index']} ({r['version']}, {r['phase']}): {r['problems']}")
    if args.workdir is None and not summary["failures"]:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
