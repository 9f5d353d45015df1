"""Test helper: tiny ONNX models whose outputs look exactly like real exporters' outputs.

Each builder writes a model whose *outputs* have the names, layout, dtype and metadata that the
named exporter produces, with known boxes planted in them, so a decoder can be tested against
ground truth. The graphs contain no network: every output is a constant that is tied to the
input(s) through ``Add(const, Mul(ReduceMean(input), 0))`` (``Cast`` for integer outputs), so
ONNX Runtime cannot fold it away and really executes the model.

The layout of each format follows the exporter's source; the file/function is cited beside each
builder. ``reference_decode`` is an independent NumPy port of each project's *published*
post-processing (YOLOX ``demo_postprocess`` + ``multiclass_nms``, Ultralytics / YOLOv5
``non_max_suppression``, PaddleDetection ``PicoDetPostProcess``, Ultra-Light-Fast face detector
``predict`` ...), to be used by tests as a second opinion next to the planted truth.

Conventions shared by all detection cases:

* input (width, height) = (320, 256) for the grid formats (non-square on purpose);
* the truth in ``FormatCase.boxes`` is what a correct decoder returns with score threshold
  ``SCORE_THRESHOLD`` (0.25) and NMS IoU ``IOU_THRESHOLD`` (0.45), in model-input pixels,
  sorted by descending score;
* raw (pre-NMS) formats plant five boxes: two class-0 boxes at stride 8 (one of them scored
  0.15, which must be dropped), a same-class overlapping pair at stride 16 (IoU 0.77: only the
  0.85 one survives), and a large box at stride 32 (stride 64 for PicoDet);
* NMS-included formats plant the rows an in-graph NMS would have left: the four boxes without
  the suppressed duplicate (a re-run of NMS must not be *needed* to get the truth), including
  the 0.15 row, which a decoder must still drop by its own score threshold;
* boxes of different classes never overlap, so class-aware and class-agnostic NMS agree (the
  YOLOX demo uses class-agnostic NMS, Ultralytics / YOLOv5 class-aware);
* ``Box.class_id`` indexes ``FormatCase.labels``; for "ssd" the labels start with "BACKGROUND"
  (score column 0), so its class ids are 1..C.

Run ``python -m tests.harness.format_models`` for a self-check (builds every case at the
default opset and at the minimum opsets 11 (YOLOX) / 12 (others), runs them in ONNX Runtime,
decodes them with ``reference_decode`` and compares with the planted truth).
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SCORE_THRESHOLD = 0.25
IOU_THRESHOLD = 0.45
GRID_INPUT_SIZE = (320, 256)  # (width, height) of every grid / detection case
CLS_INPUT_SIZE = (224, 224)

# opset -> ir_version written: 11 -> 6 and 12 -> 7 (the IR that introduced them), 8 for 13..18
# (what torch.onnx writes there), then onnx.helper.VERSION_TABLE
_IR_FOR_OPSET = {
    11: 6,
    12: 7,
    13: 8,
    14: 8,
    15: 8,
    16: 8,
    17: 8,
    18: 8,
    19: 9,
    20: 9,
    21: 10,
}


@dataclass(frozen=True)
class Box:
    """Ground truth, in MODEL-INPUT pixels."""

    xyxy: tuple[float, float, float, float]
    class_id: int
    score: float


@dataclass(frozen=True)
class FormatCase:
    name: str  # e.g. "yolov8"
    path: Path  # the .onnx written
    input_size: tuple[int, int]  # (width, height)
    boxes: tuple[Box, ...]  # what a correct decoder (score >= 0.25, NMS IoU 0.45) returns
    labels: tuple[str, ...]  # class names, index order
    metadata: dict[str, str]  # metadata_props written into the model
    top1: int | None = None  # classification cases: the expected arg-max class id


# --------------------------------------------------------------------------------------------
# planted boxes


@dataclass(frozen=True)
class _Plant:
    box: Box
    stride: int  # pyramid level the box is planted at (grid formats)
    keep: bool  # in the truth: survives score threshold + NMS
    duplicate: bool = False  # the lower-scored member of the overlapping pair


_DET_LABELS = ("person", "car", "dog")


def _plants(*, top_stride: int = 32) -> tuple[_Plant, ...]:
    return (
        _Plant(Box((48.0, 36.0, 72.0, 68.0), 0, 0.90), 8, True),  # small -> P3
        _Plant(Box((160.0, 88.0, 240.0, 152.0), 1, 0.85), 16, True),  # medium -> P4
        # same class, IoU 0.766 with the box above: NMS must drop it
        _Plant(Box((166.0, 92.0, 246.0, 156.0), 1, 0.60), 16, False, duplicate=True),
        _Plant(Box((24.0, 120.0, 168.0, 232.0), 2, 0.75), top_stride, True),  # large -> P5/P6
        _Plant(Box((270.0, 30.0, 290.0, 50.0), 0, 0.15), 8, False),  # below the threshold
    )


def _truth(plants: Sequence[_Plant]) -> tuple[Box, ...]:
    return tuple(sorted((p.box for p in plants if p.keep), key=lambda b: -b.score))


def _nms_rows(plants: Sequence[_Plant]) -> list[_Plant]:
    """Rows an in-graph NMS leaves, by descending score (torchvision / TensorRT order)."""
    return sorted((p for p in plants if not p.duplicate), key=lambda p: -p.box.score)


def _centre(b: Box) -> tuple[float, float]:
    x1, y1, x2, y2 = b.xyxy
    return (x1 + x2) / 2.0, (y1 + y2) / 2.0


def _size(b: Box) -> tuple[float, float]:
    x1, y1, x2, y2 = b.xyxy
    return x2 - x1, y2 - y1


def _assign_cells(plants: Sequence[_Plant], slots: int = 1) -> list[tuple[int, int, int]]:
    """(gx, gy, slot) per plant: the cell holding the box centre; a taken cell moves right."""
    used: set[tuple[int, int, int, int]] = set()
    out: list[tuple[int, int, int]] = []
    for p in plants:
        cx, cy = _centre(p.box)
        gx, gy = int(cx // p.stride), int(cy // p.stride)
        while True:
            free = [a for a in range(slots) if (p.stride, gx, gy, a) not in used]
            if free:
                break
            gx += 1
        used.add((p.stride, gx, gy, free[0]))
        out.append((gx, gy, free[0]))
    return out


def _levels(size: tuple[int, int], strides: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """(stride, nx, ny, offset of the level in the flattened anchor axis) per level."""
    w, h = size
    out: list[tuple[int, int, int, int]] = []
    off = 0
    for s in strides:
        nx, ny = math.ceil(w / s), math.ceil(h / s)
        out.append((s, nx, ny, off))
        off += nx * ny
    return out


def _level_of(levels: Sequence[tuple[int, int, int, int]], s: int) -> tuple[int, int, int, int]:
    return next(lv for lv in levels if lv[0] == s)


def _grid(nx: int, ny: int) -> tuple[np.ndarray, np.ndarray]:
    """(gx, gy) of the flattened cells, row-major (y outer, x inner) like every exporter here."""
    gy, gx = np.divmod(np.arange(nx * ny), nx)
    return gx.astype(np.float32), gy.astype(np.float32)


# --------------------------------------------------------------------------------------------
# graph construction

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int32): TensorProto.INT32}
Dims = Sequence[int | str | None]


class _Graph:
    """Collects nodes; every emitted output is ``const + 0 * mean(inputs)``."""

    def __init__(self, opset: int) -> None:
        if opset not in _IR_FOR_OPSET:
            raise ValueError(f"opset {opset} not supported (choose {sorted(_IR_FOR_OPSET)})")
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._count = 0
        self._zero: str | None = None

    def _fresh(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}_{self._count}"

    def add_input(self, name: str, dims: Dims) -> None:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(dims)))

    def const(self, arr: np.ndarray, prefix: str = "const") -> str:
        name = self._fresh(prefix)
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], out: str | None = None, **attrs: Any) -> str:
        out = out or self._fresh(op_type.lower())
        node = helper.make_node(op_type, list(inputs), [out], name=self._fresh(op_type), **attrs)
        self.nodes.append(node)
        return out

    def zero(self) -> str:
        """Scalar float 0 that depends on every graph input (ReduceMean over all axes: valid at
        every opset - axes is an optional attribute before 18 and an optional input from 18)."""
        if self._zero is None:
            c0 = self.const(np.array(0.0, np.float32), "zero")
            terms = [
                self.op("Mul", [self.op("ReduceMean", [vi.name], keepdims=0), c0])
                for vi in self.inputs
            ]
            z = terms[0]
            for t in terms[1:]:
                z = self.op("Add", [z, t])
            self._zero = z
        return self._zero

    def _declare(self, name: str, dtype: np.dtype, dims: Dims) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, _NP_TO_ONNX[dtype], list(dims)))

    def _finish(self, name: str, value: str, shape: Sequence[int], dims: Dims | None) -> None:
        """Make ``value`` the graph output ``name``. When the declared ``dims`` are symbolic or
        unknown (dynamic in the real export), route it through a Reshape whose target shape is
        only known at run time, so ONNX Runtime's shape inference cannot turn the declared
        dims into concrete ones (``session.get_outputs()`` then reports them as the real
        export's would)."""
        if dims is None or all(isinstance(d, int) for d in dims):
            self.op("Identity", [value], out=name)
            return
        target = self.const(np.array(shape, np.float32), "shape")
        runtime = self.op("Cast", [self.op("Add", [target, self.zero()])], to=TensorProto.INT64)
        self.op("Reshape", [value, runtime], out=name)

    def emit(self, name: str, arr: np.ndarray, dims: Dims | None = None) -> None:
        """Output ``name`` == ``arr`` (float32 or int32), declared with ``dims`` (default: the
        array's shape; str = symbolic dim_param, None = unknown dim)."""
        if arr.dtype == np.float32:
            value = self.op("Add", [self.const(arr), self.zero()])
        elif arr.dtype == np.int32:
            zi = self.op("Cast", [self.zero()], to=TensorProto.INT32)
            value = self.op("Add", [self.const(arr), zi])
        else:
            raise TypeError(arr.dtype)
        self._finish(name, value, arr.shape, dims)
        self._declare(name, arr.dtype, arr.shape if dims is None else dims)

    def emit_softmax(self, name: str, probs: np.ndarray, axis: int) -> None:
        """Output ``name`` == ``probs`` produced by a real Softmax node over ``axis`` (the last
        axis in every use here, so opset < 13's coerce-to-2D semantics give the same result)."""
        assert axis == probs.ndim - 1
        logits = np.log(np.clip(probs, 1e-30, None)).astype(np.float32)
        pre = self.op("Add", [self.const(logits, "logits"), self.zero()])
        self.op("Softmax", [pre], out=name, axis=axis)
        self._declare(name, probs.dtype, probs.shape)

    def emit_unscaled(
        self, name: str, arr: np.ndarray, scale_factor: str, n_lead: int, dims: Dims
    ) -> None:
        """Output ``name`` == ``arr`` with its box columns divided by the ``scale_factor``
        input ([[scale_y, scale_x]]), like PaddleDetection's ``pred_bboxes /= scale_factor``:
        columns ``n_lead`` .. ``n_lead + 3`` are x1, y1, x2, y2; earlier columns pass through."""
        recip = self.op("Reciprocal", [scale_factor])  # [1, 2] = [1/sy, 1/sx]
        idx = self.const(np.array([1, 0, 1, 0], np.int64), "xyxy_idx")
        factor = self.op("Gather", [recip, idx], axis=1)  # [1, 4] = 1/sx, 1/sy, 1/sx, 1/sy
        if n_lead:
            ones = self.const(np.ones((1, n_lead), np.float32), "ones")
            factor = self.op("Concat", [ones, factor], axis=1)
        pre = self.op("Add", [self.const(arr), self.zero()])
        self._finish(name, self.op("Mul", [pre, factor]), arr.shape, dims)
        self._declare(name, arr.dtype, dims)

    def build(
        self, graph_name: str, metadata: dict[str, str], producer: tuple[str, str]
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, graph_name, self.inputs, self.outputs, initializer=self.inits
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", self.opset)],
            ir_version=_IR_FOR_OPSET[self.opset],
            producer_name=producer[0],
            producer_version=producer[1],
        )
        if metadata:
            helper.set_model_props(model, metadata)
        onnx.checker.check_model(model, full_check=True)
        return model


_TORCH = ("pytorch", "2.3.1")
_PADDLE = ("PaddlePaddle", "1.0.6")  # paddle2onnx writes producer_name "PaddlePaddle"


def _save(model: onnx.ModelProto, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.onnx"
    onnx.save(model, str(path))
    return path


def _ultralytics_metadata(
    *,
    task: str,
    stem: str,
    data: str,
    imgsz_hw: tuple[int, int],
    names: Sequence[str],
    stride: int,
    nms: bool = False,
    end2end: bool = False,
) -> dict[str, str]:
    """``Exporter.__call__``'s ``self.metadata`` as ``export_onnx`` writes it: every value
    ``str(v)`` (ultralytics/engine/exporter.py). ``args`` holds the ONNX format's keys
    (batch, dynamic, half, opset, simplify, nms) in default.yaml order; ``imgsz`` is the
    ``check_imgsz`` list [h, w]; ``names`` a dict. Exporters >= ~8.3.x add ``channels`` and
    ``end2end`` (the newest dev snapshots also ``head``; older ones lack all three). AutoBackend
    reads ``args['nms']`` and ``end2end`` to know the output is already NMS'd / one-to-one.
    Date and version are illustrative, fixed for reproducibility."""
    args = {
        "batch": 1,
        "half": False,
        "dynamic": False,
        "simplify": True,
        "opset": None,
        "nms": nms,
    }
    meta: dict[str, object] = {
        "description": f"Ultralytics {stem} model trained on {data}",
        "author": "Ultralytics",
        "date": "2025-06-02T10:11:12.131415",
        "version": "8.3.150",
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "stride": stride,
        "task": task,
        "batch": 1,
        "imgsz": list(imgsz_hw),
        "names": dict(enumerate(names)),
        "args": args,
        "channels": 3,
        "end2end": end2end,
    }
    return {k: str(v) for k, v in meta.items()}


# --------------------------------------------------------------------------------------------
# builders: (out_dir, opset) -> FormatCase


def _build_yolov5(out_dir: Path, opset: int) -> FormatCase:
    """ultralytics/yolov5 ``export.py`` export_onnx + ``models/yolo.py`` Detect.forward (export):
    output "output0" [1, na*sum(ny*nx), 5+nc], per level ``view(bs, na, ny, nx, no)`` so the
    anchor axis is anchor-major, then y, then x; levels P3, P4, P5 concatenated. Row =
    [cx, cy, w, h] in input pixels (xy = (2*sig - 0.5 + grid) * stride, wh = (2*sig)^2 * anchor),
    obj (sigmoid), cls (sigmoid). Metadata: ``{"stride": int(max(stride)), "names": names}``
    written as ``str(v)``; ``attempt_load`` turns list names into a dict, hence "{0: 'person',
    ...}". Input "images". NMS reference: utils/general.py non_max_suppression."""
    size = GRID_INPUT_SIZE
    anchors = {
        8: [(10, 13), (16, 30), (33, 23)],
        16: [(30, 61), (62, 45), (59, 119)],
        32: [(116, 90), (156, 198), (373, 326)],
    }  # yolov5s.yaml
    na, nc = 3, len(_DET_LABELS)
    levels = _levels(size, (8, 16, 32))
    rows: list[np.ndarray] = []
    for s, nx, ny, _ in levels:
        gx, gy = _grid(nx, ny)
        for a in range(na):
            r = np.zeros((nx * ny, 5 + nc), np.float32)
            r[:, 0], r[:, 1] = (gx + 0.5) * s, (gy + 0.5) * s  # sigmoid(0) offsets
            r[:, 2], r[:, 3] = anchors[s][a]
            r[:, 4], r[:, 5:] = 0.002, 0.01
            rows.append(r)
    out = np.concatenate(rows)[None]
    plants = _plants()
    for p, (gx_, gy_, a) in zip(plants, _assign_cells(plants, slots=na), strict=True):
        s, nx, ny, _ = _level_of(levels, p.stride)
        base = sum(3 * lnx * lny for ls, lnx, lny, _ in levels if ls < s)
        i = base + a * ny * nx + gy_ * nx + gx_
        cx, cy = _centre(p.box)
        w, h = _size(p.box)
        assert abs(cx / s - gx_ - 0.5) <= 1.0 and abs(cy / s - gy_ - 0.5) <= 1.0
        assert w <= 4 * anchors[s][a][0] and h <= 4 * anchors[s][a][1]
        out[0, i, :5] = (cx, cy, w, h, 0.95)
        out[0, i, 5:] = 0.01
        out[0, i, 5 + p.box.class_id] = p.box.score / 0.95  # obj * cls == score
    g = _Graph(opset)
    g.add_input("images", [1, 3, size[1], size[0]])
    g.emit("output0", out)
    meta = {"stride": str(32), "names": str(dict(enumerate(_DET_LABELS)))}
    path = _save(g.build("main_graph", meta, _TORCH), out_dir, "yolov5")
    return FormatCase("yolov5", path, size, _truth(plants), _DET_LABELS, meta)


def _yolov8_case(
    name: str,
    out: np.ndarray,
    plants: Sequence[_Plant],
    out_dir: Path,
    opset: int,
    *,
    nms: bool = False,
) -> FormatCase:
    """A YOLOv8n detect export at ``GRID_INPUT_SIZE`` whose "output0" is ``out``, with the
    exporter's metadata (``nms``: ``args['nms'] = True``); truth from ``plants``."""
    size = GRID_INPUT_SIZE
    g = _Graph(opset)
    g.add_input("images", [1, 3, size[1], size[0]])
    g.emit("output0", out)
    meta = _ultralytics_metadata(
        task="detect",
        stem="YOLOv8n",
        data="coco.yaml",
        imgsz_hw=(size[1], size[0]),
        names=_DET_LABELS,
        stride=32,
        nms=nms,
    )
    path = _save(g.build("main_graph", meta, _TORCH), out_dir, name)
    return FormatCase(name, path, size, _truth(plants), _DET_LABELS, meta)


def _build_yolov8(out_dir: Path, opset: int) -> FormatCase:
    """Ultralytics ``nn/modules/head.py`` Detect._inference (export=True): "output0"
    [1, 4+nc, A], rows cx, cy, w, h (input pixels, ``dist2bbox(xywh=True) * strides``) then the
    class scores after sigmoid, no objectness; anchors from ``utils/tal.py`` make_anchors
    (cells row-major, centre (x+0.5)*stride), levels P3, P4, P5. Metadata: exporter.py (see
    ``_ultralytics_metadata``). NMS reference: ``utils/nms.py`` non_max_suppression."""
    size = GRID_INPUT_SIZE
    nc = len(_DET_LABELS)
    levels = _levels(size, (8, 16, 32))
    cols = []
    for s, nx, ny, _ in levels:
        gx, gy = _grid(nx, ny)
        c = np.zeros((4 + nc, nx * ny), np.float32)
        c[0], c[1], c[2], c[3] = (gx + 0.5) * s, (gy + 0.5) * s, 2.0 * s, 2.0 * s
        c[4:] = 0.001
        cols.append(c)
    out = np.concatenate(cols, axis=1)[None]
    plants = _plants()
    for p, (gx_, gy_, _) in zip(plants, _assign_cells(plants), strict=True):
        s, nx, _, off = _level_of(levels, p.stride)
        i = off + gy_ * nx + gx_
        x1, y1, x2, y2 = p.box.xyxy
        ax, ay = (gx_ + 0.5) * s, (gy_ + 0.5) * s  # the anchor must lie inside its box
        assert x1 < ax < x2 and y1 < ay < y2
        out[0, :4, i] = (*_centre(p.box), *_size(p.box))
        out[0, 4:, i] = 0.001
        out[0, 4 + p.box.class_id, i] = p.box.score
    return _yolov8_case("yolov8", out, plants, out_dir, opset)


def _build_yolox(out_dir: Path, opset: int) -> FormatCase:
    """Megvii YOLOX ``yolox/models/yolo_head.py`` YOLOXHead.forward (eval) with
    ``decode_in_inference=False`` (``tools/export_onnx.py`` default: input "images", output
    "output", opset 11, no metadata): per level cat([reg, obj.sigmoid(), cls.sigmoid()], 1),
    ``flatten(start_dim=2)`` -> cells row-major (index = y*W + x), levels 8, 16, 32, permuted to
    [1, A, 5+nc]. Decoding (``decode_outputs`` / ``yolox/utils/demo_utils.py``
    demo_postprocess): grid from meshgrid(arange(h), arange(w), 'ij') stacked as (x, y), NO 0.5
    offset: cx = (tx + gx) * s, cy = (ty + gy) * s, w = exp(tw) * s, h = exp(th) * s.
    Preprocessing (``yolox/data/data_augment.py`` preproc): top-left letterbox padded with 114,
    BGR, 0..255, no mean/std (only legacy releases normalised)."""
    size = GRID_INPUT_SIZE
    nc = len(_DET_LABELS)
    levels = _levels(size, (8, 16, 32))
    n = sum(nx * ny for _, nx, ny, _ in levels)
    out = np.zeros((1, n, 5 + nc), np.float32)
    out[0, :, 0:2] = 0.5  # background: s x s boxes centred on each cell
    out[0, :, 4], out[0, :, 5:] = 0.01, 0.01
    plants = _plants()
    for p, (gx_, gy_, _) in zip(plants, _assign_cells(plants), strict=True):
        s, nx, _, off = _level_of(levels, p.stride)
        cx, cy = _centre(p.box)
        w, h = _size(p.box)
        row = out[0, off + gy_ * nx + gx_]
        row[:4] = (cx / s - gx_, cy / s - gy_, math.log(w / s), math.log(h / s))
        row[4], row[5:] = 0.95, 0.01
        row[5 + p.box.class_id] = p.box.score / 0.95  # demo: scores = obj * cls
    g = _Graph(opset)
    g.add_input("images", [1, 3, size[1], size[0]])
    g.emit("output", out)
    path = _save(g.build("main_graph", {}, _TORCH), out_dir, "yolox")
    return FormatCase("yolox", path, size, _truth(plants), _DET_LABELS, {})


def _build_nms_ultralytics(out_dir: Path, opset: int) -> FormatCase:
    """Ultralytics ``engine/exporter.py`` NMSModel (``export(format="onnx", nms=True)``):
    "output0" [1, max_det=300, 6], rows [x1, y1, x2, y2, score, class] (Detect.xyxy=True),
    filled from row 0 in NMS order (descending score), rows past the detections are zeros.
    YOLOv10 / YOLO26 end2end heads (Detect.postprocess, top-k, no NMS) give the same
    [1, 300, 6] xyxy-score-class layout (their unused rows hold low-scored top-k rows instead of
    zeros). Metadata as exporter.py writes it with ``args['nms'] = True``. The 0.15 row is one
    an export with a low ``conf`` keeps; the decoder must drop it with its own threshold.
    Reference: ``utils/nms.py`` non_max_suppression end2end branch
    (``pred[pred[:, 4] > conf_thres]``)."""
    plants = _plants()
    out = np.zeros((1, 300, 6), np.float32)
    for i, p in enumerate(_nms_rows(plants)):
        out[0, i] = (*p.box.xyxy, p.box.score, p.box.class_id)
    return _yolov8_case("nms_ultralytics", out, plants, out_dir, opset, nms=True)


def _build_nms_efficient(out_dir: Path, opset: int) -> FormatCase:
    """WongKinYiu/yolov7 ``export.py --grid --end2end`` (``models/experimental.py`` ONNX_TRT /
    TRT_NMS, the TensorRT ``EfficientNMS_TRT`` plugin): outputs "num_dets" [1, 1] int32,
    "det_boxes" [1, 100, 4] float32, "det_scores" [1, 100] float32, "det_classes" [1, 100]
    int32. The plugin README (NVIDIA/TensorRT plugin/efficientNMSPlugin) says the boxes are
    always BoxCorner (x1, y1, x2, y2) whatever the input coding, and only the first
    ``num_detections`` rows are valid: row 4 here is deliberate garbage (score 0.95) that a
    decoder must ignore. yolov7's export overwrites every output dim with ``dim_param =
    str(size)`` ("1", "100", "4"), reproduced here. No metadata (commented out in export.py).
    The real graph holds the TRT plugin op; only the output side is reproduced."""
    size = GRID_INPUT_SIZE
    plants = _plants()
    rows = _nms_rows(plants)
    boxes = np.zeros((1, 100, 4), np.float32)
    scores = np.zeros((1, 100), np.float32)
    classes = np.zeros((1, 100), np.int32)
    for i, p in enumerate(rows):
        boxes[0, i], scores[0, i], classes[0, i] = p.box.xyxy, p.box.score, p.box.class_id
    k = len(rows)
    boxes[0, k], scores[0, k], classes[0, k] = (200.0, 200.0, 260.0, 250.0), 0.95, 2  # garbage
    g = _Graph(opset)
    g.add_input("images", [1, 3, size[1], size[0]])
    g.emit("num_dets", np.array([[k]], np.int32), dims=["1", "1"])
    g.emit("det_boxes", boxes, dims=["1", "100", "4"])
    g.emit("det_scores", scores, dims=["1", "100"])
    g.emit("det_classes", classes, dims=["1", "100"])
    path = _save(g.build("torch-jit-export", {}, _TORCH), out_dir, "nms_efficient")
    return FormatCase("nms_efficient", path, size, _truth(plants), _DET_LABELS, {})


def _build_nms_paddle(out_dir: Path, opset: int) -> FormatCase:
    """PaddleDetection export with NMS (``ppdet/engine/trainer.py`` _get_infer_cfg_and_input_spec,
    ``ppdet/modeling/heads/pico_head.py`` post_process: ``pred_bboxes /= scale_factor`` then
    ``self.nms`` = multiclass_nms3), converted by paddle2onnx. Inputs "image" [N, 3, H, W],
    "im_shape" [N, 2] and "scale_factor" [N, 2] = [[scale_y, scale_x]] (newer exports prune
    the unused "im_shape"; feed inputs by name). Outputs "multiclass_nms3_0.tmp_0" [-1, 6]
    float32 rows [class, score, x1, y1, x2, y2] in ORIGINAL-image pixels, and
    "multiclass_nms3_0.tmp_2" [-1] int32 = boxes per image (names / dtypes as in
    deploy/fastdeploy/serving/models/runtime/ppyoloe_runtime_config.pbtxt). Rows come grouped
    by class (ascending), by score within a class, as Paddle's multiclass_nms writes them (see
    the example in PaddlePaddle/docs multiclass_nms_cn.rst); paddle2onnx's conversion may order
    them differently - a decoder must not assume any order.
    Feed scale_factor [[1, 1]] to get the planted input-pixel boxes. No metadata.
    Reference: deploy/python/infer.py (``np_boxes[:, 1] > threshold`` and class > -1)."""
    size = GRID_INPUT_SIZE
    plants = _plants()
    rows = sorted(_nms_rows(plants), key=lambda p: (p.box.class_id, -p.box.score))
    out = np.array([[p.box.class_id, p.box.score, *p.box.xyxy] for p in rows], np.float32)
    g = _Graph(opset)
    g.add_input("image", [None, 3, size[1], size[0]])
    g.add_input("im_shape", [None, 2])
    g.add_input("scale_factor", [None, 2])
    g.emit_unscaled("multiclass_nms3_0.tmp_0", out, "scale_factor", n_lead=2, dims=[None, 6])
    g.emit("multiclass_nms3_0.tmp_2", np.array([len(rows)], np.int32), dims=[None])
    path = _save(g.build("paddle_model", {}, _PADDLE), out_dir, "nms_paddle")
    return FormatCase("nms_paddle", path, size, _truth(plants), _DET_LABELS, {})


_SSD_LABELS = ("BACKGROUND", "person", "car", "dog")


def _ultraface_priors(size: tuple[int, int]) -> tuple[np.ndarray, list[int], list[int]]:
    """Ultra-Light-Fast-Generic-Face-Detector ``vision/utils/box_utils.py`` generate_priors for
    this input size: per level, y outer, x inner, then each min_box; (cx, cy, w, h) normalised.
    Returns priors, level start offsets and boxes per cell."""
    w, h = size
    min_boxes = [[10, 16, 24], [32, 48], [64, 96], [128, 192, 256]]
    priors: list[tuple[float, float, float, float]] = []
    offsets: list[int] = []
    for s, mbs in zip((8, 16, 32, 64), min_boxes, strict=True):
        offsets.append(len(priors))
        for j in range(math.ceil(h / s)):
            for i in range(math.ceil(w / s)):
                for mb in mbs:
                    priors.append(((i + 0.5) * s / w, (j + 0.5) * s / h, mb / w, mb / h))
    return np.array(priors, np.float32), offsets, [len(m) for m in min_boxes]


def _build_ssd(out_dir: Path, opset: int) -> FormatCase:
    """SSD-style decoded boxes + softmax scores, as Linzaer/Ultra-Light-Fast-Generic-Face-
    Detector-1MB (``vision/ssd/ssd.py`` forward with is_test: softmax(confidences, dim=2),
    convert_locations_to_boxes, center_form_to_corner_form; ONNX export ``output_names=
    ["scores", "boxes"]``, input "input") and qfgaohao/pytorch-ssd (MobileNet-SSD / SSD-Lite)
    ship: "scores" [1, N, C+1] softmax probabilities, column 0 = background, then "boxes"
    [1, N, 4] x1, y1, x2, y2 normalised to 0..1 (priors here: ultraface's for 320x256).
    ``labels`` include "BACKGROUND" at index 0 (the models' label files do), so class ids are
    score-column indices 1..C. The ONNX-zoo SSD-MobileNet (TF) graphs are NMS-included
    (num_detections / detection_*), a different format. No metadata.
    Reference: ultraface ``predict`` (per-class hard_nms from column 1)."""
    size = GRID_INPUT_SIZE
    w, h = size
    priors, offsets, per_cell = _ultraface_priors(size)
    n, c1 = len(priors), len(_SSD_LABELS)
    boxes = np.concatenate(
        [priors[:, :2] - priors[:, 2:] / 2, priors[:, :2] + priors[:, 2:] / 2], axis=1
    )[None].astype(np.float32)
    scores = np.full((1, n, c1), 0.02 / (c1 - 1), np.float32)
    scores[0, :, 0] = 0.98
    plants = [
        _Plant(Box(p.box.xyxy, p.box.class_id + 1, p.box.score), p.stride, p.keep, p.duplicate)
        for p in _plants()
    ]
    level = {8: 0, 16: 1, 32: 2, 64: 3}
    for p, (gx_, gy_, slot) in zip(plants, _assign_cells(plants, slots=3), strict=True):
        lv = level[p.stride]
        i = offsets[lv] + (gy_ * math.ceil(w / p.stride) + gx_) * per_cell[lv] + slot
        x1, y1, x2, y2 = p.box.xyxy
        boxes[0, i] = (x1 / w, y1 / h, x2 / w, y2 / h)
        row = np.full(c1, 0.005, np.float32)
        row[p.box.class_id] = p.box.score
        row[0] = 1.0 - (row.sum() - row[0])
        scores[0, i] = row
    g = _Graph(opset)
    g.add_input("input", [1, 3, h, w])
    g.emit_softmax("scores", scores, axis=2)
    g.emit("boxes", boxes)
    path = _save(g.build("torch-jit-export", {}, _TORCH), out_dir, "ssd")
    return FormatCase("ssd", path, size, _truth(plants), _SSD_LABELS, {})


def _build_ssd_paddle(out_dir: Path, opset: int) -> FormatCase:
    """PaddleDetection export with ``export.nms: False`` (PicoDet.get_pred -> {'bbox',
    'scores'}; ``pico_head.py`` PicoHeadV2.forward_eval with export_post_process +
    post_process(export_nms=False)): boxes [1, N, 4] x1, y1, x2, y2 divided by scale_factor
    (original-image pixels; input pixels when scale_factor is [[1, 1]]) and scores [1, C, N]
    (sigmoid, no background, class axis FIRST). Anchors: strides 8..64, cells row-major.
    Inputs "image" [N, 3, H, W] and "scale_factor" [N, 2] (im_shape pruned). The output NAMES
    are paddle2onnx temporaries that vary per model; the ones here are illustrative only.
    Reference: a per-class greedy NMS (Paddle multiclass_nms semantics)."""
    size = GRID_INPUT_SIZE
    nc = len(_DET_LABELS)
    levels = _levels(size, (8, 16, 32, 64))
    parts = []
    for s, nx, ny, _ in levels:
        gx, gy = _grid(nx, ny)
        ax, ay = (gx + 0.5) * s, (gy + 0.5) * s
        parts.append(np.stack([ax - s, ay - s, ax + s, ay + s], axis=1))
    boxes = np.concatenate(parts)[None].astype(np.float32)
    n = boxes.shape[1]
    scores = np.full((1, nc, n), 0.003, np.float32)
    plants = _plants(top_stride=64)
    for p, (gx_, gy_, _) in zip(plants, _assign_cells(plants), strict=True):
        s, nx, _, off = _level_of(levels, p.stride)
        i = off + gy_ * nx + gx_
        boxes[0, i] = p.box.xyxy
        scores[0, :, i] = 0.003
        scores[0, p.box.class_id, i] = p.box.score
    g = _Graph(opset)
    g.add_input("image", [None, 3, size[1], size[0]])
    g.add_input("scale_factor", [None, 2])
    g.emit_unscaled("tmp_16", boxes, "scale_factor", n_lead=0, dims=[None, n, 4])
    g.emit("concat_14.tmp_0", scores, dims=[None, nc, n])
    path = _save(g.build("paddle_model", {}, _PADDLE), out_dir, "ssd_paddle")
    return FormatCase("ssd_paddle", path, size, _truth(plants), _DET_LABELS, {})


_LAYOUT_LABELS = ("text", "title", "list", "table", "figure")  # PubLayNet, as rapid_layout


def _dfl_logits(d: float, reg_max: int) -> np.ndarray:
    """Logits over bins 0..reg_max whose softmax expectation is ``d`` (two-hot)."""
    assert 0.0 <= d <= reg_max, d
    lo = min(math.floor(d), reg_max - 1)
    frac = d - lo
    logits = np.full(reg_max + 1, -30.0, np.float32)
    if frac < 1.0:
        logits[lo] = math.log(1.0 - frac)
    if frac > 0.0:
        logits[lo + 1] = math.log(frac)
    return logits


def _build_picodet(out_dir: Path, opset: int) -> FormatCase:
    """PaddleDetection PicoDet exported WITHOUT post-process (``export.post_process: False``;
    the layout models rapid_layout / PP-Structure ship, e.g. picodet_lcnet_x1_0_layout):
    ``pico_head.py`` PicoHead / PicoHeadV2.forward_eval(export_post_process=False) returns per
    level ``sigmoid(cls).reshape([1, C, -1]).transpose([0, 2, 1])`` -> [1, HW, C] and
    ``reg.reshape([1, 4*(reg_max+1), -1]).transpose([0, 2, 1])`` -> [1, HW, 32] (raw DFL
    logits, reg_max = 7, channel = side*8 + bin, sides l, t, r, b); PicoDet.get_pred returns
    (cls_list, reg_list), so the graph outputs are the 4 score maps THEN the 4 reg maps, named
    transpose_0/2/4/6.tmp_0 (scores) and transpose_1/3/5/7.tmp_0 (reg) - older exports named
    them save_infer_model/scale_0..3.tmp_1 and scale_4..7.tmp_1. Strides 8, 16, 32, 64; input
    "image" [1, 3, H, W] only (trainer.py prunes im_shape / scale_factor for this export).

    Centre convention: (x + 0.5) * stride. PicoHead/PicoHeadV2 default ``cell_offset=0`` but
    every PicoDet config sets ``cell_offset: 0.5`` (configs/picodet/_base_/picodet_v2.yml,
    legacy_model/_base_/picodet_esnet.yml which the layout configs inherit), and the deploy
    decoders of these raw outputs - PaddleDetection deploy/python/picodet_postprocess.py
    PicoDetPostProcess and rapid_layout model_handler/pp/post_process.py - both compute
    ``ct = (arange + 0.5) * stride``. Distances: softmax over the 8 bins, expectation
    (sum p_i * i), times stride; box = centre + [-l, -t, r, b]."""
    size = GRID_INPUT_SIZE
    nc, reg_max = len(_LAYOUT_LABELS), 7
    levels = _levels(size, (8, 16, 32, 64))
    cls_maps = [np.full((1, nx * ny, nc), 0.003, np.float32) for _, nx, ny, _ in levels]
    reg_maps = [np.zeros((1, nx * ny, 4 * (reg_max + 1)), np.float32) for _, nx, ny, _ in levels]
    plants = _plants(top_stride=64)
    for p, (gx_, gy_, _) in zip(plants, _assign_cells(plants), strict=True):
        li = next(k for k, lv in enumerate(levels) if lv[0] == p.stride)
        s, nx, _, _ = levels[li]
        i = gy_ * nx + gx_
        ax, ay = (gx_ + 0.5) * s, (gy_ + 0.5) * s
        x1, y1, x2, y2 = p.box.xyxy
        dists = ((ax - x1) / s, (ay - y1) / s, (x2 - ax) / s, (y2 - ay) / s)
        reg_maps[li][0, i] = np.concatenate([_dfl_logits(d, reg_max) for d in dists])
        cls_maps[li][0, i, p.box.class_id] = p.box.score
    g = _Graph(opset)
    g.add_input("image", [1, 3, size[1], size[0]])
    for k, arr in enumerate(cls_maps):
        g.emit(f"transpose_{2 * k}.tmp_0", arr)
    for k, arr in enumerate(reg_maps):
        g.emit(f"transpose_{2 * k + 1}.tmp_0", arr)
    path = _save(g.build("paddle_model", {}, _PADDLE), out_dir, "picodet")
    return FormatCase("picodet", path, size, _truth(plants), _LAYOUT_LABELS, {})


_CLS_LABELS = ("cat", "dog", "bird", "fish", "horse")
_CLS_LOGITS = np.array([[0.5, 2.0, -1.0, 3.2, 0.1]], np.float32)  # arg-max 3


def _build_classification_logits(out_dir: Path, opset: int) -> FormatCase:
    """Raw logits, no Softmax in the graph: the Hugging Face optimum image-classification
    export layout (input "pixel_values", output "logits" [1, C]); timm / torchvision exports
    look the same apart from names. No metadata."""
    w, h = CLS_INPUT_SIZE
    g = _Graph(opset)
    g.add_input("pixel_values", [1, 3, h, w])
    g.emit("logits", _CLS_LOGITS)
    path = _save(g.build("main_graph", {}, _TORCH), out_dir, "classification_logits")
    return FormatCase(
        "classification_logits",
        path,
        CLS_INPUT_SIZE,
        (),
        _CLS_LABELS,
        {},
        top1=int(_CLS_LOGITS.argmax()),
    )


def _build_classification_probs(out_dir: Path, opset: int) -> FormatCase:
    """Ultralytics classify export: ``nn/modules/head.py`` Classify.forward returns
    ``x.softmax(1)`` when export=True, so "output0" [1, C] comes out of a real Softmax node;
    input "images"; metadata as exporter.py (task "classify", stride 1)."""
    w, h = CLS_INPUT_SIZE
    z = _CLS_LOGITS - _CLS_LOGITS.max()
    probs = (np.exp(z) / np.exp(z).sum()).astype(np.float32)
    g = _Graph(opset)
    g.add_input("images", [1, 3, h, w])
    g.emit_softmax("output0", probs, axis=1)
    meta = _ultralytics_metadata(
        task="classify",
        stem="YOLOv8n-cls",
        data="imagenet",
        imgsz_hw=(h, w),
        names=_CLS_LABELS,
        stride=1,
    )
    path = _save(g.build("main_graph", meta, _TORCH), out_dir, "classification_probs")
    return FormatCase(
        "classification_probs",
        path,
        CLS_INPUT_SIZE,
        (),
        _CLS_LABELS,
        meta,
        top1=int(_CLS_LOGITS.argmax()),
    )


_BUILDERS: dict[str, Callable[[Path, int], FormatCase]] = {
    "yolov5": _build_yolov5,
    "yolov8": _build_yolov8,
    "yolox": _build_yolox,
    "nms_ultralytics": _build_nms_ultralytics,
    "nms_efficient": _build_nms_efficient,
    "nms_paddle": _build_nms_paddle,
    "ssd": _build_ssd,
    "ssd_paddle": _build_ssd_paddle,
    "picodet": _build_picodet,
    "classification_logits": _build_classification_logits,
    "classification_probs": _build_classification_probs,
}
FORMATS: tuple[str, ...] = tuple(_BUILDERS)


def build_case(name: str, out_dir: Path, *, opset: int = 17) -> FormatCase:
    """Write ``out_dir/<name>.onnx`` for format ``name`` (one of FORMATS) at ``opset``
    (11..21; IR version matched to the opset) and return its description + truth."""
    try:
        builder = _BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known: {FORMATS}") from None
    return builder(Path(out_dir), opset)


def make_feeds(
    case: FormatCase, *, scale_factor: tuple[float, float] = (1.0, 1.0)
) -> dict[str, np.ndarray]:
    """Constant inputs for every graph input: zero images, ``im_shape`` = [[H, W]],
    ``scale_factor`` = [[scale_y, scale_x]] (default [[1, 1]] -> boxes in input pixels)."""
    w, h = case.input_size
    feeds: dict[str, np.ndarray] = {}
    for vi in onnx.load(str(case.path), load_external_data=False).graph.input:
        if vi.name == "im_shape":
            feeds[vi.name] = np.array([[h, w]], np.float32)
        elif vi.name == "scale_factor":
            feeds[vi.name] = np.array([scale_factor], np.float32)
        else:
            feeds[vi.name] = np.zeros((1, 3, h, w), np.float32)
    return feeds


# --------------------------------------------------------------------------------------------
# reference decoders (NumPy ports of each project's own post-processing)


def _iou(box: np.ndarray, others: np.ndarray, plus_one: bool = False) -> np.ndarray:
    e = 1.0 if plus_one else 0.0
    iw = np.maximum(0.0, np.minimum(box[2], others[:, 2]) - np.maximum(box[0], others[:, 0]) + e)
    ih = np.maximum(0.0, np.minimum(box[3], others[:, 3]) - np.maximum(box[1], others[:, 1]) + e)
    inter = iw * ih
    area = (box[2] - box[0] + e) * (box[3] - box[1] + e)
    areas = (others[:, 2] - others[:, 0] + e) * (others[:, 3] - others[:, 1] + e)
    return np.asarray(inter / (area + areas - inter + 1e-12))


def _greedy_nms(
    boxes: np.ndarray, scores: np.ndarray, iou_thr: float, plus_one: bool = False
) -> list[int]:
    """Keep the best, drop IoU > iou_thr, repeat (torchvision.ops.nms / YOLOX nms / hard_nms)."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        order = rest[_iou(boxes[i], boxes[rest], plus_one) <= iou_thr]
    return keep


def _hard_nms(
    box_scores: np.ndarray, iou_thr: float, top_k: int = -1, candidate_size: int = 200
) -> np.ndarray:
    """``hard_nms`` of PaddleDetection deploy/python/picodet_postprocess.py and ultraface
    vision/utils/box_utils.py: rows [x1, y1, x2, y2, score]."""
    scores, boxes = box_scores[:, -1], box_scores[:, :-1]
    picked: list[int] = []
    indexes = np.argsort(scores, kind="stable")[-candidate_size:]
    while len(indexes) > 0:
        current = int(indexes[-1])
        picked.append(current)
        if 0 < top_k == len(picked) or len(indexes) == 1:
            break
        indexes = indexes[:-1]
        indexes = indexes[_iou(boxes[current], boxes[indexes]) <= iou_thr]
    return box_scores[picked, :]


def _xywh2xyxy(x: np.ndarray) -> np.ndarray:
    y: np.ndarray = x.copy()
    y[:, 0], y[:, 1] = x[:, 0] - x[:, 2] / 2, x[:, 1] - x[:, 3] / 2
    y[:, 2], y[:, 3] = x[:, 0] + x[:, 2] / 2, x[:, 1] + x[:, 3] / 2
    return y


def _to_boxes(dets: np.ndarray) -> list[Box]:
    """rows [x1, y1, x2, y2, score, class] -> Boxes by descending score."""
    out = [
        Box((float(d[0]), float(d[1]), float(d[2]), float(d[3])), round(float(d[5])), float(d[4]))
        for d in dets
    ]
    return sorted(out, key=lambda b: -b.score)


def _batched_nms(x: np.ndarray, conf: float, iou: float) -> np.ndarray:
    """Core of Ultralytics / YOLOv5 non_max_suppression for rows [x1, y1, x2, y2, conf, cls]:
    sort by conf, offset boxes by class * max_wh (class-aware), torchvision nms."""
    x = x[x[:, 4] > conf]
    x = x[np.argsort(-x[:, 4], kind="stable")]
    offset = x[:, 5:6] * 7680.0  # max_wh
    keep = _greedy_nms(x[:, :4] + offset, x[:, 4], iou)
    return x[keep]


def _ref_yolov5(o: dict[str, np.ndarray], conf: float, iou: float) -> list[Box]:
    # ultralytics/yolov5 utils/general.py non_max_suppression (multi_label=False)
    x = o["output0"][0].astype(np.float64)
    x = x[x[:, 4] > conf]  # xc: objectness candidates
    x[:, 5:] *= x[:, 4:5]  # conf = obj_conf * cls_conf
    box = _xywh2xyxy(x[:, :4])
    j = x[:, 5:].argmax(1)
    c = x[np.arange(len(x)), 5 + j]
    return _to_boxes(_batched_nms(np.column_stack([box, c, j]), conf, iou))


def _ref_yolov8(o: dict[str, np.ndarray], conf: float, iou: float) -> list[Box]:
    # Ultralytics utils/nms.py non_max_suppression: (1, 4+nc, A) -> (A, 4+nc), no objectness
    x = o["output0"][0].T.astype(np.float64)
    x = x[x[:, 4:].max(1) > conf]
    j = x[:, 4:].argmax(1)
    c = x[np.arange(len(x)), 4 + j]
    return _to_boxes(_batched_nms(np.column_stack([_xywh2xyxy(x[:, :4]), c, j]), conf, iou))


def _ref_yolox(case: FormatCase, o: dict[str, np.ndarray], conf: float, iou: float) -> list[Box]:
    # YOLOX demo/ONNXRuntime/onnx_inference.py: demo_postprocess + multiclass_nms (default
    # class_agnostic=True, nms with the +1 area convention)
    w, h = case.input_size
    outputs = o["output"].astype(np.float64).copy()
    grids, expanded = [], []
    for s in (8, 16, 32):
        xv, yv = np.meshgrid(np.arange(w // s), np.arange(h // s))
        grid = np.stack((xv, yv), 2).reshape(1, -1, 2)
        grids.append(grid)
        expanded.append(np.full((*grid.shape[:2], 1), s))
    g, st = np.concatenate(grids, 1), np.concatenate(expanded, 1)
    outputs[..., :2] = (outputs[..., :2] + g) * st
    outputs[..., 2:4] = np.exp(outputs[..., 2:4]) * st
    pred = outputs[0]
    boxes = _xywh2xyxy(pred[:, :4])
    scores = pred[:, 4:5] * pred[:, 5:]
    cls_inds = scores.argmax(1)
    cls_scores = scores[np.arange(len(cls_inds)), cls_inds]
    m = cls_scores > conf
    b, sc, ci = boxes[m], cls_scores[m], cls_inds[m]
    keep = _greedy_nms(b, sc, iou, plus_one=True)
    return _to_boxes(np.column_stack([b[keep], sc[keep], ci[keep]]))


def _ref_nms_ultralytics(o: dict[str, np.ndarray], conf: float) -> list[Box]:
    # Ultralytics utils/nms.py: end2end / (1, 300, 6) -> pred[pred[:, 4] > conf_thres]
    pred = o["output0"][0].astype(np.float64)
    return _to_boxes(pred[pred[:, 4] > conf])


def _ref_nms_efficient(o: dict[str, np.ndarray], conf: float) -> list[Box]:
    # EfficientNMS_TRT contract: only the first num_dets rows are valid
    k = int(o["num_dets"][0, 0])
    b = o["det_boxes"][0, :k].astype(np.float64)
    s = o["det_scores"][0, :k].astype(np.float64)
    c = o["det_classes"][0, :k].astype(np.float64)
    dets = np.column_stack([b, s, c])
    return _to_boxes(dets[dets[:, 4] > conf])


def _ref_nms_paddle(o: dict[str, np.ndarray], conf: float) -> list[Box]:
    # PaddleDetection deploy/python/infer.py: rows [class, score, x1, y1, x2, y2];
    # keep score > threshold and class > -1 (boxes are input pixels when scale_factor = 1)
    k = int(o["multiclass_nms3_0.tmp_2"].sum())
    r = o["multiclass_nms3_0.tmp_0"][:k].astype(np.float64)
    r = r[(r[:, 1] > conf) & (r[:, 0] > -1)]
    return _to_boxes(np.column_stack([r[:, 2:6], r[:, 1], r[:, 0]]))


def _ref_ssd(case: FormatCase, o: dict[str, np.ndarray], conf: float, iou: float) -> list[Box]:
    # Ultra-Light-Fast-Generic-Face-Detector run_ultra_light_face_detector.py predict():
    # per class from column 1, probs > threshold, hard_nms, then scale by (width, height)
    w, h = case.input_size
    boxes, confidences = o["boxes"][0].astype(np.float64), o["scores"][0].astype(np.float64)
    picked: list[np.ndarray] = []
    labels: list[int] = []
    for class_index in range(1, confidences.shape[1]):
        probs = confidences[:, class_index]
        mask = probs > conf
        if not mask.any():
            continue
        bp = _hard_nms(np.column_stack([boxes[mask], probs[mask]]), iou)
        picked.append(bp)
        labels.extend([class_index] * len(bp))
    if not picked:
        return []
    p = np.concatenate(picked)
    p[:, [0, 2]] *= w
    p[:, [1, 3]] *= h
    return _to_boxes(np.column_stack([p, np.array(labels, np.float64)]))


def _ref_ssd_paddle(o: dict[str, np.ndarray], conf: float, iou: float) -> list[Box]:
    # Paddle multiclass_nms semantics: per class, score > threshold, greedy NMS
    boxes, scores = o["tmp_16"][0].astype(np.float64), o["concat_14.tmp_0"][0].astype(np.float64)
    rows: list[np.ndarray] = []
    for c in range(scores.shape[0]):
        m = scores[c] > conf
        b, s = boxes[m], scores[c][m]
        keep = _greedy_nms(b, s, iou)
        rows.extend(np.array([*b[i], s[i], c]) for i in keep)
    return _to_boxes(np.array(rows).reshape(-1, 6))


def _ref_picodet(case: FormatCase, outs: list[np.ndarray], conf: float, iou: float) -> list[Box]:
    # rapid_layout model_handler/pp/post_process.py PPPostProcess (== PaddleDetection
    # deploy/python/picodet_postprocess.py PicoDetPostProcess) with scale_factor 1
    w, h = case.input_size
    num_outs = len(outs) // 2
    scores_l, raw_boxes = outs[:num_outs], outs[num_outs:]
    reg_max = int(raw_boxes[0].shape[-1] / 4 - 1)
    decode_boxes, select_scores = [], []
    for stride, box_distribute, score in zip((8, 16, 32, 64), raw_boxes, scores_l, strict=True):
        box_distribute, score = box_distribute[0].astype(np.float64), score[0].astype(np.float64)
        ww, hh = np.meshgrid(np.arange(w / stride), np.arange(h / stride))
        ct_row, ct_col = (hh.flatten() + 0.5) * stride, (ww.flatten() + 0.5) * stride
        center = np.stack((ct_col, ct_row, ct_col, ct_row), axis=1)
        d = box_distribute.reshape((-1, reg_max + 1))
        e = np.exp(d - d.max(axis=1, keepdims=True))
        d = e / e.sum(axis=1, keepdims=True)
        dist = (d * np.arange(reg_max + 1)[None]).sum(axis=1).reshape((-1, 4)) * stride
        topk = np.argsort(score.max(axis=1))[::-1][:1000]
        decode_boxes.append(center[topk] + np.array([-1, -1, 1, 1]) * dist[topk])
        select_scores.append(score[topk])
    bboxes, confidences = np.concatenate(decode_boxes), np.concatenate(select_scores)
    picked: list[np.ndarray] = []
    labels: list[int] = []
    for class_index in range(confidences.shape[1]):
        probs = confidences[:, class_index]
        mask = probs > conf
        if not mask.any():
            continue
        bp = _hard_nms(np.column_stack([bboxes[mask], probs[mask]]), iou, top_k=100)
        picked.append(bp)
        labels.extend([class_index] * len(bp))
    if not picked:
        return []
    p = np.concatenate(picked)
    p[:, [0, 2]] = p[:, [0, 2]].clip(0, w)  # warp_boxes clip to the (unscaled) image
    p[:, [1, 3]] = p[:, [1, 3]].clip(0, h)
    return _to_boxes(np.column_stack([p, np.array(labels, np.float64)]))


def reference_decode(
    case: FormatCase,
    outputs: list[np.ndarray],
    *,
    conf: float = SCORE_THRESHOLD,
    iou: float = IOU_THRESHOLD,
) -> list[Box]:
    """Decode ``outputs`` (in the model's output order, as ``session.run(None, feeds)`` returns
    them; for the Paddle formats run with scale_factor [[1, 1]]) with the exporter project's
    published post-processing. Boxes in input pixels, by descending score. Classification
    cases return [] (see ``reference_top1``)."""
    names = [vi.name for vi in onnx.load(str(case.path), load_external_data=False).graph.output]
    o = dict(zip(names, outputs, strict=True))
    if case.name == "yolov5":
        return _ref_yolov5(o, conf, iou)
    if case.name == "yolov8":
        return _ref_yolov8(o, conf, iou)
    if case.name == "yolox":
        return _ref_yolox(case, o, conf, iou)
    if case.name == "nms_ultralytics":
        return _ref_nms_ultralytics(o, conf)
    if case.name == "nms_efficient":
        return _ref_nms_efficient(o, conf)
    if case.name == "nms_paddle":
        return _ref_nms_paddle(o, conf)
    if case.name == "ssd":
        return _ref_ssd(case, o, conf, iou)
    if case.name == "ssd_paddle":
        return _ref_ssd_paddle(o, conf, iou)
    if case.name == "picodet":
        return _ref_picodet(case, outputs, conf, iou)
    if case.name.startswith("classification"):
        return []
    raise ValueError(f"no reference decoder for {case.name!r}")


def reference_top1(case: FormatCase, outputs: list[np.ndarray]) -> int | None:
    """Arg-max class of a classification case's [1, C] output; None for detection cases."""
    if not case.name.startswith("classification"):
        return None
    return int(np.argmax(outputs[0][0]))


def boxes_match(
    got: Sequence[Box], want: Sequence[Box], *, px: float = 0.5, score_tol: float = 1e-3
) -> str | None:
    """None when ``got`` equals ``want`` up to order (coords within ``px``, same class, score
    within ``score_tol``); otherwise a description of the first difference."""
    g = sorted(got, key=lambda b: -b.score)
    w = sorted(want, key=lambda b: -b.score)
    if len(g) != len(w):
        return f"{len(g)} boxes, want {len(w)}: {g} vs {w}"
    for a, b in zip(g, w, strict=True):
        if (
            a.class_id != b.class_id
            or abs(a.score - b.score) > score_tol
            or any(abs(p - q) > px for p, q in zip(a.xyxy, b.xyxy, strict=True))
        ):
            return f"{a} != {b}"
    return None


# --------------------------------------------------------------------------------------------
# self-check


def _self_check() -> int:
    import onnxruntime as ort

    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="fmt_") as tmp:
        for label in ("default", "minimum"):
            for name in FORMATS:
                opset = 17 if label == "default" else (11 if name == "yolox" else 12)
                case = build_case(name, Path(tmp) / str(opset), opset=opset)
                model = onnx.load(str(case.path))
                assert model.opset_import[0].version == opset
                assert model.ir_version == _IR_FOR_OPSET[opset]
                assert {p.key: p.value for p in model.metadata_props} == case.metadata
                sess = ort.InferenceSession(str(case.path), providers=["CPUExecutionProvider"])
                outs = [np.asarray(x) for x in sess.run(None, make_feeds(case))]
                got = reference_decode(case, outs)
                err = boxes_match(got, case.boxes)
                if err is None and reference_top1(case, outs) != case.top1:
                    err = f"top1 {reference_top1(case, outs)} != {case.top1}"
                if name == "classification_probs" and err is None:
                    assert abs(float(outs[0].sum()) - 1.0) < 1e-5
                if name in ("nms_paddle", "ssd_paddle") and err is None:
                    sf = (0.5, 2.0)  # [scale_y, scale_x]: boxes must come out divided by it
                    scaled = sess.run(None, make_feeds(case, scale_factor=sf))
                    k = 2 if name == "nms_paddle" else 0
                    a, b = np.asarray(scaled[0]), outs[0]
                    div = np.array([sf[1], sf[0], sf[1], sf[0]], np.float32)
                    if not np.allclose(a[..., k : k + 4], b[..., k : k + 4] / div, atol=1e-4):
                        err = "scale_factor not applied as a divisor"
                status = "ok" if err is None else f"FAIL {err}"
                print(f"opset {opset:2d} {name:22s} {len(got)} boxes  {status}")
                if err is not None:
                    failures.append(f"{name}@{opset}: {err}")
    print("all ok" if not failures else "\n".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_self_check())
