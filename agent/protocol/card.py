"""Pure: the model card, the description of a model version that rides with it.

A card says what the model does (task), what it eats (input spec: size, layout, colour order,
scaling) and how to read its outputs (post-processing parameters). It is written at publish time
and signed with the model in the registry; a bare local ONNX file gets a card derived from the
model's own input shape and the pipeline's config.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Task = Literal["classification", "detection", "heatmap", "raw"]
Precision = Literal["fp32", "fp16", "int8"]
DetectionFormat = Literal["yolov5", "yolov8", "yolox", "nms", "boxes_scores", "picodet"]
"""How a detector's outputs are laid out (``agent.pipeline.detect`` has one decoder each):

- ``yolov5``: one output (1, N, 5+C) rows ``[cx, cy, w, h, obj, cls...]`` in input pixels
  (YOLOv5, YOLOv7, YOLOX exported with ``--decode_in_inference``); (1, 5+C, N) is read too.
- ``yolov8``: one output (1, 4+C, N), ``[cx, cy, w, h, cls...]``, no objectness (YOLOv8/v11).
- ``yolox``: one output (1, N, 5+C) of raw grid offsets, decoded on ``strides``.
- ``nms``: NMS inside the model: one output (1, K, 6) / (K, 6) / (K, 7) laid out as
  ``nms_layout``, or several (boxes, scores, classes, optional count).
- ``boxes_scores``: SSD-style boxes (1, N, 4) and scores (1, N, C) or (1, C, N), NMS here.
- ``picodet``: PaddleDetection raw heads, per stride scores (1, HW, C) and DFL distances
  (1, HW, 4*(reg_max+1)).
"""
NmsLayout = Literal["xyxy_score_class", "class_score_xyxy", "batch_xyxy_class_score"]


class ConstantInput(BaseModel):
    """An extra model input that takes the same value on every frame."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256, description="Graph input name")
    shape: tuple[int, ...] = Field(max_length=8, description="Tensor shape, e.g. [1, 2]")
    dtype: Literal["float32", "int32", "int64"] = Field("float32", description="Tensor dtype")
    values: tuple[float, ...] = Field(max_length=4096, description="Values, row-major")

    @model_validator(mode="after")
    def _check(self) -> ConstantInput:
        n = 1
        for d in self.shape:
            if not 1 <= d <= 4096:
                raise ValueError(f"constant {self.name!r}: dimension {d} is not in 1..4096")
            n *= d
        if n != len(self.values):
            raise ValueError(
                f"constant {self.name!r} has {len(self.values)} values, shape "
                f"{list(self.shape)} needs {n}"
            )
        return self


class InputSpec(BaseModel):
    """How a camera frame becomes the model's input tensor."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    width: int = Field(ge=1, le=8192, description="Model input width in pixels")
    height: int = Field(ge=1, le=8192, description="Model input height in pixels")
    channels: Literal[1, 3] = Field(3, description="1 = grayscale, 3 = colour")
    color: Literal["rgb", "bgr", "gray"] = Field(
        "rgb", description="Channel order the model expects"
    )
    layout: Literal["nchw", "nhwc"] = Field("nchw", description="Tensor layout")
    resize: Literal["letterbox", "stretch", "center_crop"] = Field(
        "letterbox",
        description="letterbox keeps aspect ratio and pads; stretch distorts; center_crop "
        "scales the short side to size / crop_ratio and cuts the centre (ImageNet classifiers)",
    )
    crop_ratio: float = Field(
        0.875, gt=0.0, le=1.0, description="center_crop: input size / resized short side"
    )
    pad_value: int = Field(114, ge=0, le=255, description="Letterbox padding grey level")
    scale: float = Field(1.0 / 255.0, gt=0, description="Pixel value multiplier applied first")
    mean: tuple[float, ...] = Field((0.0,), description="Subtracted after scaling, per channel")
    std: tuple[float, ...] = Field((1.0,), description="Divided after mean, per channel")
    dtype: Literal["float32", "float16", "uint8"] = Field("float32", description="Input dtype")
    pad_position: Literal["center", "top_left"] = Field(
        "center",
        description="letterbox: picture centred (Ultralytics) or at the top-left corner (YOLOX)",
    )
    constants: tuple[ConstantInput, ...] = Field(
        (),
        max_length=8,
        description="Extra model inputs fed the same value every frame (PaddleDetection's "
        "im_shape / scale_factor)",
    )

    @model_validator(mode="after")
    def _check(self) -> InputSpec:
        if (self.color == "gray") != (self.channels == 1):
            raise ValueError(f"color={self.color!r} does not match channels={self.channels}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if len(v) not in (1, self.channels):
                raise ValueError(f"{name} has {len(v)} values, expected 1 or {self.channels}")
        if any(s == 0 for s in self.std):
            raise ValueError("std must not contain 0")
        return self


class PostprocessSpec(BaseModel):
    """Parameters for reading outputs, by task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    top_k: int = Field(5, ge=1, le=1000, description="classification: results to keep")
    softmax: bool = Field(
        False, description="classification: apply softmax (set when the model outputs logits)"
    )
    score_threshold: float = Field(0.25, ge=0.0, le=1.0, description="detection/heatmap: min score")
    iou_threshold: float = Field(0.45, ge=0.0, le=1.0, description="detection: NMS IoU threshold")
    max_detections: int = Field(100, ge=1, le=10000, description="detection: results to keep")
    class_agnostic_nms: bool = Field(
        False,
        description="detection: NMS across classes (a box suppresses overlapping boxes of "
        "any class), as YOLOX's demo and several exporters' references do",
    )
    box_format: Literal["cxcywh", "xyxy"] = Field("cxcywh", description="detection: box encoding")
    has_objectness: bool = Field(
        True, description="detection: rows are [box, obj, cls...] (YOLOv5) vs [box, cls...] (v8)"
    )
    format: DetectionFormat | None = Field(
        None,
        description="detection: output layout; None (cards before formats) = yolov5 when "
        "has_objectness else yolov8",
    )
    strides: tuple[int, ...] = Field(
        (), max_length=8, description="yolox/picodet: feature strides, e.g. [8, 16, 32]"
    )
    reg_max: int = Field(7, ge=1, le=64, description="picodet: DFL bins - 1")
    extra_attributes: int = Field(
        0,
        ge=0,
        le=4096,
        description="yolov5/yolov8: values after the class scores to skip (YOLOv8-seg's 32 "
        "mask coefficients, pose keypoints)",
    )
    nms_layout: NmsLayout = Field(
        "xyxy_score_class", description="nms: column order of a single (K, 6|7) output"
    )
    box_normalized: bool = Field(
        False, description="boxes are fractions of the input size (0..1), not input pixels"
    )
    background_class: bool = Field(
        False, description="boxes_scores: score column 0 is the background class (SSD)"
    )

    @property
    def detection_format(self) -> DetectionFormat:
        """The format in force: ``format``, or what ``has_objectness`` meant before it."""
        if self.format is not None:
            return self.format
        return "yolov5" if self.has_objectness else "yolov8"

    heatmap_threshold: float = Field(0.3, ge=0.0, le=1.0, description="heatmap: pixel threshold")
    min_area: int = Field(4, ge=0, description="heatmap: smallest region kept, in map pixels")


class VariantSpec(BaseModel):
    """One precision variant of a model version (a target file in the registry)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    precision: Precision
    file: str = Field(description="Target file name, e.g. model.int8.onnx")
    sha256: str = Field("", description="Hex sha256 of the file")
    accuracy: float | None = Field(
        None, description="Top-1 agreement (classification) or 1 - relative error vs FP32"
    )
    opset: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Default-domain opset of this file; an INT8 variant of a model below "
        "opset 13 was converted to 13 first (QDQ per channel needs it)",
    )


class ModelCard(BaseModel):
    """Everything the device needs to run a model version."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field("0.0.0", description="Semantic version")
    task: Task = "raw"
    input: InputSpec
    postprocess: PostprocessSpec = Field(default_factory=PostprocessSpec)
    labels: tuple[str, ...] = Field((), description="Class names, index order")
    variants: tuple[VariantSpec, ...] = ()
    golden_atol: dict[str, float] = Field(
        default_factory=lambda: {"fp32": 1e-4, "fp16": 2e-2, "int8": 1e-1},
        description="Golden-output absolute tolerance per precision",
    )
