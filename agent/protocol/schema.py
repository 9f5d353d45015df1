"""Pure + small IO: the JSON Schemas of the wire messages, their topics and example payloads.

``MESSAGES`` names every JSON wire message; ``schemas()`` renders their JSON Schemas (draft
2020-12, as pydantic emits them) with an ``$id`` that carries ``CONTRACT_VERSION``;
``export_schemas(dir)`` writes them for dashboard builders (``edgefleet schema export DIR``),
deterministically, so that CI can compare the committed ``docs/schema/`` with a fresh export.
``EXAMPLES`` holds one real, validated instance per message; ``render_protocol_doc()`` builds
``docs/protocol.md`` from the topic table and those examples.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from agent.common.fsutil import atomic_write_bytes
from agent.protocol import CONTRACT_VERSION
from agent.protocol.analytics import ObjectEvent
from agent.protocol.fetch import MAX_CHUNK, MAX_FILE, MAX_HEADER, MAX_REQUEST, FetchRequest
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
    MAX_SNAPSHOT_BYTES,
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
from agent.protocol.topics import DEFAULT_ROOT
from agent.protocol.wire import MAX_MESSAGE

__all__ = [
    "EXAMPLES",
    "MESSAGES",
    "TOPICS",
    "TopicInfo",
    "export_schemas",
    "render",
    "render_protocol_doc",
    "schema_id",
    "schemas",
]

MESSAGES: dict[str, type[BaseModel]] = {
    "device_state": DeviceState,
    "signed_desired": SignedDesired,
    "reported_state": ReportedState,
    "telemetry": Telemetry,
    "inference_event": InferenceEvent,
    "snapshot": Snapshot,
    "fetch_request": FetchRequest,
}
"""Schema name → model of every JSON message on the wire."""

INDEX_FILE = "index.json"
SUFFIX = ".schema.json"


@dataclass(frozen=True)
class TopicInfo:
    """One topic of the contract (ARCHITECTURE.md "Wire contract")."""

    kind: str
    direction: str
    qos: int
    retained: bool
    message: str | None  # key of MESSAGES, None when the payload has no JSON schema (yet)
    content: str


TOPICS: tuple[TopicInfo, ...] = (
    TopicInfo("state", "dev→cloud", 1, True, "device_state", "birth message; LWT: online=false"),
    TopicInfo("desired", "cloud→dev", 1, True, "signed_desired", "signed desired state"),
    TopicInfo("reported", "dev→cloud", 1, True, "reported_state", "per-pipeline update phase"),
    TopicInfo("telemetry", "dev→cloud", 1, False, "telemetry", "periodic metrics"),
    TopicInfo("events", "dev→cloud", 1, False, "inference_event", "inference results"),
    TopicInfo(
        "snapshots", "dev→cloud", 1, False, "snapshot", "JPEG frames, from opted-in pipelines"
    ),
    TopicInfo(
        "fetch/req",
        "dev→cloud",
        1,
        False,
        "fetch_request",
        "chunk request (shared by the registry replicas; `fetch/req/R` for replica R: sticky)",
    ),
    TopicInfo(
        "fetch/resp",
        "cloud→dev",
        1,
        False,
        None,
        "binary: 4-byte big-endian header length, header JSON, data (agent/protocol/fetch.py)",
    ),
    TopicInfo("cmd", "cloud→dev", 1, False, None, "operator command (schema not yet defined)"),
    TopicInfo("cmd/result", "dev→cloud", 1, False, None, "command result (schema not yet defined)"),
)


def topic_template(kind: str) -> str:
    """``edgefleet/v1/devices/{device_id}/KIND`` under the default root."""
    return f"{DEFAULT_ROOT}/devices/{{device_id}}/{kind}"


def schema_id(name: str) -> str:
    """The ``$id`` of one schema: a URN naming the contract version."""
    return f"urn:edgefleet:contract:{CONTRACT_VERSION}:{name}"


def schemas() -> dict[str, dict[str, Any]]:
    """Schema name → JSON Schema dict of every message in ``MESSAGES``."""
    out: dict[str, dict[str, Any]] = {}
    for name, model in MESSAGES.items():
        s = model.model_json_schema()
        s["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        s["$id"] = schema_id(name)
        out[name] = s
    return out


def index() -> dict[str, Any]:
    """The ``index.json`` content: contract version and, per message, its topic and flags."""
    by_message = {t.message: t for t in TOPICS if t.message}
    messages = {}
    for name, model in MESSAGES.items():
        t = by_message[name]
        messages[name] = {
            "model": model.__name__,
            "schema": f"{name}{SUFFIX}",
            "topic": topic_template(t.kind),
            "direction": t.direction,
            "qos": t.qos,
            "retained": t.retained,
        }
    return {"contract": CONTRACT_VERSION, "topic_root": DEFAULT_ROOT, "messages": messages}


def render(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, 2-space indent, UTF-8, trailing newline."""
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def rendered_files() -> dict[str, bytes]:
    """File name → bytes of a full export (pure; ``export_schemas`` writes exactly these)."""
    files = {f"{name}{SUFFIX}": render(s) for name, s in schemas().items()}
    files[INDEX_FILE] = render(index())
    return files


def export_schemas(directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``<name>.schema.json`` per message and ``index.json`` into ``directory``.

    Each file is written atomically, and only when its bytes change; ``*.schema.json`` files
    of messages no longer in ``MESSAGES`` are removed so the folder mirrors the contract.

    Returns:
        The paths written or left unchanged, sorted.

    Raises:
        OSError: the directory cannot be created or written.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = rendered_files()
    for stale in d.glob(f"*{SUFFIX}"):
        if stale.name not in files:
            stale.unlink()
    paths = []
    for fname, data in sorted(files.items()):
        path = d / fname
        if not (path.is_file() and path.read_bytes() == data):
            atomic_write_bytes(path, data)
        paths.append(path)
    return paths


# --- examples --------------------------------------------------------------------------------

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
}
"""Schema name → one real message instance, shown in docs/protocol.md and checked in tests."""

EXTRA_EXAMPLES: dict[str, BaseModel] = {
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
}
"""More examples of the same messages (other shapes), in the doc and tests too."""


def example_json(model: BaseModel) -> str:
    """Pretty JSON of an example, as it goes on the wire (keys in field order)."""
    return json.dumps(json.loads(model.model_dump_json()), indent=2, ensure_ascii=False)


def _limits_paragraph() -> list[str]:
    """The payload limits every receiver enforces, from the constants that enforce them."""
    return [
        f"**Limits.** A payload over its limit is dropped by the receiver, which counts it and"
        f" logs it without flooding its log; it never costs the receiver its connection. Sizes:"
        f" JSON messages {MAX_MESSAGE:,} bytes (snapshots {Snapshot.max_bytes:,}: a"
        f" {MAX_SNAPSHOT_BYTES >> 20} MiB JPEG in base64), chunk requests {MAX_REQUEST:,} bytes,"
        f" chunk answers a {MAX_HEADER:,}-byte header and {MAX_CHUNK:,} bytes of data. JSON"
        " nests at most about 200 levels (pydantic's JSON parser; real messages nest a few)."
        " Numbers must fit their field's bounds; non-finite ones (`1e999`, `NaN`, `Infinity`)"
        " and integers of more than 4,300 digits are refused wherever they appear. File"
        f" offsets and sizes are at most {MAX_FILE:,} bytes (1 TiB). Text and topics must be"
        " valid UTF-8.",
    ]


def render_protocol_doc() -> str:
    """Pure: the text of ``docs/protocol.md``."""
    lines = [
        "# edgefleet wire protocol",
        "",
        "<!-- Generated by `edgefleet schema export docs/schema --doc docs/protocol.md`"
        " from agent/protocol/schema.py; do not edit by hand. -->",
        "",
        f"Contract version **{CONTRACT_VERSION}** (`agent.protocol.CONTRACT_VERSION`). MQTT"
        f" 3.1.1-compatible. Topic root is configurable, default `{DEFAULT_ROOT}`; `D` is the"
        " device id (`[A-Za-z0-9][A-Za-z0-9_.-]{0,63}`).",
        "",
        "Every JSON message is UTF-8, at most 64 KiB, validated strictly on receipt (unknown"
        " fields are rejected) and carries `contract` (`MAJOR.MINOR`) where it has a body of its"
        " own. JSON Schemas (draft 2020-12) are in [`docs/schema/`](schema/), with"
        " [`index.json`](schema/index.json) mapping each to its topic.",
        "",
        *_limits_paragraph(),
        "",
        "| topic | direction | QoS | retained | payload schema | content |",
        "|---|---|---|---|---|---|",
    ]
    for t in TOPICS:
        schema = f"[`{t.message}{SUFFIX}`](schema/{t.message}{SUFFIX})" if t.message else "—"
        lines.append(
            f"| `{topic_template(t.kind).replace('{device_id}', 'D')}` | {t.direction} | {t.qos}"
            f" | {'yes' if t.retained else 'no'} | {schema} | {t.content} |"
        )
    lines += ["", "## Example payloads", ""]
    by_message = {t.message: t for t in TOPICS if t.message}
    examples = [(name, name, m) for name, m in EXAMPLES.items()]
    examples += [(title, title.split(" ")[0], m) for title, m in EXTRA_EXAMPLES.items()]
    for title, name, model in examples:
        t = by_message[name]
        lines += [
            f"### {title}: `{type(model).__name__}` on `…/devices/D/{t.kind}`",
            "",
            "```json",
            example_json(model),
            "```",
            "",
        ]
    return "\n".join(lines)
