"""Adapter: ONNX Runtime backend (CPU, CUDA and TensorRT execution providers).

ONNX Runtime's "build" is session creation; its graph optimisations are saved next to the
engine cache (``optimized_model_filepath``) so a restart skips them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.common.errors import ModelError
from agent.engine.base import Backend, BackendInfo, TensorSpec

_ORT_DTYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(uint8)": "uint8",
    "tensor(int8)": "int8",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}

# Preference order when the caller asks for "auto".
_PROVIDER_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def available_providers() -> list[str]:
    """Execution providers this ONNX Runtime build offers."""
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _spec(nodes: Sequence[object]) -> tuple[TensorSpec, ...]:
    out = []
    for n in nodes:
        shape = tuple(d if isinstance(d, int) else None for d in n.shape)  # type: ignore[attr-defined]
        out.append(TensorSpec(n.name, shape, _ORT_DTYPES.get(n.type, "float32")))  # type: ignore[attr-defined]
    return tuple(out)


def _wanted_providers(providers: Sequence[str] | None, model_name: str) -> list[str]:
    """The providers asked for (``None``: the best available, in preference order).

    Raises:
        ModelError: (reason ``"provider"``) a provider is not in this ONNX Runtime build.
    """
    import onnxruntime as ort

    have = ort.get_available_providers()
    wanted = list(providers) if providers else [p for p in _PROVIDER_ORDER if p in have]
    missing = [p for p in wanted if p not in have]
    if missing:
        raise ModelError(
            f"execution providers {missing} are not in this onnxruntime build (has {have})",
            model=model_name,
            reason="provider",
        )
    return wanted


def _session_options(
    model_path: str | os.PathLike[str],
    threads: int,
    optimized_cache: str | os.PathLike[str] | None,
) -> tuple[Any, str]:
    """(session options, file to load): the optimised graph when cached, else the model
    (saving its optimised graph to ``optimized_cache``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    model_to_load = str(model_path)
    if optimized_cache is not None:
        cache = Path(optimized_cache)
        if cache.exists():
            model_to_load = str(cache)
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        else:
            opts.optimized_model_filepath = str(cache)
    return opts, model_to_load


def _provider_args(wanted: list[str], precision: str) -> list[object]:
    """``providers=`` for the session: TensorRT's with FP16/INT8 set by ``precision``."""
    provider_args: list[object] = []
    for p in wanted:
        if p == "TensorrtExecutionProvider":
            provider_args.append(
                (
                    p,
                    {
                        "trt_fp16_enable": precision == "fp16",
                        "trt_int8_enable": precision == "int8",
                    },
                )
            )
        else:
            provider_args.append(p)
    return provider_args


class OnnxRuntimeBackend(Backend):
    """An ``onnxruntime.InferenceSession`` behind the backend interface."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        *,
        providers: Sequence[str] | None = None,
        precision: str = "fp32",
        threads: int = 0,
        optimized_cache: str | os.PathLike[str] | None = None,
        model_name: str = "",
    ) -> None:
        """Load a model.

        Args:
            model_path: ONNX file.
            providers: execution providers in preference order; ``None`` = best available.
            precision: the precision this variant runs at (reported, and used to pick
                FP16 in the TensorRT execution provider).
            threads: intra-op threads, 0 = ONNX Runtime's default (one per core).
            optimized_cache: where to save/load the optimised graph.
            model_name: for error messages.

        Raises:
            ModelError: the file is missing or ONNX Runtime cannot load it.
        """
        import onnxruntime as ort

        self.model_name = model_name or str(model_path)
        wanted = _wanted_providers(providers, self.model_name)
        opts, model_to_load = _session_options(model_path, threads, optimized_cache)
        provider_args = _provider_args(wanted, precision)
        if not Path(model_path).is_file():
            raise ModelError(
                f"model file {model_path} does not exist", model=self.model_name, reason="load"
            )
        try:
            self._session = ort.InferenceSession(model_to_load, opts, providers=provider_args)
        except Exception as e:
            raise ModelError(
                f"onnxruntime cannot load {model_path}: {e}", model=self.model_name, reason="load"
            ) from e
        self.inputs = _spec(self._session.get_inputs())
        self.outputs = _spec(self._session.get_outputs())
        self._output_names = [o.name for o in self.outputs]
        used = tuple(self._session.get_providers())
        device = "cuda:0" if used and used[0] in _PROVIDER_ORDER[:2] else "cpu"
        self.info = BackendInfo("onnxruntime", ort.__version__, device, precision, used)
        # InferenceSession.run is thread-safe, but concurrent runs on 2 cores only thrash
        # the intra-op pool; serialise so each run gets all threads.
        self._lock = threading.Lock()

    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        with self._lock:
            out = self._session.run(self._output_names, dict(feeds))
        return [np.asarray(o) for o in out]
