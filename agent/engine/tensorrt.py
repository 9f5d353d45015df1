"""Adapter: native TensorRT backend (inference on a built engine with pycuda buffers).

Written against the TensorRT 10 Python API as shipped in JetPack 6 (TRT 10.x):
``build_serialized_network`` with an explicit-batch network (``create_network(0)``; the
``EXPLICIT_BATCH`` flag is deprecated in 10), the name-based I/O tensor API and
``execute_async_v3``. Building lives in ``trt_build``, what both sides share (version policy,
availability, lazy imports) in ``trt_common``; their public names are re-exported here.

Threading: pipelines call ``run`` from their own threads. pycuda contexts are per thread, so the
backend owns one CUDA context (``Device.make_context``, never ``pycuda.autoinit``) and pushes
it around every call; a lock serialises runs because one execution context, one stream and one
set of buffers are shared.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.common.errors import ModelError
from agent.engine.base import Backend, BackendInfo, TensorSpec
from agent.engine.trt_build import Profiles, ProgressFn, build_engine
from agent.engine.trt_common import (
    MAX_MAJOR,
    MIN_VERSION,
    _create,
    _import_trt,
    _make_logger,
    capabilities,
    numpy_dtype,
    platform_facts,
    tensorrt_available,
    version_supported,
    weak_typing,
)

__all__ = [
    "MAX_MAJOR",
    "MIN_VERSION",
    "Profiles",
    "ProgressFn",
    "TensorRTBackend",
    "build_engine",
    "capabilities",
    "numpy_dtype",
    "platform_facts",
    "tensorrt_available",
    "version_supported",
    "weak_typing",
]

log = logging.getLogger(__name__)


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
