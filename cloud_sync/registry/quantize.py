"""Adapter: static INT8 quantization (ONNX Runtime, QDQ) and the FP32-vs-INT8 accuracy gate.

``quantize_int8`` writes the explicit-quantization form TensorRT builds as INT8: QDQ pairs,
symmetric INT8 activations and weights (TensorRT takes zero points of 0 only), weights per
output channel (``per_channel``). Calibration is MinMax over the samples given. Soft-max,
sigmoid and the arithmetic of detection heads stay in float (``DEFAULT_OP_TYPES`` lists what
is quantized): scores near a threshold are where 8 bits hurt most.

Pre-processing is ``quant_pre_process`` reduced to ONNX shape inference, as in
``cloud_sync.samples.digits``: ORT's optimiser would only add foreign opset imports, and the
sympy-based symbolic shape inference is not needed (nor installed) for these graphs.

``accuracy_gate`` runs both models on held-back samples: classification compares top-1
classes (``drop = 1 - agreement``); other tasks the mean relative L2 error of every output
(``drop`` = that error). The INT8 model runs as **simulated quantization**: graph
optimisations off, so ONNX Runtime executes each QuantizeLinear/DequantizeLinear pair as the
rounding and clipping it specifies and every Conv/MatMul in float. With optimisations on, ORT
fuses QDQ into QLinearConv/MatMulInteger and runs the CPU's integer kernels, whose results
depend on the CPU: on x86-64 without AVX-512 VNNI the u8s8 kernels (``vpmaddubsw``) saturate
16-bit sums, and the measured top-1 agreement of the digits model drops from 0.99 to 0.82.
The INT8 variant is built for TensorRT, which computes the QDQ graph exactly; the gate must
give the same answer on any publishing machine, so it measures the quantization, not the
publisher's kernels.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.common.errors import ModelError
from agent.common.fsutil import atomic_write_bytes
from cloud_sync.registry.artifacts import ort_session

__all__ = [
    "DEFAULT_OP_TYPES",
    "GateResult",
    "accuracy_gate",
    "match_detections",
    "quantize_int8",
    "simulated_session",
]

DEFAULT_OP_TYPES: tuple[str, ...] = (
    "Conv",
    "ConvTranspose",
    "Gemm",
    "MatMul",
    "MaxPool",
    "AveragePool",
    "GlobalAveragePool",
    "Add",
    "Concat",
    "Resize",
)
_ORT_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(uint8)": np.uint8,
}
_EPS = 1e-12


@dataclass(frozen=True)
class GateResult:
    """The outcome of comparing an INT8 variant with its FP32 model.

    Attributes:
        metric_name: ``"top1_agreement"`` (classification), ``"detection_f1"`` (detection)
            or ``"mean_relative_error"``.
        value: the metric's value.
        drop: the accuracy lost: ``1 - agreement`` or the relative error (inf if non-finite).
        passed: ``drop <= max_drop``.
        detail: one line for the operator, e.g. "top-1 agreement 0.989 on 90 samples …".
        samples: how many held-back samples were compared.
    """

    metric_name: str
    value: float
    drop: float
    passed: bool
    detail: str
    samples: int

    @property
    def accuracy(self) -> float:
        """``1 - drop`` clipped to 0..1, as a card's ``VariantSpec.accuracy`` states it."""
        return float(min(1.0, max(0.0, 1.0 - self.drop))) if np.isfinite(self.drop) else 0.0


def simulated_session(path: str | Path, *, profile_prefix: str | None = None) -> Any:
    """A CPU session that runs a QDQ model as simulated quantization (no integer kernels).

    ``ORT_DISABLE_ALL`` keeps the graph as written: no QDQ → QLinear* fusion, no constant
    folding of DequantizeLinear into float weights, so the result is the ONNX definition of
    the graph evaluated in float, the same on every x86-64 or ARM CPU.

    Args:
        path: the ONNX model.
        profile_prefix: write ORT's kernel profile with this file prefix (tests read which
            kernels ran).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if profile_prefix is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile_prefix
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _input_of(
    path: Path, *, simulated: bool = False, constants: Mapping[str, np.ndarray] | None = None
) -> tuple[Any, str, Any]:
    """(session, image input name, NumPy dtype): the one input ``constants`` do not feed."""
    try:
        sess = simulated_session(path) if simulated else ort_session(path)
    except Exception as e:  # ORT raises its own pybind error types
        raise ModelError(
            f"ONNX Runtime cannot load {path}: {e}", model=str(path), reason="load"
        ) from e
    inputs = [i for i in sess.get_inputs() if i.name not in (constants or {})]
    if len(inputs) != 1:
        raise ModelError(
            f"{path} has {len(inputs)} inputs besides the constants, expected exactly 1",
            model=str(path),
            reason="shape",
        )
    dtype = _ORT_DTYPES.get(inputs[0].type)
    if dtype is None:
        raise ModelError(
            f"{path} input type is {inputs[0].type}, expected one of {sorted(_ORT_DTYPES)}",
            model=str(path),
            reason="dtype",
        )
    return sess, inputs[0].name, dtype


def _check_samples(samples: npt.ArrayLike, what: str, model: Path) -> np.ndarray:
    arr = np.asarray(samples)
    if arr.ndim < 2 or len(arr) == 0:
        raise ModelError(
            f"{what} must be a non-empty array [N, ...] of model inputs, got shape {arr.shape}",
            model=str(model),
            reason="usage",
        )
    return arr


def quantize_int8(
    model_path: str | Path,
    out_path: str | Path,
    calibration: npt.ArrayLike,
    *,
    per_channel: bool = True,
    op_types: Sequence[str] = DEFAULT_OP_TYPES,
    constants: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write a static INT8 QDQ copy of an FP32 model, calibrated on ``calibration``.

    Args:
        model_path: the FP32 ONNX model (one input).
        out_path: where to write the INT8 model (atomically).
        calibration: model inputs stacked on axis 0: ``calibration[i:i+1]`` is one
            batch-1 input (e.g. [N, C, H, W] for an NCHW model).
        per_channel: quantize Conv/Gemm/MatMul weights per output channel (what TensorRT
            does for explicit INT8); False gives one scale per tensor.
        op_types: the operator types to quantize.
        constants: extra inputs fed the same value with every sample (from the card).

    Returns:
        ``out_path``.

    Raises:
        ModelError: the model cannot be loaded (reason ``"load"``), the calibration array is
            empty or misshapen (``"usage"``), or quantization fails (``"quantize"``).
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(model_path), Path(out_path)
    consts = dict(constants or {})
    _, name, dtype = _input_of(src, constants=consts)
    data = _check_samples(calibration, "calibration", src).astype(dtype, copy=False)

    class _Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._i = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self._i >= len(data):
                return None
            self._i += 1
            return {**consts, name: data[self._i - 1 : self._i]}

    with tempfile.TemporaryDirectory(prefix="edgefleet-quant-") as tmp:
        pre, out = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        try:
            quant_pre_process(str(src), str(pre), skip_optimization=True, skip_symbolic_shape=True)
            quantize_static(
                str(pre),
                str(out),
                _Reader(),
                quant_format=QuantFormat.QDQ,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
                per_channel=per_channel,
                op_types_to_quantize=list(op_types),
                extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            )
            atomic_write_bytes(dst, out.read_bytes())
        except Exception as e:  # ORT's quantizer raises anything from onnx, numpy and itself
            raise ModelError(
                f"INT8 quantization of {src} failed: {type(e).__name__}: {e}",
                model=str(src),
                reason="quantize",
            ) from e
    return dst


DetectFn = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]
"""One sample's outputs → (boxes (N, 4) x1, y1, x2, y2, class ids (N,))."""


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of (N, 4) and (M, 4) xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=1)
    return np.asarray(inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, _EPS))


def match_detections(
    ref: tuple[np.ndarray, np.ndarray], got: tuple[np.ndarray, np.ndarray], iou: float = 0.5
) -> int:
    """Pure: how many ``got`` boxes match a ``ref`` box of the same class at IoU >= ``iou``,
    each ref box matched at most once (greedy, in ``got`` order: best score first)."""
    (rb, rc), (gb, gc) = ref, got
    if len(rc) == 0 or len(gc) == 0:
        return 0
    ious = _iou(np.asarray(gb, np.float64), np.asarray(rb, np.float64))
    ious[np.asarray(gc)[:, None] != np.asarray(rc)[None, :]] = 0.0
    used = np.zeros(len(rc), bool)
    n = 0
    for row in ious:
        row = np.where(used, 0.0, row)
        j = int(row.argmax())
        if row[j] >= iou:
            used[j] = True
            n += 1
    return n


def _run(sess: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(o, dtype=np.float64) for o in sess.run(None, feeds)]


@dataclass
class _Tally:
    """Pure: the gate's comparison of FP32 and INT8 outputs, added up sample by sample."""

    task: str
    detect: DetectFn | None  # set for detection only: compare decoded boxes
    agree: int = 0
    errors: list[float] = field(default_factory=list)
    finite: bool = True
    matched: int = 0
    n_ref: int = 0
    n_got: int = 0

    def add(self, a: list[np.ndarray], b: list[np.ndarray]) -> None:
        """Count one sample's FP32 outputs ``a`` against its INT8 outputs ``b``."""
        self.finite = self.finite and all(np.isfinite(o).all() for o in b)
        if self.detect is not None and self.finite:
            ref, got = self.detect(a), self.detect(b)
            self.matched += match_detections(ref, got)
            self.n_ref, self.n_got = self.n_ref + len(ref[1]), self.n_got + len(got[1])
        elif self.task == "classification":
            self.agree += int(np.argmax(a[0].reshape(-1)) == np.argmax(b[0].reshape(-1)))
        else:
            self.errors += [
                float(np.linalg.norm(y8 - y) / max(float(np.linalg.norm(y)), _EPS))
                for y, y8 in zip(a, b, strict=True)
            ]

    def verdict(self, n: int, max_drop: float) -> GateResult:
        """The gate's result over ``n`` samples."""
        finite = self.finite
        if self.task == "classification":
            metric, value = "top1_agreement", self.agree / n
            drop = 1.0 - value if finite else float("inf")
            what = f"top-1 agreement {value:.4f} on {n} held-back samples ({n - self.agree} differ)"
        elif self.detect is not None:
            metric = "detection_f1"
            total = self.n_ref + self.n_got
            value = 2 * self.matched / total if total else 1.0
            drop = 1.0 - value if finite else float("inf")
            what = (
                f"detection F1 {value:.4f} on {n} held-back samples ({self.matched} of "
                f"{self.n_ref} FP32 boxes found again among {self.n_got} INT8 boxes, same class, "
                "IoU >= 0.5)"
            )
        else:
            metric = "mean_relative_error"
            value = float(np.mean(self.errors)) if finite else float("inf")
            drop = value
            what = f"mean relative output error {value:.4f} on {n} held-back samples"
        if not finite:
            what += "; the INT8 model gave non-finite outputs"
        passed = bool(drop <= max_drop)
        verdict = "<=" if passed else ">"
        detail = f"{what}: drop {drop:.4f} {verdict} max {max_drop:.4f}"
        return GateResult(metric, float(value), float(drop), passed, detail, n)


def accuracy_gate(
    fp32_path: str | Path,
    int8_path: str | Path,
    samples: npt.ArrayLike,
    *,
    task: str,
    max_drop: float = 0.01,
    constants: Mapping[str, np.ndarray] | None = None,
    detect: DetectFn | None = None,
) -> GateResult:
    """Compare an INT8 model with its FP32 original on held-back samples, one at a time.

    Args:
        fp32_path: the FP32 model.
        int8_path: its quantized variant.
        samples: model inputs stacked on axis 0, as ``quantize_int8`` takes them; NOT the
            calibration samples.
        task: the card's task; ``"classification"`` compares top-1 classes of the first
            output; ``"detection"`` with ``detect`` compares decoded detections (F1 of INT8
            boxes matched to FP32 boxes of the same class at IoU >= 0.5: raw detector outputs
            hold thousands of unused candidates and logits, whose relative error says little);
            anything else the relative L2 error of every output.
        max_drop: the largest drop that passes.
        constants: extra inputs fed with every sample (from the card).
        detect: decodes one sample's outputs into ``(boxes (N, 4) xyxy, class ids (N,))``.

    Returns:
        The metric, the drop and whether it passed.

    Raises:
        ModelError: a model cannot be loaded or run, or ``samples`` is empty.
    """
    p32, p8 = Path(fp32_path), Path(int8_path)
    consts = dict(constants or {})
    s32, name, dtype = _input_of(p32, constants=consts)
    s8, name8, _ = _input_of(p8, simulated=True, constants=consts)
    data = _check_samples(samples, "samples", p32).astype(dtype, copy=False)
    tally = _Tally(task, detect if task == "detection" else None)
    try:
        for i in range(len(data)):
            x = data[i : i + 1]
            tally.add(_run(s32, {**consts, name: x}), _run(s8, {**consts, name8: x}))
    except Exception as e:  # ORT run errors (shape, type) are foreign types
        raise ModelError(
            f"comparing {p8} with {p32} failed on a sample of shape {data.shape[1:]}: {e}",
            model=str(p8),
            reason="run",
        ) from e
    return tally.verdict(len(data), max_drop)
