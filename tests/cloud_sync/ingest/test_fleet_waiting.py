"""``edgefleet fleet status`` shows what each device's update waits for (contract 1.3
``waiting``) and whose source has ended, from the stored reported state (real SQLite)."""

from __future__ import annotations

from pathlib import Path

from cloud_sync.ingest.commands import _row
from cloud_sync.ingest.store import open_store
from tests.harness.ingest_messages import T0, reported, state, telemetry

WAIT = "activation waits for maintenance window 02:00-05:00 (device local time), next opens in 3 h"


def test_fleet_status_lines_say_what_a_device_waits_for(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path / 'ingest.db'}")
    try:
        for dev in ("cam-1", "cam-2"):
            store.upsert_state(state(dev), now=T0)
        waiting = reported("cam-1", phase="waiting")
        waiting["pipelines"][0].update(waiting=WAIT, source_ended=True)
        store.upsert_reported_batch([waiting, reported("cam-2")], now=T0)
        cam1, cam2 = store.fleet()
        assert cam1["pipelines"][0]["waiting"] == WAIT and cam1["pipelines"][0]["source_ended"]
        assert cam2["pipelines"][0]["waiting"] is None and not cam2["pipelines"][0]["source_ended"]
        lines = _row(cam1)
        assert any(line.strip() == f"front      waits: {WAIT}" for line in lines), lines
        assert any(line.strip() == "front      source ended" for line in lines), lines
        assert not any("waits:" in line or "source ended" in line for line in _row(cam2))
        # a later report without waiting clears it
        store.upsert_reported(reported("cam-1"), now=T0)
        assert store.fleet()[0]["pipelines"][0]["waiting"] is None
    finally:
        store.close()


def test_fleet_shows_the_pipelines_a_1_3_agent_runs_now(tmp_path: Path) -> None:
    """A contract 1.3 agent republishes its birth state when a remote configuration removes a
    pipeline: the rows that pipeline left behind are not shown; an older agent's are."""
    store = open_store(f"sqlite:///{tmp_path / 'ingest.db'}")
    try:
        for dev, contract in (("cam-new", "1.3"), ("cam-old", "1.0")):
            store.upsert_state({**state(dev), "contract": contract}, now=T0)
            store.add_telemetry_batch([telemetry(dev)], now=T0)  # pipelines front and rear
        new, old = store.fleet()
        assert [p["name"] for p in new["pipelines"]] == ["front"]  # its state lists front only
        assert [p["name"] for p in old["pipelines"]] == ["front", "rear"]
        store.upsert_state({**state("cam-new"), "contract": "1.3",
                            "pipelines": ["front", "rear"]}, now=T0)  # fmt: skip
        assert [p["name"] for p in store.fleet()[0]["pipelines"]] == ["front", "rear"]
    finally:
        store.close()
