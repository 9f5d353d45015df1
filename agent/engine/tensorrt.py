"""Adapter: native TensorRT 10 backend (engine build and inference with pycuda buffers).

Written against the TensorRT 10 Python API as shipped in JetPack 6 (TRT 10.x):
``build_serialized_network`` with an explicit-batch network (``create_network(0)``; the
``EXPLICIT_BATCH`` flag is deprecated in 10), the name-based I/O tensor API and
``execute_async_v3``. ``tensorrt`` and ``pycuda`` are imported lazily inside functions so this
module imports on machines without them; ``tensorrt_available()`` says why not.

Threading: pipelines call ``run`` from their own threads. pycuda contexts are per thread, so the
backend owns one CUDA context (``Device.make_context``, never ``pycuda.autoinit``) and pushes
it around every call; a lock serialises runs because one execution context, one stream and one
set of buffers are shared.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.engine.base import Backend, BackendInfo, TensorSpec
from agent.errors import ModelError

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]
# input name -> (min, opt, max) shapes
Profiles = Mapping[str, Sequence[Sequence[int]]]


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


def _make_monitor(trt: Any, progress: ProgressFn) -> Any:
    """A ``trt.IProgressMonitor`` reporting top-level build phases as ``(phase, fraction)``.

    TensorRT calls it from several internal threads, hence the lock; exceptions must not
    escape into TensorRT, so the callback's are logged and the build goes on.
    """

    class _Monitor(trt.IProgressMonitor):  # type: ignore[misc]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self._steps: dict[str, int] = {}
            self._top: set[str] = set()
            self._lock = threading.Lock()

        def _emit(self, phase: str, frac: float) -> None:
            try:
                progress(phase, max(0.0, min(1.0, frac)))
            except Exception:
                log.exception("engine build progress callback failed; build continues")

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with self._lock:
                self._steps[phase_name] = max(int(num_steps), 1)
                if parent_phase is None:
                    self._top.add(phase_name)
                top = parent_phase is None
            if top:
                self._emit(phase_name, 0.0)

        def step_complete(self, phase_name: str, step: int) -> bool:
            with self._lock:
                top = phase_name in self._top
                n = self._steps.get(phase_name, 1)
            if top:
                self._emit(phase_name, (step + 1) / n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            with self._lock:
                top = phase_name in self._top
                self._top.discard(phase_name)
                self._steps.pop(phase_name, None)
            if top:
                self._emit(phase_name, 1.0)

    return _Monitor()


def _atomic_write(path: Path, data: Any) -> None:
    """Write a buffer (bytes or ``IHostMemory``) atomically: temp in same dir, fsync, replace."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(memoryview(data))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _parse_onnx(
    trt: Any, builder: Any, logger: Any, onnx_path: Path, model: str
) -> tuple[Any, Any]:
    network = builder.create_network(0)  # TRT 10: networks are always explicit-batch
    if network is None:
        raise ModelError(
            f"TensorRT could not create a network for {model}", model=model, reason="build"
        )
    parser = _create("an ONNX parser", trt.OnnxParser, network, logger, model=model, reason="build")
    data = onnx_path.read_bytes()
    # path= lets the parser find external weight files next to the model.
    if not parser.parse(data, str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ModelError(
            f"TensorRT cannot parse {onnx_path}: {len(errors)} error(s): "
            + "; ".join(errors)
            + "; the model is rejected for this backend",
            model=model,
            reason="parse",
        )
    return network, parser


def _add_profile(
    trt: Any, builder: Any, config: Any, network: Any, profiles: Profiles | None, model: str
) -> None:
    profiles = dict(profiles or {})
    dynamic: dict[str, tuple[int, ...]] = {}
    names = []
    for i in range(network.num_inputs):
        t = network.get_input(i)
        names.append(t.name)
        shape = tuple(int(d) for d in t.shape)
        if any(d < 0 for d in shape):
            dynamic[t.name] = shape
    unknown = sorted(set(profiles) - set(names))
    if unknown:
        raise ModelError(
            f"profiles name inputs {unknown}, the model's inputs are {names}",
            model=model,
            reason="shape",
        )
    missing = sorted(set(dynamic) - set(profiles))
    if missing:
        raise ModelError(
            f"inputs {[(n, dynamic[n]) for n in missing]} have dynamic dimensions (-1) but no "
            f"optimization profile; pass profiles={{name: (min, opt, max)}}",
            model=model,
            reason="shape",
        )
    if not profiles:
        return
    profile = builder.create_optimization_profile()
    for name, shapes in profiles.items():
        mn, opt, mx = (tuple(int(d) for d in s) for s in shapes)
        try:
            profile.set_shape(name, mn, opt, mx)
        except Exception as e:  # the binding raises RuntimeError on inconsistent shapes
            raise ModelError(
                f"optimization profile for {name!r} rejected (min {mn}, opt {opt}, max {mx}): {e}",
                model=model,
                reason="shape",
            ) from e
    if config.add_optimization_profile(profile) < 0:
        raise ModelError(
            f"TensorRT rejected the optimization profile {profiles}", model=model, reason="shape"
        )


def _has_fp16_inputs(trt: Any, network: Any) -> bool:
    half = getattr(trt, "float16", None)
    return any(network.get_input(i).dtype == half for i in range(network.num_inputs))


def _has_qdq(trt: Any, network: Any) -> bool:
    qdq = (trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE)
    return any(network.get_layer(i).type in qdq for i in range(network.num_layers))


def _configure(
    trt: Any,
    builder: Any,
    config: Any,
    network: Any,
    *,
    precision: str,
    workspace_bytes: int,
    dla_core: int | None,
    model: str,
) -> None:
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if precision not in ("fp32", "fp16", "int8"):
        raise ModelError(
            f"precision must be fp32, fp16 or int8, got {precision!r}",
            model=model,
            reason="precision",
        )
    weak = weak_typing(trt)
    if precision == "int8":
        # Explicit quantization only: the scales come from the model's Q/DQ nodes, so no
        # calibrator. FP16 too, so the layers between Q/DQ pairs need not run in FP32.
        if not _has_qdq(trt, network):
            raise ModelError(
                f"int8 requested but {model} has no QuantizeLinear/DequantizeLinear nodes; "
                "this agent builds INT8 only from QDQ models (no calibrator); "
                "publish the QDQ variant",
                model=model,
                reason="precision",
            )
        if weak:  # TensorRT 11: a strongly typed network builds Q/DQ as INT8 by itself
            config.set_flag(trt.BuilderFlag.INT8)
            config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "fp16":
        if weak:
            config.set_flag(trt.BuilderFlag.FP16)
        elif not _has_fp16_inputs(trt, network):
            raise ModelError(
                f"fp16 requested but TensorRT {trt.__version__} has no FP16 builder flag "
                "(strong typing) and this file is fp32; publish an fp16 variant",
                model=model,
                reason="precision",
            )
    elif hasattr(trt.BuilderFlag, "TF32"):
        # TF32 is on by default (Ampere and later, e.g. Orin): it rounds conv/matmul inputs to
        # 10-bit mantissas. "fp32" must match the fp32 accuracy the model was published with.
        config.clear_flag(trt.BuilderFlag.TF32)
    if dla_core is not None:
        n = int(builder.num_DLA_cores)
        if not 0 <= dla_core < n:
            raise ModelError(
                f"DLA core {dla_core} requested, this device has {n} DLA core(s)",
                model=model,
                reason="device",
            )
        if precision == "fp32":
            raise ModelError(
                "DLA runs fp16 or int8 only, fp32 was requested", model=model, reason="precision"
            )
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = int(dla_core)
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU


def _attach_timing_cache(config: Any, path: Path | None, model: str) -> None:
    """Attach the persisted timing cache, or an empty one if it is absent or does not fit."""
    data = b""
    if path is not None and path.is_file():
        try:
            data = path.read_bytes()
        except OSError as e:
            log.warning("model=%s timing cache %s unreadable (%s); starting empty", model, path, e)
    if data:
        try:
            cache = config.create_timing_cache(data)
            attached = cache is not None and config.set_timing_cache(cache, ignore_mismatch=False)
        except Exception as e:  # a corrupt blob: some versions raise instead of returning None
            log.warning("model=%s timing cache %s rejected: %s", model, path, e)
            attached = False
        if attached:
            return
        # Written by another TensorRT version or GPU: its timings would mislead; start afresh.
        log.warning(
            "model=%s timing cache %s does not match this TensorRT/GPU; starting empty", model, path
        )
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        raise ModelError(
            "TensorRT could not create an empty timing cache", model=model, reason="build"
        )


def build_engine(
    onnx_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    precision: str = "fp32",
    workspace_bytes: int = 1 << 30,
    dla_core: int | None = None,
    profiles: Profiles | None = None,
    timing_cache_path: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
) -> None:
    """Build a serialized TensorRT engine from an ONNX file and write it atomically.

    Meant to run in a child process (``agent.engine.build``): a build can take minutes, use
    most of a Jetson's memory, and crash.

    Args:
        onnx_path: the ONNX model.
        out_path: where the engine goes (temp file in the same folder, fsync, ``os.replace``).
        precision: ``"fp32"``, ``"fp16"``, or ``"int8"`` (QDQ models only, no calibrator).
        workspace_bytes: limit of the builder's workspace memory pool.
        dla_core: build for this DLA core (GPU fallback on), ``None`` for the GPU.
        profiles: ``{input: (min, opt, max)}`` for inputs with dynamic dimensions.
        timing_cache_path: persisted timing cache; loaded if present, written back after.
        progress: called as ``(phase, fraction)`` for top-level builder phases.

    Raises:
        ModelError: TensorRT unavailable (``"unavailable"``), the model does not parse
            (``"parse"``, every parser error in the message), bad profiles (``"shape"``),
            precision or device not possible (``"precision"``, ``"device"``), or the build
            failed (``"build"``, TensorRT's logged errors in the message).
        OSError: the output cannot be written.
    """
    trt = _import_tensorrt()
    onnx_path = Path(onnx_path)
    model = str(onnx_path)
    if not onnx_path.is_file():
        raise ModelError(f"model file {onnx_path} does not exist", model=model, reason="load")
    logger = _make_logger(trt)
    builder = _create("a builder", trt.Builder, logger, model=model, reason="build")
    network, parser = _parse_onnx(trt, builder, logger, onnx_path, model)
    config = builder.create_builder_config()
    if config is None:
        raise ModelError("TensorRT could not create a builder config", model=model, reason="build")
    _configure(
        trt,
        builder,
        config,
        network,
        precision=precision,
        workspace_bytes=workspace_bytes,
        dla_core=dla_core,
        model=model,
    )
    _add_profile(trt, builder, config, network, profiles, model)
    tc_path = Path(timing_cache_path) if timing_cache_path is not None else None
    _attach_timing_cache(config, tc_path, model)
    monitor = None
    if progress is not None:
        monitor = _make_monitor(trt, progress)  # must outlive the build: keep the reference
        config.progress_monitor = monitor
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = "; ".join(logger.errors) or "no error was logged"
        raise ModelError(
            f"TensorRT build of {onnx_path} ({precision}, workspace {workspace_bytes} B, "
            f"{'dla:' + str(dla_core) if dla_core is not None else 'gpu'}) failed: {errors}",
            model=model,
            reason="build",
        )
    _atomic_write(Path(out_path), serialized)
    if tc_path is not None:
        cache = config.get_timing_cache()
        if cache is not None:
            try:
                _atomic_write(tc_path, cache.serialize())
            except OSError as e:  # the engine is fine; the next build is only slower
                log.warning("model=%s timing cache not saved to %s: %s", model, tc_path, e)
    del parser, monitor


class _Buffer:
    """A pinned host buffer and a device buffer of the same capacity (in elements)."""

    def __init__(self, cuda: Any, dtype: np.dtype, elements: int) -> None:
        self.dtype = dtype
        self.capacity = max(int(elements), 1)
        self.host = cuda.pagelocked_empty(self.capacity, dtype)
        self.device = cuda.mem_alloc(self.capacity * dtype.itemsize)

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape, dtype=np.int64))
        view: np.ndarray = self.host[:n].reshape(shape)
        return view

    def free(self) -> None:
        """Free both now, while the owning CUDA context is current (not at GC time)."""
        self.device.free()
        host_free = getattr(getattr(self.host, "base", None), "free", None)
        if callable(host_free):  # pycuda's HostAllocation behind pagelocked_empty
            host_free()
        self.host = None


class TensorRTBackend(Backend):
    """A deserialized TensorRT engine behind the backend interface."""

    def __init__(
        self,
        engine_bytes: bytes,
        *,
        precision: str = "fp32",
        model_name: str = "",
        device_index: int = 0,
        dla_core: int | None = None,
    ) -> None:
        """Deserialize an engine and prepare a context and stream.

        Args:
            engine_bytes: a serialized engine built by this TensorRT version on this GPU.
            precision: what it was built for (reported).
            model_name: for messages.
            device_index: CUDA device.
            dla_core: the DLA core the engine was built for, ``None`` for the GPU.

        Raises:
            ModelError: TensorRT unavailable (``"unavailable"``), the engine is corrupt or
                was built by another TensorRT/GPU (``"engine"``), or it has I/O this backend
                does not support (``"unsupported"``).
        """
        trt, cuda = _import_trt()
        self.model_name = model_name
        self._trt, self._cuda = trt, cuda
        self._lock = threading.Lock()
        self._buffers: dict[str, _Buffer] = {}
        self._closed = False
        try:
            cuda.init()
            self._ctx = cuda.Device(device_index).make_context()  # made current: pop below
        except Exception as e:
            raise ModelError(
                f"cannot create a CUDA context on device {device_index}: {e}",
                model=model_name,
                reason="unavailable",
            ) from e
        try:
            self._open(engine_bytes, dla_core)
        except BaseException:
            self._release()
            self._ctx.detach()  # still current: destroys the context and pops it
            raise
        self._ctx.pop()
        device = f"dla:{dla_core}" if dla_core is not None else f"cuda:{device_index}"
        self.info = BackendInfo("tensorrt", str(trt.__version__), device, precision)

    def _open(self, engine_bytes: bytes, dla_core: int | None) -> None:
        trt, cuda = self._trt, self._cuda
        self._logger = _make_logger(trt)
        self._runtime = _create(
            "a runtime", trt.Runtime, self._logger, model=self.model_name, reason="unavailable"
        )
        if dla_core is not None:
            self._runtime.DLA_core = int(dla_core)
        self._engine = self._runtime.deserialize_cuda_engine(engine_bytes)
        if self._engine is None:
            errors = "; ".join(self._logger.errors) or "no error was logged"
            raise ModelError(
                f"engine for {self.model_name or 'model'} does not deserialize "
                f"({len(engine_bytes)} bytes): {errors}; it is corrupt or was built by another "
                "TensorRT version or GPU; rebuild it",
                model=self.model_name,
                reason="engine",
            )
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ModelError(
                "TensorRT could not create an execution context (out of GPU memory?)",
                model=self.model_name,
                reason="engine",
            )
        inputs, outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            if self._engine.is_shape_inference_io(name):
                raise ModelError(
                    f"tensor {name!r} is a shape tensor; not supported by this backend",
                    model=self.model_name,
                    reason="unsupported",
                )
            dtype = numpy_dtype(trt, self._engine.get_tensor_dtype(name), name, self.model_name)
            shape = tuple(int(d) for d in self._engine.get_tensor_shape(name))
            spec = TensorSpec(name, tuple(d if d >= 0 else None for d in shape), dtype.name)
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
            else:
                outputs.append(spec)
        self.inputs, self.outputs = tuple(inputs), tuple(outputs)
        self._stream = cuda.Stream()

    @classmethod
    def from_engine_file(
        cls,
        path: str | os.PathLike[str],
        *,
        precision: str = "fp32",
        model_name: str = "",
        device_index: int = 0,
        dla_core: int | None = None,
    ) -> TensorRTBackend:
        """Load a serialized engine file.

        Raises:
            ModelError: the file is missing or unreadable (``"load"``), or see ``__init__``.
        """
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ModelError(
                f"cannot read engine file {path}: {e}", model=model_name or str(path), reason="load"
            ) from e
        return cls(
            data,
            precision=precision,
            model_name=model_name or str(path),
            device_index=device_index,
            dla_core=dla_core,
        )

    def _buffer(self, name: str, dtype: np.dtype, elements: int) -> _Buffer:
        buf = self._buffers.get(name)
        if buf is None or buf.capacity < elements:
            if buf is not None:
                buf.free()
            buf = _Buffer(self._cuda, dtype, elements)  # grown: the shape got bigger
            self._buffers[name] = buf
        return buf

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            if self._closed:
                raise ModelError("backend is closed", model=self.model_name, reason="closed")
            self._ctx.push()
            try:
                return self._run_locked(feeds)
            finally:
                self._ctx.pop()

    def _run_locked(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        cuda, ctx, stream = self._cuda, self._context, self._stream
        for spec in self.inputs:
            arr = feeds[spec.name]
            if arr.dtype != np.dtype(spec.dtype):
                raise ModelError(
                    f"input {spec.name!r} is {arr.dtype}, engine expects {spec.dtype}",
                    model=self.model_name,
                    reason="dtype",
                )
            if not ctx.set_input_shape(spec.name, tuple(arr.shape)):
                raise ModelError(
                    f"input {spec.name!r} shape {arr.shape} is outside the engine's optimization "
                    f"profile (declared {spec.shape}); rebuild with a wider profile",
                    model=self.model_name,
                    reason="shape",
                )
            buf = self._buffer(spec.name, arr.dtype, arr.size)
            host = buf.view(arr.shape)
            np.copyto(host, arr)
            cuda.memcpy_htod_async(buf.device, host, stream)
            if not ctx.set_tensor_address(spec.name, int(buf.device)):
                raise ModelError(
                    f"TensorRT refused the address of input {spec.name!r}",
                    model=self.model_name,
                    reason="run",
                )
        results = []
        for spec in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise ModelError(
                    f"output {spec.name!r} shape {shape} is data-dependent; not supported",
                    model=self.model_name,
                    reason="unsupported",
                )
            buf = self._buffer(spec.name, np.dtype(spec.dtype), int(np.prod(shape, dtype=np.int64)))
            if not ctx.set_tensor_address(spec.name, int(buf.device)):
                raise ModelError(
                    f"TensorRT refused the address of output {spec.name!r}",
                    model=self.model_name,
                    reason="run",
                )
            results.append((buf, shape))
        if not ctx.execute_async_v3(stream.handle):
            errors = "; ".join(self._logger.errors[-3:]) or "no error was logged"
            raise ModelError(
                f"TensorRT execution failed: {errors}", model=self.model_name, reason="run"
            )
        views = []
        for buf, shape in results:
            host = buf.view(shape)
            cuda.memcpy_dtoh_async(host, buf.device, stream)
            views.append(host)
        stream.synchronize()
        return [v.copy() for v in views]  # the pinned buffers are reused by the next run

    def _release(self) -> None:
        for buf in self._buffers.values():
            buf.free()
        self._buffers.clear()
        # Destroy in dependency order while our CUDA context is current.
        for attr in ("_context", "_engine", "_runtime", "_stream"):
            if hasattr(self, attr):
                setattr(self, attr, None)

    def close(self) -> None:
        """Free buffers, the execution context, the engine and the CUDA context. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._ctx.push()
            try:
                self._release()
            finally:
                # Detach while current: pycuda then destroys the context and pops it from
                # this thread's stack (from another thread a non-current detach would leak).
                self._ctx.detach()
