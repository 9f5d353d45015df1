"""The exported JSON Schemas, the protocol doc, the telemetry/event messages and their parsers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from agent.pipeline.metrics import PipelineMetrics
from agent.protocol import CONTRACT_VERSION
from agent.protocol.fetch import FetchRequest
from agent.protocol.schema import (
    EXAMPLES,
    EXTRA_EXAMPLES,
    MESSAGES,
    TOPICS,
    export_schemas,
    render_protocol_doc,
    rendered_files,
    schemas,
)
from agent.protocol.telemetry import (
    InferenceEvent,
    PipelineTelemetry,
    Telemetry,
    pipeline_telemetry_from_status,
)
from agent.protocol.topics import KINDS
from agent.protocol.wire import MAX_MESSAGE, BadMessage
from cloud_sync.schema_cmd import add_schema_command

ROOT = Path(__file__).resolve().parents[3]
SCHEMA_DIR = ROOT / "docs" / "schema"
DOC = ROOT / "docs" / "protocol.md"
FIX = "run `edgefleet schema export docs/schema --doc docs/protocol.md` and commit the result"

ALL_EXAMPLES: list[tuple[str, BaseModel]] = [*EXAMPLES.items(), *EXTRA_EXAMPLES.items()]


# --- committed files match a fresh export (the CI check) -------------------------------------


def test_committed_schemas_are_current() -> None:
    fresh = rendered_files()
    committed = {p.name for p in SCHEMA_DIR.glob("*.json")} if SCHEMA_DIR.is_dir() else set()
    assert committed == set(fresh), (
        f"docs/schema holds {sorted(committed)}, the contract has {sorted(fresh)}; {FIX}"
    )
    stale = [n for n, data in sorted(fresh.items()) if (SCHEMA_DIR / n).read_bytes() != data]
    assert not stale, f"docs/schema files out of date with the models: {stale}; {FIX}"


def test_committed_protocol_doc_is_current() -> None:
    assert DOC.read_text(encoding="utf-8") == render_protocol_doc(), (
        f"docs/protocol.md is out of date with agent/protocol/schema.py; {FIX}"
    )


def test_export_is_deterministic_and_prunes(tmp_path: Path) -> None:
    (tmp_path / "gone.schema.json").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("kept\n")
    first = {p.name: p.read_bytes() for p in export_schemas(tmp_path)}
    second = {p.name: p.read_bytes() for p in export_schemas(tmp_path)}
    assert first == second == rendered_files()
    assert not (tmp_path / "gone.schema.json").exists()
    assert (tmp_path / "notes.txt").read_text() == "kept\n"
    for data in first.values():
        assert data.endswith(b"}\n")
        assert (
            data
            == (
                json.dumps(json.loads(data), indent=2, sort_keys=True, ensure_ascii=False) + "\n"
            ).encode()
        )


def test_cli_command_writes_schemas_and_doc(tmp_path: Path) -> None:
    ap = argparse.ArgumentParser(prog="edgefleet")
    add_schema_command(ap.add_subparsers(dest="cmd", required=True))
    out, doc = tmp_path / "schema", tmp_path / "protocol.md"
    args = ap.parse_args(["schema", "export", str(out), "--doc", str(doc)])
    assert args.fn(args) == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == rendered_files()
    assert doc.read_text(encoding="utf-8") == render_protocol_doc()


# --- schemas and index -----------------------------------------------------------------------


def test_schemas_name_the_contract_version() -> None:
    for name, s in schemas().items():
        assert s["$id"].endswith(f":{CONTRACT_VERSION}:{name}")
        assert s["title"] == MESSAGES[name].__name__
        assert s["additionalProperties"] is False


def test_index_maps_every_message_to_its_topic() -> None:
    idx = json.loads(rendered_files()["index.json"])
    assert idx["contract"] == CONTRACT_VERSION
    assert set(idx["messages"]) == set(MESSAGES)
    assert idx["messages"]["telemetry"] == {
        "model": "Telemetry",
        "schema": "telemetry.schema.json",
        "topic": "edgefleet/v1/devices/{device_id}/telemetry",
        "direction": "dev→cloud",
        "qos": 1,
        "retained": False,
    }
    assert idx["messages"]["signed_desired"]["retained"] is True


def test_topic_table_covers_every_kind() -> None:
    assert tuple(t.kind for t in TOPICS) == KINDS
    doc = render_protocol_doc()
    for kind in KINDS:
        assert f"`edgefleet/v1/devices/D/{kind}`" in doc


def _fields_described(schema: dict[str, Any]) -> list[str]:
    missing = []
    for where in [schema, *schema.get("$defs", {}).values()]:
        for field, spec in where.get("properties", {}).items():
            if "description" not in spec:
                missing.append(f"{where.get('title')}.{field}")
    return missing


@pytest.mark.parametrize("name", ["telemetry", "inference_event"])
def test_new_messages_describe_every_field(name: str) -> None:
    assert _fields_described(schemas()[name]) == []


# --- examples --------------------------------------------------------------------------------


def test_every_message_has_an_example() -> None:
    assert set(EXAMPLES) == set(MESSAGES)
    for name, model in EXAMPLES.items():
        assert type(model) is MESSAGES[name]


@pytest.mark.parametrize(("name", "example"), ALL_EXAMPLES, ids=[n for n, _ in ALL_EXAMPLES])
def test_example_validates_and_round_trips(name: str, example: BaseModel) -> None:
    cls = type(example)
    again = cls.model_validate(example.model_dump(mode="json"))
    assert again == example
    payload = example.encode()  # type: ignore[attr-defined]
    assert len(payload) <= MAX_MESSAGE
    assert cls.decode(payload) == example  # type: ignore[attr-defined]
    assert json.dumps(json.loads(payload), indent=2, ensure_ascii=False) in render_protocol_doc()


def test_examples_match_their_json_schema_shape() -> None:
    # a light structural check (no jsonschema dependency): required keys exist, no extras
    for name, example in EXAMPLES.items():
        s = schemas()[name]
        data = json.loads(example.model_dump_json())
        assert set(s.get("required", [])) <= set(data)
        assert set(data) <= set(s["properties"])


# --- telemetry and events --------------------------------------------------------------------


def _status(now: float = 100.0) -> dict[str, Any]:
    """A ``Pipeline.status(now)``-shaped dict with real metrics."""
    m = PipelineMetrics()
    m.snapshot(now - 10.0)
    for i in range(300):
        m.count("frames_read")
        if i % 3:
            m.count("frames_inferred")
        m.observe("infer", 5.0 + i % 7)
        m.observe("preprocess", 1.0)
    m.count("frames_dropped", 4)
    m.count("source_failures")
    return {
        "name": "entrance",
        "source": "rtsp://user:secret@10.0.0.5/stream",
        "source_state": "streaming",
        "model": "det@1.4.0-rc.1",
        "backend": "onnxruntime",
        "precision": "fp32",
        "last_error": None,
        **m.snapshot(now),
    }


def test_pipeline_telemetry_from_real_status() -> None:
    status = _status()
    t = pipeline_telemetry_from_status(status)
    assert (t.name, t.model, t.version) == ("entrance", "det", "1.4.0-rc.1")
    assert (t.backend, t.precision, t.source_state) == ("onnxruntime", "fp32", "streaming")
    assert (t.frames_read, t.frames_inferred, t.frames_dropped) == (300, 200, 4)
    assert t.fps_in == 30.0 and t.fps_out == 20.0
    assert set(t.latency_ms) == {"infer", "preprocess"}
    assert t.latency_ms["infer"].p50 == status["latency_ms"]["infer"]["p50"]
    assert t.latency_ms["preprocess"].p99 == 1.0
    assert "secret" not in t.model_dump_json()  # the source URL is not on the wire


def test_pipeline_telemetry_without_model_or_samples() -> None:
    status = {
        "name": "idle",
        "source": "0",
        "source_state": "connecting",
        "model": None,
        "backend": None,
        "precision": None,
        "last_error": "camera 0 not found",
        **PipelineMetrics().snapshot(5.0),
    }
    t = pipeline_telemetry_from_status(status)
    assert t.model is t.version is None
    assert t.latency_ms == {} and t.fps_in == 0.0


def test_telemetry_with_mapped_pipeline_round_trips() -> None:
    base = EXAMPLES["telemetry"]
    assert isinstance(base, Telemetry)
    msg = base.model_copy(update={"pipelines": [pipeline_telemetry_from_status(_status())]})
    msg = Telemetry.model_validate(msg.model_dump())
    assert Telemetry.decode(msg.encode()) == msg


def test_inference_event_from_pipeline_event() -> None:
    event = {
        "pipeline": "entrance",
        "model": "det",
        "version": "1.3.2",
        "frame_seq": 9,
        "frame_time": 1768465800.125,
        "latency_ms": 10.2,
        "task": "detection",
        "detections": [
            {"box": [1.0, 2.0, 30.5, 40.0], "score": 0.5, "label_id": 2, "label": "car"}
        ],
        "summary": {"count": 1},
    }
    ev = InferenceEvent.from_pipeline_event("cam-017", event)
    assert ev.detections[0].box == (1.0, 2.0, 30.5, 40.0)
    assert InferenceEvent.decode(ev.encode()) == ev


@pytest.mark.parametrize(
    ("patch", "why"),
    [
        ({"extra": 1}, "extra field"),
        ({"type": "telemetry"}, "wrong type"),
        ({"latency_ms": -1.0}, "negative latency"),
        ({"detections": [{"box": [5, 5, 1, 1], "score": 0.5, "label_id": 0, "label": "x"}]}, "box"),
        (
            {"detections": [{"box": [0, 0, 1, 1], "score": 1.5, "label_id": 0, "label": "x"}]},
            "score",
        ),
        ({"device_id": "a/b"}, "device id not topic-safe"),
        ({"version": "1.4"}, "not semver"),
    ],
)
def test_inference_event_rejects(patch: dict[str, Any], why: str) -> None:
    data = {**EXAMPLES["inference_event"].model_dump(mode="json"), **patch}
    with pytest.raises(BadMessage):
        InferenceEvent.decode(json.dumps(data).encode())


@pytest.mark.parametrize(
    "payload",
    [
        b'{"p50": NaN}',
        b"",
        b"[]",
        b"null",
    ],
)
def test_telemetry_rejects_junk(payload: bytes) -> None:
    with pytest.raises(BadMessage):
        Telemetry.decode(payload)


def test_telemetry_rejects_non_finite_and_naive_time() -> None:
    data = EXAMPLES["telemetry"].model_dump(mode="json")
    text = json.dumps(data).replace('"cpu_percent": 37.5', '"cpu_percent": NaN')
    with pytest.raises(BadMessage, match="cpu_percent"):
        Telemetry.decode(text.encode())
    data["ts"] = "2026-01-15T08:30:00"
    with pytest.raises(BadMessage, match="timezone"):
        Telemetry.decode(json.dumps(data).encode())
    data["ts"] = "2026-01-15T10:30:00+02:00"
    assert Telemetry.decode(json.dumps(data).encode()).ts == EXAMPLES["telemetry"].ts  # type: ignore[attr-defined]


def test_model_and_version_come_together() -> None:
    status = {**_status(), "model": None}
    ok = pipeline_telemetry_from_status(status)
    with pytest.raises(ValidationError, match="together"):
        PipelineTelemetry.model_validate({**ok.model_dump(), "model": "det"})


# --- parsers of untrusted bytes only raise BadMessage ----------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=30,
)


def _mutated(name: str) -> st.SearchStrategy[bytes]:
    """Valid example payloads with one top-level field replaced or removed."""
    base = EXAMPLES[name].model_dump(mode="json")
    keys = sorted(base)

    def mutate(key: str, value: Any, drop: bool) -> bytes:
        d = dict(base)
        if drop:
            d.pop(key)
        else:
            d[key] = value
        return json.dumps(d).encode()

    return st.builds(mutate, st.sampled_from(keys), _json, st.booleans())


def _check(cls: type[Telemetry] | type[InferenceEvent], payload: bytes) -> None:
    try:
        msg = cls.decode(payload)
    except BadMessage:
        return
    assert cls.decode(msg.encode()) == msg  # what parses re-encodes and parses the same


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | _json.map(lambda v: json.dumps(v).encode()))
@pytest.mark.parametrize("cls", [Telemetry, InferenceEvent])
def test_decode_random_raises_only_bad_message(
    cls: type[Telemetry] | type[InferenceEvent], payload: bytes
) -> None:
    _check(cls, payload)


@settings(max_examples=200, deadline=None)
@given(st.data())
@pytest.mark.parametrize(
    ("cls", "name"), [(Telemetry, "telemetry"), (InferenceEvent, "inference_event")]
)
def test_decode_mutated_raises_only_bad_message(
    cls: type[Telemetry] | type[InferenceEvent], name: str, data: st.DataObject
) -> None:
    _check(cls, data.draw(_mutated(name)))


def test_oversized_and_deep_payloads() -> None:
    with pytest.raises(BadMessage, match="allowed"):
        Telemetry.decode(b" " * (MAX_MESSAGE + 1))
    with pytest.raises(BadMessage):
        InferenceEvent.decode(b"[" * 5000 + b"]" * 5000)
    with pytest.raises(BadMessage):
        Telemetry.decode("not json")  # type: ignore[arg-type]


def test_fetch_request_example_is_a_real_request() -> None:
    req = EXAMPLES["fetch_request"]
    assert isinstance(req, FetchRequest)
    assert FetchRequest.decode(req.encode()) == req


@pytest.mark.parametrize("value", ["Infinity", "-Infinity", "NaN", '{"a": [1, Infinity]}'])
def test_summary_refuses_non_finite_numbers(value: str) -> None:
    # found by the mutation test: Infinity went in and came back out as null
    base = EXAMPLES["inference_event"].model_dump(mode="json")
    payload = json.dumps({**base, "summary": {"x": "PLACEHOLDER"}}).replace('"PLACEHOLDER"', value)
    with pytest.raises(BadMessage, match="finite"):
        InferenceEvent.decode(payload.encode())
