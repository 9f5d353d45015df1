"""Pure: the backend interface every inference engine implements, and its guarding wrapper.

A backend is made from an ONNX model (or a cached engine built from it) and answers ``run``
on a dict of named NumPy arrays. The public ``run`` checks names, dtypes and ranks against the
model's declared inputs and wraps every foreign error in ``ModelError``; implementations
override only ``_run`` (the python-tuf ``FetcherInterface`` shape).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from agent.common.errors import ModelError


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output.

    Attributes:
        name: tensor name in the graph.
        shape: dimensions; ``None`` or a string for a dynamic dimension.
        dtype: NumPy dtype name (``"float32"``, ``"uint8"``, ...).
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str

    @property
    def is_dynamic(self) -> bool:
        return any(not isinstance(d, int) or d < 0 for d in self.shape)


@dataclass(frozen=True)
class BackendInfo:
    """What a backend reports about itself (goes into telemetry and ``reported`` state)."""

    name: str  # "onnxruntime" or "tensorrt"
    version: str
    device: str  # "cpu", "cuda:0", "dla:0", ...
    precision: str  # "fp32", "fp16", "int8"
    providers: tuple[str, ...] = field(default_factory=tuple)


class Backend(abc.ABC):
    """An inference engine for one model.

    Thread safety: ``run`` may be called from several threads (pipelines share one backend
    per model); implementations serialise internally where the engine needs it.
    """

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    info: BackendInfo
    model_name: str = ""

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run one inference.

        Args:
            feeds: input name to array; every declared input must be present.

        Returns:
            The outputs in declared order.

        Raises:
            ModelError: wrong inputs, or the engine failed (foreign error wrapped).
        """
        for spec in self.inputs:
            arr = feeds.get(spec.name)
            if arr is None:
                raise ModelError(
                    f"input {spec.name!r} missing; model expects {[s.name for s in self.inputs]}",
                    model=self.model_name,
                    reason="input",
                )
            if arr.ndim != len(spec.shape):
                raise ModelError(
                    f"input {spec.name!r} has rank {arr.ndim} (shape {arr.shape}), "
                    f"model expects rank {len(spec.shape)} {spec.shape}",
                    model=self.model_name,
                    reason="shape",
                )
            for got, want in zip(arr.shape, spec.shape, strict=True):
                if isinstance(want, int) and want >= 0 and got != want:
                    raise ModelError(
                        f"input {spec.name!r} has shape {arr.shape}, model expects {spec.shape}",
                        model=self.model_name,
                        reason="shape",
                    )
        try:
            return self._run(feeds)
        except ModelError:
            raise
        except Exception as e:  # foreign engine errors are wrapped here, at the edge
            raise ModelError(
                f"inference failed on {self.info.name}: {e}", model=self.model_name, reason="run"
            ) from e

    @abc.abstractmethod
    def _run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """Run the engine; inputs are already checked."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release engine resources (explicit; never rely on ``__del__``)."""

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
