"""Tests for scripts/make_test_models.py (over cloud_sync.samples): valid, accurate models."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import ModuleType

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from agent.protocol.card import ModelCard
from scripts import make_test_models

MODELS = ("digits", "blobdet", "tinyseg")


@pytest.fixture(scope="module")
def mtm() -> ModuleType:
    return make_test_models


@pytest.fixture(scope="module")
def built(mtm: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    models: dict[str, Path] = mtm.build_all(tmp_path_factory.mktemp("models"))
    return models


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # the build ran with ORT's default threads: differ on purpose
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _card(model_dir: Path) -> ModelCard:
    return ModelCard.model_validate_json((model_dir / "card.json").read_text())


def test_builds_every_model(built: dict[str, Path]) -> None:
    assert set(built) == set(MODELS)
    for name, d in built.items():
        assert d.name == name
        for f in ("model.onnx", "card.json", "golden.npz"):
            assert (d / f).is_file(), f"{name}: {f} missing"


@pytest.mark.parametrize(
    ("name", "file"),
    [
        ("digits", "model.onnx"),
        ("digits", "model.int8.onnx"),
        ("blobdet", "model.onnx"),
        ("tinyseg", "model.onnx"),
    ],
)
def test_onnx_checker_passes(built: dict[str, Path], name: str, file: str) -> None:
    onnx.checker.check_model(onnx.load(str(built[name] / file)), full_check=True)


@pytest.mark.parametrize("name", MODELS)
def test_card_validates_and_matches_files(built: dict[str, Path], name: str) -> None:
    d = built[name]
    card = _card(d)
    assert card.name == name
    labels_file = d / "labels.txt"
    if card.labels:
        assert tuple(labels_file.read_text().splitlines()) == card.labels
    assert card.variants, "every card lists at least its fp32 variant"
    for v in card.variants:
        assert v.sha256 == hashlib.sha256((d / v.file).read_bytes()).hexdigest(), (
            f"{name}: {v.file} sha256 differs from card"
        )
    sess = _session(d / "model.onnx")
    shape = sess.get_inputs()[0].shape
    assert shape[1] == card.input.channels
    if isinstance(shape[2], int):
        assert (shape[2], shape[3]) == (card.input.height, card.input.width)


@pytest.mark.parametrize("name", MODELS)
def test_golden_outputs_reproduce(built: dict[str, Path], name: str) -> None:
    d = built[name]
    atol = _card(d).golden_atol["fp32"]
    sess = _session(d / "model.onnx")
    inp = sess.get_inputs()[0].name
    with np.load(d / "golden.npz") as z:
        keys = sorted(z.files)
        n = len([k for k in keys if k.startswith("input_")])
        assert n >= 2 and keys == sorted(
            [f"input_{i}" for i in range(n)] + [f"output_{i}" for i in range(n)]
        )
        for i in range(n):
            x, want = z[f"input_{i}"], z[f"output_{i}"]
            assert x.dtype == np.float32 and x.shape[0] == 1
            got = sess.run(None, {inp: x})[0]
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=atol)


def _digits_test_set(d: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(d / "test_set.npz") as z:
        return z["images"], z["labels"]


def _digits_predict(model: Path, images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32)[:, None] / np.float32(255.0)
    probs = _session(model).run(None, {"input": x})[0]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # softmax in the graph
    return np.asarray(np.argmax(probs, axis=1))


def test_digits_accuracy_recomputed_from_test_set(built: dict[str, Path]) -> None:
    d = built["digits"]
    images, labels = _digits_test_set(d)
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8) and len(images) == len(labels)
    assert images.max() == 255 and len(np.unique(labels)) == 10
    acc = float(np.mean(_digits_predict(d / "model.onnx", images) == labels))
    report = json.loads((d / "accuracy.json").read_text())
    assert acc >= 0.9
    assert report["n_test"] == len(labels)
    assert report["test_accuracy"] == pytest.approx(acc, abs=1e-12)


def test_digits_int8_is_qdq_and_close_to_fp32(built: dict[str, Path]) -> None:
    d = built["digits"]
    int8 = d / "model.int8.onnx"
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    images, labels = _digits_test_set(d)
    acc32 = float(np.mean(_digits_predict(d / "model.onnx", images) == labels))
    acc8 = float(np.mean(_digits_predict(int8, images) == labels))
    assert acc8 >= acc32 - 0.03
    report = json.loads((d / "accuracy.json").read_text())
    assert report["int8_test_accuracy"] == pytest.approx(acc8, abs=1e-12)
    precisions = {v.precision: v.file for v in _card(d).variants}
    assert precisions == {"fp32": "model.onnx", "int8": "model.int8.onnx"}


def _letterbox_by_hand(frame_bgr: np.ndarray) -> tuple[np.ndarray, int]:
    """640x480 -> 640x640 (scale 1, 80 rows of grey 114 above and below), RGB, /255, NCHW."""
    assert frame_bgr.shape == (480, 640, 3)
    canvas = np.full((640, 640, 3), 114, np.uint8)
    canvas[80:560] = frame_bgr
    x = canvas[:, :, ::-1].astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    return np.ascontiguousarray(x), 80


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def _cxcywh_to_xyxy(r: np.ndarray) -> np.ndarray:
    return np.array([r[0] - r[2] / 2, r[1] - r[3] / 2, r[0] + r[2] / 2, r[1] + r[3] / 2])


@pytest.mark.parametrize(
    "box",
    [
        (100, 120, 164, 184),
        (300, 200, 348, 248),
        (0, 0, 40, 40),
        (590, 430, 640, 480),
        (201, 333, 213, 345),
    ],
)
def test_blobdet_finds_the_square(built: dict[str, Path], box: tuple[int, int, int, int]) -> None:
    x1, y1, x2, y2 = box
    frame = np.full((480, 640, 3), 20, np.uint8)
    frame[y1:y2, x1:x2] = 255
    x, top = _letterbox_by_hand(frame)
    rows = _session(built["blobdet"] / "model.onnx").run(None, {"images": x})[0][0]
    assert rows.shape == (1600, 6) and np.isfinite(rows).all()
    best = int(np.argmax(rows[:, 4]))
    cell_cx, cell_cy = (best % 40) * 16 + 8, (best // 40) * 16 + 8
    sq_cx, sq_cy = (x1 + x2) / 2, (y1 + y2) / 2 + top
    assert abs(cell_cx - sq_cx) <= 16 and abs(cell_cy - sq_cy) <= 16
    assert rows[best, 4] * rows[best, 5] > 0.5
    gt = np.array([x1, y1 + top, x2, y2 + top], dtype=np.float64)
    assert _iou(_cxcywh_to_xyxy(rows[best, :4]), gt) > 0.9


def test_blobdet_finds_nothing_on_a_dark_frame(built: dict[str, Path]) -> None:
    x, _ = _letterbox_by_hand(np.full((480, 640, 3), 20, np.uint8))
    rows = _session(built["blobdet"] / "model.onnx").run(None, {"images": x})[0][0]
    assert np.isfinite(rows).all()
    assert (rows[:, 4] * rows[:, 5]).max() < 0.5


def test_tinyseg_handles_any_size(built: dict[str, Path]) -> None:
    img = np.full((50, 70, 3), 220, np.uint8)
    img[10:30, 20:40] = 0
    x = img.transpose(2, 0, 1)[None].astype(np.float32) / 255.0
    heat = _session(built["tinyseg"] / "model.onnx").run(None, {"input": x})[0]
    assert heat.shape == (1, 1, 50, 70)
    assert heat[0, 0, 12:28, 22:38].min() > 0.9
    assert heat[0, 0, :, 45:].max() < 0.1


def test_digit_video_round_trip(mtm: ModuleType, built: dict[str, Path], tmp_path: Path) -> None:
    images, labels = _digits_test_set(built["digits"])
    images, labels = images[:40], labels[:40]
    path = tmp_path / "digits.mkv"
    assert mtm.write_digit_video(path, images, labels) == [int(v) for v in labels]
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        frames.append(frame)
    cap.release()
    assert len(frames) == len(images)
    for i, frame in enumerate(frames):
        assert frame.shape == (160, 160, 3)
        assert (frame[:, :, 0] == frame[:, :, 2]).all() and (frame[:, :, 1] == frame[:, :, 2]).all()
        small = cv2.resize(frame, (8, 8), interpolation=cv2.INTER_AREA)[:, :, 0]
        np.testing.assert_array_equal(small, images[i], err_msg=f"frame {i}")


def test_blob_video_matches_ground_truth(
    mtm: ModuleType, built: dict[str, Path], tmp_path: Path
) -> None:
    path = tmp_path / "blobs.mkv"
    track = mtm.write_blob_video(path, 12)
    assert len(track) == 12 and len({b[0] for b in track}) == 12  # it moves
    sess = _session(built["blobdet"] / "model.onnx")
    cap = cv2.VideoCapture(str(path))
    for t, boxes in enumerate(track):
        ok, frame = cap.read()
        assert ok, f"frame {t} missing"
        (x1, y1, x2, y2) = boxes[0]
        assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 480
        expected = np.full((480, 640, 3), 20, np.uint8)
        expected[y1:y2, x1:x2] = 255
        np.testing.assert_array_equal(frame, expected, err_msg=f"frame {t} is not lossless")
        x, top = _letterbox_by_hand(frame)
        rows = sess.run(None, {"images": x})[0][0]
        best = rows[int(np.argmax(rows[:, 4] * rows[:, 5]))]
        assert _iou(_cxcywh_to_xyxy(best[:4]), np.array([x1, y1 + top, x2, y2 + top])) > 0.9
    assert not cap.read()[0]
    cap.release()


def test_cli_only_builds_one_model(mtm: ModuleType, tmp_path: Path) -> None:
    assert mtm.main(["--out", str(tmp_path), "--only", "tinyseg"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tinyseg"]


def test_unknown_model_is_rejected(mtm: ModuleType, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="nosuch"):
        mtm.build_all(tmp_path, only=["nosuch"])


@pytest.mark.video
@pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="needs ffmpeg")
def test_digit_video_ffmpeg_fallback_is_lossless(
    mtm: ModuleType, built: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    class _ClosedWriter:  # what cv2 returns when its FFmpeg backend lacks the codec
        fourcc = staticmethod(cv2.VideoWriter.fourcc)

        def __init__(self, *args: object) -> None: ...

        def isOpened(self) -> bool:
            return False

    monkeypatch.setattr(cv2, "VideoWriter", _ClosedWriter)  # the module cloud_sync.samples uses
    images, labels = _digits_test_set(built["digits"])
    path = tmp_path / "digits_ffmpeg.mkv"
    mtm.write_digit_video(path, images[:10], labels[:10])
    monkeypatch.undo()
    cap = cv2.VideoCapture(str(path))
    for i in range(10):
        ok, frame = cap.read()
        assert ok, f"frame {i} missing"
        small = cv2.resize(frame, (8, 8), interpolation=cv2.INTER_AREA)
        np.testing.assert_array_equal(small[:, :, 1], images[i], err_msg=f"frame {i}")
    assert not cap.read()[0]
    cap.release()
