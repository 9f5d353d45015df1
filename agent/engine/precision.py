"""Pure: choosing the precision (fp32/fp16/int8) a model runs at, from on-device measurements.

The core (``candidate_precisions``, ``choose_precision``) takes values and returns typed
results. The one edge is ``measure_variant``, which runs a loaded ``Backend`` and reads a clock
(passed in as ``now``).

Never assume a lower precision is faster. Measured in this project: a static QDQ INT8 PP-OCR
text detector ran about 2x slower than its FP32 original under ONNX Runtime on an AVX2 CPU
without VNNI (the int8 kernels lack the dot-product instructions and the Q/DQ nodes add work).
So every candidate is measured on the device, checked against golden outputs, and the fastest
one that passes wins.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from agent.common.errors import ModelError
from agent.engine.base import Backend

# Highest precision first: the order of preference on a tie.
PRECISION_ORDER: tuple[str, ...] = ("fp32", "fp16", "int8")
BACKENDS = frozenset({"tensorrt", "onnxruntime"})
TIE_TOLERANCE = 0.03  # latencies within 3 % count as equal: measurement noise


def _check_names(names: Sequence[str] | Mapping[str, str], what: str) -> None:
    unknown = sorted(set(names) - set(PRECISION_ORDER))
    if unknown:
        raise ValueError(f"{what} has unknown precisions {unknown}; expected {PRECISION_ORDER}")


def candidate_precisions(
    profile_precisions: Sequence[str],
    available_variants: Mapping[str, str],
    backend: str,
    *,
    cuda_provider: bool = False,
    fp16_from_fp32: bool = True,
) -> list[str]:
    """Pure: the precisions worth measuring for one model on one device and backend.

    Rules:
      * the device profile must list the precision (e.g. no int8 on a Jetson Nano);
      * fp32 needs the fp32 file;
      * fp16 needs a GPU path: TensorRT builds it from an fp16 file or from the fp32 file
        (builder flag; not on TensorRT 11, which has none: ``fp16_from_fp32`` False); ONNX
        Runtime runs it only with a CUDA provider (``cuda_provider``) and an fp16 file, since
        the CPU provider has few fp16 kernels and is not faster;
      * int8 needs its own QDQ variant file (calibration happens at publish time, not here).

    Args:
        profile_precisions: ``DeviceProfile.precisions``.
        available_variants: precision to file name, from the model card's variants.
        backend: ``"tensorrt"`` or ``"onnxruntime"``.
        cuda_provider: the ONNX Runtime session has the CUDA (or TensorRT) provider.
        fp16_from_fp32: TensorRT can build fp16 from the fp32 file (``BuilderFlag.FP16``).

    Returns:
        Candidate precisions, highest precision first (may be empty); ``variant_file`` names
        the file each one is built from.

    Raises:
        ValueError: unknown backend or precision name.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r} is unknown; expected one of {sorted(BACKENDS)}")
    _check_names(profile_precisions, "profile_precisions")
    _check_names(available_variants, "available_variants")
    files = {p for p, f in available_variants.items() if f}
    out: list[str] = []
    for p in PRECISION_ORDER:
        if p not in profile_precisions:
            continue
        if p == "fp16":
            if backend == "tensorrt":
                ok = "fp16" in files or (fp16_from_fp32 and "fp32" in files)
            else:
                ok = cuda_provider and "fp16" in files
        else:
            ok = p in files
        if ok:
            out.append(p)
    return out


def variant_file(precision: str, available_variants: Mapping[str, str]) -> str:
    """Pure: the file a candidate precision is built from: its own variant file, or for fp16
    without one the fp32 file (TensorRT's FP16 builder flag; ``candidate_precisions`` offers
    that only where the backend can).

    Raises:
        ValueError: no file for that precision (it was not a candidate).
    """
    f = available_variants.get(precision) or (
        available_variants.get("fp32") if precision == "fp16" else None
    )
    if not f:
        raise ValueError(
            f"no file for precision {precision!r} among variants {dict(available_variants)}"
        )
    return f


@dataclass(frozen=True)
class Measurement:
    """How one precision variant did on this device.

    Attributes:
        precision: ``"fp32"``, ``"fp16"`` or ``"int8"``.
        latency_ms_p50: median latency of the timed runs; ``None`` when it could not run.
        latency_ms_p95: 95th percentile latency; ``None`` when it could not run.
        golden_ok: outputs matched the golden outputs within ``atol``; ``None`` = not checked.
        max_abs_err: largest absolute difference to the golden outputs (``inf`` for NaN/inf).
        error: why the variant could not be loaded or run, if it could not.
        atol: the tolerance the golden check used.
    """

    precision: str
    latency_ms_p50: float | None
    latency_ms_p95: float | None
    golden_ok: bool | None = None
    max_abs_err: float | None = None
    error: str | None = None
    atol: float | None = None

    def failure(self) -> str | None:
        """Why this variant must not be chosen, or ``None`` when it may be."""
        if self.error is not None:
            return self.error
        if self.golden_ok is False:
            err = "unknown" if self.max_abs_err is None else f"{self.max_abs_err:.4g}"
            return f"golden outputs differ: max abs err {err}, allowed atol {self.atol}"
        if self.latency_ms_p50 is None or not math.isfinite(self.latency_ms_p50):
            return f"no latency measured (p50={self.latency_ms_p50})"
        return None


@dataclass(frozen=True)
class Choice:
    """The chosen precision, why, and everything that was measured."""

    precision: str
    reason: str
    measurements: tuple[Measurement, ...]


def _rank(precision: str) -> int:
    return (
        PRECISION_ORDER.index(precision) if precision in PRECISION_ORDER else len(PRECISION_ORDER)
    )


def choose_precision(
    measurements: Sequence[Measurement], *, tie_tolerance: float = TIE_TOLERANCE
) -> Choice:
    """Pure: pick the fastest variant that works, preferring higher precision on a near-tie.

    A variant passes when it has no error, its golden check did not fail, and it has a finite
    p50 latency. Among passing variants the lowest p50 wins; variants within ``tie_tolerance``
    (3 %) of that p50 count as tied and the highest precision (fp32 > fp16 > int8) of them wins.

    Args:
        measurements: one per candidate precision.
        tie_tolerance: relative p50 difference treated as noise.

    Returns:
        The choice with a one-line reason.

    Raises:
        ModelError: no candidates, duplicate precisions, or no candidate passes (the message
            lists each candidate's failure).
    """
    if not measurements:
        raise ModelError("no precision candidates were measured", reason="precision")
    names = [m.precision for m in measurements]
    if len(set(names)) != len(names):
        raise ModelError(f"duplicate precisions in measurements: {names}", reason="precision")
    failures = {m.precision: m.failure() for m in measurements}
    passing = [m for m in measurements if failures[m.precision] is None]
    refused = "; ".join(f"{p} refused: {why}" for p, why in failures.items() if why is not None)
    if not passing:
        raise ModelError(
            f"no precision variant passed ({refused}); keeping the previous model",
            reason="precision",
        )
    fastest = min(passing, key=lambda m: (m.latency_ms_p50 or 0.0, _rank(m.precision)))
    best_p50 = fastest.latency_ms_p50 or 0.0
    tied = [m for m in passing if (m.latency_ms_p50 or 0.0) <= best_p50 * (1.0 + tie_tolerance)]
    chosen = min(tied, key=lambda m: _rank(m.precision))
    others = ", ".join(
        f"{m.precision} {m.latency_ms_p50:.3g} ms" for m in passing if m is not chosen
    )
    if chosen is fastest:
        reason = f"{chosen.precision}: fastest passing, p50 {chosen.latency_ms_p50:.3g} ms"
    else:
        reason = (
            f"{chosen.precision}: p50 {chosen.latency_ms_p50:.3g} ms is within "
            f"{tie_tolerance:.0%} of fastest {fastest.precision} {best_p50:.3g} ms; "
            "prefer higher precision"
        )
    if others:
        reason += f" (others: {others})"
    if refused:
        reason += f"; {refused}"
    return Choice(chosen.precision, reason, tuple(measurements))


def _golden_error(
    outputs: Sequence[np.ndarray], golden: Sequence[np.ndarray]
) -> tuple[float, str | None]:
    """Max abs error over the golden outputs (``inf`` when anything is NaN/inf), or a shape
    error. ``golden.npz`` holds a model's first output(s): they are compared with as many
    leading outputs of the model (a PicoDet or NMS model has several)."""
    if len(outputs) < len(golden):
        return math.inf, f"model gave {len(outputs)} outputs, golden has {len(golden)}"
    worst = 0.0
    for i, (out, ref) in enumerate(zip(outputs[: len(golden)], golden, strict=True)):
        if out.shape != ref.shape:
            return math.inf, f"output {i} has shape {out.shape}, golden has {ref.shape}"
        diff = np.abs(out.astype(np.float64) - np.asarray(ref, dtype=np.float64))
        err = float(diff.max()) if diff.size else 0.0
        if not math.isfinite(err):  # NaN or inf in either side is a failure
            return math.inf, None
        worst = max(worst, err)
    return worst, None


def measure_variant(
    backend: Backend,
    feeds: Mapping[str, np.ndarray],
    golden_outputs: Sequence[np.ndarray] | None = None,
    atol: float = 1e-4,
    warmup: int = 3,
    runs: int = 20,
    now: Callable[[], float] = time.perf_counter,
) -> Measurement:
    """Edge: run a loaded backend, check it against golden outputs and time it.

    The first warm-up run's outputs are checked; the timed runs follow. A run that fails
    becomes ``Measurement.error`` rather than an exception, so one bad variant does not stop
    the others from being measured.

    Args:
        backend: the variant, loaded; its ``info.precision`` names the measurement.
        feeds: golden (or representative) inputs.
        golden_outputs: expected outputs in declared order; ``None`` skips the comparison
            (outputs must still be finite).
        atol: largest allowed absolute difference to the golden outputs.
        warmup: untimed runs first (at least 1: it produces the checked outputs).
        runs: timed runs.
        now: clock in seconds (``time.perf_counter``; a fake in tests).

    Returns:
        The measurement.

    Raises:
        ValueError: ``warmup`` < 1, ``runs`` < 1 or ``atol`` < 0.
    """
    problems = [
        f"{name} must be >= {low}, got {value}"
        for name, value, low in (("warmup", warmup, 1), ("runs", runs, 1), ("atol", atol, 0))
        if value < low
    ]
    if problems:
        raise ValueError("; ".join(problems))
    precision = backend.info.precision
    try:
        outputs = backend.run(feeds)
        for _ in range(warmup - 1):
            backend.run(feeds)
        times_ms = []
        for _ in range(runs):
            t0 = now()
            backend.run(feeds)
            times_ms.append((now() - t0) * 1000.0)
    except ModelError as e:
        return Measurement(precision, None, None, error=str(e), atol=atol)
    p50 = float(np.percentile(times_ms, 50))
    p95 = float(np.percentile(times_ms, 95))
    if golden_outputs is None:
        bad = [i for i, o in enumerate(outputs) if not np.all(np.isfinite(o))]
        error = f"outputs {bad} contain NaN or inf" if bad else None
        return Measurement(precision, p50, p95, None, None, error, atol)
    err, shape_error = _golden_error(outputs, golden_outputs)
    return Measurement(precision, p50, p95, err <= atol, err, shape_error, atol)
