"""Test double: fake ``tensorrt`` and ``pycuda.driver`` modules that run ONNX Runtime inside.

No machine here has a GPU, so the native TensorRT adapter would otherwise never execute in
CI. They are no evidence that TensorRT itself behaves this way: the ``tensorrt``-marked tests
on a device are (``scripts/hardware_check``).

What the fake promises, and only where the adapter depends on it (checked against NVIDIA's
bindings' documented API, TensorRT 10.3 - 11.x):

- **Factories raise, methods return None.** ``Builder``, ``Runtime`` and ``OnnxParser`` are
  pybind11 constructors: a NULL from the C++ factory raises ``TypeError: pybind11::init():
  factory function returned nullptr`` (``FAIL`` names which fail); ``create_network``,
  ``create_builder_config``, ``deserialize_cuda_engine``, ``create_execution_context`` return
  None on failure; setters return False.
- **``nptype`` raises ``TypeError``** for types NumPy lacks (bf16, fp8, int4, fp4, e8m0).
- **Versions** (``make_trt_module(version)``): 10.x has ``BuilderFlag.FP16``/``INT8``; 11.x has
  neither (strong typing): Q/DQ networks build as INT8 without flags, fp16 needs fp16 tensors.
- **Asynchronous execution.** ``execute_async_v3`` and the ``memcpy_*_async`` calls are queued
  on their stream and happen at ``Stream.synchronize()``: a host buffer read before the
  synchronize holds stale data, as on a GPU.
- pycuda's per-thread context stack: allocations, copies and execution need a current context;
  a non-current ``detach`` is refused (it would leak).
- Parser errors are objects with ``desc()`` and ``str()``; their texts are the fake's own.

The "engine" is ``MAGIC + header + ONNX bytes``; executing it runs the ONNX model with ONNX
Runtime on the bytes found at the tensor addresses in fake device memory. The header records
the builder settings (flags, pools, profiles, DLA core) so tests can see what reached TensorRT.

``fake_site()`` writes importable ``tensorrt`` and ``pycuda`` packages that load this module,
for the agent's spawned build child (which cannot see ``sys.modules`` of the test process).

The "engine" is ``MAGIC + header + ONNX bytes``; executing it runs the ONNX model with ONNX
Runtime on the bytes found at the tensor addresses in fake device memory.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import types
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

MAGIC = b"FAKETRT1"

# ---------------------------------------------------------------- pycuda.driver


class FakeCuda:
    """State of the fake driver: device memory, contexts, and counters tests can check."""

    def __init__(self) -> None:
        self.mem: dict[int, bytearray] = {}
        self.addr = itertools.count(0x1000, 0x1000)
        self.tls = threading.local()
        self.live_contexts = 0
        self.pushes_from_threads: set[int] = set()
        self.streams: dict[int, Any] = {}

    def stack(self) -> list[Any]:
        if not hasattr(self.tls, "stack"):
            self.tls.stack = []
        return self.tls.stack  # type: ignore[no-any-return]

    def require_context(self, what: str) -> None:
        st = self.stack()
        if not st or st[-1].detached:
            raise RuntimeError(f"{what} without a current CUDA context (cuCtxGetCurrent is NULL)")


def make_cuda_module(state: FakeCuda) -> types.ModuleType:
    m = types.ModuleType("pycuda.driver")

    class Context:
        def __init__(self) -> None:
            self.detached = False
            state.live_contexts += 1

        def push(self) -> None:
            if self.detached:
                raise RuntimeError("push of a detached context")
            state.stack().append(self)
            state.pushes_from_threads.add(threading.get_ident())

        @staticmethod
        def pop() -> None:
            st = state.stack()
            if not st:
                raise RuntimeError("cuCtxPopCurrent: context stack is empty")
            st.pop()

        def detach(self) -> None:
            st = state.stack()
            if not st or st[-1] is not self:
                raise RuntimeError("fake pycuda: detach of a non-current context leaks it")
            st.pop()
            self.detached = True
            state.live_contexts -= 1

    class Device:
        def __init__(self, index: int) -> None:
            if index != 0:
                raise RuntimeError(f"invalid device ordinal {index}")

        @staticmethod
        def count() -> int:
            return 1

        def name(self) -> str:
            return "Fake Orin"

        def compute_capability(self) -> tuple[int, int]:
            return (8, 7)

        def make_context(self) -> Context:
            ctx = Context()
            ctx.push()
            return ctx

    class DeviceAllocation:
        def __init__(self, nbytes: int) -> None:
            state.require_context("cuMemAlloc")
            if nbytes <= 0:
                raise RuntimeError(f"cuMemAlloc of {nbytes} bytes")
            self.ptr = next(state.addr)
            state.mem[self.ptr] = bytearray(nbytes)

        def __int__(self) -> int:
            return self.ptr

        def free(self) -> None:
            state.require_context("cuMemFree")
            del state.mem[self.ptr]  # KeyError on a double free

    class Stream:
        def __init__(self) -> None:
            state.require_context("cuStreamCreate")
            self.handle = next(state.addr)
            self.queue: list[Any] = []
            state.streams[self.handle] = self

        def synchronize(self) -> None:
            state.require_context("cuStreamSynchronize")
            while self.queue:
                self.queue.pop(0)()

    def _enqueue(stream: Any, work: Any) -> None:
        if stream is None:  # the legacy default stream: synchronous
            work()
        else:
            stream.queue.append(work)

    def memcpy_htod_async(dest: Any, src: np.ndarray, stream: Any = None) -> None:
        state.require_context("cuMemcpyHtoDAsync")
        buf = state.mem[int(dest)]
        if src.nbytes > len(buf):
            raise RuntimeError(f"copy of {src.nbytes} bytes into a {len(buf)}-byte allocation")

        def work() -> None:  # reads the pinned source when the stream gets to it
            raw = np.ascontiguousarray(src).view(np.uint8).ravel().tobytes()
            buf[: len(raw)] = raw

        _enqueue(stream, work)

    def memcpy_dtoh_async(dest: np.ndarray, src: Any, stream: Any = None) -> None:
        state.require_context("cuMemcpyDtoHAsync")
        buf = state.mem[int(src)]
        n = dest.nbytes
        if n > len(buf):
            raise RuntimeError(f"copy of {n} bytes out of a {len(buf)}-byte allocation")

        def work() -> None:
            dest.reshape(-1).view(np.uint8)[:] = np.frombuffer(bytes(buf[:n]), np.uint8)

        _enqueue(stream, work)

    m.init = lambda flags=0: None  # type: ignore[attr-defined]
    m.get_driver_version = lambda: 12020  # type: ignore[attr-defined]
    m.Context = Context  # type: ignore[attr-defined]
    m.Device = Device  # type: ignore[attr-defined]
    m.Stream = Stream  # type: ignore[attr-defined]
    m.mem_alloc = DeviceAllocation  # type: ignore[attr-defined]
    m.pagelocked_empty = lambda shape, dtype: np.empty(shape, dtype)  # type: ignore[attr-defined]
    m.memcpy_htod_async = memcpy_htod_async  # type: ignore[attr-defined]
    m.memcpy_dtoh_async = memcpy_dtoh_async  # type: ignore[attr-defined]
    return m


# ---------------------------------------------------------------- tensorrt


class Severity:
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)


class ILogger:
    Severity = Severity

    def __init__(self) -> None:
        pass


class IProgressMonitor:
    def __init__(self) -> None:
        pass


class _Enum:
    def __init__(self, *names: str) -> None:
        for n in names:
            setattr(self, n, n)


MemoryPoolType = _Enum("WORKSPACE")
BuilderFlag = _Enum("FP16", "INT8", "GPU_FALLBACK", "TF32")
DeviceType = _Enum("GPU", "DLA")
LayerType = _Enum("QUANTIZE", "DEQUANTIZE", "OTHER")
TensorIOMode = _Enum("INPUT", "OUTPUT")


# ONNX element types TensorRT has and NumPy has not: the fake's DataType stand-ins for them.
_NO_NUMPY = {
    onnx.TensorProto.BFLOAT16: "DataType.BF16",
    onnx.TensorProto.FLOAT8E4M3FN: "DataType.FP8",
    onnx.TensorProto.INT4: "DataType.INT4",
}


def _np_type(elem_type: int) -> Any:
    if elem_type in _NO_NUMPY:
        return _NO_NUMPY[elem_type]
    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).type


def nptype(trt_type: Any) -> type:
    """As ``tensorrt.nptype``: the NumPy type, ``TypeError`` where NumPy has none."""
    if isinstance(trt_type, str):
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return trt_type  # type: ignore[no-any-return]


def _dims(vi: onnx.ValueInfoProto) -> tuple[int, ...]:
    return tuple(
        d.dim_value if d.HasField("dim_value") else -1 for d in vi.type.tensor_type.shape.dim
    )


class _Tensor:
    def __init__(self, vi: onnx.ValueInfoProto) -> None:
        self.name = vi.name
        self.shape = _dims(vi)
        self.dtype = _np_type(vi.type.tensor_type.elem_type)


class _Layer:
    def __init__(self, op_type: str) -> None:
        self.type = {"QuantizeLinear": "QUANTIZE", "DequantizeLinear": "DEQUANTIZE"}.get(
            op_type, "OTHER"
        )


class Network:
    def __init__(self) -> None:
        self.inputs: list[_Tensor] = []
        self.layers: list[_Layer] = []
        self.model_bytes = b""

    @property
    def num_inputs(self) -> int:
        return len(self.inputs)

    def get_input(self, i: int) -> _Tensor:
        return self.inputs[i]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def get_layer(self, i: int) -> _Layer:
        return self.layers[i]


class _ParserError:
    def __init__(self, desc: str) -> None:
        self._desc = desc

    def desc(self) -> str:
        return self._desc

    def __str__(self) -> str:
        return f"In node -1 with name:  and operator:  (parseGraph): INVALID_GRAPH: {self._desc}"


FAIL: set[str] = set()  # factory names that fail: "Builder", "Runtime", "OnnxParser"
_NULLPTR = "pybind11::init(): factory function returned nullptr"


def _factory(name: str) -> None:
    if name in FAIL or name in os.environ.get("EDGEFLEET_FAKE_TRT_FAIL", "").split(","):
        raise TypeError(_NULLPTR)


class OnnxParser:
    def __init__(self, network: Network, logger: Any) -> None:
        _factory("OnnxParser")
        self.network = network
        self.errors: list[_ParserError] = []

    def parse(self, model: bytes, path: str | None = None) -> bool:
        try:
            proto = onnx.load_from_string(bytes(model))
            onnx.checker.check_model(proto)
        except Exception as e:
            self.errors.append(_ParserError(f"failed to parse ONNX: {type(e).__name__}: {e}"))
            self.errors.append(_ParserError("network has no inputs"))
            return False
        inits = {i.name for i in proto.graph.initializer}
        self.network.inputs = [_Tensor(vi) for vi in proto.graph.input if vi.name not in inits]
        self.network.layers = [_Layer(n.op_type) for n in proto.graph.node]
        self.network.model_bytes = bytes(model)
        return True

    @property
    def num_errors(self) -> int:
        return len(self.errors)

    def get_error(self, i: int) -> _ParserError:
        return self.errors[i]


class _Profile:
    def __init__(self) -> None:
        self.shapes: dict[str, list[list[int]]] = {}

    def set_shape(self, name: str, mn: Any, opt: Any, mx: Any) -> None:
        mn, opt, mx = list(mn), list(opt), list(mx)
        if not all(a <= b <= c for a, b, c in zip(mn, opt, mx, strict=True)):
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        self.shapes[name] = [mn, opt, mx]


class _TimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = bytes(data) or b"TC"

    def serialize(self) -> bytes:
        return self.data


class BuilderConfig:
    def __init__(self) -> None:
        self.flags: set[str] = {"TF32"}  # on by default, as in TensorRT
        self.pools: dict[str, int] = {}
        self.profiles: list[_Profile] = []
        self.default_device_type = "GPU"
        self.DLA_core = -1
        self.progress_monitor: Any = None
        self.timing_cache: _TimingCache | None = None

    def set_memory_pool_limit(self, pool: str, size: int) -> None:
        self.pools[pool] = size

    def set_flag(self, flag: str) -> None:
        self.flags.add(flag)

    def clear_flag(self, flag: str) -> None:
        self.flags.discard(flag)

    def add_optimization_profile(self, profile: _Profile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, data: bytes) -> _TimingCache | None:
        return None if bytes(data).startswith(b"CORRUPT") else _TimingCache(data)

    def set_timing_cache(self, cache: _TimingCache, ignore_mismatch: bool) -> bool:
        if cache.data.startswith(b"OTHERGPU") and not ignore_mismatch:
            return False
        self.timing_cache = cache
        return True

    def get_timing_cache(self) -> _TimingCache | None:
        return self.timing_cache


class Builder:
    num_DLA_cores = int(os.environ.get("EDGEFLEET_FAKE_TRT_DLA_CORES", "0"))

    def __init__(self, logger: Any) -> None:
        _factory("Builder")
        self.logger = logger

    def create_network(self, flags: int) -> Network:
        if flags != 0:
            raise TypeError("EXPLICIT_BATCH is deprecated in TensorRT 10; pass 0")
        return Network()

    def create_builder_config(self) -> BuilderConfig:
        return BuilderConfig()

    def create_optimization_profile(self) -> _Profile:
        return _Profile()

    def build_serialized_network(self, network: Network, config: BuilderConfig) -> bytes | None:
        pm = config.progress_monitor
        if pm is not None:
            pm.phase_start("Building engine", None, 2)
            pm.phase_start("Timing tactics", "Building engine", 3)
            for i in range(3):
                pm.step_complete("Timing tactics", i)
            pm.phase_finish("Timing tactics")
            pm.step_complete("Building engine", 0)
            pm.step_complete("Building engine", 1)
            pm.phase_finish("Building engine")
        shapes = config.profiles[0].shapes if config.profiles else {}
        for t in network.inputs:
            if -1 in t.shape and t.name not in shapes:
                self.logger.log(
                    Severity.ERROR, f"Network has dynamic input {t.name} and no profile"
                )
                return None
        if config.timing_cache is not None:
            config.timing_cache.data += b"+"
        if (
            STRONG
            and "INT8" not in config.flags
            and any(layer.type == "QUANTIZE" for layer in network.layers)
        ):
            config.flags.add("INT8(strongly typed Q/DQ)")  # what TRT 11 does by itself
        header = json.dumps(
            {
                "profiles": shapes,
                "flags": sorted(config.flags),
                "pools": config.pools,
                "device_type": config.default_device_type,
                "dla_core": config.DLA_core,
                "trt_version": VERSION,
            }
        ).encode()
        return MAGIC + len(header).to_bytes(4, "little") + header + network.model_bytes


class Runtime:
    def __init__(self, logger: Any) -> None:
        _factory("Runtime")
        self.logger = logger
        self.DLA_core = -1

    def deserialize_cuda_engine(self, data: bytes) -> Engine | None:
        data = bytes(data)
        try:
            if not data.startswith(MAGIC):
                raise ValueError("magic tag does not match")
            n = int.from_bytes(data[8:12], "little")
            header = json.loads(data[12 : 12 + n])
            return Engine(data[12 + n :], header["profiles"])
        except Exception as e:
            self.logger.log(Severity.ERROR, f"IRuntime::deserializeCudaEngine: Error Code 1: {e}")
            return None


class Engine:
    def __init__(self, model_bytes: bytes, profiles: dict[str, list[list[int]]]) -> None:
        proto = onnx.load_from_string(model_bytes)
        inits = {i.name for i in proto.graph.initializer}
        ins = [_Tensor(vi) for vi in proto.graph.input if vi.name not in inits]
        outs = [_Tensor(vi) for vi in proto.graph.output]
        self.tensors = {t.name: t for t in ins + outs}
        self.order = [t.name for t in ins + outs]
        self.input_names = [t.name for t in ins]
        self.profiles = profiles
        self.session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])

    @property
    def num_io_tensors(self) -> int:
        return len(self.order)

    def get_tensor_name(self, i: int) -> str:
        return self.order[i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name in self.input_names else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> type:
        return self.tensors[name].dtype

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def is_shape_inference_io(self, name: str) -> bool:
        return False

    def create_execution_context(self) -> ExecutionContext:
        return ExecutionContext(self)


class ExecutionContext:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.executions = 0

    def set_input_shape(self, name: str, shape: Any) -> bool:
        shape = tuple(int(d) for d in shape)
        decl = self.engine.tensors[name].shape
        if len(shape) != len(decl) or any(
            d >= 0 and d != s for d, s in zip(decl, shape, strict=True)
        ):
            return False
        if name in self.engine.profiles:
            mn, _, mx = self.engine.profiles[name]
            if not all(a <= s <= b for a, s, b in zip(mn, shape, mx, strict=True)):
                return False
        self.shapes[name] = shape
        return True

    def _output_shapes(self) -> dict[str, tuple[int, ...]]:
        feeds = {
            n: np.zeros(self.shapes[n], self.engine.tensors[n].dtype)
            for n in self.engine.input_names
        }
        outs = self.engine.session.run(None, feeds)
        names = [o.name for o in self.engine.session.get_outputs()]
        return {n: tuple(o.shape) for n, o in zip(names, outs, strict=True)}

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.engine.input_names:
            return self.shapes.get(name, self.engine.tensors[name].shape)
        if not all(n in self.shapes for n in self.engine.input_names):
            return tuple(-1 for _ in self.engine.tensors[name].shape)
        return self._output_shapes()[name]

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine.tensors:
            return False
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        st = STATE.stack() if STATE is not None else []
        if not st:
            raise RuntimeError("enqueueV3 without a current CUDA context")
        assert STATE is not None
        stream = STATE.streams.get(int(stream_handle))
        if stream is None:
            return False
        state, shapes, addresses = STATE, dict(self.shapes), dict(self.addresses)

        def work() -> None:  # runs when the stream gets to it, not now
            feeds = {}
            for n in self.engine.input_names:
                t = self.engine.tensors[n]
                nbytes = int(np.prod(shapes[n])) * np.dtype(t.dtype).itemsize
                raw = bytes(state.mem[addresses[n]][:nbytes])
                feeds[n] = np.frombuffer(raw, t.dtype).reshape(shapes[n])
            names = [o.name for o in self.engine.session.get_outputs()]
            for n, out in zip(names, self.engine.session.run(None, feeds), strict=True):
                raw = np.ascontiguousarray(out).view(np.uint8).ravel().tobytes()
                state.mem[addresses[n]][: len(raw)] = raw

        stream.queue.append(work)
        self.executions += 1
        return True


STATE: FakeCuda | None = None
VERSION = "10.3.0"
STRONG = False  # TensorRT 11: strongly typed networks, no precision flags


def make_trt_module(version: str = "10.3.0") -> types.ModuleType:
    """A ``tensorrt`` module of ``version``: 11.x has no ``BuilderFlag.FP16``/``INT8``."""
    global VERSION, STRONG
    VERSION, STRONG = version, int(version.split(".")[0]) >= 11
    m = types.ModuleType("tensorrt")
    m.__version__ = version  # type: ignore[attr-defined]
    flags = ("GPU_FALLBACK", "TF32") if STRONG else ("FP16", "INT8", "GPU_FALLBACK", "TF32")
    for name, obj in {
        "ILogger": ILogger,
        "IProgressMonitor": IProgressMonitor,
        "MemoryPoolType": MemoryPoolType,
        "BuilderFlag": _Enum(*flags),
        "DeviceType": DeviceType,
        "LayerType": LayerType,
        "TensorIOMode": TensorIOMode,
        "Builder": Builder,
        "OnnxParser": OnnxParser,
        "Runtime": Runtime,
        "nptype": nptype,
        "float16": np.float16,
    }.items():
        setattr(m, name, obj)
    return m


def install(monkeypatch: pytest.MonkeyPatch, version: str = "10.3.0") -> FakeCuda:
    """Put the fakes in ``sys.modules`` for one test; returns the driver state to inspect."""
    global STATE
    state = FakeCuda()
    STATE = state
    cuda = make_cuda_module(state)
    pkg = types.ModuleType("pycuda")
    pkg.driver = cuda  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", make_trt_module(version))
    monkeypatch.setitem(sys.modules, "pycuda", pkg)
    monkeypatch.setitem(sys.modules, "pycuda.driver", cuda)
    monkeypatch.setattr(Builder, "num_DLA_cores", 0)
    monkeypatch.setattr(sys.modules[__name__], "FAIL", set())
    return state


def fake_site(root: Path) -> Path:
    """Write importable ``tensorrt`` / ``pycuda`` packages backed by this module into
    ``root`` (for a process that imports them itself: the agent's spawned build child).
    ``EDGEFLEET_FAKE_TRT_VERSION``, ``EDGEFLEET_FAKE_TRT_DLA_CORES`` and
    ``EDGEFLEET_FAKE_TRT_FAIL`` (comma-separated factory names) configure them."""
    (root / "tensorrt").mkdir(parents=True, exist_ok=True)
    (root / "pycuda").mkdir(exist_ok=True)
    head = "import os\nimport tests.harness.fake_tensorrt as _f\n"
    (root / "tensorrt" / "__init__.py").write_text(
        head
        + "_m = _f.make_trt_module(os.environ.get('EDGEFLEET_FAKE_TRT_VERSION', '10.3.0'))\n"
        + "globals().update({k: v for k, v in vars(_m).items() if not k.startswith('__')})\n"
        + "__version__ = _m.__version__\n"
    )
    (root / "pycuda" / "__init__.py").write_text("")
    (root / "pycuda" / "driver.py").write_text(
        head
        + "if _f.STATE is None:\n    _f.STATE = _f.FakeCuda()\n"
        + "globals().update({k: v for k, v in vars(_f.make_cuda_module(_f.STATE)).items()"
        + " if not k.startswith('__')})\n"
    )
    return root
