"""Adapter: a model ready to serve frames — backend, card, pre- and post-processing in one.

Pipelines, the benchmark and the local HTTP API (``agent.api``) all infer through
``RunnableModel``, so there is one code path from a BGR frame (or an already preprocessed
tensor) to a ``Result``. A pipeline holds a reference to one and swaps it between frames for a
hot update; users lease it (``acquire``/``release``) so that ``close`` after a swap waits for
the inferences still running on it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.common.errors import BadDataError, ModelError
from agent.engine.base import Backend
from agent.pipeline.postprocess import Postprocessor, Result, make_postprocessor
from agent.pipeline.preprocess import (
    FrameTransform,
    Preprocessor,
    constant_feeds,
    image_input_name,
    input_spec_from_shape,
)
from agent.protocol.card import ModelCard, PostprocessSpec, Task


@dataclass
class StageTimes:
    """Milliseconds spent in each stage of one inference."""

    preprocess: float = 0.0
    infer: float = 0.0
    postprocess: float = 0.0


@dataclass
class RunnableModel:
    """One loaded model version: call ``infer(frame)`` or ``infer_tensor(tensor)``.

    Lifetime: ``close()`` releases the backend at once when nobody holds a lease, else when the
    last lease is released (``acquire``/``release``). A model swapped out of a pipeline can
    thus be closed right away by the update manager while an API request finishes on it.
    """

    card: ModelCard
    backend: Backend
    preprocessor: Preprocessor = field(init=False)
    postprocessor: Postprocessor = field(init=False)
    input_name: str = field(init=False)
    _lease_lock: threading.Lock = field(
        init=False, repr=False, compare=False, default_factory=threading.Lock
    )
    _constants: dict[str, np.ndarray] = field(init=False, repr=False, compare=False)
    _leases: int = field(init=False, repr=False, compare=False, default=0)
    _closing: bool = field(init=False, repr=False, compare=False, default=False)
    _closed: bool = field(init=False, repr=False, compare=False, default=False)

    def __post_init__(self) -> None:
        names = tuple(i.name for i in self.backend.inputs)
        try:
            self.input_name = image_input_name(self.card.input, names)
        except ModelError as e:
            raise ModelError(str(e), model=self.ref, reason="inputs") from e
        self._constants = constant_feeds(self.card.input)
        self.preprocessor = Preprocessor(self.card.input)
        self.postprocessor = make_postprocessor(
            self.card.task,
            self.card.postprocess,
            self.card.labels,
            self.card.input,
            model=self.ref,
            output_names=[o.name for o in self.backend.outputs],
        )

    @property
    def ref(self) -> str:
        """``name@version``."""
        return f"{self.card.name}@{self.card.version}"

    def feeds(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """The backend's inputs for one preprocessed tensor: it, plus the card's constants."""
        return {**self._constants, self.input_name: tensor}

    def infer(self, image: np.ndarray) -> tuple[Result, StageTimes]:
        """Pre-process a BGR frame, run the backend, post-process.

        Raises:
            BadDataError: the frame is unusable.
            ModelError: the backend failed or produced NaN/inf.
        """
        t0 = time.perf_counter()
        tensor, transform = self.preprocessor(image)
        t1 = time.perf_counter()
        outputs = self.backend.run(self.feeds(tensor))
        t2 = time.perf_counter()
        result = self.postprocessor(outputs, transform)
        t3 = time.perf_counter()
        return result, StageTimes((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    @property
    def tensor_shape(self) -> tuple[int, ...]:
        """The batch-1 input tensor shape the preprocessor makes (and ``infer_tensor`` takes)."""
        spec = self.card.input
        if spec.layout == "nchw":
            return (1, spec.channels, spec.height, spec.width)
        return (1, spec.height, spec.width, spec.channels)

    def infer_tensor(self, tensor: np.ndarray) -> tuple[Result, StageTimes]:
        """Run an already preprocessed batch-1 tensor: same backend and post-processing as
        ``infer``, no pre-processing. Boxes come back in model-input pixels.

        Raises:
            BadDataError: the tensor's shape or dtype is not the model input's.
            ModelError: the backend failed or produced NaN/inf.
        """
        spec = self.card.input
        if not isinstance(tensor, np.ndarray):
            raise BadDataError(f"tensor must be a NumPy array, got {type(tensor).__name__}")
        if tensor.shape != self.tensor_shape:
            raise BadDataError(
                f"tensor has shape {list(tensor.shape)}, model {self.ref} expects "
                f"{list(self.tensor_shape)} ({spec.layout}, batch 1)"
            )
        if tensor.dtype != np.dtype(spec.dtype):
            raise BadDataError(
                f"tensor has dtype {tensor.dtype}, model {self.ref} expects {spec.dtype}"
            )
        # identity geometry: the tensor is the model input, so boxes stay in its pixels
        transform = FrameTransform(spec.width, spec.height, 1.0, 1.0, 0.0, 0.0)
        t1 = time.perf_counter()
        outputs = self.backend.run(self.feeds(tensor))
        t2 = time.perf_counter()
        result = self.postprocessor(outputs, transform)
        t3 = time.perf_counter()
        return result, StageTimes(0.0, (t2 - t1) * 1e3, (t3 - t2) * 1e3)

    def acquire(self) -> bool:
        """Take a lease for one inference; False when the model is closed or closing (the
        caller reads the pipeline's model again: a swap has put the next one in place)."""
        with self._lease_lock:
            if self._closing:
                return False
            self._leases += 1
            return True

    def release(self) -> None:
        """Return a lease; the last one out closes the backend when ``close`` was called."""
        with self._lease_lock:
            self._leases -= 1
            last = self._closing and self._leases == 0 and not self._closed
            if last:
                self._closed = True
        if last:
            self.backend.close()

    def close(self) -> None:
        """Release the backend now, or when the last lease is returned; safe to call more than
        once (a model can be released by an update and again at shutdown)."""
        with self._lease_lock:
            self._closing = True
            now = self._leases == 0 and not self._closed
            if now:
                self._closed = True
        if now:
            self.backend.close()

    @property
    def closed(self) -> bool:
        """True once the backend has been released."""
        return self._closed


def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"640x480"`` → ``(640, 480)``.

    Raises:
        ValueError: not ``WxH`` with positive integers.
    """
    if text is None:
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size must look like 640x480, got {text!r}")
    return int(parts[0]), int(parts[1])


def card_file_for(model_path: Path) -> Path | None:
    """The card that goes with a local model file: ``NAME.card.json`` beside ``NAME.onnx``, or
    ``card.json`` beside ``model.onnx`` (a registry version's folder); None when there is none."""
    own = model_path.with_suffix(".card.json")
    if own.is_file():
        return own
    folder = model_path.parent / "card.json"
    if folder.is_file() and (model_path.parent / "model.onnx").exists():
        return folder
    return None


def card_input_size(model_path: Path) -> tuple[int, int] | None:
    """``(width, height)`` of the card beside a model, None without a valid one."""
    f = card_file_for(model_path)
    if f is None:
        return None
    try:
        card = ModelCard.model_validate_json(f.read_text())
    except (OSError, ValueError):
        return None
    return card.input.width, card.input.height


def card_for_local_model(
    model_path: Path,
    backend: Backend,
    *,
    task: Task | None = None,
    input_size: tuple[int, int] | None = None,
    labels: Sequence[str] | None = None,
) -> ModelCard:
    """The card for a local ONNX file: ``NAME.card.json`` beside ``NAME.onnx`` (what
    ``edgefleet model inspect --card-out`` writes), or ``card.json`` beside ``model.onnx`` (a
    registry version's folder), else one derived from the model.

    A card found on disk wins for everything it says; ``task`` overrides its task only when
    given. Labels come from ``labels.txt`` beside the model when present.

    Raises:
        ModelError: the card is invalid, or a dynamic input has no ``input_size``.
    """
    card_file = card_file_for(model_path)
    if card_file is not None:
        try:
            card = ModelCard.model_validate_json(card_file.read_text())
        except ValueError as e:
            raise ModelError(
                f"{card_file} is not a valid model card: {e}", model=str(model_path), reason="card"
            ) from e
        if task is not None and task != card.task:
            card = card.model_copy(update={"task": task})
        return card
    if labels is None:
        lf = model_path.parent / "labels.txt"
        labels = (
            [s.strip() for s in lf.read_text().splitlines() if s.strip()] if lf.is_file() else []
        )
    spec = backend.inputs[0]
    input_spec = input_spec_from_shape(spec.shape, input_size=input_size, dtype=spec.dtype)
    name = model_path.stem if model_path.stem != "model" else model_path.parent.name
    safe = "".join(c if c.isalnum() or c in "._-" else "-" for c in name).lstrip("._-") or "model"
    return ModelCard(
        name=safe,
        version="0.0.0",
        task=task or "raw",
        input=input_spec,
        postprocess=PostprocessSpec(),
        labels=tuple(labels),
    )


def load_golden(path: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Golden inputs and outputs from ``golden.npz`` (keys ``input_N`` / ``output_N``)."""
    with np.load(path) as z:
        ins = [z[k] for k in sorted(k for k in z.files if k.startswith("input_"))]
        outs = [z[k] for k in sorted(k for k in z.files if k.startswith("output_"))]
    return ins, outs


def card_json(card: ModelCard) -> str:
    return json.dumps(card.model_dump(mode="json"), indent=2)
