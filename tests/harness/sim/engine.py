"""Adapter: the simulator's stand-ins for the camera and the inference — nothing else is fake.

``SimPipeline`` has the surface ``UpdateManager`` uses on a real ``Pipeline`` (``model``,
``swap_model``, ``observer``, ``metrics``, ``status``) but no camera and no inference loop:
``advance(now)`` produces the frames that a model *would* have served since the last call,
each with a latency drawn from the behaviour profile of (device, model version) and an error
with the profile's probability. The frames go through the real ``PipelineMetrics`` (so
telemetry and the health window's baseline p95 are the real computations) and through the
``observer`` hook (so the real ``HealthWindow`` judges them and can roll a model back).

``open_sim_model`` is the stand-in for the engine build: it reads the delivered file (already
verified against signed TUF metadata by the real fetch), checks it is an ONNX model (parsed and
run through ``onnx.checker`` once per content and process, cached by sha256: 1,000 devices
installing the same bytes need one check, not 1,000) and builds a ``RunnableModel`` around
``SimBackend``. ``SimBackend.run`` computes the model's real outputs with ONNX's reference
evaluator (loaded per call and dropped, so 1,000 devices do not each keep a copy in memory):
the update manager's golden-output trial is real.
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from agent.common.errors import ModelError
from agent.engine.base import Backend, BackendInfo, TensorSpec
from agent.models import BuildProgress
from agent.pipeline.metrics import PipelineMetrics
from agent.pipeline.model import RunnableModel
from agent.protocol.card import ModelCard
from agent.protocol.state import PipelineTarget

SIM_BACKEND = "sim"
Z95 = 1.6448536269514722  # the standard normal's 95th percentile
MAX_FRAMES_PER_ADVANCE = 1000  # a stalled ticker must not produce a burst of a minute's frames


@dataclass(frozen=True)
class SimProfile:
    """How a model version behaves on a device: frame rate, latency, errors.

    Attributes:
        fps: frames per second the camera delivers and the model serves.
        p50_ms: median inference latency.
        p95_ms: 95th percentile (latency is log-normal through the two).
        error_rate: probability that a frame fails (counted as an inference error).
        nan_rate: probability that a failing frame is a NaN output (the health window rolls
            back on the first NaN).
    """

    fps: float = 10.0
    p50_ms: float = 20.0
    p95_ms: float = 30.0
    error_rate: float = 0.0
    nan_rate: float = 0.0

    def __post_init__(self) -> None:
        """Raises: ValueError on an out-of-range field."""
        if not (0 < self.fps <= 1000 and 0 < self.p50_ms <= self.p95_ms):
            raise ValueError(f"need 0 < fps <= 1000 and 0 < p50_ms <= p95_ms, got {self}")
        if not (0 <= self.error_rate <= 1 and 0 <= self.nan_rate <= 1):
            raise ValueError(f"error_rate and nan_rate must be within [0, 1], got {self}")

    def degraded(self, latency_factor: float = 3.0, error_rate: float = 0.0) -> SimProfile:
        """This profile with latency multiplied and an error rate (a bad model version)."""
        return replace(
            self,
            p50_ms=self.p50_ms * latency_factor,
            p95_ms=self.p95_ms * latency_factor,
            error_rate=max(self.error_rate, error_rate),
        )

    def sample(self, rng: random.Random) -> tuple[bool, bool, float]:
        """One frame: ``(ok, nan, infer_ms)``."""
        if self.error_rate and rng.random() < self.error_rate:
            return False, bool(self.nan_rate and rng.random() < self.nan_rate), 0.0
        sigma = math.log(self.p95_ms / self.p50_ms) / Z95
        return True, False, self.p50_ms * math.exp(sigma * rng.gauss(0.0, 1.0))


# (device_id, model running) → its behaviour; the model is None before any is delivered.
ProfileFn = Callable[[str, PipelineTarget | None], SimProfile]


def default_profile(device_id: str, model: PipelineTarget | None) -> SimProfile:
    """Every model version behaves the same everywhere."""
    return SimProfile()


def make_profile_fn(
    base: SimProfile, bad_version: str | None, bad: set[str], factor: float, error_rate: float
) -> ProfileFn:
    """``base`` everywhere; ``bad_version`` on the ``bad`` devices: latency × ``factor``, errors."""

    def fn(device_id: str, model: PipelineTarget | None) -> SimProfile:
        if model is not None and model.version == bad_version and device_id in bad:
            return base.degraded(factor, error_rate)
        return base

    return fn


class SimBackend(Backend):
    """A stand-in engine for an ONNX file: real outputs, computed on demand (see module doc).

    Evaluators are shared between devices through a small cache keyed by the sha256 of the
    model bytes, so 1,000 devices trying the same version parse it a few times, not 4,000.
    """

    def __init__(self, path: Path, model: Any, sha256: str) -> None:
        """``model`` is the parsed ``onnx.ModelProto`` or its ``_Signature`` (only the
        signature is kept)."""
        self.path = path
        self.sha256 = sha256
        self.model_name = str(path)
        sig = model if isinstance(model, _Signature) else _signature(model)
        self.inputs, self.outputs = sig.inputs, sig.outputs
        self.info = BackendInfo(name=SIM_BACKEND, version="1", device="sim", precision="fp32")

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with _EVAL_LOCK:
            evaluator = _EVALUATORS.pop(self.sha256, None)
        if evaluator is None:
            evaluator = self._load_evaluator()
        with _EVAL_LOCK:
            _EVALUATORS[self.sha256] = evaluator  # most recently used last
            while len(_EVALUATORS) > EVALUATOR_CACHE:
                _EVALUATORS.pop(next(iter(_EVALUATORS)))
        with evaluator[1]:
            return [np.asarray(o) for o in evaluator[0].run(None, dict(feeds))]

    def _load_evaluator(self) -> tuple[Any, threading.Lock]:
        import onnx
        from onnx.reference import ReferenceEvaluator

        data = self.path.read_bytes()
        got = hashlib.sha256(data).hexdigest()
        if got != self.sha256:
            raise ModelError(
                f"{self.path} changed since it was opened: sha256 {got}, opened {self.sha256}",
                model=str(self.path),
                reason="load",
            )
        return ReferenceEvaluator(onnx.load_model_from_string(data)), threading.Lock()


EVALUATOR_CACHE = 4
_EVALUATORS: dict[str, tuple[Any, threading.Lock]] = {}
_EVAL_LOCK = threading.Lock()


def open_sim_model(path: Path, progress: Callable[[BuildProgress], None]) -> RunnableModel:
    """The engine-build stand-in: the delivered file must be a loadable one-input ONNX model.

    The card is the ``card.json`` the store materialised beside the model (the update manager
    already checked it against the card signed in TUF metadata).

    Raises:
        ModelError: not ONNX, not one input, or no valid card beside it.
    """
    progress(BuildProgress("sim", 0.0))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ModelError(
            f"{path} is not a valid ONNX model: {e}", model=str(path), reason="load"
        ) from e
    sha256 = hashlib.sha256(data).hexdigest()
    sig = _checked_signature(data, sha256, path)
    try:
        card = ModelCard.model_validate_json((path.parent / "card.json").read_bytes())
    except (OSError, ValueError) as e:
        raise ModelError(f"no valid card beside {path}: {e}", model=str(path), reason="card") from e
    backend = SimBackend(path, sig, sha256)
    progress(BuildProgress("sim", 1.0))
    return RunnableModel(card, backend)


@dataclass(frozen=True)
class _Signature:
    """What ``SimBackend`` keeps of a model: its inputs (initializers excluded) and outputs."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _signature(model: Any) -> _Signature:
    import onnx

    init = {i.name for i in model.graph.initializer}

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).name
        return TensorSpec(v.name, dims, dtype)

    return _Signature(
        tuple(spec(v) for v in model.graph.input if v.name not in init),
        tuple(spec(v) for v in model.graph.output),
    )


SIGNATURE_CACHE = 16
_SIGNATURES: dict[str, _Signature] = {}  # sha256 of model bytes that passed the checker
_SIG_LOCK = threading.Lock()


def _checked_signature(data: bytes, sha256: str, path: Path) -> _Signature:
    """The signature of ONNX bytes that pass ``onnx.checker``; parsed and checked once per
    content per process (a simulated fleet installs the same bytes on every device: the
    check's outcome depends on the bytes only, which ``sha256`` names).

    Raises:
        ModelError: not a valid ONNX model.
    """
    import onnx

    with _SIG_LOCK:
        sig = _SIGNATURES.get(sha256)
    if sig is not None:
        return sig
    try:
        model = onnx.load_model_from_string(data)
        onnx.checker.check_model(model)
    except Exception as e:  # onnx raises DecodeError, ValidationError…
        raise ModelError(
            f"{path} is not a valid ONNX model: {e}", model=str(path), reason="load"
        ) from e
    sig = _signature(model)
    with _SIG_LOCK:
        _SIGNATURES[sha256] = sig
        while len(_SIGNATURES) > SIGNATURE_CACHE:
            _SIGNATURES.pop(next(iter(_SIGNATURES)))
    return sig


class SimPipeline:
    """A pipeline without camera or inference (see module docstring); driven by ``advance``.

    Args:
        name: pipeline name.
        device_id: the device it belongs to (passed to ``profile_fn``).
        profile_fn: the behaviour of (device, model) — consulted at every swap.
        rng: randomness for latencies and errors.
    """

    def __init__(
        self,
        name: str,
        device_id: str,
        profile_fn: ProfileFn = default_profile,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.name = name
        self.device_id = device_id
        self.profile_fn = profile_fn
        self.metrics = PipelineMetrics(ring_size=512)
        self.observer: Callable[[RunnableModel, bool, bool, float], None] | None = None
        self.last_error = ""
        self.source_ended = False  # no source to end
        self._rng = rng or random.Random()
        self._model: RunnableModel | None = None
        self._profile = profile_fn(device_id, None)
        self._lock = threading.Lock()
        self._last: float | None = None
        self._carry = 0.0

    @property
    def model(self) -> RunnableModel | None:
        return self._model

    @property
    def profile(self) -> SimProfile:
        """The behaviour of the model running now."""
        return self._profile

    def swap_model(self, model: RunnableModel | None) -> RunnableModel | None:
        """Replace the model between two (simulated) frames; returns the previous one."""
        target = (
            PipelineTarget(model=model.card.name, version=model.card.version) if model else None
        )
        profile = self.profile_fn(self.device_id, target)
        with self._lock:
            old, self._model, self._profile = self._model, model, profile
        return old

    def start(self, now: float | None = None) -> None:
        """Open the fps window; frames count from here."""
        now = time.monotonic() if now is None else now
        self.metrics.start_window(now)
        self._last = now

    def stop(self) -> None:
        """Nothing runs on its own: here for the pipeline surface."""

    def advance(self, now: float) -> int:
        """Produce the frames due since the previous call; returns how many."""
        with self._lock:
            model, profile = self._model, self._profile
            last, self._last = self._last, now
            if last is None or model is None:
                self._carry = 0.0
                return 0
            exact = profile.fps * max(0.0, now - last) + self._carry
            n = min(int(exact), MAX_FRAMES_PER_ADVANCE)
            self._carry = exact - int(exact)
        if n == 0:
            return 0
        m = self.metrics
        errors = 0
        for _ in range(n):
            ok, nan, ms = profile.sample(self._rng)
            if ok:
                m.observe("infer", ms)
            else:
                errors += 1
            obs = self.observer
            if obs is not None:
                obs(model, ok, nan, ms)
        m.count("frames_read", n)
        m.count("frames_inferred", n - errors)
        if errors:
            m.count("errors", errors)
            self.last_error = f"simulated inference error ({errors} of {n} frames)"
        return n

    def status(self, now: float, reader: str = "status") -> dict[str, Any]:
        """What ``Pipeline.status`` returns, for telemetry."""
        model = self._model
        return {
            "name": self.name,
            "source": "sim://",
            "source_state": "streaming",  # the simulated camera never drops
            "model": model.ref if model else None,
            "backend": model.backend.info.name if model else None,
            "precision": model.backend.info.precision if model else None,
            "last_error": self.last_error or None,
            **self.metrics.snapshot(now, reader),
        }
