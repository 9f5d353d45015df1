"""Precision choice: the pure rules, and real FP32 vs QDQ INT8 models under ONNX Runtime."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.common.errors import ModelError
from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.engine.precision import (
    Measurement,
    candidate_precisions,
    choose_precision,
    measure_variant,
)

ALL = ("fp32", "fp16", "int8")
BOTH_FILES = {"fp32": "model.onnx", "int8": "model.int8.onnx"}
ALL_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}

# --- candidate_precisions --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("profile", "variants", "backend", "cuda", "expected"),
    [
        # Jetson Nano: no int8 in the profile, even with an int8 file.
        (("fp32", "fp16"), BOTH_FILES, "tensorrt", False, ["fp32", "fp16"]),
        # TensorRT builds fp16 from the fp32 file.
        (ALL, {"fp32": "model.onnx"}, "tensorrt", False, ["fp32", "fp16"]),
        (ALL, BOTH_FILES, "tensorrt", False, ["fp32", "fp16", "int8"]),
        # ORT on CPU: fp16 is never a candidate, int8 needs its QDQ file.
        (ALL, ALL_FILES, "onnxruntime", False, ["fp32", "int8"]),
        (("fp32", "int8"), {"fp32": "model.onnx"}, "onnxruntime", False, ["fp32"]),
        # ORT with CUDA runs fp16 only from an fp16 file.
        (ALL, BOTH_FILES, "onnxruntime", True, ["fp32", "int8"]),
        (ALL, ALL_FILES, "onnxruntime", True, ["fp32", "fp16", "int8"]),
        # Only an int8 file, on a device without int8: nothing to run.
        (("fp32", "fp16"), {"int8": "model.int8.onnx"}, "tensorrt", False, []),
        # An empty file name is not a file.
        (ALL, {"fp32": "model.onnx", "int8": ""}, "tensorrt", False, ["fp32", "fp16"]),
    ],
)
def test_candidate_precisions(
    profile: tuple[str, ...],
    variants: dict[str, str],
    backend: str,
    cuda: bool,
    expected: list[str],
) -> None:
    assert candidate_precisions(profile, variants, backend, cuda_provider=cuda) == expected


@pytest.mark.parametrize(
    ("profile", "variants", "backend", "says"),
    [
        (ALL, BOTH_FILES, "openvino", "'openvino'"),
        (("fp32", "bf16"), BOTH_FILES, "tensorrt", "'bf16'"),
        (ALL, {"FP16": "m.onnx"}, "tensorrt", "'FP16'"),
    ],
)
def test_candidate_precisions_rejects_unknown_names(
    profile: tuple[str, ...], variants: dict[str, str], backend: str, says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        candidate_precisions(profile, variants, backend)


# --- choose_precision ------------------------------------------------------------------------


def _m(
    precision: str,
    p50: float | None,
    golden_ok: bool | None = True,
    error: str | None = None,
    err: float | None = 0.0,
) -> Measurement:
    p95 = None if p50 is None else p50 * 1.2
    return Measurement(precision, p50, p95, golden_ok, err, error, 0.1)


@pytest.mark.parametrize(
    ("measurements", "expected"),
    [
        ([_m("fp32", 10.0), _m("int8", 5.0)], "int8"),
        # The measured case: int8 about 2x slower than fp32 on a CPU without VNNI.
        ([_m("fp32", 10.0), _m("int8", 20.0)], "fp32"),
        # Within 3 %: prefer the higher precision.
        ([_m("fp32", 10.2), _m("int8", 10.0)], "fp32"),
        ([_m("int8", 10.0), _m("fp32", 10.2)], "fp32"),
        ([_m("fp32", 10.4), _m("int8", 10.0)], "int8"),
        ([_m("fp32", 12.0), _m("fp16", 10.2), _m("int8", 10.0)], "fp16"),
        ([_m("fp32", 10.0), _m("fp16", 10.0), _m("int8", 10.0)], "fp32"),
        # Failures are skipped even when fastest.
        ([_m("fp32", 10.0), _m("int8", 1.0, golden_ok=False, err=0.5)], "fp32"),
        ([_m("fp32", None, error="load failed"), _m("int8", 20.0)], "int8"),
        ([_m("fp32", float("nan")), _m("fp16", 9.0)], "fp16"),
        # Not checked against golden (None) still counts as passing.
        ([_m("fp32", 10.0, golden_ok=None), _m("int8", 30.0)], "fp32"),
        ([_m("fp16", 3.0)], "fp16"),
    ],
)
def test_choose_precision(measurements: list[Measurement], expected: str) -> None:
    choice = choose_precision(measurements)
    assert choice.precision == expected
    assert choice.reason.startswith(f"{expected}: ")
    assert choice.measurements == tuple(measurements)


def test_choose_reason_explains_the_tie_and_the_refusals() -> None:
    choice = choose_precision(
        [_m("fp32", 10.2), _m("int8", 10.0), _m("fp16", 1.0, golden_ok=False, err=0.5)]
    )
    assert choice.precision == "fp32"
    assert "within 3% of fastest int8" in choice.reason
    assert "fp16 refused: golden outputs differ: max abs err 0.5, allowed atol 0.1" in (
        choice.reason
    )


def test_choose_refuses_when_nothing_passes_and_lists_each_failure() -> None:
    with pytest.raises(ModelError) as exc:
        choose_precision(
            [
                _m("fp32", None, error="onnxruntime cannot load model.onnx"),
                _m("int8", 4.0, golden_ok=False, err=2.5),
            ]
        )
    msg = str(exc.value)
    assert "fp32 refused: onnxruntime cannot load model.onnx" in msg
    assert "int8 refused: golden outputs differ: max abs err 2.5" in msg
    assert exc.value.reason == "precision"


@pytest.mark.parametrize(
    ("measurements", "says"),
    [([], "no precision candidates"), ([_m("fp32", 1.0), _m("fp32", 2.0)], "duplicate")],
)
def test_choose_rejects_empty_and_duplicates(measurements: list[Measurement], says: str) -> None:
    with pytest.raises(ModelError, match=says):
        choose_precision(measurements)


# --- real models ---------------------------------------------------------------------------

RNG_SEED = 1234
SHAPE = (1, 3, 64, 64)


@dataclass(frozen=True)
class Models:
    fp32: Path
    int8: Path
    weight: np.ndarray
    bias: np.ndarray


def _conv_model(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["y"]),
        ],
        "conv_relu_gap",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(SHAPE))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 1, 1])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _reference(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Conv 3x3 pad 1 + ReLU + global average pool in float64 NumPy: independent golden."""
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (3, 3), axis=(2, 3))
    conv = np.einsum("nchwij,ocij->nohw", windows, weight.astype(np.float64))
    conv += bias.astype(np.float64)[None, :, None, None]
    return np.asarray(np.maximum(conv, 0.0).mean(axis=(2, 3), keepdims=True))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    rng = np.random.default_rng(RNG_SEED)
    weight = (rng.standard_normal((8, 3, 3, 3)) * 0.2).astype(np.float32)
    bias = (rng.standard_normal(8) * 0.1).astype(np.float32)
    folder = tmp_path_factory.mktemp("models")
    fp32 = folder / "model.onnx"
    int8 = folder / "model.int8.onnx"
    onnx.save(_conv_model(weight, bias), fp32)

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            batches = [{"x": rng.random(SHAPE, dtype=np.float32)} for _ in range(8)]
            self._it: Iterator[dict[str, np.ndarray]] = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    quantize_static(
        str(fp32),
        str(int8),
        Reader(),
        quant_format=QuantFormat.QDQ,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    ops = {n.op_type for n in onnx.load(int8).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    return Models(fp32, int8, weight, bias)


@pytest.fixture(scope="module")
def golden(models: Models) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    x = np.random.default_rng(RNG_SEED + 1).random(SHAPE, dtype=np.float32)
    return {"x": x}, [_reference(x, models.weight, models.bias).astype(np.float32)]


def _backend(path: Path, precision: str) -> OnnxRuntimeBackend:
    return OnnxRuntimeBackend(
        path, providers=["CPUExecutionProvider"], precision=precision, threads=1
    )


ATOL = {"fp32": 1e-4, "int8": 1e-1}  # the model card's default golden tolerances


def test_real_fp32_and_int8_are_measured_and_one_is_chosen(
    models: Models, golden: tuple[dict[str, np.ndarray], list[np.ndarray]]
) -> None:
    feeds, expected = golden
    measured = []
    for precision, path in (("fp32", models.fp32), ("int8", models.int8)):
        with _backend(path, precision) as backend:
            m = measure_variant(backend, feeds, expected, atol=ATOL[precision], runs=10)
        assert m.error is None, m.error
        assert m.precision == precision
        assert m.golden_ok is True, (precision, m.max_abs_err)
        assert m.latency_ms_p50 is not None and m.latency_ms_p95 is not None
        assert 0 < m.latency_ms_p50 <= m.latency_ms_p95
        measured.append(m)
    fp32, int8 = measured
    assert fp32.max_abs_err is not None and fp32.max_abs_err < 1e-4
    # Quantisation really changed the numbers: the int8 file is not a copy of the fp32 one.
    assert int8.max_abs_err is not None and int8.max_abs_err > fp32.max_abs_err
    choice = choose_precision(measured)
    assert choice.precision in ("fp32", "int8")
    assert choice.reason.startswith(f"{choice.precision}: ")


def test_real_variant_with_wrong_golden_is_refused(
    models: Models, golden: tuple[dict[str, np.ndarray], list[np.ndarray]]
) -> None:
    feeds, expected = golden
    perturbed = [expected[0] + 0.5]
    with _backend(models.fp32, "fp32") as backend:
        good = measure_variant(backend, feeds, expected, atol=ATOL["fp32"], runs=3)
    with _backend(models.int8, "int8") as backend:
        bad = measure_variant(backend, feeds, perturbed, atol=ATOL["int8"], runs=3)
    assert bad.golden_ok is False
    assert bad.max_abs_err is not None and bad.max_abs_err > 0.4
    choice = choose_precision([good, bad])
    assert choice.precision == "fp32"
    assert "int8 refused: golden outputs differ" in choice.reason
    with _backend(models.fp32, "fp32") as backend:
        also_bad = measure_variant(backend, feeds, perturbed, atol=ATOL["fp32"], runs=3)
    with pytest.raises(ModelError, match=r"fp32 refused.*int8 refused"):
        choose_precision([also_bad, bad])


def test_real_wrong_shape_and_wrong_input_become_errors(
    models: Models, golden: tuple[dict[str, np.ndarray], list[np.ndarray]]
) -> None:
    feeds, expected = golden
    with _backend(models.fp32, "fp32") as backend:
        shape = measure_variant(backend, feeds, [expected[0].reshape(1, 8)], runs=1)
        missing = measure_variant(backend, {"image": feeds["x"]}, expected, runs=1)
        count = measure_variant(backend, feeds, [*expected, expected[0]], runs=1)
    assert shape.error == "output 0 has shape (1, 8, 1, 1), golden has (1, 8)"
    assert shape.golden_ok is False
    assert missing.error is not None and "'x' missing" in missing.error
    assert missing.latency_ms_p50 is None
    assert count.error == "model gave 1 outputs, golden has 2"
    for m in (shape, missing, count):
        assert m.failure() is not None


@pytest.fixture(scope="module")
def sqrt_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Sqrt", ["x"], ["y"])],
        "sqrt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path = tmp_path_factory.mktemp("sqrt") / "sqrt.onnx"
    onnx.save(model, path)
    return path


def test_real_nan_output_fails_with_and_without_golden(sqrt_model: Path) -> None:
    x = np.array([[4.0, -1.0, 9.0, 16.0]], dtype=np.float32)  # sqrt(-1) is NaN
    golden = [np.array([[2.0, 0.0, 3.0, 4.0]], dtype=np.float32)]
    with _backend(sqrt_model, "fp32") as backend:
        checked = measure_variant(backend, {"x": x}, golden, atol=10.0, runs=2)
        unchecked = measure_variant(backend, {"x": x}, None, runs=2)
        fine = measure_variant(backend, {"x": np.abs(x)}, None, runs=2)
    assert checked.golden_ok is False
    assert checked.max_abs_err == float("inf")
    assert unchecked.golden_ok is None
    assert unchecked.error == "outputs [0] contain NaN or inf"
    assert fine.error is None and fine.failure() is None


# --- measure_variant with a fake clock ------------------------------------------------------


class FakeClock:
    """Each timed run takes 1 ms longer than the previous one: 1, 2, ..., N ms."""

    def __init__(self) -> None:
        self.t = 0.0
        self.calls = 0
        self.run = 0

    def __call__(self) -> float:
        self.calls += 1
        if self.calls % 2 == 1:  # start of a run
            self.run += 1
            return self.t
        self.t += self.run / 1000.0
        return self.t


def test_measure_variant_percentiles_from_the_clock(sqrt_model: Path) -> None:
    x = np.ones((1, 4), dtype=np.float32)
    clock = FakeClock()
    with _backend(sqrt_model, "fp32") as backend:
        m = measure_variant(backend, {"x": x}, [x], warmup=2, runs=20, now=clock)
    assert clock.calls == 40  # two reads per timed run, none for warm-up
    assert m.latency_ms_p50 == pytest.approx(10.5)  # median of 1..20 ms
    assert m.latency_ms_p95 == pytest.approx(19.05)  # linear interpolation at 95 %
    assert (m.golden_ok, m.max_abs_err, m.error, m.atol) == (True, 0.0, None, 1e-4)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"runs": 0}, "^runs must be >= 1, got 0$"),
        ({"warmup": 0}, "^warmup must be >= 1, got 0$"),
        ({"atol": -1.0}, "^atol must be >= 0, got -1.0$"),
    ],
)
def test_measure_variant_rejects_bad_arguments(
    sqrt_model: Path, kwargs: dict[str, float], says: str
) -> None:
    with _backend(sqrt_model, "fp32") as backend, pytest.raises(ValueError, match=says):
        measure_variant(backend, {"x": np.ones((1, 4), dtype=np.float32)}, **kwargs)  # type: ignore[arg-type]
