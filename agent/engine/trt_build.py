"""Adapter: building a TensorRT engine from an ONNX file (runs in the build child).

Written against the TensorRT 10 Python API as shipped in JetPack 6 (TRT 10.x), and 11.x's
strong typing: ``build_serialized_network`` with an explicit-batch network
(``create_network(0)``; the ``EXPLICIT_BATCH`` flag is deprecated in 10), precision flags where
the version has them (``trt_common.weak_typing``), optimisation profiles, DLA, a persisted
timing cache. Building needs ``tensorrt`` only, no pycuda.
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

from agent.common.errors import ModelError
from agent.engine.trt_common import _create, _import_tensorrt, _make_logger, weak_typing

log = logging.getLogger("agent.engine.tensorrt")

ProgressFn = Callable[[str, float], None]
# input name -> (min, opt, max) shapes
Profiles = Mapping[str, Sequence[Sequence[int]]]


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
