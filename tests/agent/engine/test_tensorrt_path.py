"""The agent's TensorRT path against the fake bindings (``tests/harness/fake_tensorrt.py``,
which says what it promises): factories that raise, types NumPy lacks, TensorRT 11's strong
typing, engine settings that reach the builder, and ``open_local_model`` → spawned child build
→ cache → open, with the fake importable in the child too.

No GPU here: these prove the adapter's logic, not TensorRT's behaviour (``scripts/hardware_check``
on a device does that).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import tests.harness.fake_tensorrt as fake
from agent.common.errors import ModelError
from agent.engine.precision import candidate_precisions, variant_file
from tests.harness.util import ROOT


def _conv_model(path: Path, *, dynamic: bool = False, dtype: int = TensorProto.FLOAT) -> Path:
    """A 1-conv model, input [1, 3, H, W] (H, W dynamic when asked)."""
    hw: list[Any] = ["h", "w"] if dynamic else [16, 16]
    x = helper.make_tensor_value_info("images", dtype, [1, 3, *hw])
    y = helper.make_tensor_value_info("out", dtype, [1, 2, *hw])
    w = helper.make_tensor(
        "w", dtype, [2, 3, 1, 1], np.linspace(-1, 1, 6).astype(np.float32).tolist()
    )
    g = helper.make_graph([helper.make_node("Conv", ["images", "w"], ["out"])], "c", [x], [y], [w])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _header(engine: Path) -> dict[str, Any]:
    data = engine.read_bytes()
    n = int.from_bytes(data[8:12], "little")
    return dict(json.loads(data[12 : 12 + n]))


# ------------------------------------------------------------------------------------ 1. fp16
def test_fp16_on_tensorrt_is_built_from_the_fp32_file_when_there_is_no_fp16_file() -> None:
    variants = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    cands = candidate_precisions(["fp32", "fp16", "int8"], variants, "tensorrt")
    assert cands == ["fp32", "fp16", "int8"]
    # every candidate has a file: the KeyError of variants["fp16"] is gone
    assert [variant_file(p, variants) for p in cands] == [
        "model.onnx",
        "model.onnx",
        "model.int8.onnx",
    ]
    assert variant_file("fp16", {**variants, "fp16": "model.fp16.onnx"}) == "model.fp16.onnx"
    # TensorRT 11 (no FP16 builder flag): fp16 only from an fp16 file
    strong = candidate_precisions(["fp32", "fp16"], variants, "tensorrt", fp16_from_fp32=False)
    assert strong == ["fp32"]
    with pytest.raises(ValueError, match="no file for precision 'int8'"):
        variant_file("int8", {"fp32": "model.onnx"})


# ------------------------------------------------------------------------------------ 2. factories
@pytest.mark.parametrize("factory", ["Builder", "OnnxParser"])
def test_a_failing_build_factory_is_a_model_error(
    factory: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake.install(monkeypatch)
    fake.FAIL.add(factory)
    from agent.engine.tensorrt import build_engine

    with pytest.raises(ModelError, match="could not create") as e:
        build_engine(_conv_model(tmp_path / "m.onnx"), tmp_path / "m.engine")
    assert e.value.reason == "build"
    assert isinstance(e.value.__cause__, TypeError) and "nullptr" in str(e.value.__cause__)
    assert not (tmp_path / "m.engine").exists()


def test_a_failing_runtime_factory_is_a_model_error_not_a_type_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    state = fake.install(monkeypatch)
    from agent.engine.tensorrt import TensorRTBackend, build_engine

    engine = tmp_path / "m.engine"
    build_engine(_conv_model(tmp_path / "m.onnx"), engine)
    fake.FAIL.add("Runtime")
    with pytest.raises(ModelError, match="could not create a runtime") as e:
        TensorRTBackend.from_engine_file(engine)
    assert e.value.reason == "unavailable"
    assert state.live_contexts == 0 and not state.stack()  # the CUDA context was released


# ------------------------------------------------------------------------------------ 4. nptype
def test_a_bf16_tensor_is_unsupported_not_a_type_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake.install(monkeypatch)
    from agent.engine.tensorrt import TensorRTBackend, build_engine

    x = helper.make_tensor_value_info("images", TensorProto.BFLOAT16, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 4, 4])
    node = helper.make_node("Cast", ["images"], ["out"], to=TensorProto.FLOAT)
    m = helper.make_model(
        helper.make_graph([node], "bf16", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    m.ir_version = 8
    onnx.save(m, str(tmp_path / "m.onnx"))
    engine = tmp_path / "m.engine"
    build_engine(tmp_path / "m.onnx", engine)
    with pytest.raises(ModelError, match="no NumPy equivalent") as e:
        TensorRTBackend.from_engine_file(engine)
    assert e.value.reason == "unsupported"


# ------------------------------------------------------------------------------------ 3. TRT 11
def test_tensorrt_11_builds_int8_from_qdq_without_flags_and_refuses_fp16_from_fp32(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, test_models: dict[str, Path]
) -> None:
    fake.install(monkeypatch, version="11.4.0")
    import tensorrt as trt

    from agent.engine.tensorrt import build_engine, weak_typing

    assert not weak_typing(trt) and not hasattr(trt.BuilderFlag, "FP16")
    from cloud_sync.registry.quantize import quantize_int8

    digits = test_models["digits"] / "model.onnx"
    with np.load(test_models["digits"] / "test_set.npz") as z:
        x = np.asarray(z["images"][:40], np.float32)[:, None] / 255.0
    qdq = quantize_int8(digits, tmp_path / "q.onnx", x)
    prof = {"input": [[1, 1, 8, 8]] * 3}  # its batch axis is dynamic
    build_engine(qdq, tmp_path / "q.engine", precision="int8", profiles=prof)  # no AttributeError
    assert "INT8(strongly typed Q/DQ)" in _header(tmp_path / "q.engine")["flags"]
    with pytest.raises(ModelError, match="no FP16 builder flag") as e:
        build_engine(digits, tmp_path / "f.engine", precision="fp16", profiles=prof)
    assert e.value.reason == "precision"
    build_engine(digits, tmp_path / "f32.engine", precision="fp32", profiles=prof)


def test_tensorrt_10_sets_the_precision_flags(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake.install(monkeypatch, version="10.3.0")
    from agent.engine.tensorrt import build_engine

    build_engine(_conv_model(tmp_path / "m.onnx"), tmp_path / "m.engine", precision="fp16")
    assert "FP16" in _header(tmp_path / "m.engine")["flags"]


# ------------------------------------------------------------------------------------ 6. pycuda
def test_building_needs_no_pycuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake.install(monkeypatch)
    monkeypatch.setitem(sys.modules, "pycuda", None)  # import pycuda now raises ImportError
    monkeypatch.setitem(sys.modules, "pycuda.driver", None)
    from agent.engine.tensorrt import build_engine

    build_engine(_conv_model(tmp_path / "m.onnx"), tmp_path / "m.engine")
    assert (tmp_path / "m.engine").is_file()


# ------------------------------------------------------------------------------------ fake
def test_the_fake_executes_asynchronously_like_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A host read before ``synchronize`` sees stale data (what would hide a missing sync)."""
    fake.install(monkeypatch)
    import pycuda.driver as cuda

    ctx = cuda.Device(0).make_context()
    try:
        stream = cuda.Stream()
        dev = cuda.mem_alloc(16)
        src = np.arange(4, dtype=np.float32)
        out = np.zeros(4, np.float32)
        cuda.memcpy_htod_async(dev, src, stream)
        cuda.memcpy_dtoh_async(out, dev, stream)
        assert not out.any()  # nothing happened yet
        stream.synchronize()
        assert out.tolist() == [0.0, 1.0, 2.0, 3.0]
        dev.free()
    finally:
        ctx.detach()


# ------------------------------------------------------------------------------------ 5 + path
@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake importable by the spawned build child (and this process)."""
    root = fake.fake_site(tmp_path / "site")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setenv("EDGEFLEET_FAKE_TRT_DLA_CORES", "2")
    return root


def test_the_agents_own_path_builds_in_a_child_caches_and_passes_engine_settings(
    site: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """open_local_model → load_backend → spawned child build (fake imported there) → cache →
    TensorRTBackend; workspace_mb, dla_core and a profile from input_size reach the builder."""
    fake.install(monkeypatch)  # this process: the same fake, with driver state to inspect
    from agent.config import TensorRTEngine
    from agent.models import open_local_model
    from agent.profiles import get_profile

    model = _conv_model(tmp_path / "dyn.onnx", dynamic=True)
    cache = tmp_path / "cache"
    engine_cfg = TensorRTEngine(workspace_mb=64, dla_core=1)
    profile = get_profile("jetson-orin-nano")
    kw: dict[str, Any] = {"task": "raw", "engine": engine_cfg, "profile": profile}
    with pytest.raises(ModelError, match="input_size") as e:
        open_local_model(model, cache_dir=cache, **kw)
    assert e.value.reason == "shape"

    runnable = open_local_model(model, input_size="32x24", cache_dir=cache, **kw)
    try:
        assert runnable.backend.info.name == "tensorrt"
        assert runnable.backend.info.device == "dla:1"
        engines = list(cache.rglob("*.engine")) or [
            p for p in cache.rglob("*") if p.is_file() and p.read_bytes()[:8] == fake.MAGIC
        ]
        assert len(engines) == 1, list(cache.rglob("*"))
        h = _header(engines[0])
        assert h["pools"] == {"WORKSPACE": 64 << 20}
        assert (h["device_type"], h["dla_core"]) == ("DLA", 1)
        assert h["profiles"] == {"images": [[1, 3, 24, 32]] * 3}
        out = runnable.backend.run({"images": np.ones((1, 3, 24, 32), np.float32)})
        assert out[0].shape == (1, 2, 24, 32)
    finally:
        runnable.backend.close()
    # a second open is a cache hit: no new build
    again = open_local_model(model, input_size="32x24", cache_dir=cache, **kw)
    again.backend.close()
    assert (
        len([p for p in cache.rglob("*") if p.is_file() and p.read_bytes()[:8] == fake.MAGIC]) == 1
    )


def test_a_child_build_whose_builder_fails_is_a_model_error(
    site: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    fake.install(monkeypatch)
    monkeypatch.setenv("EDGEFLEET_FAKE_TRT_FAIL", "Builder")
    from agent.config import TensorRTEngine
    from agent.models import open_local_model

    with pytest.raises(ModelError, match="could not create a builder"):
        open_local_model(
            _conv_model(tmp_path / "m.onnx"),
            task="raw",
            engine=TensorRTEngine(),
            cache_dir=tmp_path / "cache",
        )


# ------------------------------------------------------------------------------------ versions
@pytest.mark.parametrize(
    ("version", "ok"),
    [
        ("10.3.0", True),
        ("10.16.1.11", True),
        ("11.4.0", True),
        ("8.5.2", False),
        ("10.2.0", False),
        ("12.0.0", False),
        ("x.y", False),
    ],
)
def test_supported_tensorrt_versions(version: str, ok: bool) -> None:
    from agent.engine.tensorrt import version_supported

    assert version_supported(version)[0] is ok


@pytest.mark.parametrize(("version", "fp16"), [("10.3.0", "builder flag"), ("11.4.0", "only")])
def test_check_says_which_tensorrt_precisions_and_dla_cores(
    version: str, fp16: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.install(monkeypatch, version=version)
    monkeypatch.setattr(fake.Builder, "num_DLA_cores", 2)
    from agent.engine.tensorrt import tensorrt_available

    ok, detail = tensorrt_available()
    assert ok and f"tensorrt {version}" in detail and "2 DLA core(s)" in detail
    assert fp16 in detail and "int8 (Q/DQ)" in detail


def test_an_unsupported_tensorrt_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    fake.install(monkeypatch, version="8.5.2")
    from agent.engine.tensorrt import tensorrt_available

    ok, detail = tensorrt_available()
    assert not ok and "8.5.2 is not supported" in detail


# ------------------------------------------------------------------------------------ hw check
def test_hardware_check_refuses_cleanly_without_a_gpu(tmp_path: Path) -> None:
    import subprocess

    script = Path(__file__).resolve().parents[3] / "scripts" / "hardware_check.py"
    res = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2, res.stderr
    assert "no TensorRT GPU here" in res.stderr and "nothing was built" in res.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_hardware_check_runs_end_to_end_against_the_fake(site: Path, tmp_path: Path) -> None:
    """The script's whole path (child builds, cache hits, edgefleet-agent bench on TensorRT,
    report) with the fake bindings importable: what a device will run, minus the GPU."""
    import os
    import subprocess

    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}"}
    res = subprocess.run(
        [sys.executable, "-m", "scripts.hardware_check", "--skip-tests", "--frames", "5",
         "--models", "digits", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, check=False, env=env, cwd=ROOT,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(next((tmp_path / "out").glob("hardware-report-*.json")).read_text())
    assert [(b["model"], b["precision"], b["ok"]) for b in report["builds"]] == [
        ("digits", "fp32", True),
        ("digits", "fp16", True),
        ("digits", "int8", True),
    ]
    assert all(b["cache_hit_s"] < b["cold_build_s"] for b in report["builds"])
    assert report["bench"][0]["ok"] and report["bench"][0]["report"]["backend"] == "tensorrt"
    assert (tmp_path / "out").glob("hardware-report-*.md")


# ------------------------------------------------------------------------------------ update
@pytest.mark.broker
@pytest.mark.video
def test_a_delivered_model_updates_on_tensorrt_with_precision_choice_and_hot_swap(
    site: Path,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    broker: Any,
    test_models: dict[str, Path],
) -> None:
    """Registry → MQTT → update manager on a Jetson profile with the TensorRT backend: each
    precision the profile allows is built in a spawned child (the fake imported there),
    measured against the golden outputs, the fastest passing one runs, then a second version
    hot-swaps in. Before, fp16 on such a profile was a KeyError left in 'building'."""
    fake.install(monkeypatch)
    from agent.config import parse_config
    from agent.service import Agent
    from tests.harness.fleet import DEVICE, Fleet
    from tests.harness.models import write_digit_loop
    from tests.harness.util import wait_for

    video = write_digit_loop(test_models, tmp_path / "digits.mkv")
    fleet = Fleet(tmp_path, broker, video, test_models)
    fleet.start_server()
    try:
        fleet.publish("digits", "1.0.0")
        cfg = parse_config(
            {
                "device_id": DEVICE,
                "data_dir": str(tmp_path / "data"),
                "profile": "jetson-orin-nano",
                "engine": {"type": "tensorrt"},
                "pipelines": [
                    {"name": "front", "source": str(video), "model": "digits", "loop": True}
                ],
                "broker": {"url": broker.url},
                "trust": {"root": str(fleet.repo_dir / "root.json")},
                "update": {"health_window_s": 0.5, "health_min_frames": 5, "max_latency_ratio": 20},
            }
        )
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
        fleet.agent = Agent(cfg)
        fleet.agent.start()
        rep = fleet.commit("digits@1.0.0", timeout=120)
        assert rep.last_error is None
        model = fleet.pipe.model
        assert model.backend.info.name == "tensorrt"
        assert model.backend.info.precision in ("fp32", "fp16")
        assert wait_for(lambda: fleet.pipe.metrics.counters["frames_inferred"] > 10, 30)

        fleet.publish("digits", "1.1.0")
        rep = fleet.commit("digits@1.1.0", timeout=120)
        assert fleet.running() == "digits@1.1.0" and rep.last_error is None
        before = fleet.pipe.metrics.counters["frames_inferred"]
        assert wait_for(lambda: fleet.pipe.metrics.counters["frames_inferred"] > before + 5, 30)
    finally:
        fleet.close()
