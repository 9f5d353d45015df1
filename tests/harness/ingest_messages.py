"""Ingest messages as the worker hands them to the store (dicts of the wire JSON): a device's
birth state, reported state, telemetry, events and snapshots, with the values the ingest
tests assert on."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from agent.protocol.schema import EXAMPLES
from agent.protocol.telemetry import Telemetry

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)


def state(device: str = "cam-1", online: bool = True, **tags: str) -> dict[str, Any]:
    return {
        "type": "state", "device_id": device, "online": online, "agent_version": "0.1.0",
        "profile": "jetson-orin-nano", "contract": "1.0", "pipelines": ["front"],
        "tags": tags or {"site": "berlin"},
    }  # fmt: skip


def reported(device: str = "cam-1", phase: str = "committed") -> dict[str, Any]:
    return {
        "type": "reported", "device_id": device, "desired_revision": 7, "contract": "1.0",
        "pipelines": [{
            "name": "front", "phase": phase, "active_model": "det", "active_version": "1.4.0",
            "backend": "tensorrt", "precision": "fp16", "target_model": None,
            "target_version": None, "progress": None, "last_error": None,
            "updated_at": "2026-11-23T11:59:00Z",
        }],
    }  # fmt: skip


def telemetry(device: str = "cam-1", at: datetime = T0, fps: float = 25.0) -> dict[str, Any]:
    lat = {"p50": 8.0, "p95": 12.5, "p99": 20.0}
    return {
        "type": "telemetry", "device_id": device, "ts": at.isoformat().replace("+00:00", "Z"),
        "interval_s": 10.0, "contract": "1.0",
        "pipelines": [
            {"name": "front", "model": "det", "version": "1.4.0", "backend": "tensorrt",
             "precision": "fp16", "source_state": "streaming", "fps_in": 30.0, "fps_out": fps,
             "frames_read": 900,
             "frames_inferred": 750, "frames_dropped": 150, "reconnects": 0, "errors": 2,
             "latency_ms": {"pre": {"p50": 1.0, "p95": 2.0, "p99": 3.0}, "total": lat}},
            {"name": "rear", "model": "cls", "version": "2.0.0", "backend": "onnxruntime-cpu",
             "precision": "fp32", "source_state": "streaming", "fps_in": 10.0, "fps_out": 10.0,
             "frames_read": 100, "frames_inferred": 100, "frames_dropped": 0, "reconnects": 0,
             "errors": 0, "latency_ms": {"preprocess": lat, "infer": lat, "age": lat}},
        ],
        "device": {"cpu_percent": 41.5, "load1": 1.2, "mem_used_mb": 2100.0,
                   "mem_total_mb": 7620.0, "disk_used_pct": 33.0,
                   "temperatures_c": {"cpu": 51.2, "gpu": 49.0}, "gpu_load_pct": 60.0,
                   "emc_load_pct": 12.0, "power_mw": {"VDD_IN": 5120.0}},
        "outbox": {"depth": 3, "bytes": 2048, "dropped": 0},
    }  # fmt: skip


def event(seq: int, at: datetime = T0, device: str = "cam-1") -> dict[str, Any]:
    return {
        "type": "event", "device_id": device, "pipeline": "front", "model": "det",
        "version": "1.4.0", "task": "detection", "frame_seq": seq, "frame_time": at.timestamp(),
        "latency_ms": 11.0,
        "classifications": [],
        "detections": [{"label_id": 0, "label": "person", "score": 0.91, "box": [1, 2, 3, 4]},
                       {"label_id": 2, "label": "car", "score": 0.55, "box": [5, 6, 7, 8]}],
        "summary": {"count": 2},
    }  # fmt: skip


SNAPSHOT = EXAMPLES["snapshot"]


def snapshot(
    seq: int, at: datetime = T0, device: str = "cam-1", pipeline: str = "front"
) -> dict[str, Any]:
    return SNAPSHOT.model_copy(update={
        "device_id": device, "pipeline": pipeline, "frame_seq": seq, "frame_time": at.timestamp(),
    }).model_dump(mode="json")  # fmt: skip


def zone(name: str, label: str, entered: int, left: int = 0, dwell: int = 0, inside: int = 0
         ) -> dict[str, Any]:  # fmt: skip
    return {"zone": name, "label": label, "entered": entered, "left": left, "dwell": dwell,
            "inside": inside}  # fmt: skip


def line(name: str, label: str, crossed_in: int, crossed_out: int = 0) -> dict[str, Any]:
    return {"line": name, "label": label, "crossed_in": crossed_in, "crossed_out": crossed_out}


def counts_msg(
    device: str = "cam-1",
    at: datetime = T0,
    zones: list[dict[str, Any]] | None = None,
    lines: list[dict[str, Any]] | None = None,
    pipeline: str = "front",
) -> dict[str, Any]:
    """A contract-1.1 telemetry message (validated by the wire model) with these counts."""
    base = EXAMPLES["telemetry"].model_dump(mode="json")
    p = {**base["pipelines"][0], "name": pipeline, "zones": zones or [], "lines": lines or []}
    msg = {**base, "device_id": device, "ts": at.isoformat(), "pipelines": [p]}
    return Telemetry.model_validate(msg).model_dump(mode="json")
