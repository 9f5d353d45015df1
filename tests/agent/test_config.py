"""Agent config: the documented example validates; mistakes name the file and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.common.errors import ConfigError
from agent.config import AgentConfig, OnnxRuntimeEngine, load_config, parse_config

EXAMPLE = """
device_id = "cam-01"
data_dir = "/var/lib/edgefleet"
profile = "auto"
[tags]
site = "berlin"
[[pipelines]]
name = "front"
source = "rtsp://10.0.0.5/stream"
model = "det"
task = "detection"
input_size = "640x640"
[pipelines.sink]
jsonl = "/var/lib/edgefleet/front.jsonl"
"""


def test_issue_example_config_validates(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(EXAMPLE)
    cfg = load_config(f)
    assert cfg.device_id == "cam-01"
    assert cfg.tags == {"site": "berlin"}
    assert cfg.pipelines[0].sink.jsonl == Path("/var/lib/edgefleet/front.jsonl")
    assert cfg.engine.type == "auto"


def test_example_config_in_repo_validates() -> None:
    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "docs" / "agent.example.toml")
    assert cfg.pipelines


def test_env_overrides_file(tmp_path: Path) -> None:
    f = tmp_path / "agent.toml"
    f.write_text(EXAMPLE)
    cfg = load_config(f, env={"EDGEFLEET_DEVICE_ID": "cam-99", "EDGEFLEET_DATA_DIR": "/tmp/x"})
    assert cfg.device_id == "cam-99" and cfg.data_dir == Path("/tmp/x")


def test_engine_is_a_discriminated_union() -> None:
    cfg = parse_config({"device_id": "d", "engine": {"type": "onnxruntime", "threads": 2}})
    assert isinstance(cfg.engine, OnnxRuntimeEngine) and cfg.engine.threads == 2
    with pytest.raises(ConfigError, match="engine"):
        parse_config({"device_id": "d", "engine": {"type": "onnxruntime", "workspace_mb": 64}})


@pytest.mark.parametrize(
    ("snippet", "field"),
    [
        ('device_id = "cam 01"', "device_id"),
        ('device_id = "d"\nsurprise = 1', "surprise"),
        (
            'device_id = "d"\n[[pipelines]]\nname = "a"\nsource = 0\nmodel = "m"\n'
            'input_size = "640"',
            "pipelines.0.input_size",
        ),
        (
            'device_id = "d"\n[[pipelines]]\nname = "a"\nsource = 0\nmodel = "m"\ntask = "segment"',
            "pipelines.0.task",
        ),
        ('device_id = "d"\nbuild_timeout_s = -1', "build_timeout_s"),
    ],
)
def test_bad_config_names_file_and_field(tmp_path: Path, snippet: str, field: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(snippet)
    with pytest.raises(ConfigError) as ei:
        load_config(f)
    assert str(f) in str(ei.value)
    assert ei.value.field == field
    assert field in str(ei.value)


def test_duplicate_pipeline_names_rejected() -> None:
    p = {"name": "a", "source": 0, "model": "m"}
    with pytest.raises(ConfigError, match="repeated"):
        parse_config({"device_id": "d", "pipelines": [p, p]})


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    f = tmp_path / "x.toml"
    f.write_text("device_id = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_every_field_is_described() -> None:
    def walk(model: type) -> None:
        for name, f in model.model_fields.items():  # type: ignore[attr-defined]
            if name == "type":
                continue
            assert f.description, f"{model.__name__}.{name} has no description"

    from agent.config import AutoEngine, TensorRTEngine
    from agent.pipeline.config import PipelineConfig, SinkConfig

    for m in (
        AgentConfig,
        PipelineConfig,
        SinkConfig,
        OnnxRuntimeEngine,
        TensorRTEngine,
        AutoEngine,
    ):
        walk(m)
