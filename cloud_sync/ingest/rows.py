"""Pure: wire message dicts → rows of the ingest tables (``schema.py``), and their checks.

Takes plain dicts (a validated wire message's ``model_dump(mode="json")``), so it does not
depend on the message models. A dict the store cannot take raises ``BadRecord`` naming the
message kind and the field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from agent.common.errors import BadDataError

MAX_REASON = 1000  # characters of a dead letter's reason kept
MAX_TOPIC = 512  # characters of a dead letter's topic kept (a topic may be 64 KiB)
DEAD_LETTER_KEEP = 4096  # bytes of a dead letter's payload kept (with its length and SHA-256)

# The stages of one frame's own processing (agent.protocol.telemetry names them); capture_wait,
# sink, overhead and age are left out: they measure the source and the frame's age, not the model.
FRAME_STAGES = ("preprocess", "infer", "postprocess")

# pipeline_state columns copied as reported (None when absent)
_REPORTED_FIELDS = (
    "active_model", "active_version", "target_model", "target_version", "backend", "precision",
    "last_error", "waiting",
)  # fmt: skip


class BadRecord(BadDataError):
    """A message dict the store cannot take as is (missing field, wrong type, bad time).

    Attributes:
        kind: ``"state"``, ``"reported"``, ``"telemetry"`` or ``"event"``.
        field: the offending key, when known.
    """

    def __init__(self, message: str, *, kind: str, field: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.field = field


def required(msg: Mapping[str, Any], key: str, kind: str) -> Any:
    """``msg[key]``, or ``BadRecord`` naming the ``kind`` of message that lacks it."""
    try:
        return msg[key]
    except (KeyError, TypeError):
        raise BadRecord(
            f"{kind} message has no '{key}'; not stored", kind=kind, field=key
        ) from None


def utc_time(value: Any, kind: str, field: str) -> datetime:
    """An aware UTC datetime from a datetime, an ISO 8601 string or epoch seconds."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:  # InferenceEvent.frame_time: seconds since the Unix epoch
            return datetime.fromtimestamp(value, timezone.utc)
        except (OverflowError, OSError, ValueError):
            raise BadRecord(
                f"{kind} '{field}' is {value!r}, not a time in range", kind=kind, field=field
            ) from None
    if isinstance(value, str):
        try:  # Python 3.10's fromisoformat does not take the 'Z' pydantic writes
            value = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
        except ValueError:
            raise BadRecord(
                f"{kind} '{field}' is {value[:40]!r}, expected an ISO 8601 time",
                kind=kind,
                field=field,
            ) from None
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise BadRecord(
            f"{kind} '{field}' must be a time with a zone, got {value!r}", kind=kind, field=field
        )
    return value.astimezone(timezone.utc)


def _latency(p: Mapping[str, Any]) -> dict[str, float | None]:
    """p50/p95/p99 of one frame: a 'total' stage if sent, else the sum over FRAME_STAGES.

    Percentiles do not add exactly; the sum is the conservative figure a dashboard and a
    latency-regression gate want, and it is what ``InferenceEvent.latency_ms`` measures.
    """
    stages: Mapping[str, Mapping[str, float]] = p.get("latency_ms") or {}
    if "total" in stages:
        return {q: stages["total"].get(q) for q in ("p50", "p95", "p99")}
    out: dict[str, float | None] = {}
    for q in ("p50", "p95", "p99"):
        vals = [stages[s][q] for s in FRAME_STAGES if stages.get(s, {}).get(q) is not None]
        out[q] = sum(vals) if vals else None
    return out


def state_row(msg: Mapping[str, Any], *, now: datetime) -> dict[str, Any]:
    """The ``devices`` row of a birth message or last will (``DeviceState``), seen at ``now``."""
    return {
        "device_id": required(msg, "device_id", "state"),
        "online": required(msg, "online", "state"),
        "agent_version": msg.get("agent_version"), "profile": msg.get("profile"),
        "contract": msg.get("contract"), "tags": dict(msg.get("tags") or {}),
        "groups": list(msg.get("groups") or []),
        "pipelines": list(msg.get("pipelines") or []), "first_seen": now, "last_seen": now,
    }  # fmt: skip


def reported_rows(msgs: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """``ReportedState`` dicts → (their devices, the ``pipeline_state`` rows of each).

    Per device the last message wins: each is a full snapshot, and one device's messages
    arrive in order. Devices are listed in the order of their first message.
    """
    latest: dict[str, Mapping[str, Any]] = {}
    for msg in msgs:
        latest[required(msg, "device_id", "reported")] = msg
    rows = [
        {
            "device_id": device_id, "pipeline": required(p, "name", "reported"),
            "phase": required(p, "phase", "reported"),
            **{k: p.get(k) for k in _REPORTED_FIELDS},
            "desired_revision": msg.get("desired_revision"),
            "source_ended": bool(p.get("source_ended")),
            "updated_at": utc_time(required(p, "updated_at", "reported"), "reported",
                                   "updated_at"),
        }
        for device_id, msg in latest.items()
        for p in msg.get("pipelines") or []
    ]  # fmt: skip
    return list(latest), rows


def reported_config_rows(msgs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """``ReportedState`` dicts → ``device_config`` rows (per device the last message wins;
    devices whose last message has no ``config`` get none)."""
    latest: dict[str, Mapping[str, Any]] = {}
    for msg in msgs:
        latest[required(msg, "device_id", "reported")] = msg
    rows = []
    for device_id, msg in latest.items():
        c = msg.get("config")
        if not isinstance(c, Mapping):
            continue
        rows.append({
            "device_id": device_id, "hash": c.get("hash"), "revision": c.get("revision"),
            "target_hash": c.get("target_hash"), "status": c.get("status"),
            "reason": c.get("reason"),
            "updated_at": utc_time(required(c, "updated_at", "reported"), "reported",
                                   "config.updated_at"),
        })  # fmt: skip
    return rows


def telemetry_rows(msg: Mapping[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One telemetry message → (a row per pipeline, the device row)."""
    device_id, ts = (
        required(msg, "device_id", "telemetry"),
        utc_time(required(msg, "ts", "telemetry"), "telemetry", "ts"),
    )
    rows = []
    for p in msg.get("pipelines") or []:
        lat = _latency(p)
        rows.append({
            "device_id": device_id, "ts": ts, "pipeline": required(p, "name", "telemetry"),
            "fps_in": p.get("fps_in"), "fps_out": p.get("fps_out"),
            "frames_dropped": p.get("frames_dropped"), "errors": p.get("errors"),
            "p50_ms": lat["p50"], "p95_ms": lat["p95"], "p99_ms": lat["p99"],
            "model": p.get("model"), "version": p.get("version"),
            "backend": p.get("backend"), "precision": p.get("precision"),
        })  # fmt: skip
    dev = msg.get("device") or {}
    outbox = msg.get("outbox") or {}
    device = {
        "device_id": device_id, "ts": ts,
        "cpu_percent": dev.get("cpu_percent"), "mem_used_mb": dev.get("mem_used_mb"),
        "mem_total_mb": dev.get("mem_total_mb"), "disk_used_pct": dev.get("disk_used_pct"),
        "gpu_load_pct": dev.get("gpu_load_pct"),
        "temperatures": dev.get("temperatures_c"),
        "power": dev.get("power_mw"),
        "outbox_depth": outbox.get("depth"), "outbox_dropped": outbox.get("dropped"),
    }  # fmt: skip
    return rows, device


# region_counts columns of a zone row and of a line row (schema v7), from the contract's names
ZONE_COUNTERS = {"entered": "entered", "exited": "left", "dwell": "dwell"}
LINE_COUNTERS = {"crossed_in": "crossed_in", "crossed_out": "crossed_out"}
COUNT_COLUMNS = (*ZONE_COUNTERS, "inside", *LINE_COUNTERS)


def region_count_rows(msg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One telemetry message → a ``region_counts`` row per zone or line and class of each
    pipeline (contract 1.1; none from a 1.0 device). Every row has every column, the other
    kind's counters None, so a batch goes out as one executemany.

    Raises:
        BadRecord: a row lacks its name, class or a counter.
    """
    device_id = required(msg, "device_id", "telemetry")
    ts = utc_time(required(msg, "ts", "telemetry"), "telemetry", "ts")
    rows = []
    for p in msg.get("pipelines") or []:
        base = {"device_id": device_id, "ts": ts, "pipeline": required(p, "name", "telemetry")}
        blank = dict.fromkeys(COUNT_COLUMNS)
        for z in p.get("zones") or []:
            counters = {col: required(z, key, "telemetry") for col, key in ZONE_COUNTERS.items()}
            rows.append({**base, "kind": "zone", "region": required(z, "zone", "telemetry"),
                         "label": required(z, "label", "telemetry"), **blank, **counters,
                         "inside": required(z, "inside", "telemetry")})  # fmt: skip
        for ln in p.get("lines") or []:
            counters = {col: required(ln, key, "telemetry") for col, key in LINE_COUNTERS.items()}
            rows.append({**base, "kind": "line", "region": required(ln, "line", "telemetry"),
                         "label": required(ln, "label", "telemetry"), **blank,
                         **counters})  # fmt: skip
    return rows


def event_row(msg: Mapping[str, Any]) -> dict[str, Any]:
    """One inference event → its row; the top label is the best-scoring class or detection."""
    when = msg.get("ts", msg.get("frame_time"))
    if when is None:
        raise BadRecord("event has neither 'ts' nor 'frame_time'; not stored", kind="event",
                        field="frame_time")  # fmt: skip
    detections = msg.get("detections") or []
    scored = [c for c in [*(msg.get("classifications") or []), *detections] if "score" in c]
    top = max(scored, key=lambda c: c["score"], default=None)
    return {
        "device_id": required(msg, "device_id", "event"),
        "ts": utc_time(when, "event", "frame_time"),
        "pipeline": required(msg, "pipeline", "event"), "model": msg.get("model"),
        "version": msg.get("version"), "frame_seq": required(msg, "frame_seq", "event"),
        "top_label": None if top is None else top.get("label"),
        "top_score": None if top is None else top["score"],
        "n_detections": len(detections), "payload": dict(msg),
    }  # fmt: skip


def snapshot_row(msg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``snapshots`` row of one ``Snapshot`` dict.

    Raises:
        BadRecord: a key field is missing or the JPEG is not base64.
    """
    try:
        jpeg = base64.b64decode(required(msg, "jpeg_b64", "snapshot"), validate=True)
    except (binascii.Error, ValueError, TypeError) as e:
        raise BadRecord(f"snapshot: jpeg_b64 is not base64: {e}", kind="snapshot",
                        field="jpeg_b64") from None  # fmt: skip
    return {
        "device_id": required(msg, "device_id", "snapshot"),
        "ts": utc_time(required(msg, "frame_time", "snapshot"), "snapshot", "frame_time"),
        "pipeline": required(msg, "pipeline", "snapshot"),
        "model": msg.get("model"), "version": msg.get("version"),
        "frame_seq": required(msg, "frame_seq", "snapshot"),
        "width": required(msg, "width", "snapshot"), "height": required(msg, "height", "snapshot"),
        "jpeg": jpeg,
    }  # fmt: skip


def _text(value: str, limit: int) -> str:
    """``value`` cut to ``limit`` characters, storable in any text column: PostgreSQL text
    holds no U+0000 and neither backend takes lone surrogates (a reason may quote bad input)."""
    value = value[:limit].replace("\x00", "\\x00")
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def dead_letter_row(
    topic: str, payload: bytes, reason: str, *, now: datetime, keep: int = DEAD_LETTER_KEEP
) -> dict[str, Any]:
    """The ``dead_letters`` row of a message that could not be stored.

    Keeps the first ``keep`` bytes of the payload with its whole length and SHA-256, so a
    20 MB payload costs a few KiB and can still be matched against what a device sent.
    """
    return {
        "received_at": now, "topic": _text(topic, MAX_TOPIC),
        "payload": bytes(payload[:keep]), "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "reason": _text(reason, MAX_REASON),
    }  # fmt: skip
