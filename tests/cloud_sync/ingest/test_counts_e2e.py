"""A real agent counts a scripted scene (zone and line) → Mosquitto → ingest worker → SQLite or
PostgreSQL → the store's counts and `edgefleet fleet counts`; then the agent restarts, its
counters start from zero, and the fleet's increase still adds both runs up."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.config import parse_config
from agent.pipeline.scene import SPARSE_SCENE, ground_truth, write_scene_video
from agent.service import Agent
from cloud_sync.ingest.store import Store, open_store
from cloud_sync.ingest.worker import IngestWorker
from tests.harness.broker import Mosquitto
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video, pytest.mark.slow]
EDGEFLEET = str(Path(sys.executable).parent / "edgefleet")


def agent_config(tmp_path: Path, video: Path, model: Path, broker: Mosquitto) -> dict[str, Any]:
    scene = SPARSE_SCENE
    return {
        "device_id": "cam-18", "data_dir": str(tmp_path / "data"), "profile": "x86-cpu",
        "engine": {"type": "onnxruntime"},
        "pipelines": [{
            "name": "cam", "source": str(video), "pace": "none", "max_fps": 1000,
            "model": str(model),
            "zones": [{"name": "corner", "points": [list(p) for p in scene.zone],
                       "dwell_s": scene.dwell_s}],
            "lines": [{"name": "gate", "start": list(scene.line[0]),
                       "end": list(scene.line[1])}],
        }],
        "broker": {"url": broker.url},
        "telemetry": {"interval_s": 0.2},
    }  # fmt: skip


def run_agent_once(cfg: dict[str, Any], store: Store, want: dict[str, int]) -> None:
    """One run of the agent over the whole video; returns once the store's latest counts are
    the run's final counts (the device's own, from its status)."""
    agent = Agent(parse_config(cfg))
    agent.start()
    try:
        assert agent.pipelines[0].wait(300)
        status = agent.pipelines[0].status(0.0)
        [z], [ln] = status["zones"], status["lines"]
        device = {"entered": z["entered"], "exited": z["left"], "dwell": z["dwell"],
                  "crossed_in": ln["crossed_in"], "crossed_out": ln["crossed_out"]}  # fmt: skip
        assert device == want  # the device counted the scene exactly

        def stored() -> dict[str, int]:
            rows = store.latest_counts("cam-18")  # a zone row and a line row
            return {k: v for r in rows for k, v in r.items() if k in want and v is not None}

        assert wait_for(lambda: stored() == want, 30), (stored(), want)
    finally:
        agent.stop()


def test_counts_reach_the_fleet_and_survive_an_agent_restart(
    db_url: str, broker: Mosquitto, test_models: dict[str, Path], tmp_path: Path
) -> None:
    gt = ground_truth(SPARSE_SCENE)
    want = {"entered": gt.entered, "exited": gt.left, "dwell": gt.dwell,
            "crossed_in": gt.crossed["in"], "crossed_out": gt.crossed["out"]}  # fmt: skip
    assert want == {"entered": 1, "exited": 1, "dwell": 1, "crossed_in": 2, "crossed_out": 1}
    video = write_scene_video(tmp_path / "scene.mkv", SPARSE_SCENE)
    cfg = agent_config(tmp_path, video, test_models["blobdet"] / "model.onnx", broker)
    start = datetime.now(timezone.utc) - timedelta(seconds=1)
    store = open_store(db_url)
    worker = IngestWorker(broker.url, store)
    worker.start()
    try:
        assert worker.subscribed.wait(10)
        run_agent_once(cfg, store, want)
        run_agent_once(cfg, store, want)  # a restart: the device counts from zero again
        increase = {r["kind"]: r for r in store.count_increase(start, "cam-18")}
    finally:
        worker.stop()
        store.close()
    zone, line = increase["zone"], increase["line"]
    assert (zone["entered"], zone["exited"], zone["dwell"]) == (2, 2, 2)
    assert (line["crossed_in"], line["crossed_out"]) == (4, 2)
    assert zone["resets"] == 1 and line["resets"] == 1

    # as the operator sees it
    out = subprocess.run(
        [EDGEFLEET, "fleet", "counts", "--db", db_url, "--device", "cam-18", "--since", "1h"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    gate = next(ln for ln in out.splitlines() if "line gate" in ln)
    assert gate.split()[:2] == ["cam-18", "cam"] and "in 2  out 1" in gate
    assert "+4 in, +2 out in 1h (1 restart)" in gate, out
    rows = json.loads(
        subprocess.run([EDGEFLEET, "fleet", "counts", "--db", db_url, "--json"],
                       capture_output=True, text=True, timeout=60, check=True).stdout
    )  # fmt: skip
    corner = next(r for r in rows if r["region"] == "corner")
    assert (corner["label"], corner["entered"], corner["inside"]) == ("blob", 1, 0)
