"""The ingest store's message → row mapping, pure (no database)."""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta, timezone

import pytest

from cloud_sync.ingest.rows import (
    BadRecord,
    dead_letter_row,
    event_row,
    reported_rows,
    state_row,
    telemetry_rows,
    utc_time,
)
from tests.harness.ingest_messages import T0, event, reported, state, telemetry


def test_telemetry_rows_latency_is_total_else_the_frame_stages_summed() -> None:
    rows, device = telemetry_rows(telemetry(at=T0))
    front, rear = rows
    assert (front["ts"], front["pipeline"], front["fps_out"]) == (T0, "front", 25.0)
    # 'total' wins over the other stages; without it preprocess + infer, never 'age'
    assert (front["p50_ms"], front["p95_ms"], front["p99_ms"]) == (8.0, 12.5, 20.0)
    assert (rear["p50_ms"], rear["p95_ms"], rear["p99_ms"]) == (16.0, 25.0, 40.0)
    assert (rear["backend"], rear["precision"]) == ("onnxruntime-cpu", "fp32")
    assert device == {
        "device_id": "cam-1", "ts": T0, "cpu_percent": 41.5, "mem_used_mb": 2100.0,
        "mem_total_mb": 7620.0, "disk_used_pct": 33.0, "gpu_load_pct": 60.0,
        "temperatures": {"cpu": 51.2, "gpu": 49.0}, "power": {"VDD_IN": 5120.0},
        "outbox_depth": 3, "outbox_dropped": 0,
    }  # fmt: skip


def test_event_row_top_label_is_the_best_score() -> None:
    row = event(5, at=T0)
    row["classifications"] = [{"label": "truck", "score": 0.7}]
    got = event_row(row)
    assert (got["ts"], got["frame_seq"], got["n_detections"]) == (T0, 5, 2)
    assert (got["top_label"], got["top_score"]) == ("person", 0.91)
    assert got["payload"] == row


def test_reported_rows_last_report_per_device_wins_in_first_seen_order() -> None:
    msgs = [reported("cam-2"), reported("cam-1"), reported("cam-2", phase="failed")]
    devices, rows = reported_rows(msgs)
    assert devices == ["cam-2", "cam-1"]
    assert [(r["device_id"], r["phase"]) for r in rows] == [("cam-2", "failed"),
                                                          ("cam-1", "committed")]  # fmt: skip
    assert rows[0]["updated_at"] == datetime(2026, 11, 23, 11, 59, tzinfo=timezone.utc)
    assert rows[0]["desired_revision"] == 7 and rows[0]["active_version"] == "1.4.0"


def test_state_row_first_and_last_seen_now() -> None:
    row = state("cam-1", online=False, site="x")
    got = state_row(row | {"groups": ["lobby"]}, now=T0)
    assert (got["online"], got["tags"], got["groups"]) == (False, {"site": "x"}, ["lobby"])
    assert got["first_seen"] == got["last_seen"] == T0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-23T12:00:00Z", T0),
        ("2026-11-23T14:00:00+02:00", T0),
        (T0.timestamp(), T0),
        (T0.astimezone(timezone(timedelta(hours=-5))), T0),
    ],
)
def test_utc_time_takes_iso_epoch_and_aware_datetimes(value: object, expected: datetime) -> None:
    assert utc_time(value, "telemetry", "ts") == expected


@pytest.mark.parametrize("value", ["2026-11-23T12:00:00", "yesterday", 1e300, None, True])
def test_utc_time_refuses_naive_unparsable_and_out_of_range(value: object) -> None:
    with pytest.raises(BadRecord) as e:
        utc_time(value, "telemetry", "ts")
    assert (e.value.kind, e.value.field) == ("telemetry", "ts")


def test_missing_key_fields_name_kind_and_field() -> None:
    bad = telemetry()
    del bad["pipelines"][1]["name"]
    with pytest.raises(BadRecord) as e:
        telemetry_rows(bad)
    assert (e.value.kind, e.value.field) == ("telemetry", "name")
    with pytest.raises(BadRecord, match="neither 'ts' nor 'frame_time'"):
        event_row({k: v for k, v in event(1).items() if k != "frame_time"})


def test_dead_letter_row_keeps_a_prefix_the_length_and_the_hash() -> None:
    payload = b"\x00" * 10_000
    row = dead_letter_row("t/\x00x", payload, "bad \ud800", now=T0, keep=16)
    assert row["payload"] == payload[:16] and row["payload_bytes"] == 10_000
    assert row["payload_sha256"] == hashlib.sha256(payload).hexdigest()
    assert (row["topic"], row["reason"]) == ("t/\\x00x", "bad \\ud800")
