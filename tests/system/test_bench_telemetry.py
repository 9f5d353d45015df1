"""Smoke test of ``python -m scripts.bench_telemetry``: tiny sizes, correctness only (never
timings)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness.util import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def test_bench_telemetry_smoke(test_models: dict[str, Path]) -> None:
    cmd = [
        sys.executable, "-m", "scripts.bench_telemetry", "all", "--json",
        "--model", str(test_models["digits"] / "model.onnx"),
        # outage: 3 s at 10 messages/s, bounded variant holds 10 rows
        "--outage-s", "3", "--interval-s", "0.1", "--small-rows", "10",
        "--messages", "500", "--reps", "2",  # 2: a later rep once hung
        "--seconds", "2", "--cpu-reps", "1", "--warmup-s", "0.5",
    ]  # fmt: skip
    # ~50 s alone; minutes on a machine that other jobs load
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    out: dict[str, Any] = json.loads(p.stdout)
    assert out["machine"]["cpus"] >= 1

    full, bounded = out["outage"]["full"], out["outage"]["bounded"]
    # unbounded: everything produced (before, during and after the outage) stored once, in order
    assert full["produced"] > full["produced_before_outage"] > 0
    assert full["outbox_depth_at_outage_end"] > 0, "nothing was queued during the outage"
    assert full["dropped_counted"] == full["missing"] == 0
    assert full["stored_rows"] == full["stored_device_rows"] == full["produced"]
    assert full["duplicates_stored"] == full["unknown_stored"] == full["order_violations"] == 0
    assert full["worker_received_distinct"] == full["produced"]
    # bounded: the oldest were dropped and counted; everything within the bound arrived
    assert bounded["dropped_counted"] > 0
    assert bounded["missing"] == bounded["dropped_counted"]
    assert bounded["missing_are_one_oldest_block"]
    assert bounded["stored_rows"] == bounded["produced"] - bounded["dropped_counted"]
    assert bounded["duplicates_stored"] == bounded["order_violations"] == 0
    assert out["outage"]["timing"]["drained"]
    assert full["pass"] and bounded["pass"]

    # ingest rate: no loss on either path (the ratio itself is not asserted), in every rep
    assert len(out["rate"]["runs"]) == 2
    for run in out["rate"]["runs"]:
        assert run["raw"]["received"] == run["raw"]["sent"] == 500
        assert run["ingest"]["stored"] == run["ingest"]["sent"] == 500
        assert run["ingest"]["stored_device_rows"] == 500
        assert run["ingest"]["dead_letters"] == 0
    assert out["rate"]["no_loss"]

    # CPU: the on run ticked, the off run did not (the figures themselves are not asserted)
    runs = {r["mode"]: r for r in out["cpu"]["runs"]}
    assert runs["on"]["ticks"] > 0 and runs["off"]["ticks"] == 0
    assert runs["on"]["tick_cpu_s"] > 0
