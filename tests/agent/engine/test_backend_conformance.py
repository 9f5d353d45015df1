"""Conformance suite every inference backend must pass, with NumPy reference outputs.

Backends: ``onnxruntime`` (always), ``tensorrt`` (needs TensorRT, pycuda and a GPU; skipped
with the reason otherwise), and ``tensorrt-fake``: the real TensorRT adapter code driven by
the fake ``tensorrt``/``pycuda`` of ``tests/harness/fake_tensorrt.py``, so the adapter's logic
runs here even though no machine in CI has a GPU.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import tests.harness.fake_tensorrt as fake_trt
from agent.common.errors import ModelError
from agent.engine.base import Backend, TensorSpec
from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.engine.tensorrt import TensorRTBackend, build_engine, tensorrt_available

TRT_OK, TRT_WHY = tensorrt_available()

BACKENDS = [
    pytest.param("onnxruntime", id="onnxruntime"),
    pytest.param(
        "tensorrt",
        id="tensorrt",
        marks=[pytest.mark.tensorrt, pytest.mark.skipif(not TRT_OK, reason=f"TensorRT: {TRT_WHY}")],
    ),
    pytest.param("tensorrt-fake", id="tensorrt-fake"),
]
TRT_KINDS = [p for p in BACKENDS if p.values[0] != "onnxruntime"]

RNG = np.random.default_rng(7)
W1 = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.5
B1 = RNG.standard_normal(4).astype(np.float32) * 0.1
W2 = RNG.standard_normal((4 * 8 * 8, 5)).astype(np.float32) * 0.1
B2 = RNG.standard_normal(5).astype(np.float32) * 0.1
DYN_PROFILE = {"x": ((1, 3, 4, 4), (1, 3, 8, 8), (1, 3, 16, 16))}
# fp32 everywhere; a real GPU sums in another order than NumPy, hence its looser bound.
TOLERANCE = {"onnxruntime": (1e-4, 1e-5), "tensorrt-fake": (1e-4, 1e-5), "tensorrt": (1e-3, 1e-4)}


# ---------------------------------------------------------------- models and references


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _conv_nodes() -> list[onnx.NodeProto]:
    return [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
    ]


def _model(
    nodes: list[onnx.NodeProto], x_shape: list[object], y_shape: list[int], inits: list
) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def make_convnet(path: Path) -> Path:
    """Conv(3x3, pad 1) + Relu + Flatten + Gemm: x [1,3,8,8] -> y [1,5]."""
    nodes = [
        *_conv_nodes(),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "w2", "b2"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(a, n) for a, n in ((W1, "w1"), (B1, "b1"), (W2, "w2"), (B2, "b2"))
    ]
    return _save(_model(nodes, [1, 3, 8, 8], [1, 5], inits), path)


def make_dynamic(path: Path) -> Path:
    """Conv + Relu + GlobalAveragePool with dynamic H, W: x [1,3,H,W] -> y [1,4,1,1]."""
    nodes = [*_conv_nodes(), helper.make_node("GlobalAveragePool", ["r"], ["y"])]
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1")]
    return _save(_model(nodes, [1, 3, "H", "W"], [1, 4, 1, 1], inits), path)


def conv_relu_ref(x: np.ndarray) -> np.ndarray:
    """NumPy reference of Conv(W1, B1, 3x3, pad 1) + Relu, NCHW."""
    h, w = x.shape[2:]
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    patches = np.stack(
        [xp[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1
    )
    out = np.einsum("nchwk,ock->nohw", patches, W1.reshape(4, 3, 9).astype(np.float64))
    return np.maximum(out + B1[None, :, None, None], 0.0)


def convnet_ref(x: np.ndarray) -> np.ndarray:
    return conv_relu_ref(x).reshape(1, -1) @ W2.astype(np.float64) + B2


def dynamic_ref(x: np.ndarray) -> np.ndarray:
    return conv_relu_ref(x).mean(axis=(2, 3), keepdims=True)


def _x(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ---------------------------------------------------------------- backend factories

Factory = Callable[..., Backend]


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> object:
    return fake_trt.install(monkeypatch)


@pytest.fixture(params=BACKENDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def open_backend(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Factory]:
    """``open_backend(model_path, profiles=None)`` on the parametrized backend; closes all."""
    state = request.getfixturevalue("fake_cuda") if kind == "tensorrt-fake" else None
    opened: list[Backend] = []

    def factory(model: Path, profiles: dict | None = None) -> Backend:
        if kind == "onnxruntime":
            b: Backend = OnnxRuntimeBackend(model, providers=["CPUExecutionProvider"])
        else:
            engine = tmp_path / f"{model.stem}.engine"
            build_engine(
                model,
                engine,
                precision="fp32",
                workspace_bytes=1 << 28,
                profiles=profiles,
                timing_cache_path=tmp_path / "timing.cache",
            )
            b = TensorRTBackend.from_engine_file(engine)
        opened.append(b)
        return b

    yield factory
    for b in opened:
        b.close()
    if state is not None:  # the adapter must free every buffer and its CUDA context
        assert state.mem == {}
        assert state.live_contexts == 0
        assert state.stack() == []


# ---------------------------------------------------------------- the conformance suite


def test_declares_inputs_and_outputs(open_backend: Factory, tmp_path: Path) -> None:
    b = open_backend(make_convnet(tmp_path / "convnet.onnx"))
    assert b.inputs == (TensorSpec("x", (1, 3, 8, 8), "float32"),)
    assert [(o.name, o.shape, o.dtype) for o in b.outputs] == [("y", (1, 5), "float32")]
    assert b.info.name in ("onnxruntime", "tensorrt")
    assert b.info.precision == "fp32"


def test_outputs_match_numpy_reference(kind: str, open_backend: Factory, tmp_path: Path) -> None:
    rtol, atol = TOLERANCE[kind]
    b = open_backend(make_convnet(tmp_path / "convnet.onnx"))
    for seed in range(3):
        x = _x(1, 3, 8, 8, seed=seed)
        (y,) = b.run({"x": x})
        assert y.dtype == np.float32 and y.shape == (1, 5)
        np.testing.assert_allclose(y, convnet_ref(x), rtol=rtol, atol=atol)


def test_dynamic_height_and_width(kind: str, open_backend: Factory, tmp_path: Path) -> None:
    rtol, atol = TOLERANCE[kind]
    b = open_backend(make_dynamic(tmp_path / "dynamic.onnx"), profiles=DYN_PROFILE)
    assert b.inputs[0].shape[:2] == (1, 3) and b.inputs[0].is_dynamic
    # small, then larger (buffers must grow), then small again (reuse the grown ones)
    for h, w in ((8, 8), (12, 16), (4, 6)):
        x = _x(1, 3, h, w, seed=h * w)
        (y,) = b.run({"x": x})
        assert y.shape == (1, 4, 1, 1)
        np.testing.assert_allclose(y, dynamic_ref(x), rtol=rtol, atol=atol)


def test_broken_model_file_raises_model_error(
    kind: str, open_backend: Factory, tmp_path: Path
) -> None:
    good = make_convnet(tmp_path / "good.onnx").read_bytes()
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError) as err:
        open_backend(broken)
    assert "broken.onnx" in str(err.value)


@pytest.mark.parametrize(
    ("feeds", "reason"),
    [
        ({"x": np.zeros((1, 3, 9, 8), np.float32)}, "shape"),
        ({"x": np.zeros((3, 8, 8), np.float32)}, "shape"),
        ({"image": np.zeros((1, 3, 8, 8), np.float32)}, "input"),
    ],
    ids=["wrong-dim", "wrong-rank", "wrong-name"],
)
def test_wrong_input_raises_model_error(
    open_backend: Factory, tmp_path: Path, feeds: dict, reason: str
) -> None:
    b = open_backend(make_convnet(tmp_path / "convnet.onnx"))
    with pytest.raises(ModelError) as err:
        b.run(feeds)
    assert err.value.reason == reason
    assert "(1, 3, 8, 8)" in str(err.value) or "['x']" in str(err.value)


def test_wrong_dtype_raises_model_error(open_backend: Factory, tmp_path: Path) -> None:
    b = open_backend(make_convnet(tmp_path / "convnet.onnx"))
    with pytest.raises(ModelError):
        b.run({"x": np.zeros((1, 3, 8, 8), np.float64)})


def test_concurrent_runs_from_threads(kind: str, open_backend: Factory, tmp_path: Path) -> None:
    rtol, atol = TOLERANCE[kind]
    b = open_backend(make_convnet(tmp_path / "convnet.onnx"))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            for i in range(8):
                x = _x(1, 3, 8, 8, seed=seed * 100 + i)
                np.testing.assert_allclose(b.run({"x": x})[0], convnet_ref(x), rtol=rtol, atol=atol)
        except BaseException as e:  # collected: an exception in a thread would be lost
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_close_is_idempotent(open_backend: Factory, tmp_path: Path) -> None:
    b = open_backend(make_convnet(tmp_path / "convnet.onnx"))
    b.run({"x": _x(1, 3, 8, 8)})
    b.close()
    b.close()


# ---------------------------------------------------------------- TensorRT specifics


@pytest.mark.parametrize("kind", TRT_KINDS)
def test_tensorrt_shape_outside_profile_raises(open_backend: Factory, tmp_path: Path) -> None:
    b = open_backend(make_dynamic(tmp_path / "dynamic.onnx"), profiles=DYN_PROFILE)
    with pytest.raises(ModelError) as err:
        b.run({"x": _x(1, 3, 32, 32)})
    assert err.value.reason == "shape" and "profile" in str(err.value)


@pytest.mark.parametrize("kind", TRT_KINDS)
def test_tensorrt_corrupt_engine_is_reason_engine(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "tensorrt-fake":
        request.getfixturevalue("fake_cuda")
    engine = tmp_path / "corrupt.engine"
    engine.write_bytes(b"\x00not an engine" * 64)
    with pytest.raises(ModelError) as err:
        TensorRTBackend.from_engine_file(engine)
    assert err.value.reason == "engine" and "rebuild" in str(err.value)


@pytest.mark.parametrize("kind", TRT_KINDS)
def test_tensorrt_build_checks(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "tensorrt-fake":
        request.getfixturevalue("fake_cuda")
    convnet, dynamic = make_convnet(tmp_path / "c.onnx"), make_dynamic(tmp_path / "d.onnx")
    out = tmp_path / "out.engine"
    cases = [
        (dict(onnx_path=dynamic), "shape"),  # dynamic input without a profile
        (dict(onnx_path=convnet, profiles={"nope": DYN_PROFILE["x"]}), "shape"),
        (dict(onnx_path=convnet, precision="int8"), "precision"),  # no Q/DQ nodes
        (dict(onnx_path=convnet, precision="fp16", dla_core=99), "device"),
    ]
    for kwargs, reason in cases:
        with pytest.raises(ModelError) as err:
            build_engine(out_path=out, **kwargs)
        assert err.value.reason == reason, kwargs
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("kind", TRT_KINDS)
def test_tensorrt_progress_and_timing_cache(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "tensorrt-fake":
        request.getfixturevalue("fake_cuda")
    model, out, tc = (
        make_convnet(tmp_path / "c.onnx"),
        tmp_path / "c.engine",
        tmp_path / "timing.cache",
    )
    seen: list[tuple[str, float]] = []
    build_engine(model, out, timing_cache_path=tc, progress=lambda p, f: seen.append((p, f)))
    assert out.stat().st_size > 0 and tc.stat().st_size > 0
    assert seen and all(0.0 <= f <= 1.0 for _, f in seen)
    first = tc.read_bytes()
    build_engine(model, out, timing_cache_path=tc)  # loads the cache, writes it back
    assert tc.stat().st_size >= len(first)
    if kind == "tensorrt-fake":  # a cache from another GPU/version is replaced, not fatal
        tc.write_bytes(b"OTHERGPU")
        build_engine(model, out, timing_cache_path=tc)
        assert not tc.read_bytes().startswith(b"OTHERGPU")


def test_tensorrt_fp32_means_no_tf32(fake_cuda: object, tmp_path: Path) -> None:
    import json

    engines = {}
    for precision in ("fp32", "fp16"):
        engines[precision] = tmp_path / f"{precision}.engine"
        build_engine(make_convnet(tmp_path / "c.onnx"), engines[precision], precision=precision)
    flags = {}
    for precision, path in engines.items():
        data = path.read_bytes()
        n = int.from_bytes(data[8:12], "little")
        flags[precision] = json.loads(data[12 : 12 + n])["flags"]
    assert flags == {"fp32": [], "fp16": ["FP16", "TF32"]}


def test_tensorrt_parse_errors_are_all_reported(fake_cuda: object, tmp_path: Path) -> None:
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage")
    with pytest.raises(ModelError) as err:
        build_engine(broken, tmp_path / "x.engine")
    assert err.value.reason == "parse"
    assert "2 error(s)" in str(err.value) and "network has no inputs" in str(err.value)


def test_tensorrt_runs_push_the_context_in_each_thread(fake_cuda: object, tmp_path: Path) -> None:
    engine = tmp_path / "c.engine"
    build_engine(make_convnet(tmp_path / "c.onnx"), engine)
    b = TensorRTBackend.from_engine_file(engine)
    t = threading.Thread(target=lambda: b.run({"x": _x(1, 3, 8, 8)}))
    t.start()
    t.join()
    assert t.ident in fake_cuda.pushes_from_threads  # type: ignore[attr-defined]
    closer = threading.Thread(target=b.close)  # close from another thread must not leak
    closer.start()
    closer.join()
    assert fake_cuda.live_contexts == 0 and fake_cuda.mem == {}  # type: ignore[attr-defined]


def test_tensorrt_unavailable_is_a_model_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail
    ok, why = tensorrt_available()
    assert not ok and "tensorrt" in why
    with pytest.raises(ModelError) as err:
        build_engine(make_convnet(tmp_path / "c.onnx"), tmp_path / "c.engine")
    assert err.value.reason == "unavailable"
    with pytest.raises(ModelError) as err:
        TensorRTBackend(b"engine")
    assert err.value.reason == "unavailable"
