"""Adapter: what the TensorRT build and runtime sides share — version policy, availability,
lazy imports, factory calls that raise, type mapping and the logger.

``tensorrt`` and ``pycuda`` are imported lazily inside functions so these modules import on
machines without them; ``tensorrt_available()`` says why not.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from agent.common.errors import ModelError

log = logging.getLogger("agent.engine.tensorrt")

# Supported TensorRT versions: 10.3 (JetPack 6) up to 11.x. 8.x (JetPack 5) creates implicit-batch
# networks from create_network(0) and lacks parts of the name-based I/O API used here.
MIN_VERSION, MAX_MAJOR = (10, 3), 11


def version_supported(version: str) -> tuple[bool, str]:
    """Pure: whether a TensorRT version string is one this backend supports, and why not."""
    try:
        major, minor = (int(x) for x in version.split(".")[:2])
    except ValueError:
        return False, f"tensorrt version {version!r} is not MAJOR.MINOR..."
    if (major, minor) < MIN_VERSION or major > MAX_MAJOR:
        return False, (
            f"tensorrt {version} is not supported: this agent needs "
            f"{MIN_VERSION[0]}.{MIN_VERSION[1]} to {MAX_MAJOR}.x (JetPack 6 ships 10.3)"
        )
    return True, ""


def capabilities(trt: Any) -> str:
    """What this TensorRT can build: precisions (by typing mode) and DLA cores."""
    prec = (
        "fp32, fp16 (builder flag), int8 (Q/DQ)"
        if weak_typing(trt)
        else "fp32, fp16 only from fp16 models (strong typing), int8 (Q/DQ)"
    )
    try:
        builder = trt.Builder(_make_logger(trt))
        dla = f"{int(builder.num_DLA_cores)} DLA core(s)"
    except Exception as e:  # no usable GPU: a builder cannot be made
        dla = f"DLA cores unknown (no builder: {e})"
    return f"precisions {prec}; {dla}"


def tensorrt_available() -> tuple[bool, str]:
    """Whether TensorRT, pycuda and a CUDA device are usable here, and why not.

    Returns:
        ``(True, "tensorrt 10.3.0, pycuda, <gpu name>; precisions ...; N DLA core(s)")`` or
        ``(False, <reason>)``.
    """
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError from a missing libnvinfer
        return False, f"cannot import tensorrt: {e}"
    ok, why = version_supported(str(trt.__version__))
    if not ok:
        return False, why
    try:
        import pycuda.driver as cuda
    except Exception as e:
        return False, f"tensorrt {trt.__version__} found, but cannot import pycuda.driver: {e}"
    try:
        cuda.init()
        if cuda.Device.count() < 1:
            return False, f"tensorrt {trt.__version__} found, but CUDA reports no device"
        name = cuda.Device(0).name()
    except Exception as e:
        return False, f"tensorrt {trt.__version__} found, but CUDA init failed: {e}"
    return True, f"tensorrt {trt.__version__}, pycuda, {name}; {capabilities(trt)}"


def platform_facts(device_index: int = 0) -> dict[str, str]:
    """Versions and GPU facts that go into the engine cache key.

    Returns:
        ``trt_version``, ``cuda_version`` (driver API version, e.g. ``"12.2"``), ``gpu_name``,
        ``compute_capability``.

    Raises:
        ModelError: TensorRT or pycuda unavailable (reason ``"unavailable"``).
    """
    trt, cuda = _import_trt()
    try:
        cuda.init()
        dev = cuda.Device(device_index)
        major, minor = dev.compute_capability()
        drv = int(cuda.get_driver_version())
    except Exception as e:
        raise ModelError(f"CUDA device {device_index} unusable: {e}", reason="unavailable") from e
    return {
        "trt_version": str(trt.__version__),
        "cuda_version": f"{drv // 1000}.{(drv % 1000) // 10}",
        "gpu_name": str(dev.name()),
        "compute_capability": f"{major}.{minor}",
    }


def _import_trt() -> tuple[Any, Any]:
    """``tensorrt`` and ``pycuda.driver`` (running an engine needs both)."""
    trt = _import_tensorrt()
    try:
        import pycuda.driver as cuda
    except Exception as e:
        raise ModelError(
            f"TensorRT backend unavailable: cannot import pycuda.driver: {e}; use the "
            "onnxruntime backend on this machine",
            reason="unavailable",
        ) from e
    return trt, cuda


def _import_tensorrt() -> Any:
    """``tensorrt`` alone: building an engine needs no pycuda."""
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or OSError from a missing libnvinfer
        raise ModelError(
            f"TensorRT backend unavailable: {e}; use the onnxruntime backend on this machine",
            reason="unavailable",
        ) from e
    return trt


def _create(what: str, factory: Any, *args: Any, model: str, reason: str) -> Any:
    """Call a TensorRT factory (``trt.Builder``, ``trt.Runtime``, ``trt.OnnxParser``).

    Their pybind11 constructors never return None: a NULL from the C++ factory raises
    ``TypeError: pybind11::init(): factory function returned nullptr``. Both are handled.

    Raises:
        ModelError: (``reason``) the factory failed; the message says which and why.
    """
    try:
        obj = factory(*args)
    except TypeError as e:
        raise ModelError(
            f"TensorRT could not create {what} ({e}); out of GPU memory, or no usable GPU",
            model=model,
            reason=reason,
        ) from e
    if obj is None:
        raise ModelError(f"TensorRT could not create {what}", model=model, reason=reason)
    return obj


def weak_typing(trt: Any) -> bool:
    """Whether this TensorRT takes precision builder flags (``BuilderFlag.FP16``/``INT8``).

    TensorRT 11 removed them (deprecated from 10.12, "superseded by strong typing"): every
    network is strongly typed, INT8 comes from the model's Q/DQ nodes alone, and FP16 needs a
    model whose tensors are fp16 (an fp16 variant file); there is no building fp16 from fp32.
    """
    flags = getattr(trt, "BuilderFlag", None)
    return flags is not None and hasattr(flags, "FP16") and hasattr(flags, "INT8")


def numpy_dtype(trt: Any, trt_dtype: Any, name: str, model: str) -> np.dtype:
    """The NumPy dtype of a TensorRT tensor type.

    Raises:
        ModelError: (``"unsupported"``) a type NumPy has no equivalent for (bf16, fp8, int4,
            fp4, e8m0: ``trt.nptype`` raises ``TypeError`` for them).
    """
    try:
        dtype: np.dtype = np.dtype(trt.nptype(trt_dtype))
        return dtype
    except (TypeError, KeyError, ValueError) as e:
        raise ModelError(
            f"tensor {name!r} has TensorRT type {trt_dtype}, which has no NumPy equivalent "
            f"({e}); this backend feeds and reads NumPy arrays, so the engine is not supported",
            model=model,
            reason="unsupported",
        ) from e


def _make_logger(trt: Any) -> Any:
    """A ``trt.ILogger`` that forwards to ``logging`` and keeps error texts for messages."""

    class _Logger(trt.ILogger):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self._lock = threading.Lock()

        def log(self, severity: Any, msg: str) -> None:
            sev = trt.ILogger.Severity
            if severity == sev.INTERNAL_ERROR or severity == sev.ERROR:
                with self._lock:
                    self.errors.append(str(msg))
                    del self.errors[:-20]  # keep the latest few for messages, not all
                log.error("tensorrt: %s", msg)
            elif severity == sev.WARNING:
                log.warning("tensorrt: %s", msg)
            else:
                log.debug("tensorrt: %s", msg)

    return _Logger()
