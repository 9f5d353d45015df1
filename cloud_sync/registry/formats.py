"""Pure: tell a model's task, output format, input contract and labels from its signature.

``infer_format`` looks at what an exporter leaves in the ONNX file: metadata (Ultralytics
writes ``author``, ``task``, ``imgsz``, ``stride``, ``names``, ``args``; ultralytics/yolov5
``stride`` and ``names``; Paddle models a ``character`` list), the output shapes, and the
operator that produces each output (a final ``Softmax`` means probabilities). It returns card
fields, each with the reason it was chosen, or raises ``FormatError`` listing the shapes it saw
and the formats it tried. Explicit card fields and flags always win (``publish`` applies them
over what is inferred).

Grid arithmetic tells the YOLO families apart when metadata does not: on a W x H input with
strides 8/16/32 there are ``cells = sum(ceil(H/s) * ceil(W/s))`` grid cells; YOLOX has one
candidate per cell (N = cells, rows of 5+C), YOLOv5/v7 three anchors per cell (N = 3 * cells),
YOLOv8/v11 one per cell with attributes first ((1, 4+C, N)).
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FORMAT_NAMES",
    "FormatError",
    "Inferred",
    "ModelSignature",
    "TensorInfo",
    "infer_format",
    "labels_from_metadata",
]

FORMAT_NAMES = (
    "classification",
    "heatmap",
    "yolov5",
    "yolov8",
    "yolox",
    "nms",
    "boxes_scores",
    "picodet",
    "raw",
)
"""What ``--format`` takes: a detection format, or a task whose outputs need no format."""

Dim = int | str | None
_IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
_YOLO_INPUT = {"resize": "letterbox", "pad_value": 114, "color": "rgb", "scale": 1 / 255}
_INPUTS = {  # input contract per format family, from each exporter's own pre-processing
    "ultralytics": _YOLO_INPUT,  # ultralytics LetterBox(center=True), BGR→RGB, /255
    "yolov5": _YOLO_INPUT,  # yolov5 utils/augmentations.py letterbox(color=114), /255
    # YOLOX data_augment.preproc: top-left letterbox, pad 114, BGR, 0..255 (no /255 since 0.2)
    "yolox": {
        "resize": "letterbox",
        "pad_position": "top_left",
        "pad_value": 114,
        "color": "bgr",
        "scale": 1.0,
    },
    # PaddleDetection infer_cfg.yml for PicoDet: Resize keep_ratio false, /255, ImageNet norm
    "paddle": {"resize": "stretch", "color": "rgb", "scale": 1 / 255, **_IMAGENET},
}
_NMS_MAX_ROWS = 1000  # an NMS output holds at most max_det rows; grid outputs hold thousands


class FormatError(ValueError):
    """The format could not be told; the message lists the shapes and the formats tried."""


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str


@dataclass(frozen=True)
class ModelSignature:
    """What inference reads from an ONNX file."""

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    metadata: dict[str, str] = field(default_factory=dict)
    producer: str = ""
    output_ops: tuple[str, ...] = ()  # op type producing each output ("" unknown)
    opset: int = 0


@dataclass
class Inferred:
    """Card fields inferred for a model, each with why."""

    task: str
    input: dict[str, Any]
    postprocess: dict[str, Any]
    labels: tuple[str, ...]
    image_input: str
    reasons: list[str]


def _static(d: Dim) -> int | None:
    """A fixed dimension, or None; digit strings count (yolov7's export writes "100")."""
    if isinstance(d, str) and d.isdigit():
        d = int(d)
    return d if isinstance(d, int) and d > 0 else None


def _fmt_shapes(ts: tuple[TensorInfo, ...]) -> str:
    return ", ".join(f"{t.name} {list(t.shape)}" for t in ts)


def labels_from_metadata(meta: dict[str, str]) -> tuple[tuple[str, ...], str]:
    """Class names an exporter left in the metadata, and the key they came from.

    Ultralytics and yolov5 write ``names`` as ``str(dict)`` (``{0: 'person', ...}``); Paddle OCR
    models carry ``character`` (one per line); ``labels``/``classes`` as JSON lists are read too.
    """
    for key in ("names", "labels", "classes"):
        text = meta.get(key)
        if not text:
            continue
        value: Any
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            try:
                value = json.loads(text)
            except ValueError:
                value = [s.strip() for s in text.split(",")] if "," in text else None
        if isinstance(value, dict):
            try:
                items = sorted((int(k), str(v)) for k, v in value.items())
            except (TypeError, ValueError):
                continue
            if [k for k, _ in items] == list(range(len(items))):
                return tuple(v for _, v in items), key
        elif isinstance(value, (list, tuple)) and value:
            return tuple(str(v) for v in value), key
    text = meta.get("character")
    if text:
        chars = tuple(text.splitlines())
        if chars:
            return chars, "character"
    return (), ""


def _imgsz(meta: dict[str, str]) -> tuple[int, int] | None:
    """(width, height) from Ultralytics' ``imgsz`` (written as [h, w])."""
    text = meta.get("imgsz")
    if not text:
        return None
    try:
        v = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return (int(v[1]), int(v[0]))
    return None


def _cells(w: int, h: int, strides: tuple[int, ...] = (8, 16, 32)) -> int:
    return sum(-(-h // s) * -(-w // s) for s in strides)


def _image_input(sig: ModelSignature, constants: set[str]) -> TensorInfo:
    images = [t for t in sig.inputs if t.name not in constants and len(t.shape) == 4]
    if len(images) != 1:
        raise FormatError(
            f"cannot tell the image input among {_fmt_shapes(sig.inputs)}: expected exactly one "
            "rank-4 input besides the constants"
        )
    return images[0]


def _size(
    image: TensorInfo, meta: dict[str, str], given: tuple[int, int] | None
) -> tuple[int | None, int | None, str]:
    shape = image.shape
    h, w = (shape[1], shape[2]) if _nhwc(shape) else (shape[2], shape[3])
    if _static(h) and _static(w):
        return _static(w), _static(h), "the input shape"
    if given:
        return given[0], given[1], "--input-size"
    imgsz = _imgsz(meta)
    if imgsz:
        return imgsz[0], imgsz[1], "metadata imgsz"
    return None, None, ""


def _nhwc(shape: tuple[Dim, ...]) -> bool:
    """A rank-4 image input with channels last: (1, H, W, 1|3)."""
    return _static(shape[3]) in (1, 3) and _static(shape[1]) not in (1, 3)


def _paddle_constants(sig: ModelSignature, w: int, h: int) -> list[dict[str, Any]]:
    """PaddleDetection's extra inputs: ``im_shape`` = [[H, W]] of the model input and
    ``scale_factor`` = [[1, 1]], so the model's boxes stay in model-input pixels (the agent maps
    them to the frame itself)."""
    out = []
    for t in sig.inputs:
        if t.name == "im_shape":
            out.append({"name": t.name, "shape": [1, 2], "dtype": "float32", "values": [h, w]})
        elif t.name == "scale_factor":
            out.append({"name": t.name, "shape": [1, 2], "dtype": "float32", "values": [1, 1]})
    return out


def infer_format(
    sig: ModelSignature,
    *,
    fmt: str | None = None,
    input_size: tuple[int, int] | None = None,
    constants: tuple[str, ...] = (),
) -> Inferred:
    """Infer task, format, input contract and labels.

    Args:
        sig: the model's signature.
        fmt: a format the operator named (``FORMAT_NAMES``); its family still picks the
            input contract.
        input_size: ``(width, height)`` for a dynamic input.
        constants: input names the operator already gives values for.

    Returns:
        The card fields and one reason per choice.

    Raises:
        FormatError: the format cannot be told (message: shapes seen, formats tried), or
            ``fmt`` is not one of ``FORMAT_NAMES``.
    """
    if fmt is not None and fmt not in FORMAT_NAMES:
        raise FormatError(f"format {fmt!r} is not one of {', '.join(FORMAT_NAMES)}")
    meta = sig.metadata
    reasons: list[str] = []
    labels, label_key = labels_from_metadata(meta)
    if labels:
        reasons.append(f"labels: {len(labels)} from metadata '{label_key}'")
    paddle_inputs = {t.name for t in sig.inputs} & {"im_shape", "scale_factor"}
    image = _image_input(sig, set(constants) | paddle_inputs)
    w, h, size_from = _size(image, meta, input_size)
    inp: dict[str, Any] = {}
    if w and h:
        inp.update(width=w, height=h)
        reasons.append(f"input size {w}x{h} from {size_from}")
    nhwc = _nhwc(image.shape)
    channels = _static(image.shape[3] if nhwc else image.shape[1])
    if nhwc:
        inp["layout"] = "nhwc"
    if channels == 1:
        inp.update(channels=1, color="gray")
    if paddle_inputs and w and h:
        inp["constants"] = _paddle_constants(sig, w, h)
        reasons.append(f"constant inputs {sorted(paddle_inputs)} (PaddleDetection)")

    ultralytics = "ultralytics" in meta.get("author", "").lower() or (
        "task" in meta and "imgsz" in meta
    )
    yolov5_meta = not ultralytics and "stride" in meta and "names" in meta
    family = (
        "ultralytics"
        if ultralytics
        else "yolov5"
        if yolov5_meta
        else "paddle"
        if paddle_inputs
        else ""
    )
    task, post, why = _task_and_format(sig, fmt, meta, ultralytics, w, h, labels)
    reasons.append(why)
    fmt_name = post.get("format", task)
    if fmt_name == "yolox":
        family = "yolox"
    elif fmt_name == "picodet":
        family = "paddle"
    elif fmt_name in ("yolov8", "yolov5") and not family:
        family = "ultralytics" if fmt_name == "yolov8" else "yolov5"
    if family in _INPUTS and channels != 1:
        inp = {**_INPUTS[family], **inp}
        reasons.append(f"input contract of the {family} exporter")
    return Inferred(task, inp, post, labels, image.name, reasons)


def _task_and_format(
    sig: ModelSignature,
    fmt: str | None,
    meta: dict[str, str],
    ultralytics: bool,
    w: int | None,
    h: int | None,
    labels: tuple[str, ...],
) -> tuple[str, dict[str, Any], str]:
    """(task, postprocess fields, reason)."""
    outs = sig.outputs
    if fmt in ("classification", "heatmap", "raw"):
        return (
            fmt,
            _classification_post(sig) if fmt == "classification" else {},
            (f"task {fmt} (given)"),
        )
    if fmt is not None:
        return "detection", _detection_post(sig, fmt), f"format {fmt} (given)"
    if ultralytics:
        t = meta.get("task", "detect")
        if t == "classify":
            return "classification", _classification_post(sig), "Ultralytics classify model"
        if t == "segment" and labels and len(outs[0].shape) == 3:
            attrs = _static(outs[0].shape[1])
            if attrs is not None and attrs > 4 + len(labels):
                post = _detection_post(sig, "yolov8")
                post["extra_attributes"] = attrs - 4 - len(labels)
                why = (
                    f"Ultralytics segment model: yolov8 boxes, {post['extra_attributes']} mask "
                    "coefficients skipped (masks are not decoded)"
                )
                return "detection", post, why
        if t == "detect":
            args = meta.get("args", "")
            nms = (_single(outs) and outs[0].shape[-1] == 6) or "'nms': True" in args
            nms = nms or meta.get("end2end", "").lower() == "true"
            f = "nms" if nms else "yolov8"
            return "detection", _detection_post(sig, f), f"Ultralytics detect model: {f}"
        raise FormatError(
            f"Ultralytics task {t!r} is not supported (detect and classify are); publish it "
            "with --format raw to run it without a reader"
        )
    guess = _guess(sig, w, h, labels)
    if guess is not None:
        task, f, why = guess
        post = (
            _classification_post(sig)
            if task == "classification"
            else (_detection_post(sig, f) if task == "detection" else {})
        )
        return task, post, why
    size = f"{w}x{h}" if w and h else "a dynamic size (give --input-size WxH)"
    raise FormatError(
        f"cannot tell the output format from outputs {_fmt_shapes(outs)} on an input of {size}; "
        "tried classification ((1, C)), heatmap ((1, 1, h, w)), yolov5 ((1, 3*cells, 5+C)), "
        "yolov8 ((1, 4+C, cells)), yolox ((1, cells, 5+C)), nms ((1, K, 6|7) or boxes/scores/"
        "classes), boxes_scores ((1, N, 4) + (1, N, C)), picodet (scores + DFL per stride), "
        f"where cells = {_cells(w, h) if w and h else '?'} for strides 8/16/32; name one with "
        f"--format {{{','.join(FORMAT_NAMES)}}}"
    )


def _single(outs: tuple[TensorInfo, ...]) -> bool:
    return len(outs) == 1


def _classification_post(sig: ModelSignature) -> dict[str, Any]:
    op = sig.output_ops[0] if sig.output_ops else ""
    return {"softmax": op not in ("Softmax", "Sigmoid", "LogSoftmax")}


def _detection_post(sig: ModelSignature, f: str) -> dict[str, Any]:
    post: dict[str, Any] = {"format": f}
    outs = sig.outputs
    if f == "yolov8":
        post["has_objectness"] = False
    if f == "nms" and len(outs) == 2 and outs[0].shape[-1] == 6 and len(outs[0].shape) == 2:
        post["nms_layout"] = "class_score_xyxy"  # PaddleDetection multiclass_nms3 + count
    elif f == "nms" and _single(outs) and outs[0].shape[-1] == 7:
        post["nms_layout"] = "batch_xyxy_class_score"
    if f in ("nms", "boxes_scores"):
        post["box_format"] = "xyxy"
    if f == "picodet":
        bins = {_static(o.shape[-1]) for o in outs} - {None}
        regs = sorted(b for b in bins if b is not None and b % 4 == 0 and b >= 8)
        reg = 32 if 32 in regs else (regs[-1] if regs else None)  # PicoDet's reg_max is 7
        if reg is not None:
            post["reg_max"] = reg // 4 - 1
        post["strides"] = [8, 16, 32, 64][: len(outs) // 2] if len(outs) // 2 <= 4 else []
    return post


def _guess(
    sig: ModelSignature, w: int | None, h: int | None, labels: tuple[str, ...]
) -> tuple[str, str, str] | None:
    """(task, format, reason) from output shapes alone, or None."""
    outs = sig.outputs
    # A dynamic leading batch axis is read as batch 1 (exporters often leave it dynamic).
    shapes = [
        tuple(
            1 if i == 0 and _static(d) is None and len(o.shape) >= 2 else _static(d)
            for i, d in enumerate(o.shape)
        )
        for o in outs
    ]
    if len(outs) == 1:
        s = shapes[0]
        nonone = [d for d in s if d != 1]
        one = len(nonone) == 1 and nonone[0] is not None and nonone[0] > 1
        if one and (len(s) == 2 or (len(s) == 4 and s[2] == 1 and s[3] == 1)):
            return "classification", "", f"one output {list(outs[0].shape)}: class scores"
        if len(s) in (3, 4) and s[0] == 1 and (len(s) == 3 or s[1] == 1):
            hw = s[-2:]
            if (w and h and hw in ((h, w), (h // 4, w // 4))) or (
                hw[0] is None and hw[1] is None and len(outs[0].shape) == 4
            ):
                return "heatmap", "", f"one output {list(outs[0].shape)}: a probability map"
        if len(s) in (2, 3):
            a, b = s[-2], s[-1]
            cells = _cells(w, h) if w and h else None
            if b in (6, 7) and a is not None and a <= _NMS_MAX_ROWS and a != cells:
                return "detection", "nms", f"output {list(outs[0].shape)}: rows of {b}, NMS done"
            if cells and a == cells and b and b > 5:
                return "detection", "yolox", f"(1, {a}, {b}): one row per grid cell = YOLOX"
            if cells and a == 3 * cells and b and b > 5:
                return "detection", "yolov5", f"(1, {a}, {b}): 3 anchors per cell = YOLOv5/v7"
            if cells and b == cells and a and a > 4:
                return "detection", "yolov8", f"(1, {a}, {b}): attributes first = YOLOv8/v11"
        return None
    if _picodet(shapes):
        return "detection", "picodet", f"{len(outs)} outputs: scores + DFL per stride = PicoDet"
    box4 = [i for i, s in enumerate(shapes) if len(s) >= 2 and s[-1] == 4]
    if len(box4) > 1:  # scores of 3 classes + background end in 4 too: go by name
        box4 = [i for i in box4 if any(k in outs[i].name.lower() for k in ("box", "loc"))]
    if len(box4) == 1:
        n = shapes[box4[0]][-2]
        others = [s for i, s in enumerate(shapes) if i != box4[0]]
        vecs = [s for s in others if len([d for d in s if d != 1]) <= 1]
        if len(others) in (2, 3) and len(vecs) == len(others):
            return "detection", "nms", "boxes, scores, classes outputs: NMS done (EfficientNMS)"
        if any(len(s) == 3 and n in s[1:] for s in others):
            return "detection", "boxes_scores", "boxes (1, N, 4) + scores: SSD-style"
    if len(outs) == 2 and len(shapes[0]) == 2 and shapes[0][-1] == 6:
        return "detection", "nms", "(N, 6) + count: PaddleDetection multiclass_nms"
    return None


def _picodet(shapes: list[tuple[int | None, ...]]) -> bool:
    if len(shapes) % 2 or len(shapes) < 6 or any(len(s) != 3 for s in shapes):
        return False
    lasts = {s[-1] for s in shapes}
    return len(lasts) == 2 and any(x is not None and x % 4 == 0 and x >= 8 for x in lasts)
