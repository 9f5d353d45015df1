"""Models as exporters lay them out: publish infers the format, the agent decodes the boxes.

Each case of ``tests/harness/format_models.py`` is an ONNX model whose outputs have exactly one
exporter's layout, names and metadata (YOLOv5, YOLOv8/v11, YOLOX raw grid, Ultralytics
``nms=True``, TensorRT EfficientNMS, PaddleDetection ``multiclass_nms3``, SSD-style, PicoDet raw
heads, classifiers), with known boxes planted in them. For each, at the newest and at an old
opset: ``inspect_model`` (what ``publish`` would sign) must infer the right format with at most
the documented flags, and the agent's own path (``RunnableModel`` on ONNX Runtime, card
constants fed) must return the planted boxes, the same the exporter's reference decoding
returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.pipeline.model import RunnableModel
from agent.protocol.card import ModelCard
from cloud_sync.registry.model_file import inspect_model
from tests.harness.format_models import (
    FORMATS,
    Box,
    FormatCase,
    boxes_match,
    build_case,
    make_feeds,
    reference_decode,
    reference_top1,
)

# case → (inferred task, inferred format, the flags a user passes: --set FIELD=VALUE)
EXPECTED: dict[str, tuple[str, str | None, dict[str, Any]]] = {
    "yolov5": ("detection", "yolov5", {}),
    "yolov8": ("detection", "yolov8", {}),
    "yolox": ("detection", "yolox", {"labels": ["person", "car", "dog"]}),
    "nms_ultralytics": ("detection", "nms", {}),
    "nms_efficient": ("detection", "nms", {"labels": ["person", "car", "dog"]}),
    "nms_paddle": ("detection", "nms", {"labels": ["person", "car", "dog"]}),
    "ssd": (
        "detection",
        "boxes_scores",
        {
            "labels": ["BACKGROUND", "person", "car", "dog"],
            "postprocess.background_class": True,
            "postprocess.box_normalized": True,
        },
    ),
    "ssd_paddle": ("detection", "boxes_scores", {"labels": ["person", "car", "dog"]}),
    "picodet": ("detection", "picodet", {"labels": ["person", "car", "dog"]}),
    "classification_logits": ("classification", None, {}),
    "classification_probs": ("classification", None, {}),
}
OLD_OPSET = {"yolox": 11}  # YOLOX's export_onnx.py default; the rest at 12 (PP-OCR's)


def _case(name: str, opset: int, tmp_path: Path) -> FormatCase:
    return build_case(name, tmp_path, opset=opset)


def _card(case: FormatCase, fields: dict[str, Any]) -> tuple[ModelCard, dict[str, Any]]:
    report = inspect_model(case.path, card_fields=fields)
    assert "card" in report, report.get("error")
    return ModelCard.model_validate({**report["card"], "name": case.name}), report


def _run_agent(case: FormatCase, card: ModelCard) -> Any:
    backend = OnnxRuntimeBackend(case.path, providers=["CPUExecutionProvider"], threads=1)
    model = RunnableModel(card, backend)
    try:
        image = make_feeds(case)[model.input_name]
        result, _ = model.infer_tensor(image.astype(card.input.dtype))
    finally:
        backend.close()
    return result


def test_every_case_is_covered() -> None:
    assert set(EXPECTED) == set(FORMATS)


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("old", [False, True], ids=["opset17", "old-opset"])
def test_publish_infers_the_format_and_the_agent_finds_the_planted_boxes(
    name: str, old: bool, tmp_path: Path
) -> None:
    opset = OLD_OPSET.get(name, 12) if old else 17
    case = _case(name, opset, tmp_path)
    task, fmt, fields = EXPECTED[name]
    card, report = _card(case, fields)
    assert report["opset"] == opset
    assert card.task == task, report["reasons"]
    if fmt is not None:
        assert card.postprocess.detection_format == fmt, report["reasons"]
    result = _run_agent(case, card)

    import onnxruntime as ort

    sess = ort.InferenceSession(str(case.path), providers=["CPUExecutionProvider"])
    outputs = sess.run(None, make_feeds(case))
    if task == "classification":
        top = result.classifications[0]
        assert top.label_id == case.top1 == reference_top1(case, outputs)
        scores = [c.score for c in result.classifications]
        assert scores == sorted(scores, reverse=True)
        assert 0.0 < top.score <= 1.0  # probabilities: softmax applied once, where needed
        return
    got = [Box(d.box, d.label_id, d.score) for d in result.detections]
    assert boxes_match(got, list(case.boxes)) is None, boxes_match(got, list(case.boxes))
    ref = reference_decode(case, outputs)
    assert boxes_match(got, ref) is None, boxes_match(got, ref)
    labels = card.labels
    assert [d.label for d in result.detections] == [labels[d.label_id] for d in result.detections]


def test_softmax_is_applied_to_logits_and_not_to_probabilities(tmp_path: Path) -> None:
    logits, _ = _card(_case("classification_logits", 17, tmp_path), {})
    probs, _ = _card(_case("classification_probs", 17, tmp_path), {})
    assert logits.postprocess.softmax is True
    assert probs.postprocess.softmax is False


def test_ultralytics_metadata_gives_labels_size_and_the_yolo_input_contract(
    tmp_path: Path,
) -> None:
    card, report = _card(_case("yolov8", 17, tmp_path), {})
    assert card.labels == ("person", "car", "dog")
    assert (card.input.width, card.input.height) == (320, 256)
    inp = card.input
    assert (inp.resize, inp.pad_value, inp.pad_position, inp.color) == (
        "letterbox",
        114,
        "center",
        "rgb",
    )
    assert inp.scale == pytest.approx(1 / 255)
    assert any("names" in r for r in report["reasons"])


def test_yolox_gets_its_own_input_contract(tmp_path: Path) -> None:
    card, _ = _card(_case("yolox", 11, tmp_path), {})
    inp = card.input
    assert (inp.resize, inp.pad_position, inp.color, inp.scale) == (
        "letterbox",
        "top_left",
        "bgr",
        1.0,
    )


def test_paddle_constant_inputs_come_from_the_card(tmp_path: Path) -> None:
    card, _ = _card(_case("nms_paddle", 17, tmp_path), {})
    consts = {c.name: c.values for c in card.input.constants}
    assert consts == {"im_shape": (256.0, 320.0), "scale_factor": (1.0, 1.0)}


def test_an_unknown_layout_is_refused_listing_shapes_and_formats(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from cloud_sync.registry.keys import RegistryError
    from cloud_sync.registry.publish import publish
    from cloud_sync.registry.repo import Repository

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 9, 5])
    starts = numpy_helper.from_array(np.zeros(4, np.int64), "st")
    ends = numpy_helper.from_array(np.array([1, 3, 9, 5], np.int64), "en")
    g = helper.make_graph(
        [helper.make_node("Slice", ["x", "st", "en"], ["y"])], "odd", [x], [y], [starts, ends]
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7
    path = tmp_path / "odd.onnx"
    onnx.save(model, str(path))
    report = inspect_model(path)
    assert "card" not in report
    err = report["error"]
    assert "y [1, 3, 9, 5]" in err and "64x64" in err
    for fmt in ("yolov5", "yolov8", "yolox", "nms", "boxes_scores", "picodet", "heatmap"):
        assert fmt in err
    assert "--format" in err
    repo = Repository.init(tmp_path / "repo")
    with pytest.raises(RegistryError, match="cannot tell the output format") as e:
        publish(repo, path, name="odd", version="1.0.0")
    assert e.value.reason == "format"
    # a named format the outputs do not fit is refused at decode with the shapes
    raw = publish(repo, path, name="odd", version="1.0.0", task="raw")
    assert raw.card.task == "raw"


# ------------------------------------------------------------------------------------ pieces
def test_top_left_letterbox_puts_the_picture_at_the_origin_and_maps_back() -> None:
    from agent.pipeline.preprocess import Preprocessor
    from agent.protocol.card import InputSpec

    spec = InputSpec(width=64, height=64, pad_position="top_left", pad_value=114, scale=1.0)
    frame = np.full((32, 64, 3), 200, np.uint8)  # 2:1 → 64x32 picture, 32 rows of padding
    tensor, t = Preprocessor(spec)(frame)
    assert (tensor[0, :, :32] == 200).all() and (tensor[0, :, 32:] == 114).all()
    assert (t.pad_x, t.pad_y, t.scale_x) == (0.0, 0.0, 1.0)
    assert t.to_source(np.array([[0, 0, 64, 32]])).tolist() == [[0, 0, 64, 32]]


def test_center_crop_cuts_the_middle_of_the_short_side_scaled_frame() -> None:
    from agent.pipeline.preprocess import Preprocessor
    from agent.protocol.card import InputSpec

    spec = InputSpec(width=224, height=224, resize="center_crop", scale=1.0)
    frame = np.zeros((512, 1024, 3), np.uint8)  # short side 512 → 256, crop 224 of it
    frame[:, 456:568] = 255  # a bar in the middle: 112 px wide → 56 px after scaling by 1/2
    tensor, t = Preprocessor(spec)(frame)
    cols = np.flatnonzero(tensor[0, 0, 100] > 127)
    assert 84 <= cols[0] <= 85 and 138 <= cols[-1] <= 140  # centred: 112 ± 28
    # the input covers the frame's centre: 448 of its 1024 columns (224 at scale 1/2)
    x1, y1, x2, y2 = t.to_source(np.array([[0, 0, 224, 224]]))[0]
    assert (x1, y1, x2, y2) == pytest.approx((288, 32, 736, 480), abs=1)


def test_class_agnostic_nms_keeps_one_box_per_place() -> None:
    from agent.pipeline.postprocess import make_postprocessor
    from agent.pipeline.preprocess import FrameTransform
    from agent.protocol.card import InputSpec, PostprocessSpec

    # two classes, same place (YOLOv8 rows): class-aware keeps both, agnostic the better one
    out = np.zeros((1, 6, 2), np.float32)
    out[0, :4] = [[50, 50], [50, 51], [20, 20], [20, 20]]
    out[0, 4:] = [[0.9, 0.1], [0.1, 0.8]]
    inp = InputSpec(width=100, height=100)
    t = FrameTransform(100, 100, 1.0, 1.0, 0.0, 0.0)
    for agnostic, want in [(False, [0, 1]), (True, [0])]:
        spec = PostprocessSpec(format="yolov8", class_agnostic_nms=agnostic)
        dets = make_postprocessor("detection", spec, ["a", "b"], inp)([out], t).detections
        assert [d.label_id for d in dets] == want


def test_match_detections_needs_the_same_class_and_overlap() -> None:
    from cloud_sync.registry.quantize import match_detections

    ref = (np.array([[0, 0, 10, 10], [20, 20, 30, 30]], float), np.array([0, 1]))
    same = (np.array([[0, 0, 10, 11], [20, 20, 30, 30]], float), np.array([0, 1]))
    other_class = (np.array([[0, 0, 10, 10]], float), np.array([1]))
    moved = (np.array([[5, 5, 15, 15]], float), np.array([0]))
    twice = (np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float), np.array([0, 0]))
    assert match_detections(ref, same) == 2
    assert match_detections(ref, other_class) == 0
    assert match_detections(ref, moved) == 0  # IoU 25/175
    assert match_detections(ref, twice) == 1  # a ref box is matched once
    assert match_detections(ref, (np.zeros((0, 4)), np.zeros(0))) == 0
