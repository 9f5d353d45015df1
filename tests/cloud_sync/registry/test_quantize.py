"""Static INT8 QDQ quantization and the FP32-vs-INT8 accuracy gate, on the project's real models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from agent.common.errors import ModelError
from cloud_sync.registry.quantize import GateResult, accuracy_gate, quantize_int8


@pytest.fixture(scope="module")
def digits_inputs(test_models: dict[str, Path]) -> np.ndarray:
    """The held-out digits as model inputs [N, 1, 8, 8] in 0..1."""
    with np.load(test_models["digits"] / "test_set.npz") as z:
        return np.asarray(z["images"], dtype=np.float32)[:, None] / 255.0


def test_digits_int8_is_symmetric_per_channel_qdq_and_agrees_with_fp32(
    tmp_path: Path, test_models: dict[str, Path], digits_inputs: np.ndarray
) -> None:
    fp32 = test_models["digits"] / "model.onnx"
    out = quantize_int8(fp32, tmp_path / "model.int8.onnx", digits_inputs[:300])
    assert out == tmp_path / "model.int8.onnx"
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert "Softmax" in ops  # left in float
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    zero_points = [inits[n.input[2]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    # symmetric: every zero point is 0 (int8 tensors; int32 for biases)
    assert zero_points and all(not zp.any() for zp in zero_points)
    assert {zp.dtype for zp in zero_points} == {np.dtype(np.int8), np.dtype(np.int32)}
    # per-channel: the conv weight (16 output channels) has 16 scales
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert any(sc.shape == (16,) for sc in scales)

    gate = accuracy_gate(fp32, out, digits_inputs[300:], task="classification")
    assert gate.metric_name == "top1_agreement" and gate.samples == len(digits_inputs) - 300
    assert gate.value >= 0.97 and gate.drop == pytest.approx(1 - gate.value)
    assert gate.accuracy == pytest.approx(gate.value)
    assert gate.passed is (gate.drop <= 0.01)
    assert "held-back samples" in gate.detail


def test_calibrating_on_black_frames_fails_the_gate(
    tmp_path: Path, test_models: dict[str, Path], digits_inputs: np.ndarray
) -> None:
    fp32 = test_models["digits"] / "model.onnx"
    out = quantize_int8(fp32, tmp_path / "bad.onnx", np.zeros_like(digits_inputs[:50]))
    gate = accuracy_gate(fp32, out, digits_inputs[300:], task="classification", max_drop=0.05)
    assert not gate.passed and gate.drop > 0.3
    assert "> max 0.0500" in gate.detail


def test_heatmap_gate_is_relative_output_error(
    tmp_path: Path, test_models: dict[str, Path]
) -> None:
    fp32 = test_models["tinyseg"] / "model.onnx"  # dynamic H, W
    rng = np.random.default_rng(1)
    x = rng.random((10, 3, 48, 64), dtype=np.float32)
    out = quantize_int8(fp32, tmp_path / "seg.int8.onnx", x[:8], per_channel=False)
    strict = accuracy_gate(fp32, out, x[8:], task="heatmap", max_drop=0.0)
    assert strict.metric_name == "mean_relative_error"
    assert 0.0 < strict.drop == strict.value < 0.1  # 8 bits always cost something, not much
    assert not strict.passed
    assert accuracy_gate(fp32, out, x[8:], task="heatmap", max_drop=0.1).passed


def test_bad_inputs_raise_model_error(tmp_path: Path, test_models: dict[str, Path]) -> None:
    fp32 = test_models["digits"] / "model.onnx"
    with pytest.raises(ModelError, match="non-empty array") as e:
        quantize_int8(fp32, tmp_path / "q.onnx", np.zeros((0, 1, 8, 8), np.float32))
    assert e.value.reason == "usage"
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="ONNX Runtime cannot load") as e:
        quantize_int8(junk, tmp_path / "q.onnx", np.zeros((4, 1, 8, 8), np.float32))
    assert e.value.reason == "load"
    with pytest.raises(ModelError, match="quantization of") as e:
        quantize_int8(fp32, tmp_path / "q.onnx", np.zeros((4, 3, 8, 8), np.float32))
    assert e.value.reason == "quantize"
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize(
    ("drop", "accuracy"), [(0.0, 1.0), (0.25, 0.75), (1.5, 0.0), (float("inf"), 0.0)]
)
def test_gate_result_accuracy_is_one_minus_drop_clipped(drop: float, accuracy: float) -> None:
    assert GateResult("m", drop, drop, False, "", 1).accuracy == accuracy


def _kernels_run(sess: object, x: np.ndarray) -> set[str]:
    """The op types of the kernels ONNX Runtime ran for one input (from its profile)."""
    import json

    name = sess.get_inputs()[0].name  # type: ignore[attr-defined]
    sess.run(None, {name: x})  # type: ignore[attr-defined]
    events = json.loads(Path(sess.end_profiling()).read_text())  # type: ignore[attr-defined]
    return {
        e["args"]["op_name"]
        for e in events
        if e.get("cat") == "Node" and "op_name" in e.get("args", {})
    }


def test_gate_runs_int8_as_simulated_quantization_not_the_cpus_integer_kernels(
    tmp_path: Path, test_models: dict[str, Path], digits_inputs: np.ndarray
) -> None:
    """ORT's default session fuses QDQ into integer kernels whose results depend on the CPU
    (AVX2 without VNNI saturates); the gate's session must run Q/DQ + float Conv only."""
    import onnxruntime as ort

    from cloud_sync.registry.quantize import simulated_session

    q = quantize_int8(
        test_models["digits"] / "model.onnx", tmp_path / "q.onnx", digits_inputs[:100]
    )
    opts = ort.SessionOptions()
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "default")
    default = ort.InferenceSession(str(q), opts, providers=["CPUExecutionProvider"])
    fused = _kernels_run(default, digits_inputs[:1])
    assert any(op.startswith("QLinear") or op.endswith("Integer") for op in fused), fused

    gate_kernels = _kernels_run(
        simulated_session(q, profile_prefix=str(tmp_path / "gate")), digits_inputs[:1]
    )
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= gate_kernels
    assert not any(op.startswith("QLinear") or "Integer" in op for op in gate_kernels)
