"""Every TensorRT name the backend uses exists in NVIDIA's real bindings, and in the fake.

The real module comes from the ``tensorrt-cu12-bindings`` wheels that ``scripts/test`` downloads
(10.3 = JetPack 6, 10.16, 11.4), imported against stand-in native libraries
(``tests/harness/trt_bindings.py``). The same names are looked up on the fake
(``tests/harness/fake_tensorrt.py``) made for that version, so the fake cannot drift from the API.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper

import tests.harness.fake_tensorrt as fake
from tests.harness.trt_bindings import probe, wheels

# Real name → the fake object it is looked up on (None: a module attribute).
USED: dict[str, str | None] = {
    "__version__": None,
    "nptype": None,
    "float16": None,
    "Builder": None,
    "Runtime": None,
    "OnnxParser": None,
    "ILogger": None,
    "IProgressMonitor": None,
    "ILogger.Severity": None,
    "ILogger.Severity.INTERNAL_ERROR": None,
    "ILogger.Severity.ERROR": None,
    "ILogger.Severity.WARNING": None,
    "BuilderFlag": None,
    "BuilderFlag.GPU_FALLBACK": None,
    "BuilderFlag.TF32": None,
    "BuilderFlag.FP16": None,  # TensorRT 10 only: weak_typing() guards it
    "BuilderFlag.INT8": None,  # TensorRT 10 only
    "MemoryPoolType.WORKSPACE": None,
    "DeviceType.DLA": None,
    "LayerType.QUANTIZE": None,
    "LayerType.DEQUANTIZE": None,
    "TensorIOMode.INPUT": None,
    "Builder.create_network": "builder",
    "Builder.create_builder_config": "builder",
    "Builder.create_optimization_profile": "builder",
    "Builder.build_serialized_network": "builder",
    "Builder.num_DLA_cores": "builder",
    "IBuilderConfig.set_memory_pool_limit": "config",
    "IBuilderConfig.set_flag": "config",
    "IBuilderConfig.clear_flag": "config",
    "IBuilderConfig.add_optimization_profile": "config",
    "IBuilderConfig.create_timing_cache": "config",
    "IBuilderConfig.set_timing_cache": "config",
    "IBuilderConfig.get_timing_cache": "config",
    "IBuilderConfig.default_device_type": "config",
    "IBuilderConfig.DLA_core": "config",
    "IBuilderConfig.progress_monitor": "config",
    "INetworkDefinition.num_inputs": "network",
    "INetworkDefinition.get_input": "network",
    "INetworkDefinition.num_layers": "network",
    "INetworkDefinition.get_layer": "network",
    "ITensor.name": "tensor",
    "ITensor.shape": "tensor",
    "ITensor.dtype": "tensor",
    "ILayer.type": "layer",
    "OnnxParser.parse": "parser",
    "OnnxParser.num_errors": "parser",
    "OnnxParser.get_error": "parser",
    "IOptimizationProfile.set_shape": "profile",
    "ITimingCache.serialize": "cache",
    "Runtime.deserialize_cuda_engine": "runtime",
    "Runtime.DLA_core": "runtime",
    "ICudaEngine.num_io_tensors": "engine",
    "ICudaEngine.get_tensor_name": "engine",
    "ICudaEngine.get_tensor_mode": "engine",
    "ICudaEngine.get_tensor_dtype": "engine",
    "ICudaEngine.get_tensor_shape": "engine",
    "ICudaEngine.is_shape_inference_io": "engine",
    "ICudaEngine.create_execution_context": "engine",
    "IExecutionContext.set_input_shape": "context",
    "IExecutionContext.set_tensor_address": "context",
    "IExecutionContext.get_tensor_shape": "context",
    "IExecutionContext.execute_async_v3": "context",
}
WEAK_TYPING_ONLY = {"BuilderFlag.FP16", "BuilderFlag.INT8"}


def _fake_objects(version: str) -> tuple[Any, dict[str, Any]]:
    trt = fake.make_trt_module(version)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])
    g = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "i",
        [x],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    engine = fake.Engine(m.SerializeToString(), {})
    network = fake.Network()
    logger = trt.ILogger()
    objs = {
        "builder": trt.Builder(logger),
        "config": fake.BuilderConfig(),
        "network": network,
        "tensor": fake._Tensor(x),
        "layer": fake._Layer("Conv"),
        "parser": trt.OnnxParser(network, logger),
        "profile": fake._Profile(),
        "cache": fake._TimingCache(b"x"),
        "runtime": trt.Runtime(logger),
        "engine": engine,
        "context": engine.create_execution_context(),
    }
    return trt, objs


def _fake_has(trt: Any, objs: dict[str, Any], name: str, on: str | None) -> bool:
    if on is None:
        obj: Any = trt
        for part in name.split("."):
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return hasattr(objs[on], name.split(".")[-1])


VERSIONS = sorted(wheels()) or ["(none downloaded)"]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_name_the_backend_uses_is_in_the_real_bindings_and_the_fake(
    version: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if version not in wheels():
        pytest.skip("no tensorrt-cu12-bindings wheel in .cache/trt-bindings (scripts/test)")
    work = tmp_path_factory.getbasetemp() / "trt-bindings"
    real = probe(version, sorted(USED), work)
    major = int(version.split(".")[0])
    assert str(real["version"]).split(".")[:2] == version.split(".")[:2]
    present: dict[str, bool] = real["present"]  # type: ignore[assignment]
    missing = [
        n for n, ok in present.items() if not ok and not (major >= 11 and n in WEAK_TYPING_ONLY)
    ]
    assert not missing, f"tensorrt {real['version']} lacks {missing}"
    if major < 11:
        assert all(present[n] for n in WEAK_TYPING_ONLY)
    # the genuine factory failure the backend turns into ModelError
    assert real["builder"] == "TypeError: pybind11::init(): factory function returned nullptr"

    trt, objs = _fake_objects(version)
    fake_missing = [
        n for n, on in USED.items() if present.get(n) and not _fake_has(trt, objs, n, on)
    ]
    assert not fake_missing, f"the fake for {version} lacks {fake_missing}"
    extra = [n for n in WEAK_TYPING_ONLY if not present[n] and _fake_has(trt, objs, n, None)]
    assert not extra, f"the fake for {version} has {extra}, the real bindings do not"
    with pytest.raises(TypeError, match="nullptr"):
        fake.FAIL.add("Builder")
        try:
            trt.Builder(trt.ILogger())
        finally:
            fake.FAIL.discard("Builder")
    assert np.dtype(trt.nptype(np.float32)) == np.float32


def test_the_list_covers_every_trt_attribute_the_backend_names() -> None:
    """A new ``trt.X`` in the backend must be added to USED (and so checked above)."""
    import re

    engine = Path(__file__).resolve().parents[3] / "agent" / "engine"
    src = "".join(
        (engine / f).read_text() for f in ("tensorrt.py", "trt_build.py", "trt_common.py")
    )
    named = set(re.findall(r"\btrt\.([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Z][A-Za-z0-9_]*)*)", src))
    named -= {"ILogger.__init__", "IProgressMonitor.__init__"}
    assert named <= set(USED), sorted(named - set(USED))
