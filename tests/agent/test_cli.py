"""The console scripts as a user runs them: check, run + status, bench --json, demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.models import open_local_model
from agent.profiles import get_profile
from cloud_sync.ingest.store import open_store

BIN = Path(sys.executable).parent


def _run(
    *args: str, timeout: float = 300, env: dict[str, str | None] | None = None
) -> subprocess.CompletedProcess[str]:
    """``env`` adds variables to the test's environment; a None value removes one."""
    e = {
        **os.environ,
        "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", "/tmp/edgefleet-test-cache"),
    }
    for k, v in (env or {}).items():
        if v is None:
            e.pop(k, None)
        else:
            e[k] = v
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=e, check=False)


def _config(tmp_path: Path, source: str, model: Path, **extra: str) -> Path:
    lines = [
        'device_id = "cam-01"',
        f'data_dir = "{tmp_path / "data"}"',
        'profile = "x86-cpu"',
        "[[pipelines]]",
        'name = "front"',
        f'source = "{source}"',
        f'model = "{model}"',
        'pace = "none"',
        *(f'{k} = "{v}"' for k, v in extra.items()),
        "[pipelines.sink]",
        f'jsonl = "{tmp_path / "data" / "front.jsonl"}"',
    ]
    cfg = tmp_path / "agent.toml"
    cfg.write_text("\n".join(lines) + "\n")
    return cfg


@pytest.mark.video
def test_run_processes_the_file_and_status_reports_it(
    tmp_path: Path, test_models: dict[str, Path], synthetic_video: Path
) -> None:
    cfg = _config(tmp_path, str(synthetic_video), test_models["blobdet"] / "model.onnx")
    cache = tmp_path / "xdg-cache"  # where ONNX Runtime's telemetry would write its device id
    r = _run(str(BIN / "edgefleet-agent"), "run", "--config", str(cfg), "--duration", "120",
             env={"XDG_CACHE_HOME": str(cache), "ORT_DISABLE_TELEMETRY": None})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert not (cache / "Microsoft").exists(), "ONNX Runtime's usage telemetry was on"
    lines = (tmp_path / "data" / "front.jsonl").read_text().splitlines()
    assert len(lines) == 90  # every frame of the 90-frame video, pace = "none"
    first = json.loads(lines[0])
    assert first["model"] == "blobdet" and first["detections"]
    st = _run(str(BIN / "edgefleet-agent"), "status", "--config", str(cfg), "--json")
    assert st.returncode == 0, st.stderr
    status = json.loads(st.stdout)
    assert status["device_id"] == "cam-01" and status["profile"] == "x86-cpu"
    pipe = status["pipelines"][0]
    assert pipe["frames_inferred"] == 90 and pipe["backend"] == "onnxruntime"
    assert pipe["latency_ms"]["infer"]["p95"] > 0


def test_check_reports_profile_backends_and_problems(
    tmp_path: Path, test_models: dict[str, Path]
) -> None:
    cfg = _config(tmp_path, "videotestsrc ! appsink", test_models["blobdet"] / "model.onnx")
    r = _run(str(BIN / "edgefleet-agent"), "check", "--config", str(cfg), "--json")
    report = json.loads(r.stdout)
    assert report["profile"]["name"] == "x86-cpu"
    assert report["backends"]["onnxruntime"]["available"] is True
    assert report["backends"]["tensorrt"]["available"] is False
    assert "tensorrt" in report["backends"]["tensorrt"]["detail"]
    if not report["gstreamer"]["available"]:
        assert r.returncode == 1 and not report["pipelines"][0]["ok"]
        assert "GStreamer" in report["pipelines"][0]["detail"]
    human = _run(str(BIN / "edgefleet-agent"), "check", "--config", str(cfg))
    assert "profile x86-cpu" in human.stdout and "backend onnxruntime" in human.stdout


def test_bad_config_exits_2_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('device_id = "cam 1"\n')
    r = _run(str(BIN / "edgefleet-agent"), "run", "--config", str(cfg))
    assert r.returncode == 2
    assert "device_id" in r.stderr and str(cfg) in r.stderr
    assert "Traceback" not in r.stderr


def test_broken_model_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 10)
    r = _run(str(BIN / "edgefleet-agent"), "bench", "--model", str(bad), "--frames", "5", "--json")
    assert r.returncode == 2
    assert "broken.onnx" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.video
@pytest.mark.slow
def test_bench_json_has_the_documented_keys(test_models: dict[str, Path]) -> None:
    r = _run(
        str(BIN / "edgefleet-agent"),
        "bench",
        "--model",
        str(test_models["blobdet"] / "model.onnx"),
        "--frames",
        "40",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    for key in ("backend_fps", "pipeline_fps", "ratio", "latency_ms", "frames", "dropped"):
        assert key in rep
    assert rep["frames"] == 40 and rep["dropped"] == 0
    assert rep["backend_fps"] > 0 and 0 < rep["ratio"] < 2
    for stage in ("preprocess", "infer", "postprocess", "sink", "capture_wait"):
        assert {"p50", "p95", "p99"} <= set(rep["latency_ms"][stage])
    assert rep["overload"]["dropped"] > 0


def test_dynamic_input_needs_input_size(test_models: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    from agent.common.errors import ModelError

    bare = tmp_path / "seg.onnx"  # copied alone: no card beside it
    shutil.copy(test_models["tinyseg"] / "model.onnx", bare)
    with pytest.raises(ModelError, match="input-size"):
        open_local_model(bare, cache_dir=tmp_path / "c")
    m = open_local_model(bare, task="heatmap", input_size="96x64", cache_dir=tmp_path / "c")
    try:
        assert (m.card.input.width, m.card.input.height) == (96, 64)
        assert m.card.task == "heatmap"
    finally:
        m.close()


def test_precision_is_measured_and_chosen_among_variants(
    test_models: dict[str, Path], tmp_path: Path
) -> None:
    messages: list[str] = []
    m = open_local_model(
        test_models["digits"] / "model.onnx",
        profile=get_profile("x86-cpu"),
        cache_dir=tmp_path / "c",
        progress=messages.append,
    )
    try:
        assert m.backend.info.precision in ("fp32", "int8")
        chosen = [s for s in messages if s.startswith("precision ")]
        assert len(chosen) == 1 and "fp32" in chosen[0] and "int8" in chosen[0], messages
    finally:
        m.close()
    # A profile that allows only fp32 never measures.
    messages.clear()
    nano = get_profile("jetson-nano")  # fp32 + fp16, no int8: on onnxruntime only fp32 remains
    m = open_local_model(
        test_models["digits"] / "model.onnx",
        profile=nano,
        engine="onnxruntime",
        cache_dir=tmp_path / "c",
        progress=messages.append,
    )
    try:
        assert m.backend.info.precision == "fp32"
        assert not any(s.startswith("precision ") for s in messages)
    finally:
        m.close()


def test_int8_variant_failing_golden_check_is_not_chosen(
    test_models: dict[str, Path], tmp_path: Path
) -> None:
    import shutil

    d = tmp_path / "digits"
    shutil.copytree(test_models["digits"], d)
    # An int8 tolerance no quantized model can meet: the int8 variant fails its golden check,
    # so fp32 must be chosen even where int8 measured faster.
    card = json.loads((d / "card.json").read_text())
    card["golden_atol"] = {"fp32": 1e-4, "fp16": 1e-3, "int8": 1e-9}
    (d / "card.json").write_text(json.dumps(card))
    messages: list[str] = []
    m = open_local_model(
        d / "model.onnx",
        profile=get_profile("x86-cpu"),
        cache_dir=tmp_path / "c",
        progress=messages.append,
    )
    try:
        assert m.backend.info.precision == "fp32", messages
        chosen = next(s for s in messages if s.startswith("precision "))
        assert "int8" in chosen  # int8 was a candidate and was refused
    finally:
        m.close()


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.parametrize("broker", ["mosquitto", "amqtt"])
def test_demo_runs_the_fleet_loop(tmp_path: Path, broker: str) -> None:
    """Broker, registry, publish, deploy, agent, ingest: the update commits, detections flow,
    and the ingest database ends up with the device, its telemetry and its events."""
    r = _run(str(BIN / "edgefleet"), "demo", "--duration", "4", "--workdir", str(tmp_path),
             "--broker", broker)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"MQTT broker: {broker}" in r.stdout
    assert "phase committed" in r.stdout
    assert re.search(r"frame \d+: blob 1\.00 at", r.stdout), r.stdout
    assert "fleet: demo-01 online | front: blobdet@1.0.0 committed" in r.stdout
    assert (tmp_path / "data" / "front.jsonl").stat().st_size > 0
    store = open_store(f"sqlite:///{tmp_path / 'fleet.db'}")
    try:
        counts = store.counts()
        [dev] = store.fleet()
    finally:
        store.close()
    assert counts["telemetry"] >= 1 and counts["events"] >= 1, counts
    assert counts["dead_letters"] == 0
    assert dev["device_id"] == "demo-01"
    # the agent stopped cleanly at the end, so its last state says offline
    assert dev["online"] is False
