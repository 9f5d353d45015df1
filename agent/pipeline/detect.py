"""Pure: decode a detector's raw outputs into candidate boxes, one decoder per output format.

Every decoder turns the model's outputs into ``Candidates``: boxes (x1, y1, x2, y2 in
MODEL-INPUT pixels), scores and class ids, already cut at the score threshold, and says
whether the model did its own NMS. ``agent.pipeline.postprocess`` maps the boxes to the source
frame and runs NMS where the model did not. The layouts follow the exporters' own code:

- ``yolov5``: ultralytics/yolov5 ``models/yolo.py`` ``Detect`` (rows ``[cx, cy, w, h, obj,
  cls...]``, sigmoid applied, anchors decoded into input pixels), also YOLOv7 and YOLOX with
  ``decode_in_inference``.
- ``yolov8``: Ultralytics ``nn/modules/head.py`` ``Detect`` (``[cx, cy, w, h, cls...]`` by
  N candidates, no objectness).
- ``yolox``: Megvii YOLOX ``YOLOXHead`` with ``decode_in_inference=False`` (the default of
  ``tools/export_onnx.py``): raw ``[tx, ty, tw, th, obj, cls...]`` per grid cell, decoded as
  ``demo_postprocess`` does: centre ``(t + grid) * stride``, size ``exp(t) * stride``, cells
  row-major per stride, strides ascending.
- ``picodet``: PaddleDetection PicoHead exported without post-processing: per stride a score
  map (1, HW, C) (sigmoid applied) and DFL logits (1, HW, 4 * (reg_max + 1)); distances are
  the softmax expectation over the bins times the stride, from cell centres
  ``(x + 0.5) * stride`` (``PicoHead._generate_anchors`` with ``cell_offset=0.5``).
- ``nms``: NMS inside the graph; a single (1, K, 6) / (K, 6) / (K, 7) output in one of
  ``NmsLayout``'s column orders (Ultralytics ``nms=True`` and YOLOv10: ``xyxy_score_class``;
  PaddleDetection ``multiclass_nms3``: ``class_score_xyxy`` with a count output; YOLOv7's
  ONNX Runtime end2end: ``batch_xyxy_class_score``), or separate outputs (TensorRT
  EfficientNMS: ``num_dets``, ``det_boxes``, ``det_scores``, ``det_classes``).
- ``boxes_scores``: SSD-style boxes (1, N, 4) with scores (1, N, C) or (1, C, N), optionally
  with a background column 0 and boxes as fractions of the input size.

Decoders raise ``DecodeError`` (a ``ValueError``) with the shapes they saw; the guarding
reader in ``postprocess`` wraps it into ``ModelError``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.protocol.card import DetectionFormat, InputSpec, PostprocessSpec

__all__ = [
    "DECODERS",
    "DEFAULT_STRIDES",
    "Candidates",
    "DecodeError",
    "decode",
    "grid_cells",
]

F32 = npt.NDArray[np.float32]
I32 = npt.NDArray[np.int32]
Array = npt.NDArray[Any]

DEFAULT_STRIDES: dict[str, tuple[int, ...]] = {"yolox": (8, 16, 32), "picodet": (8, 16, 32, 64)}
# Candidates kept at most before NMS, best first (Ultralytics' ``max_nms``).
MAX_CANDIDATES = 30000


class DecodeError(ValueError):
    """The outputs do not have the layout the format expects; the message lists the shapes."""


@dataclass(frozen=True)
class Candidates:
    """Boxes above the score threshold, in model-input pixels."""

    boxes: F32  # (N, 4) x1, y1, x2, y2
    scores: F32  # (N,)
    class_ids: I32  # (N,)
    nms_done: bool  # the model ran NMS itself

    @staticmethod
    def empty(nms_done: bool = False) -> Candidates:
        return Candidates(
            np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int32), nms_done
        )


def _shapes(outputs: Sequence[Array]) -> list[tuple[int, ...]]:
    return [tuple(o.shape) for o in outputs]


def _squeeze_batch(a: Array) -> Array:
    return a[0] if a.ndim == 3 and a.shape[0] == 1 else a


def _cxcywh_to_xyxy(b: F32) -> F32:
    out = np.empty_like(b)
    half = b[:, 2:4] * 0.5
    np.subtract(b[:, :2], half, out=out[:, :2])
    np.add(b[:, :2], half, out=out[:, 2:])
    return out


def _best(scores: F32, limit: int = MAX_CANDIDATES) -> npt.NDArray[np.intp]:
    """Indices of the ``limit`` best scores (all of them when fewer)."""
    if scores.size <= limit:
        return np.arange(scores.size)
    return np.argpartition(-scores, limit - 1)[:limit]


# ------------------------------------------------------------------------- YOLO rows (v5/v8)
def _attributes_first(pred: Array, base: int, classes: int | None, extra: int = 0) -> Array:
    """A single YOLO output as a (K, N) array: K attributes (box, [obj], classes) by N rows."""
    a = _squeeze_batch(pred)
    if a.ndim != 2:
        raise DecodeError(
            f"output 0 has shape {pred.shape}, expected (1, N, {base}+C) or (1, {base}+C, N)"
        )
    rows, cols = a.shape
    k = base + classes + extra if classes else None
    if k is not None and cols == k:
        transposed = False
    elif k is not None and rows == k:
        transposed = True
    elif min(rows, cols) > base:  # YOLO has far more candidates than attributes
        transposed = rows < cols
    else:
        transposed = rows > base
    a = a if transposed else a.T
    if a.shape[0] <= base:
        raise DecodeError(
            f"output 0 has shape {pred.shape}: each candidate needs at least {base + 1} values "
            f"(box, {'objectness, ' if base == 5 else ''}>=1 class), got {a.shape[0]}"
        )
    return a


def _yolo(
    a: F32, base: int, spec: PostprocessSpec, boxes_of: Callable[[F32, Any], F32]
) -> Candidates:
    """Rows of (K, N) attributes-first YOLO output → candidates (shared by v5, v8, YOLOX).

    ``boxes_of`` maps the kept columns' first 4 attributes (4, n) to (n, 4) xyxy boxes.
    """
    thr = spec.score_threshold
    cols: npt.NDArray[np.intp] | None = None
    if base == 5:
        # YOLOv5's own pre-filter (obj > conf_thres): class scores are probabilities, so
        # obj * cls >= t needs obj >= t. Cheap, and most rows go here.
        cols = np.flatnonzero(a[4] >= thr)
        a = a[:, cols]
    cls = a[base : a.shape[0] - spec.extra_attributes]
    if cls.shape[0] == 0:
        raise DecodeError(
            f"{a.shape[0]} attributes per candidate leave no class scores after {base} box "
            f"values and {spec.extra_attributes} extra attributes"
        )
    best = cls.max(axis=0)
    if base == 5:
        best = best * a[4]
    keep = np.flatnonzero(best >= thr)  # NaN compares False
    keep = keep[_best(best[keep])]
    if keep.size == 0:
        return Candidates.empty()
    ids = cls[:, keep].argmax(axis=0).astype(np.int32)
    sel = keep if cols is None else cols[keep]
    return Candidates(boxes_of(a[:4, keep], sel), best[keep].astype(np.float32), ids, False)


def _box_rows(spec: PostprocessSpec, inp: InputSpec) -> Callable[[F32, Any], F32]:
    """Boxes of attributes-first YOLO columns (4, n) as (n, 4) xyxy input pixels."""
    return lambda b4, _sel: _scaled(np.ascontiguousarray(b4.T, dtype=np.float32), spec, inp)


def _decode_yolov5(outs: list[F32], spec: PostprocessSpec, inp: InputSpec, nc: int) -> Candidates:
    a = _attributes_first(outs[0], 5, nc, spec.extra_attributes)
    return _yolo(a, 5, spec, _box_rows(spec, inp))


def _decode_yolov8(outs: list[F32], spec: PostprocessSpec, inp: InputSpec, nc: int) -> Candidates:
    a = _attributes_first(outs[0], 4, nc, spec.extra_attributes)
    return _yolo(a, 4, spec, _box_rows(spec, inp))


# ------------------------------------------------------------------------- grids
@lru_cache(maxsize=16)
def grid_cells(width: int, height: int, strides: tuple[int, ...]) -> tuple[F32, F32]:
    """(cells, stride per cell) for an input size: cells (N, 2) are (x, y) grid indices,
    row-major within a stride, strides in the order given (YOLOX ``meshgrid`` order)."""
    xy, st = [], []
    for s in strides:
        gh, gw = -(-height // s), -(-width // s)
        ys, xs = np.mgrid[0:gh, 0:gw]
        xy.append(np.stack([xs.ravel(), ys.ravel()], axis=1))
        st.append(np.full(gh * gw, s))
    cells = np.concatenate(xy).astype(np.float32)
    strides_per_cell = np.concatenate(st).astype(np.float32)
    cells.setflags(write=False)
    strides_per_cell.setflags(write=False)
    return cells, strides_per_cell


def _strides(spec: PostprocessSpec, fmt: str) -> tuple[int, ...]:
    return spec.strides or DEFAULT_STRIDES[fmt]


def _decode_yolox(outs: list[F32], spec: PostprocessSpec, inp: InputSpec, nc: int) -> Candidates:
    a = _attributes_first(outs[0], 5, nc)
    strides = _strides(spec, "yolox")
    cells, st = grid_cells(inp.width, inp.height, strides)
    if a.shape[1] != len(cells):
        raise DecodeError(
            f"yolox output has {a.shape[1]} candidates; strides {list(strides)} on a "
            f"{inp.width}x{inp.height} input give {len(cells)} grid cells (set "
            "postprocess.strides, or the input size)"
        )

    def boxes(b4: F32, sel: Any) -> F32:
        s = st[sel][:, None]
        cxcy = (b4[:2].T + cells[sel]) * s
        wh = np.exp(np.minimum(b4[2:4].T, 20.0)) * s  # exp of garbage stays finite
        return _cxcywh_to_xyxy(np.hstack([cxcy, wh]).astype(np.float32))

    return _yolo(a, 5, spec, boxes)


# ------------------------------------------------------------------------- PicoDet
def _decode_picodet(outs: list[F32], spec: PostprocessSpec, inp: InputSpec, nc: int) -> Candidates:
    strides = _strides(spec, "picodet")
    bins = spec.reg_max + 1
    if len(outs) != 2 * len(strides):
        raise DecodeError(
            f"picodet expects {2 * len(strides)} outputs (scores and distances for strides "
            f"{list(strides)}), got {len(outs)} of shapes {_shapes(outs)}"
        )
    maps = [_squeeze_batch(o) for o in outs]
    if any(m.ndim != 2 for m in maps):
        raise DecodeError(f"picodet outputs must be (1, HW, K), got {_shapes(outs)}")
    regs = [m for m in maps if m.shape[1] == 4 * bins]
    scores = [m for m in maps if m.shape[1] != 4 * bins]
    if len(regs) != len(strides) or len(scores) != len(strides):
        raise DecodeError(
            f"picodet: expected {len(strides)} score maps (1, HW, C) and {len(strides)} "
            f"distance maps (1, HW, {4 * bins}) (reg_max {spec.reg_max}), got {_shapes(outs)}"
        )
    # Largest map first = smallest stride (the export's own order, made explicit).
    regs.sort(key=lambda m: -m.shape[0])
    scores.sort(key=lambda m: -m.shape[0])
    proj = np.arange(bins, dtype=np.float32)
    parts: list[Candidates] = []
    for s, sc, rg in zip(strides, scores, regs, strict=True):
        gh, gw = -(-inp.height // s), -(-inp.width // s)
        if sc.shape[0] != gh * gw or rg.shape[0] != gh * gw:
            raise DecodeError(
                f"picodet stride {s} on a {inp.width}x{inp.height} input has {gh}x{gw} cells, "
                f"outputs have {sc.shape[0]} and {rg.shape[0]}: got {_shapes(outs)}"
            )
        best = sc.max(axis=1)
        keep = np.flatnonzero(best >= spec.score_threshold)
        if keep.size == 0:
            continue
        logits = rg[keep].reshape(-1, 4, bins)
        e = np.exp(logits - logits.max(axis=2, keepdims=True))
        dist = (e @ proj) / e.sum(axis=2) * s  # (n, 4): left, top, right, bottom
        cx = (keep % gw + 0.5) * s
        cy = (keep // gw + 0.5) * s
        b = np.stack([cx - dist[:, 0], cy - dist[:, 1], cx + dist[:, 2], cy + dist[:, 3]], 1)
        ids = sc[keep].argmax(axis=1).astype(np.int32)
        parts.append(Candidates(b.astype(np.float32), best[keep].astype(np.float32), ids, False))
    return _concat(parts, nms_done=False)


def _concat(parts: list[Candidates], nms_done: bool) -> Candidates:
    if not parts:
        return Candidates.empty(nms_done)
    return Candidates(
        np.concatenate([p.boxes for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.class_ids for p in parts]),
        nms_done,
    )


# ------------------------------------------------------------------------- NMS inside
_NMS_COLUMNS = {  # layout: (box columns, score column, class column, width)
    "xyxy_score_class": (slice(0, 4), 4, 5, 6),
    "class_score_xyxy": (slice(2, 6), 1, 0, 6),
    "batch_xyxy_class_score": (slice(1, 5), 6, 5, 7),
}


def _decode_nms(outs: list[F32], spec: PostprocessSpec, inp: InputSpec, nc: int) -> Candidates:
    big = [o for o in outs if o.size > 1 and o.ndim >= 2]
    if len(big) == 1 and big[0].shape[-1] in (6, 7):
        return _nms_single(outs, big[0], spec, inp)
    return _nms_separate(outs, spec, inp)


def _count(outs: list[F32], rows: int) -> int:
    """The valid-row count from a scalar-like output (Paddle ``bbox_num``, ``num_dets``)."""
    for o in outs:
        if o.size == 1:
            n = float(o.reshape(-1)[0])
            if not np.isfinite(n) or n < 0:
                raise DecodeError(f"detection count output is {n}, expected >= 0")
            return min(rows, int(n))
    return rows


def _scaled(b: F32, spec: PostprocessSpec, inp: InputSpec) -> F32:
    """(n, 4) boxes as the card encodes them → xyxy in model-input pixels."""
    b = np.asarray(b, np.float32)
    if spec.box_normalized:
        b = b * np.array([inp.width, inp.height] * 2, np.float32)
    return b if spec.box_format == "xyxy" else _cxcywh_to_xyxy(b)


def _nms_single(outs: list[F32], out: F32, spec: PostprocessSpec, inp: InputSpec) -> Candidates:
    a = _squeeze_batch(out)
    boxes_col, score_col, class_col, width = _NMS_COLUMNS[spec.nms_layout]
    if a.ndim != 2 or a.shape[1] != width:
        raise DecodeError(
            f"nms layout {spec.nms_layout} needs rows of {width} values, output has shape "
            f"{out.shape}"
        )
    a = a[: _count(outs, a.shape[0])]
    sc = a[:, score_col]
    keep = np.flatnonzero(sc >= spec.score_threshold)
    if keep.size == 0:
        return Candidates.empty(nms_done=True)
    a = a[keep]
    return Candidates(
        _scaled(np.ascontiguousarray(a[:, boxes_col]), spec, inp),
        a[:, score_col].astype(np.float32),
        np.rint(a[:, class_col]).astype(np.int32),
        True,
    )


def _nms_separate(outs: list[F32], spec: PostprocessSpec, inp: InputSpec) -> Candidates:
    """EfficientNMS-style outputs: boxes (1, K, 4), scores (1, K), classes (1, K), count."""
    boxes = [o for o in outs if o.ndim >= 2 and o.shape[-1] == 4 and o.size > 4]
    vecs = [_squeeze_batch(o).reshape(-1) for o in outs if o.size > 1 and o.shape[-1] != 4]
    if len(boxes) != 1 or len(vecs) != 2:
        raise DecodeError(
            "nms: expected one (1, K, 6|7) output, or boxes (1, K, 4) with scores (1, K), "
            f"classes (1, K) and an optional count; got {_shapes(outs)}"
        )
    b = boxes[0].reshape(-1, 4)
    k = b.shape[0]
    if any(v.shape[0] != k for v in vecs):
        raise DecodeError(f"nms: boxes have {k} rows, scores/classes do not: {_shapes(outs)}")
    # Classes are whole numbers (often an integer dtype); scores are not.
    whole = [v.dtype.kind in "iu" or bool(np.all(v == np.rint(v))) for v in vecs]
    if whole[0] and not whole[1]:
        classes, scores = vecs
    else:
        scores, classes = vecs
    n = _count(outs, k)
    b, scores, classes = b[:n], scores[:n], classes[:n]
    keep = np.flatnonzero(scores >= spec.score_threshold)
    if keep.size == 0:
        return Candidates.empty(nms_done=True)
    return Candidates(
        _scaled(b[keep], spec, inp),
        scores[keep].astype(np.float32),
        np.rint(classes[keep]).astype(np.int32),
        True,
    )


# ------------------------------------------------------------------------- SSD-style
def _boxes_index(outs: list[F32], names: Sequence[str]) -> int | None:
    """The boxes output: the one ending in 4 values; by name when several do (an SSD with 3
    classes plus background has scores (1, N, 4) too)."""
    fours = [i for i, o in enumerate(outs) if o.ndim >= 2 and o.shape[-1] == 4]
    if len(fours) > 1 and len(names) == len(outs):
        named = [i for i in fours if any(k in names[i].lower() for k in ("box", "loc"))]
        fours = named or fours
    return fours[0] if fours else None


def _decode_boxes_scores(
    outs: list[F32], spec: PostprocessSpec, inp: InputSpec, nc: int, names: Sequence[str] = ()
) -> Candidates:
    if len(outs) < 2:
        raise DecodeError(f"boxes_scores expects boxes and scores outputs, got {_shapes(outs)}")
    bi = _boxes_index(outs, names)
    if bi is None:
        raise DecodeError(f"boxes_scores: no (1, N, 4) boxes output among {_shapes(outs)}")
    b = _squeeze_batch(outs[bi])
    n = b.shape[0]
    rest = [_squeeze_batch(o) for i, o in enumerate(outs) if i != bi and o.ndim >= 2]
    scores = next((s for s in rest if s.ndim == 2 and n in s.shape), None)
    if b.ndim != 2 or scores is None:
        raise DecodeError(
            f"boxes_scores: boxes {outs[bi].shape} need scores (1, {n}, C) or (1, C, {n}); "
            f"got {_shapes(outs)}"
        )
    s = scores if scores.shape[0] == n and scores.shape[1] != n else scores.T  # (N, C)
    # With a background column, class ids stay column indices: SSD label lists name the
    # background first ("BACKGROUND", "person", ...), so labels[id] is still right.
    first = 1 if spec.background_class else 0
    s = s[:, first:]
    if s.shape[1] == 0:
        raise DecodeError(f"boxes_scores: no classes left in scores {scores.shape}")
    best = s.max(axis=1)
    keep = np.flatnonzero(best >= spec.score_threshold)
    keep = keep[_best(best[keep])]
    if keep.size == 0:
        return Candidates.empty()
    return Candidates(
        _scaled(b[keep], spec, inp),
        best[keep].astype(np.float32),
        (s[keep].argmax(axis=1) + first).astype(np.int32),
        False,
    )


Decoder = Callable[[list[F32], PostprocessSpec, InputSpec, int], Candidates]
DECODERS: dict[DetectionFormat, Decoder] = {
    "yolov5": _decode_yolov5,
    "yolov8": _decode_yolov8,
    "yolox": _decode_yolox,
    "picodet": _decode_picodet,
    "nms": _decode_nms,
    "boxes_scores": _decode_boxes_scores,
}


def decode(
    outputs: list[F32],
    spec: PostprocessSpec,
    inp: InputSpec,
    classes: int = 0,
    names: Sequence[str] = (),
) -> Candidates:
    """Candidates from a detector's outputs, by the card's format.

    Args:
        outputs: the model outputs as float32, graph order.
        spec: the card's post-processing (format, thresholds, strides...).
        inp: the model input (grid formats need its size; normalised boxes are scaled to it).
        classes: the number of labels, 0 when unknown (helps tell (1, N, K) from (1, K, N)).
        names: the graph's output names (tell boxes from scores where shapes cannot).

    Raises:
        DecodeError: the outputs do not fit the format; the message lists their shapes.
    """
    if spec.detection_format == "boxes_scores":
        return _decode_boxes_scores(outputs, spec, inp, classes, names)
    return DECODERS[spec.detection_format](outputs, spec, inp, classes)
