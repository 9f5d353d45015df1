"""Every Prometheus endpoint passes ``promtool check metrics`` (Debian's ``prometheus`` package;
scripts/test installs it, and the test fails rather than skips when it is missing)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import parse_config
from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.pipeline.analytics import pipeline_options
from agent.pipeline.model import RunnableModel, card_for_local_model
from agent.pipeline.runner import Pipeline
from agent.pipeline.sources import parse_source
from agent.protocol.schema import EXAMPLES
from agent.telemetry.prometheus import serve_device_metrics
from agent.telemetry.reporter import TelemetrySnapshot
from tests.harness.util import free_port, promtool, wait_for


def test_promtool_catches_a_gauge_with_quantiles() -> None:
    """The check itself works: the device endpoint's old latency gauge fails it."""
    bad = (
        b"# HELP edgefleet_pipeline_latency_seconds Per-stage latency\n"
        b"# TYPE edgefleet_pipeline_latency_seconds gauge\n"
        b'edgefleet_pipeline_latency_seconds{pipeline="p",stage="infer",quantile="0.5"} 0.01\n'
    )
    assert 'non-summary metrics should not have "quantile" label' in promtool(bad)


@pytest.mark.video
def test_device_endpoint_passes_promtool(
    tmp_path: Path, synthetic_video: Path, test_models: dict[str, Path]
) -> None:
    """The device endpoint over HTTP, for a real pipeline with tracking, a zone, a line and
    rate control on a real video: every family it can expose has samples."""
    cfg = parse_config({"device_id": "prom-02", "pipelines": [{
        "name": "front", "source": str(synthetic_video), "model": "m.onnx", "loop": True,
        "max_fps": 20, "motion": {"max_skip_s": 1.0},
        "zones": [{"name": "left-half", "coords": "normalized", "classes": ["blob"],
                   "points": [[0, 0], [0.5, 0], [0.5, 1], [0, 1]], "dwell_s": 1.0}],
        "lines": [{"name": "middle", "coords": "normalized", "start": [0, 0.5], "end": [1, 0.5]}],
    }]}).pipelines[0]  # fmt: skip
    path = test_models["blobdet"] / "model.onnx"
    backend = OnnxRuntimeBackend(path)
    model = RunnableModel(card_for_local_model(path, backend), backend)
    pipe = Pipeline("front", parse_source(cfg.source), model, loop=True,
                    **pipeline_options(cfg))  # fmt: skip
    snap = TelemetrySnapshot("prom-02", [pipe], None, interval_s=10.0, data_dir=tmp_path,
                             reader="prometheus")  # fmt: skip
    port = free_port()
    server = serve_device_metrics(snap, port, "127.0.0.1")
    pipe.start()
    try:
        assert wait_for(lambda: pipe.status(0.0)["frames_inferred"] >= 20, 60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            text = r.read()
    finally:
        pipe.stop()
        server.shutdown()
        server.server_close()
    assert promtool(text) == ""
    for name in (
        b"edgefleet_pipeline_latency_seconds_count",
        b'edgefleet_pipeline_latency_seconds{pipeline="front",quantile="0.95",stage="infer"}',
        b'edgefleet_pipeline_frames_skipped_total{pipeline="front",reason="no_motion"}',
        b'edgefleet_zone_entered_total{class="blob",pipeline="front",zone="left-half"}',
        b'edgefleet_zone_objects{class="blob",pipeline="front",zone="left-half"}',
        b'edgefleet_pipeline_tracks{pipeline="front"}',
        b"edgefleet_device_memory_total_bytes",
    ):
        assert name in text, name


def test_ingest_endpoint_passes_promtool(tmp_path: Path) -> None:
    """The ingest worker's collector over a store holding one device, its telemetry, a dead
    letter: every family the ingest side exposes."""
    from cloud_sync.ingest.metrics import IngestCollector
    from cloud_sync.ingest.store import open_store
    from cloud_sync.ingest.worker import IngestWorker

    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        store.upsert_state(EXAMPLES["device_state"].model_dump(mode="json"))
        store.upsert_reported(EXAMPLES["reported_state"].model_dump(mode="json"))
        store.add_telemetry(EXAMPLES["telemetry"].model_dump(mode="json"))
        worker = IngestWorker("mqtt://127.0.0.1:1", store)  # never connected: figures only
        worker.counts["telemetry"] = worker.counts.get("telemetry", 0) + 1
        registry = CollectorRegistry()
        registry.register(IngestCollector(worker))
        text = generate_latest(registry)
    finally:
        store.close()
    assert b"edgefleet_fleet_pipeline_latency_p95_seconds" in text
    assert promtool(text) == ""
