"""Post-processing by task: top-k, YOLO detection + NMS, heat-map regions, raw, bad outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from agent.common.errors import ModelError
from agent.pipeline.postprocess import (
    Classification,
    Detection,
    Result,
    make_postprocessor,
)
from agent.pipeline.preprocess import FrameTransform, Preprocessor
from agent.protocol.card import InputSpec, PostprocessSpec
from tests.harness.text_image import LINES, text_lines_image

SQUARE = InputSpec(width=640, height=640)
IDENTITY = FrameTransform(src_w=640, src_h=640, scale_x=1.0, scale_y=1.0, pad_x=0.0, pad_y=0.0)
# A 640x480 camera letterboxed into 640x640: 80 px of pad above and below.
CAMERA = FrameTransform(src_w=640, src_h=480, scale_x=1.0, scale_y=1.0, pad_x=0.0, pad_y=80.0)
TASKS = ("classification", "detection", "heatmap", "raw")


def post(task: str, labels: tuple[str, ...] = (), input_spec: InputSpec = SQUARE, **kw: Any) -> Any:
    return make_postprocessor(task, PostprocessSpec(**kw), labels, input_spec)


# --- classification ------------------------------------------------------------------------


def test_classification_top_k_order_and_labels() -> None:
    scores = np.array([[0.05, 0.6, 0.1, 0.25]], np.float32)
    r = post("classification", ("cat", "dog", "fox"), top_k=3)([scores], IDENTITY)
    assert r.task == "classification"
    assert [(c.label_id, c.label) for c in r.classifications] == [(1, "dog"), (3, "3"), (2, "fox")]
    assert [c.score for c in r.classifications] == pytest.approx([0.6, 0.25, 0.1])
    assert r.detections == []


@pytest.mark.parametrize("shape", [(4,), (1, 4), (1, 4, 1, 1)])
def test_classification_softmax_and_shapes(shape: tuple[int, ...]) -> None:
    logits = np.array([1.0, 3.0, 2.0, -1.0], np.float32).reshape(shape)
    r = post("classification", softmax=True, top_k=10)([logits], IDENTITY)
    want = np.exp([1.0, 3.0, 2.0, -1.0]) / np.exp([1.0, 3.0, 2.0, -1.0]).sum()
    assert [c.label_id for c in r.classifications] == [1, 2, 0, 3]  # top_k capped at C
    assert [c.score for c in r.classifications] == pytest.approx(sorted(want, reverse=True))


def test_classification_softmax_is_stable_for_huge_logits() -> None:
    r = post("classification", softmax=True, top_k=2)([np.array([[1e30, 0.0, -1e30]])], IDENTITY)
    assert r.classifications[0] == Classification(0, "0", 1.0)


@pytest.mark.parametrize("shape", [(2, 5), (1, 0), (1, 3, 2)])
def test_classification_rejects_batches_and_empty(shape: tuple[int, ...]) -> None:
    with pytest.raises(ModelError, match=r"expected \(1, C\)") as e:
        post("classification")([np.zeros(shape, np.float32)], IDENTITY)
    assert e.value.reason == "shape"


# --- NaN / inf -----------------------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_outputs_raise_nan(task: str, bad: float) -> None:
    shapes = {
        "classification": (1, 10),
        "detection": (1, 20, 6),
        "heatmap": (1, 1, 16, 16),
        "raw": (2, 5),
    }
    out = np.full(shapes[task], 0.5, np.float32)
    out.flat[7] = bad
    with pytest.raises(ModelError, match="non-finite") as e:
        post(task)([out], IDENTITY)
    assert e.value.reason == "nan"


# --- detection -----------------------------------------------------------------------------


def v5_rows(rows: list[list[float]]) -> np.ndarray:
    return np.array(rows, np.float32)[None]  # (1, N, 5 + C)


def test_nms_removes_duplicates_but_keeps_other_classes() -> None:
    # cx, cy, w, h, obj, cls0, cls1
    out = v5_rows(
        [
            [100, 300, 80, 80, 0.9, 0.9, 0.1],  # best "person"
            [104, 302, 80, 80, 0.9, 0.8, 0.1],  # duplicate of it (IoU ~0.87): suppressed
            [102, 301, 80, 80, 0.9, 0.1, 0.7],  # same place, other class: kept
            [400, 300, 60, 60, 0.8, 0.9, 0.0],  # another person elsewhere: kept
            [300, 300, 50, 50, 0.2, 0.9, 0.0],  # 0.18 < 0.25: dropped by threshold
        ]
    )
    r = post("detection", ("person", "car"))([out], IDENTITY)
    got = [(d.label, round(d.score, 2), d.box) for d in r.detections]
    assert got == [
        ("person", 0.81, (60.0, 260.0, 140.0, 340.0)),
        ("person", 0.72, (370.0, 270.0, 430.0, 330.0)),
        ("car", 0.63, (62.0, 261.0, 142.0, 341.0)),
    ]
    assert r.summary == {"count": 3}


def test_nms_iou_threshold_is_honoured() -> None:
    # Two boxes with IoU 1/3 (offset by half a width).
    out = v5_rows([[100, 100, 40, 40, 1.0, 0.9], [120, 100, 40, 40, 1.0, 0.8]])
    assert len(post("detection", iou_threshold=0.5)([out], IDENTITY).detections) == 2
    assert len(post("detection", iou_threshold=0.3)([out], IDENTITY).detections) == 1


def test_yolov8_transposed_layout_and_letterbox_mapping() -> None:
    labels = ("a", "b", "c")
    rows = np.array(
        [
            [320, 320, 100, 50, 0.1, 0.9, 0.0],  # cx, cy, w, h, cls... (no objectness)
            [50, 100, 20, 20, 0.0, 0.0, 0.6],
        ],
        np.float32,
    )
    for out in (rows.T[None], rows[None]):  # (1, 4+C, N) and (1, N, 4+C) read the same
        r = post("detection", labels, has_objectness=False)([out], CAMERA)
        assert [(d.label_id, d.label, d.box) for d in r.detections] == [
            (1, "b", (270.0, 215.0, 370.0, 265.0)),  # y - 80: back into the 640x480 frame
            (2, "c", (40.0, 10.0, 60.0, 30.0)),
        ]
        assert r.detections[0].score == pytest.approx(0.9)


def test_transposed_layout_guessed_without_labels() -> None:
    rng = np.random.default_rng(0)
    out = rng.uniform(0, 0.2, (1, 84, 8400)).astype(np.float32)  # YOLOv8n COCO shape
    out[0, :4] = rng.uniform(10, 600, (4, 8400))
    out[0, 4 + 7, 123] = 0.95
    out[0, :4, 123] = [200, 200, 50, 40]
    r = post("detection", has_objectness=False)([out], IDENTITY)
    best = r.detections[0]
    assert (best.box, best.label_id, best.label) == ((175.0, 180.0, 225.0, 220.0), 7, "7")
    assert best.score == pytest.approx(0.95)


def test_xyxy_boxes_max_detections_and_pad_only_boxes() -> None:
    out = v5_rows(
        [
            [10, 100, 60, 150, 1.0, 0.9],
            [200, 100, 260, 150, 1.0, 0.8],
            [400, 100, 460, 150, 1.0, 0.7],
            [100, 10, 200, 60, 1.0, 0.95],  # wholly in the top letterbox pad: not a detection
        ]
    )
    r = post("detection", box_format="xyxy", max_detections=2)([out], CAMERA)
    assert [d.box for d in r.detections] == [(10.0, 20.0, 60.0, 70.0), (200.0, 20.0, 260.0, 70.0)]


def test_detection_without_candidates_and_bad_shapes() -> None:
    assert post("detection")([np.zeros((1, 0, 6), np.float32)], IDENTITY).detections == []
    assert post("detection")([np.zeros((1, 100, 6), np.float32)], IDENTITY).summary == {"count": 0}
    with pytest.raises(ModelError, match="at least 6 values") as e:
        post("detection")([np.zeros((1, 3, 5), np.float32)], IDENTITY)
    assert e.value.reason == "shape"
    with pytest.raises(ModelError, match="expected"):
        post("detection")([np.zeros((2, 10, 6), np.float32)], IDENTITY)


# --- heatmap -------------------------------------------------------------------------------


def test_heatmap_two_blobs_give_two_boxes_in_source_pixels() -> None:
    # A quarter-resolution map (160x160) for a 640x640 input, camera letterboxed at y+80.
    m = np.zeros((1, 1, 160, 160), np.float32)
    m[0, 0, 30:40, 20:70] = 0.9  # map px -> input x 80..280, y 120..160 -> source y 40..80
    m[0, 0, 100:120, 100:110] = 0.6  # input x 400..440, y 400..480 -> source y 320..400
    m[0, 0, 100:120, 100] = 0.4  # its soft edge: above threshold, lowers the mean
    m[0, 0, 5:6, 5:6] = 0.99  # a 1-pixel speck: below min_area
    r = post("heatmap", heatmap_threshold=0.3, score_threshold=0.5, min_area=4)([m], CAMERA)
    assert [d.box for d in r.detections] == [
        (80.0, 40.0, 280.0, 80.0),
        (400.0, 320.0, 440.0, 400.0),
    ]
    assert [d.score for d in r.detections] == pytest.approx([0.9, 0.58])  # (9*0.6+0.4)/10
    assert {(d.label_id, d.label) for d in r.detections} == {(0, "region")}


def test_heatmap_score_threshold_and_empty_map() -> None:
    m = np.zeros((64, 64), np.float32)
    m[10:20, 10:20] = 0.45
    assert post("heatmap", score_threshold=0.5)([m], IDENTITY).detections == []
    assert len(post("heatmap", score_threshold=0.4)([m], IDENTITY).detections) == 1
    assert post("heatmap")([np.zeros((1, 1, 8, 8), np.float32)], IDENTITY).summary == {"count": 0}
    with pytest.raises(ModelError, match="heatmap output 0 has shape") as e:
        post("heatmap")([np.zeros((1, 2, 8, 8), np.float32)], IDENTITY)
    assert e.value.reason == "shape"


# --- raw and serialisation -----------------------------------------------------------------


def test_raw_summary_per_output() -> None:
    outs: list[np.ndarray] = [np.array([[1.0, 5.0, -2.0]], np.float32), np.zeros((0, 3), np.int64)]
    r = make_postprocessor("raw", PostprocessSpec(), (), SQUARE, output_names=("logits",))(
        outs, IDENTITY
    )
    assert r.summary["outputs"] == [
        {
            "index": 0,
            "name": "logits",
            "shape": [1, 3],
            "dtype": "float32",
            "min": -2.0,
            "max": 5.0,
            "mean": pytest.approx(4 / 3),
            "argmax": 1,
        },
        {
            "index": 1,
            "name": "output1",
            "shape": [0, 3],
            "dtype": "int64",
            "min": None,
            "max": None,
            "mean": None,
            "argmax": None,
        },
    ]


def test_raw_accepts_float64_beyond_float32() -> None:
    r = post("raw")([np.array([1e300, -1e300])], IDENTITY)
    assert r.summary["outputs"][0]["max"] == 1e300
    with pytest.raises(ModelError, match="beyond float32") as e:  # a reader must cast: refuse
        post("classification")([np.array([1e300, 0.0])], IDENTITY)
    assert e.value.reason == "nan"


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize(
    "outputs",
    [None, [], np.zeros((1, 4), np.float32), ["x"], [np.zeros(4, np.complex64)], [np.array(["a"])]],
    ids=["none", "empty", "bare-array", "str", "complex", "unicode"],
)
def test_outputs_that_are_not_numeric_arrays(task: str, outputs: Any) -> None:
    with pytest.raises(ModelError, match="expected") as e:
        post(task)(outputs, IDENTITY)
    assert e.value.reason == "output"


def test_to_dict_is_plain_json_and_omits_empty_lists() -> None:
    r = Result(
        task="detection",
        detections=[Detection((1.23456, 2.0, 3.0, 4.0), 0.876543, 2, "car")],
        summary={"count": np.int64(1), "mean": np.float32(0.123456), "shape": (1, 2)},
    )
    d = r.to_dict()
    assert d == {
        "task": "detection",
        "detections": [
            {"box": [1.2346, 2.0, 3.0, 4.0], "score": 0.8765, "label_id": 2, "label": "car"}
        ],
        "summary": {"count": 1, "mean": 0.1235, "shape": [1, 2]},
    }
    json.dumps(d, allow_nan=False)
    assert Result(task="raw", classifications=[], detections=[], summary={}).to_dict() == {
        "task": "raw"
    }


def test_unknown_task() -> None:
    with pytest.raises(ModelError, match="unknown task 'segmentation'") as e:
        make_postprocessor("segmentation", PostprocessSpec(), (), SQUARE)
    assert e.value.reason == "task"


# --- garbage in: ModelError or a result, nothing else --------------------------------------

garbage_arrays = hnp.arrays(
    dtype=st.sampled_from(
        [np.float32, np.float64, np.float16, np.int64, np.int8, np.uint8, np.bool_, np.complex64]
    ),
    # Default elements per dtype: floats include NaN, inf, huge and subnormal values.
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=12),
)
garbage_outputs = st.lists(
    garbage_arrays | st.sampled_from([None, "x", 3.0, [1, 2]]), min_size=0, max_size=3
) | st.sampled_from([None, "outputs", 42])


@settings(
    max_examples=300,
    deadline=2000,  # "never hang": a slow example fails the test
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    task=st.sampled_from(TASKS),
    outputs=garbage_outputs,
    has_obj=st.booleans(),
    fmt=st.sampled_from(["cxcywh", "xyxy"]),
    n_labels=st.integers(0, 4),
)
def test_garbage_outputs_raise_model_error_or_return(
    task: str, outputs: Any, has_obj: bool, fmt: str, n_labels: int
) -> None:
    pp = post(
        task,
        tuple(f"c{i}" for i in range(n_labels)),
        has_objectness=has_obj,
        box_format=fmt,
        score_threshold=0.0,
        heatmap_threshold=0.0,
        min_area=0,
    )
    try:
        r = pp(outputs, CAMERA)
    except ModelError:
        return
    assert isinstance(r, Result) and r.task == task
    json.dumps(r.to_dict(), allow_nan=False)
    for d in r.detections:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= CAMERA.src_w and 0 <= y1 < y2 <= CAMERA.src_h


@settings(max_examples=100, deadline=2000)
@given(
    out=hnp.arrays(
        np.float32,
        st.tuples(st.just(1), st.integers(0, 50), st.integers(6, 9)),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    transposed=st.booleans(),
)
def test_random_detection_outputs_give_sane_boxes(out: np.ndarray, transposed: bool) -> None:
    arr = out.transpose(0, 2, 1) if transposed else out
    r = post("detection", score_threshold=0.0)([arr], CAMERA)
    assert len(r.detections) <= 100
    for d in r.detections:
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480


# --- integration: the real PP-OCRv4 text detector ------------------------------------------


def ppocr_det_model() -> Path:
    spec = importlib.util.find_spec("rapidocr_onnxruntime")
    if spec is None or spec.origin is None:
        pytest.skip("rapidocr-onnxruntime is not installed (pip install -e '.[test]')")
    path = Path(spec.origin).parent / "models" / "ch_PP-OCRv4_det_infer.onnx"
    if not path.is_file():
        pytest.skip(f"rapidocr-onnxruntime has no PP-OCRv4 detector at {path}")
    return path


@pytest.mark.parametrize(("width", "height"), [(640, 640), (960, 480)])
def test_ppocr_v4_text_detector_finds_the_lines(width: int, height: int) -> None:
    ort = pytest.importorskip("onnxruntime")
    model = ppocr_det_model()
    img, truth = text_lines_image(height, width)
    # rapidocr-onnxruntime 1.4.4 config.yaml, section Det: mean [0.5, 0.5, 0.5], std
    # [0.5, 0.5, 0.5]; ch_ppocr_det/utils.py DetPreProcess: img * (1/255), then (x - mean) / std,
    # HWC -> CHW; utils/load_image.py hands the detector BGR (OpenCV order, no swap). So: BGR,
    # scale 1/255, mean/std 0.5, NCHW. (Upstream PaddleOCR's det config uses ImageNet
    # mean/std; this ONNX export is what rapidocr ships and runs, so we follow rapidocr.)
    spec = InputSpec(
        width=640, height=640, color="bgr", layout="nchw", scale=1 / 255, mean=(0.5,), std=(0.5,)
    )
    tensor, transform = Preprocessor(spec)(img)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    outputs = session.run(None, {session.get_inputs()[0].name: tensor})
    # DB post-processing defaults from the same config: thresh 0.3, box_thresh 0.5.
    pp = make_postprocessor(
        "heatmap",
        PostprocessSpec(heatmap_threshold=0.3, score_threshold=0.5, min_area=10),
        (),
        spec,
    )
    result = pp(outputs, transform)

    boxes = [d.box for d in result.detections]
    assert len(boxes) == len(LINES), f"expected one region per line, got {boxes}"
    for x1, y1, x2, y2 in truth:
        hits = [b for b in boxes if x1 <= (b[0] + b[2]) / 2 <= x2 and y1 <= (b[1] + b[3]) / 2 <= y2]
        assert len(hits) == 1, f"line {(x1, y1, x2, y2)}: matching boxes {hits} of {boxes}"
        bx1, by1, bx2, by2 = hits[0]
        # DBNet predicts a shrunk text kernel (it is meant to be unclipped), so the region lies
        # inside the line's box and spans most of its width.
        margin = 4
        assert (
            x1 - margin <= bx1 and bx2 <= x2 + margin and y1 - margin <= by1 and by2 <= y2 + margin
        )
        assert (bx2 - bx1) >= 0.8 * (x2 - x1)
    blank_from = max(t[3] for t in truth) + 10
    assert all(b[3] <= blank_from for b in boxes), f"a box in the blank part below y={blank_from}"
    assert all(d.score >= 0.5 and d.label == "region" for d in result.detections)
