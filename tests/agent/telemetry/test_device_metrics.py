"""The device's own Prometheus endpoint: off by default, loopback, the telemetry's numbers."""

from __future__ import annotations

import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.common.errors import EdgefleetError
from agent.config import parse_config
from agent.service import Agent
from agent.telemetry.prometheus import TelemetryCollector
from agent.telemetry.reporter import TelemetrySnapshot
from tests.harness.jetson_sysfs import orin_tree
from tests.harness.util import free_port, wait_for

pytestmark = pytest.mark.video


def _config(tmp: Path, video: Path, model: Path, **telemetry: Any) -> dict[str, Any]:
    return {
        "device_id": "prom-01",
        "data_dir": str(tmp / "data"),
        "profile": "x86-cpu",
        "pipelines": [{"name": "front", "source": str(video), "model": str(model), "loop": True}],
        "telemetry": telemetry,
    }


def scrape(port: int) -> dict[str, list[Any]]:
    """Samples by name, from the text Prometheus would read."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, list[Any]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(samples: dict[str, list[Any]], name: str, **labels: str) -> float:
    [s] = [s for s in samples[name] if all(s.labels.get(k) == v for k, v in labels.items())]
    return float(s.value)


def test_endpoint_serves_the_pipeline_and_device_metrics(
    tmp_path: Path, synthetic_video: Path, test_models: dict[str, Path]
) -> None:
    port = free_port()
    model = test_models["blobdet"] / "model.onnx"
    agent = Agent(parse_config(_config(tmp_path, synthetic_video, model, prometheus_port=port)))
    agent.start()
    try:
        assert agent.metrics_server.server_address[0] == "127.0.0.1"
        assert wait_for(lambda: agent.status()["pipelines"][0]["frames_inferred"] >= 10, 30)
        m = scrape(port)
        info = m["edgefleet_pipeline_model_info"][0].labels
        assert info == {"pipeline": "front", "model": "blobdet", "version": info["version"],
                        "backend": "onnxruntime", "precision": "fp32"}  # fmt: skip
        inferred = value(m, "edgefleet_pipeline_frames_inferred_total", pipeline="front")
        assert inferred >= 10
        assert value(m, "edgefleet_pipeline_fps", pipeline="front", stage="out") > 0
        assert value(m, "edgefleet_pipeline_source_up", pipeline="front") == 1.0
        p50 = value(m, "edgefleet_pipeline_latency_seconds", pipeline="front", stage="infer",
                    quantile="0.5")  # fmt: skip
        p99 = value(m, "edgefleet_pipeline_latency_seconds", pipeline="front", stage="infer",
                    quantile="0.99")  # fmt: skip
        assert 0 < p50 <= p99 < 10  # seconds, not milliseconds
        assert value(m, "edgefleet_device_memory_total_bytes") > 64 * 1024 * 1024
        assert 0 <= value(m, "edgefleet_device_cpu_ratio") <= 1
        # no [broker]: no outbox, reported as empty rather than missing
        assert value(m, "edgefleet_device_outbox_depth") == 0
        # counters only go up between scrapes
        assert wait_for(
            lambda: agent.status()["pipelines"][0]["frames_inferred"] > inferred + 5, 30
        )
        later = value(scrape(port), "edgefleet_pipeline_frames_inferred_total", pipeline="front")
        assert later > inferred
    finally:
        agent.stop()
    assert agent.metrics_server is None
    with pytest.raises(OSError):  # stopped with the agent
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()


def test_off_by_default(
    tmp_path: Path, synthetic_video: Path, test_models: dict[str, Path]
) -> None:
    cfg = parse_config(_config(tmp_path, synthetic_video, test_models["blobdet"] / "model.onnx"))
    assert cfg.telemetry.prometheus_port is None
    assert cfg.telemetry.prometheus_addr == "127.0.0.1"
    agent = Agent(cfg)
    agent.start()
    try:
        assert agent.metrics_server is None
    finally:
        agent.stop()


def test_port_in_use_is_a_clear_error_and_nothing_keeps_running(
    tmp_path: Path, synthetic_video: Path, test_models: dict[str, Path]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        model = test_models["blobdet"] / "model.onnx"
        agent = Agent(parse_config(_config(tmp_path, synthetic_video, model, prometheus_port=port)))
        with pytest.raises(EdgefleetError, match=f"prometheus_port {port}"):
            agent.start()
    assert not [t for t in threading.enumerate() if t.name == "infer-front" and t.is_alive()]


def test_jetson_gpu_power_and_temperatures_become_metrics(tmp_path: Path) -> None:
    # A fake AGX Orin sysfs tree (no Jetson here; layout from
    # tests/agent/telemetry/test_device_stats.py).
    orin_tree(tmp_path)
    snap = TelemetrySnapshot("orin-1", [], None, interval_s=1.0, data_dir=tmp_path,
                             sysroot=tmp_path, clock=lambda: 10.0)  # fmt: skip
    fams = {f.name: f for f in TelemetryCollector(snap).collect()}
    gpu = fams["edgefleet_device_gpu_load_ratio"].samples
    assert [s.value for s in gpu] == [pytest.approx(0.999)]
    rails = {s.labels["rail"]: s.value for s in fams["edgefleet_device_power_watts"].samples}
    assert rails == {"VDD_GPU_SOC": pytest.approx(3.576), "VDD_CPU_CV": pytest.approx(0.397)}
    temps = {
        s.labels["zone"]: s.value for s in fams["edgefleet_device_temperature_celsius"].samples
    }
    assert temps == {"cpu-thermal": 52.562, "tj-thermal": 52.562}
    assert fams["edgefleet_device_emc_load_ratio"].samples == []  # not exposed: absent, not 0
