"""Pure: example messages of the wire contract, one per message type (``EXAMPLES``) and more
shapes of the same messages (``EXTRA_EXAMPLES``), used by the protocol doc, the schema check and
the tests."""

from __future__ import annotations

from datetime import datetime, timezone

from pydantic import BaseModel

from agent.protocol.analytics import ObjectEvent
from agent.protocol.command import Command, CommandResult, ResultStatus, SignedCommand
from agent.protocol.fetch import FetchRequest
from agent.protocol.state import (
    DesiredState,
    DeviceState,
    PipelineReport,
    PipelineTarget,
    Progress,
    ReportedState,
    SignatureEntry,
    SignedDesired,
    UpdatePhase,
)
from agent.protocol.telemetry import (
    Classification,
    Detection,
    DeviceStats,
    InferenceEvent,
    OutboxStats,
    PipelineTelemetry,
    Snapshot,
    StageLatency,
    Telemetry,
)

_TS = datetime(2026, 1, 15, 8, 30, 0, tzinfo=timezone.utc)

EXAMPLES: dict[str, BaseModel] = {
    "device_state": DeviceState(
        device_id="cam-017",
        online=True,
        agent_version="0.1.0",
        profile="jetson-orin-nano",
        pipelines=["entrance"],
        tags={"site": "plant-a", "ring": "canary"},
    ),
    "signed_desired": SignedDesired(
        signed=DesiredState(
            device_id="cam-017",
            revision=42,
            issued_at=_TS,
            pipelines={"entrance": PipelineTarget(model="det", version="1.4.0")},
        ),
        signatures=[SignatureEntry(keyid="9f2c41aa", sig="3045022100ab" + "00" * 8)],
    ),
    "reported_state": ReportedState(
        device_id="cam-017",
        desired_revision=42,
        pipelines=[
            PipelineReport(
                name="entrance",
                phase=UpdatePhase.BUILDING,
                active_model="det",
                active_version="1.3.2",
                backend="tensorrt",
                precision="fp16",
                target_model="det",
                target_version="1.4.0",
                progress=Progress(done=3, total=7),
                updated_at=_TS,
            )
        ],
    ),
    "telemetry": Telemetry(
        device_id="cam-017",
        ts=_TS,
        interval_s=10.0,
        pipelines=[
            PipelineTelemetry(
                name="entrance",
                model="det",
                version="1.3.2",
                backend="tensorrt",
                precision="fp16",
                source_state="streaming",
                fps_in=29.97,
                fps_out=29.9,
                frames_read=18000,
                frames_inferred=17950,
                frames_dropped=50,
                reconnects=1,
                errors=0,
                latency_ms={
                    "preprocess": StageLatency(p50=1.2, p95=1.9, p99=2.4),
                    "infer": StageLatency(p50=8.4, p95=9.8, p99=12.1),
                    "postprocess": StageLatency(p50=0.6, p95=0.9, p99=1.3),
                },
            )
        ],
        device=DeviceStats(
            cpu_percent=37.5,
            load1=1.42,
            mem_used_mb=3120.0,
            mem_total_mb=7620.0,
            disk_used_pct=41.0,
            temperatures_c={"cpu-thermal": 52.5, "gpu-thermal": 50.1},
            gpu_load_pct=63.0,
            emc_load_pct=22.0,
            power_mw={"VDD_IN": 7450.0, "VDD_CPU_GPU_CV": 2890.0},
        ),
        outbox=OutboxStats(depth=0, bytes=0, dropped=0),
    ),
    "inference_event": InferenceEvent(
        device_id="cam-017",
        pipeline="entrance",
        model="det",
        version="1.3.2",
        task="detection",
        frame_seq=18000,
        frame_time=1768465800.125,
        latency_ms=10.2,
        detections=[
            Detection(box=(412.0, 118.5, 598.25, 470.0), score=0.9132, label_id=0, label="person")
        ],
        summary={"count": 1},
    ),
    "snapshot": Snapshot(
        device_id="cam-017",
        pipeline="entrance",
        model="det",
        version="1.3.2",
        frame_seq=18000,
        frame_time=1768465800.125,
        width=8,
        height=8,
        jpeg_b64=(
            "/9j/4AAQSkZJRgABAQAAAQABAAD/2wBDABALDA4MChAODQ4SERATGCgaGBYWGDEjJR0oOjM9PDkzODdASFxOQERX"
            "RTc4UG1RV19iZ2hnPk1xeXBkeFxlZ2P/2wBDARESEhgVGC8aGi9jQjhCY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2Nj"
            "Y2NjY2NjY2NjY2NjY2NjY2NjY2NjY2NjY2P/wAARCAAIAAgDASIAAhEBAxEB/8QAHwAAAQUBAQEBAQEAAAAAAAAA"
            "AAECAwQFBgcICQoL/8QAtRAAAgEDAwIEAwUFBAQAAAF9AQIDAAQRBRIhMUEGE1FhByJxFDKBkaEII0KxwRVS0fAk"
            "M2JyggkKFhcYGRolJicoKSo0NTY3ODk6Q0RFRkdISUpTVFVWV1hZWmNkZWZnaGlqc3R1dnd4eXqDhIWGh4iJipKT"
            "lJWWl5iZmqKjpKWmp6ipqrKztLW2t7i5usLDxMXGx8jJytLT1NXW19jZ2uHi4+Tl5ufo6erx8vP09fb3+Pn6/8QA"
            "HwEAAwEBAQEBAQEBAQAAAAAAAAECAwQFBgcICQoL/8QAtREAAgECBAQDBAcFBAQAAQJ3AAECAxEEBSExBhJBUQdh"
            "cRMiMoEIFEKRobHBCSMzUvAVYnLRChYkNOEl8RcYGRomJygpKjU2Nzg5OkNERUZHSElKU1RVVldYWVpjZGVmZ2hp"
            "anN0dXZ3eHl6goOEhYaHiImKkpOUlZaXmJmaoqOkpaanqKmqsrO0tba3uLm6wsPExcbHyMnK0tPU1dbX2Nna4uPk"
            "5ebn6Onq8vP09fb3+Pn6/9oADAMBAAIRAxEAPwAooooA/9k="
        ),  # a real 8x8 grey JPEG
    ),
    "fetch_request": FetchRequest(
        id="r-000123", path="targets/models/det/1.4.0/model.onnx", offset=0, length=65536
    ),
    "signed_command": SignedCommand(
        signed=Command(
            device_id="cam-017",
            id="c1768465800000-3fa9c1",
            name="upload_logs",
            args={"since": "2026-01-15T07:30:00Z", "max_bytes": 4194304},
            nonce="5d41402abc4b2a76b9719d911017c592",
            issued_at=_TS,
            expires_at=datetime(2026, 1, 15, 8, 35, 0, tzinfo=timezone.utc),
        ),
        signatures=[SignatureEntry(keyid="9f2c41aa", sig="3045022100cd" + "00" * 8)],
    ),
    "command_result": CommandResult(
        device_id="cam-017",
        id="c1768465800000-3fa9c1",
        name="upload_logs",
        status=ResultStatus.SUCCEEDED,
        output="2113 log lines since 2026-01-15T07:30:00+00:00: 301877 bytes, 24512 gzip'd",
        data={"upload": "logs-1768465801204-0c9e2b.log.gz", "lines": 2113, "bytes": 301877},
        finished_at=datetime(2026, 1, 15, 8, 30, 1, tzinfo=timezone.utc),
    ),
}
"""Schema name → one real message instance, shown in docs/protocol.md and checked in tests."""

EXTRA_EXAMPLES: dict[str, BaseModel] = {
    "command_result (refused)": CommandResult(
        device_id="cam-017",
        id="c1768465800000-3fa9c1",
        name="upload_logs",
        status=ResultStatus.REFUSED,
        reason="replay: command c1768465800000-3fa9c1 (upload_logs) refused: nonce 5d41402abc4b…"
        " was already used",
        finished_at=datetime(2026, 1, 15, 8, 31, 0, tzinfo=timezone.utc),
    ),
    "inference_event (classification)": InferenceEvent(
        device_id="cam-017",
        pipeline="gate",
        model="cls",
        version="2.0.1",
        task="classification",
        frame_seq=77,
        frame_time=1768465801.5,
        latency_ms=3.4,
        classifications=[
            Classification(label_id=3, label="truck", score=0.8811),
            Classification(label_id=1, label="car", score=0.0912),
        ],
    ),
    "inference_event (objects)": InferenceEvent(
        device_id="cam-017",
        pipeline="entrance",
        model="det",
        version="1.3.2",
        task="detection",
        frame_seq=18042,
        frame_time=1768465801.805,
        latency_ms=10.4,
        detections=[
            Detection(
                box=(402.5, 260.0, 471.0, 448.5),
                score=0.8874,
                label_id=0,
                label="person",
                track_id=17,
            ),
            Detection(
                box=(96.0, 301.25, 180.5, 359.0),
                score=0.7611,
                label_id=2,
                label="car",
                track_id=12,
            ),
        ],
        summary={"count": 2},
        objects=[
            ObjectEvent(
                kind="entered",
                region="dock",
                track_id=17,
                label_id=0,
                label="person",
                first_seen=1768465799.645,
                last_seen=1768465801.805,
                best_score=0.9132,
            ),
            ObjectEvent(
                kind="crossed",
                region="gate",
                track_id=12,
                label_id=2,
                label="car",
                first_seen=1768465797.12,
                last_seen=1768465801.805,
                best_score=0.8045,
                direction="in",
            ),
        ],
    ),
    "inference_event (object event with its clip)": InferenceEvent(
        device_id="cam-017",
        pipeline="gate",
        model="det",
        version="1.3.2",
        task="detection",
        frame_seq=4512,
        frame_time=1768465804.48,
        latency_ms=9.8,
        detections=[
            Detection(
                box=(300.0, 180.0, 340.0, 220.0), score=0.91, label_id=0, label="person", track_id=7
            )
        ],
        objects=[
            ObjectEvent(
                kind="crossed",
                region="door",
                track_id=7,
                label_id=0,
                label="person",
                first_seen=1768465801.2,
                last_seen=1768465804.48,
                best_score=0.93,
                direction="in",
            )
        ],
        clip="gate.1768465804480",
    ),
    "fetch_request (an event clip, on clips/req)": FetchRequest(
        id="op-7f3a-1", path="clips/gate.1768465804480.mp4", offset=0, length=65536
    ),
}
"""More examples of the same messages (other shapes), in the doc and tests too."""
