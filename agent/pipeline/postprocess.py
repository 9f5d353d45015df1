"""Pure: read a model's raw outputs into results, by task, in source-frame coordinates.

``make_postprocessor`` picks one reader per card task:

- ``classification``: top-k of one score vector, optional softmax.
- ``detection``: one decoder per output format (``agent.pipeline.detect``: YOLOv5/v7,
  YOLOv8/v11, YOLOX grid, PicoDet heads, NMS-included, SSD-style boxes + scores), then
  class-aware NMS by OpenCV (``cv2.dnn.NMSBoxesBatched``) on boxes already mapped to source
  pixels, unless the model ran NMS itself.
- ``heatmap``: a probability map (DBNet / PP-OCR det, segmentation heads) → connected regions
  → boxes, each scored by its mean probability.
- ``raw``: per-output statistics, for models the agent has no reader for.

Every reader sits behind one guarding ``__call__`` (the python-tuf ``FetcherInterface`` shape):
it checks the outputs, rejects non-finite values with ``ModelError(reason="nan")`` (the update
state machine uses that to reject or roll back a model), and wraps any foreign error in
``ModelError`` so the runner need catch only edgefleet errors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from agent.common.errors import ModelError
from agent.pipeline.detect import DecodeError, decode
from agent.pipeline.preprocess import FrameTransform
from agent.protocol.card import InputSpec, PostprocessSpec

__all__ = [
    "Classification",
    "Detection",
    "Postprocessor",
    "Result",
    "make_postprocessor",
]

Array = npt.NDArray[Any]
F32 = npt.NDArray[np.float32]

_NUMERIC_KINDS = "biuf"


@dataclass(frozen=True)
class Classification:
    """One class of a classification result."""

    label_id: int
    label: str
    score: float


@dataclass(frozen=True)
class Detection:
    """One detected object; ``box`` is x1, y1, x2, y2 in SOURCE-frame pixels."""

    box: tuple[float, float, float, float]
    score: float
    label_id: int
    label: str


@dataclass
class Result:
    """What one frame's inference found."""

    task: str
    classifications: list[Classification] = field(default_factory=list)
    detections: list[Detection] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: floats rounded to 4 decimals, empty lists/summary omitted.

        Non-finite floats (which the readers never produce) become ``None`` so the output is
        strict JSON.
        """
        d: dict[str, Any] = {"task": self.task}
        if self.classifications:
            d["classifications"] = [
                {"label_id": c.label_id, "label": c.label, "score": _jsonable(c.score)}
                for c in self.classifications
            ]
        if self.detections:
            d["detections"] = [
                {
                    "box": _jsonable(det.box),
                    "score": _jsonable(det.score),
                    "label_id": det.label_id,
                    "label": det.label,
                }
                for det in self.detections
            ]
        if self.summary:
            d["summary"] = _jsonable(self.summary)
        return d


def _jsonable(v: Any) -> Any:
    """Plain JSON types from NumPy scalars/arrays, tuples and floats (rounded to 4 places)."""
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return round(f, 4) if math.isfinite(f) else None
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v if v is None or isinstance(v, str) else str(v)


class Postprocessor(Protocol):
    """Turns one frame's model outputs into a ``Result``."""

    def __call__(self, outputs: list[np.ndarray], transform: FrameTransform) -> Result: ...


class _Reader:
    """Guarding wrapper: checks outputs, wraps foreign errors; subclasses implement ``_run``."""

    task = "raw"

    def __init__(
        self,
        spec: PostprocessSpec,
        labels: Sequence[str],
        input_spec: InputSpec,
        model: str,
        output_names: Sequence[str],
    ) -> None:
        self.spec = spec
        self.labels = tuple(labels)
        self.input_spec = input_spec
        self.model = model
        self.output_names = tuple(output_names)

    def __call__(self, outputs: list[np.ndarray], transform: FrameTransform) -> Result:
        """Read one frame's outputs.

        Args:
            outputs: the model's outputs, in graph order.
            transform: the preprocessing geometry of this frame.

        Returns:
            The frame's result.

        Raises:
            ModelError: outputs of the wrong number, type or shape (reason ``"output"`` or
                ``"shape"``), or with NaN/inf (reason ``"nan"``).
        """
        if isinstance(outputs, (str, bytes)) or not isinstance(outputs, Sequence):
            raise self._error(
                f"expected a list of output arrays, got {type(outputs).__name__}", "output"
            )
        if not outputs:
            raise self._error("expected at least one output array, got none", "output")
        for i, o in enumerate(outputs):
            if not isinstance(o, np.ndarray) or o.dtype.kind not in _NUMERIC_KINDS:
                what = f"array of {o.dtype}" if isinstance(o, np.ndarray) else type(o).__name__
                raise self._error(f"output {i}: expected a numeric array, got {what}", "output")
        try:
            with np.errstate(all="ignore"):  # overflow in garbage is caught as non-finite
                return self._run(list(outputs), transform)
        except ModelError:
            raise
        except (ValueError, TypeError, IndexError, OverflowError, cv2.error) as e:
            shapes = [tuple(o.shape) for o in outputs]
            raise self._error(
                f"{self.task} post-processing failed on outputs of shapes {shapes}: {e}",
                "output",
            ) from e

    def _run(self, outputs: list[Array], transform: FrameTransform) -> Result:
        raise NotImplementedError

    def _error(self, message: str, reason: str) -> ModelError:
        who = f"model {self.model}: " if self.model else ""
        return ModelError(f"{who}{message}", model=self.model, reason=reason)

    def _label(self, i: int) -> str:
        return self.labels[i] if 0 <= i < len(self.labels) else str(i)

    def _finite(self, arr: Array, index: int) -> F32:
        """The output as float32, or ModelError(reason="nan") if any value is NaN/inf."""
        x = np.asarray(arr, dtype=np.float32)
        self._check_finite(x, index)
        return x

    def _check_finite(self, x: Array, index: int) -> None:
        if x.dtype.kind != "f" or x.size == 0:
            return
        # min/max propagate NaN and see inf without allocating a boolean mask.
        if not (math.isfinite(float(x.min())) and math.isfinite(float(x.max()))):
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise self._error(
                f"output {index} has {bad} non-finite value(s) (NaN/inf, or beyond float32) "
                f"out of {x.size}; expected all finite",
                "nan",
            )


class _Classify(_Reader):
    task = "classification"

    def _run(self, outputs: list[Array], transform: FrameTransform) -> Result:
        raw = outputs[0]
        if raw.size == 0 or sum(d != 1 for d in raw.shape) > 1:
            raise self._error(
                f"classification output 0 has shape {raw.shape}, expected (1, C) or (C,)",
                "shape",
            )
        x = self._finite(raw, 0).reshape(-1)
        if self.spec.softmax:
            e = np.exp(x - x.max())
            x = e / e.sum()
        k = min(self.spec.top_k, x.size)
        top = np.argpartition(-x, k - 1)[:k] if k < x.size else np.arange(x.size)
        top = top[np.argsort(-x[top], kind="stable")]
        items = [Classification(int(i), self._label(int(i)), float(x[i])) for i in top]
        return Result(self.task, classifications=items)


class _Detect(_Reader):
    task = "detection"

    def _run(self, outputs: list[Array], transform: FrameTransform) -> Result:
        spec = self.spec
        floats = [self._finite(o, i) for i, o in enumerate(outputs)]
        try:
            cand = decode(floats, spec, self.input_spec, len(self.labels), self.output_names)
        except DecodeError as e:
            raise self._error(f"{spec.detection_format} detection output: {e}", "shape") from e
        if cand.scores.size == 0:
            return Result(self.task, summary={"count": 0})
        # Into source pixels first (clipped to the frame): a box wholly in the letterbox pad
        # collapses and goes before it can take an NMS or max_detections slot, and NMS then
        # sees bounded coordinates whatever garbage the model produced.
        boxes = transform.to_source(cand.boxes)
        wh = boxes[:, 2:] - boxes[:, :2]
        ok = (wh > 0).all(axis=1)
        boxes, wh, sc, ids = boxes[ok], wh[ok], cand.scores[ok], cand.class_ids[ok]
        if sc.size == 0:
            return Result(self.task, summary={"count": 0})
        if cand.nms_done:
            keep = np.argsort(-sc, kind="stable")[: spec.max_detections]
        else:
            # Rect2d rows (x, y, w, h) as Python lists: OpenCV converts lists to its vectors
            # ~6x faster than arrays (0.06 vs 0.35 ms for 200 boxes, scripts/bench_decode.py).
            xywh = np.hstack([boxes[:, :2], wh]).tolist()
            # OpenCV keeps scores strictly above its threshold; ours (>=) was applied above.
            groups = [0] * len(xywh) if spec.class_agnostic_nms else ids.tolist()
            kept = cv2.dnn.NMSBoxesBatched(
                xywh, sc.tolist(), groups, -1.0, spec.iou_threshold, top_k=spec.max_detections
            )
            keep = np.asarray(kept, dtype=np.int64).reshape(-1)
            keep = keep[np.argsort(-sc[keep], kind="stable")][: spec.max_detections]
        dets = [
            Detection(
                (float(b[0]), float(b[1]), float(b[2]), float(b[3])),
                float(s),
                int(c),
                self._label(int(c)),
            )
            for b, s, c in zip(boxes[keep], sc[keep], ids[keep], strict=True)
        ]
        return Result(self.task, detections=dets, summary={"count": len(dets)})


class _Heatmap(_Reader):
    task = "heatmap"

    def _run(self, outputs: list[Array], transform: FrameTransform) -> Result:
        spec, raw = self.spec, outputs[0]
        m = raw
        while m.ndim > 2 and m.shape[0] == 1:
            m = m[0]
        if m.ndim != 2 or m.size == 0:
            raise self._error(
                f"heatmap output 0 has shape {raw.shape}, expected (1, 1, h, w), (1, h, w) "
                "or (h, w)",
                "shape",
            )
        prob = self._finite(m, 0)
        fg = np.greater(prob, spec.heatmap_threshold)  # DBNet: pred > thresh
        # Grana's block-based labelling: ~3x faster here than the default with stats.
        n, labels, stats, _ = cv2.connectedComponentsWithStatsWithAlgorithm(
            fg.view(np.uint8), 8, cv2.CV_32S, cv2.CCL_GRANA
        )
        if n <= 1:
            return Result(self.task, summary={"count": 0})
        stats = np.asarray(stats)[1:]  # row 0 is the background
        area = stats[:, cv2.CC_STAT_AREA].astype(np.float64)
        # Region sums over foreground pixels only (text covers a small part of a frame).
        sums = np.bincount(np.asarray(labels)[fg], weights=prob[fg], minlength=n)[1:]
        score = sums / area
        keep = np.flatnonzero((area >= spec.min_area) & (score >= spec.score_threshold))
        keep = keep[np.argsort(-score[keep], kind="stable")][: spec.max_detections]
        x, y = stats[keep, cv2.CC_STAT_LEFT], stats[keep, cv2.CC_STAT_TOP]
        w, h = stats[keep, cv2.CC_STAT_WIDTH], stats[keep, cv2.CC_STAT_HEIGHT]
        # Map pixels → model-input pixels (the map may be a fraction of the input size).
        sx = self.input_spec.width / prob.shape[1]
        sy = self.input_spec.height / prob.shape[0]
        boxes = np.stack([x * sx, y * sy, (x + w) * sx, (y + h) * sy], axis=1)
        src = transform.to_source(boxes.reshape(-1, 4))
        label = self.labels[0] if self.labels else "region"
        dets = [
            Detection((float(b[0]), float(b[1]), float(b[2]), float(b[3])), float(s), 0, label)
            for b, s in zip(src, score[keep], strict=True)
            if b[2] > b[0] and b[3] > b[1]
        ]
        return Result(self.task, detections=dets, summary={"count": len(dets)})


class _Raw(_Reader):
    task = "raw"

    def _run(self, outputs: list[Array], transform: FrameTransform) -> Result:
        stats = []
        for i, o in enumerate(outputs):
            self._check_finite(o, i)  # in the output's own dtype: no float32 overflow
            entry: dict[str, Any] = {
                "index": i,
                "name": self.output_names[i] if i < len(self.output_names) else f"output{i}",
                "shape": list(o.shape),
                "dtype": str(o.dtype),
                "min": None,
                "max": None,
                "mean": None,
                "argmax": None,
            }
            if o.size:
                flat = o.reshape(-1)
                entry["min"] = _number(flat.min())
                entry["max"] = _number(flat.max())
                entry["mean"] = float(flat.mean(dtype=np.float64))
                entry["argmax"] = int(flat.argmax())
            stats.append(entry)
        return Result(self.task, summary={"outputs": stats})


def _number(v: Any) -> float | int:
    return float(v) if isinstance(v, np.floating) else int(v)


_READERS: dict[str, type[_Reader]] = {
    "classification": _Classify,
    "detection": _Detect,
    "heatmap": _Heatmap,
    "raw": _Raw,
}


def make_postprocessor(
    task: str,
    spec: PostprocessSpec,
    labels: Sequence[str],
    input_spec: InputSpec,
    *,
    model: str = "",
    output_names: Sequence[str] = (),
) -> Postprocessor:
    """The output reader for a card's task.

    Args:
        task: ``classification``, ``detection``, ``heatmap`` or ``raw``.
        spec: the card's post-processing parameters.
        labels: class names in index order (a missing name reads as the index).
        input_spec: the model input (heatmap and box coordinates are in its pixels).
        model: ``name@version`` for error messages.
        output_names: graph output names, for the raw summary.

    Returns:
        A callable ``(outputs, transform) -> Result``; stateless, safe to share.

    Raises:
        ModelError: an unknown task (reason ``"task"``).
    """
    reader = _READERS.get(task)
    if reader is None:
        raise ModelError(
            f"unknown task {task!r}, expected one of {sorted(_READERS)}", model=model, reason="task"
        )
    return reader(spec, labels, input_spec, model, output_names)
