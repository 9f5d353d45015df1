"""The pure part of remote configuration: parse, validate against the local file, diff."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.pipeline.config import PipelineConfig
from agent.remoteconfig.plan import (
    Change,
    ConfigInvalid,
    diff_pipelines,
    mask_secrets,
    parse_document,
    sealed_paths,
    validate_pipelines,
)

LOCAL = parse_config({
    "device_id": "cam-01", "data_dir": "/var/lib/edgefleet",
    "broker": {"url": "mqtt://localhost:1883", "password": "broker-secret"},
    "service": {"stall_s": 10},
    "pipelines": [{"name": "local", "source": "a.mkv", "model": "m.onnx"}],
})  # fmt: skip


def pc(**kw: object) -> PipelineConfig:
    return PipelineConfig.model_validate({"name": "a", "source": "a.mkv", "model": "m.onnx", **kw})


@pytest.mark.parametrize(
    ("new", "change", "fields"),
    [
        ({}, Change.UNCHANGED, ()),
        ({"tracking": {"high_score": 0.7}}, Change.IN_PLACE, ("tracking",)),
        ({"events": {"policy": "every"}, "max_fps": 5}, Change.IN_PLACE, ("events", "max_fps")),
        ({"snapshots": {"every_s": 5}}, Change.IN_PLACE, ("snapshots",)),
        ({"motion": {"min_changed": 0.01}}, Change.IN_PLACE, ("motion",)),
        ({"source": "rtsp://u:p@cam/1"}, Change.RESTART, ("source",)),
        ({"model": "other.onnx"}, Change.RESTART, ("model",)),
        ({"input_size": "32x32"}, Change.RESTART, ("input_size",)),
        ({"loop": True, "max_fps": 5}, Change.RESTART, ("loop", "max_fps")),
    ],
)
def test_diff_sorts_each_change(new: dict[str, object], change: Change, fields: tuple) -> None:
    plan = diff_pipelines([pc(tracking={})], [pc(**{"tracking": {}, **new})])
    assert [(c.name, c.change, c.fields) for c in plan.changes] == [("a", change, fields)]


def test_diff_adds_and_removes_by_name() -> None:
    plan = diff_pipelines([pc(), pc(name="b")], [pc(name="c"), pc()])
    assert [(c.name, c.change) for c in plan.changes] == [
        ("c", Change.ADD), ("a", Change.UNCHANGED), ("b", Change.REMOVE),
    ]  # fmt: skip
    assert plan.summary() == "add c; remove b"
    assert diff_pipelines([pc()], [pc()]).empty


def test_validation_keeps_everything_local_but_the_pipelines() -> None:
    cfg = validate_pipelines(LOCAL, [{"name": "x", "source": "b.mkv", "model": "det"}])
    assert [p.name for p in cfg.pipelines] == ["x"]
    assert cfg.data_dir == Path("/var/lib/edgefleet") and cfg.broker is not None
    assert cfg.broker.password == "broker-secret" and cfg.service.stall_s == 10


@pytest.mark.parametrize(
    ("pipelines", "says"),
    [
        ([{"name": "x", "source": "a", "model": "m"}] * 2, "unique; repeated: ['x']"),
        ([{"name": "x", "source": "a", "model": "m", "max_fps": 0.1}], "stall_s"),
        ([{"name": "x", "source": "a", "model": "m", "colour": 1}], "pipelines.0.colour"),
        ([{"name": "x", "source": "a"}], "pipelines.0.model"),
    ],
)
def test_validation_applies_the_local_files_rules(pipelines: list, says: str) -> None:
    with pytest.raises(ConfigInvalid) as e:
        validate_pipelines(LOCAL, pipelines)
    assert says in str(e.value)


@pytest.mark.parametrize(
    ("document", "says"),
    [
        ("not json", "not JSON"),
        ("[]", "JSON object"),
        ('{"pipelines": {}}', "JSON object"),
        ('{"pipelines": [], "data_dir": "/tmp"}', "['data_dir'] stay in the device's local"),
        ('{"pipelines": [], "broker": {"url": "mqtt://evil:1"}}', "['broker']"),
    ],
)
def test_documents_of_the_wrong_shape_are_refused(document: str, says: str) -> None:
    with pytest.raises(ConfigInvalid) as e:
        parse_document(document)
    assert says in str(e.value)
    assert parse_document(json.dumps({"pipelines": [{"a": 1}]})) == [{"a": 1}]


def test_sealed_values_are_found_and_their_plaintext_masked() -> None:
    # the plaintexts come from unseal_tree(opened=…): tests/agent/protocol/test_sealed.py
    sealed = [{"name": "a", "source": "sealed:v1:QUJD", "zones": [{"x": "sealed:v1:REVG"}]}]
    assert sealed_paths(sealed) == ["[0].source", "[0].zones[0].x"]
    secrets = ["rtsp://u:hunter2@cam/1", "gst pw=s3"]
    text = "bad source 'rtsp://u:hunter2@cam/1' and gst pw=s3 and rtsp://v:pw@other/2"
    masked = mask_secrets(text, secrets)
    assert "hunter2" not in masked and "s3" not in masked and ":pw@" not in masked
