"""Preprocessing: letterbox geometry, colour order, normalisation, layouts, bare-model specs."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.common.errors import BadDataError, ModelError
from agent.pipeline.preprocess import FrameTransform, Preprocessor, input_spec_from_shape
from agent.protocol.card import InputSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def identity_spec(**kw: Any) -> InputSpec:
    """Tensor values equal pixel values: geometry tests read the picture straight back."""
    base: dict[str, Any] = {"color": "bgr", "scale": 1.0, "mean": (0.0,), "std": (1.0,)}
    return InputSpec(**(base | kw))


def reference(frame: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The textbook pipeline in plain NumPy: canvas, paste, swap, scale, normalise, layout."""
    h, w = frame.shape[:2]
    if spec.resize == "letterbox":
        r = min(spec.width / w, spec.height / h)
        nw, nh = round(w * r), round(h * r)
    else:
        nw, nh = spec.width, spec.height
    left, top = (spec.width - nw) // 2, (spec.height - nh) // 2
    img = frame if (nw, nh) == (w, h) else cv2.resize(frame, (nw, nh))
    canvas = np.full((spec.height, spec.width, 3), spec.pad_value, np.uint8)
    canvas[top : top + nh, left : left + nw] = img
    if spec.color == "rgb":
        canvas = canvas[..., ::-1]
    mean = np.array(spec.mean, np.float64)
    std = np.array(spec.std, np.float64)
    x = (canvas.astype(np.float64) * spec.scale - mean) / std
    return x.transpose(2, 0, 1)[None] if spec.layout == "nchw" else x[None]


def rng_frame(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- letterbox geometry --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("src_wh", "model_wh"),
    [
        ((640, 480), (640, 640)),  # camera 4:3 into a square detector
        ((480, 640), (640, 640)),  # portrait
        ((1920, 1080), (640, 640)),  # 1080p, downscale by 3
        ((1280, 720), (416, 256)),  # non-square model input
        ((300, 300), (640, 640)),  # upscale
        ((100, 900), (320, 320)),  # very tall
        ((900, 100), (320, 320)),  # very wide
        ((333, 777), (224, 224)),  # odd sizes
    ],
)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_letterbox_round_trip(
    src_wh: tuple[int, int], model_wh: tuple[int, int], layout: str
) -> None:
    w, h = src_wh
    mw, mh = model_wh
    box = np.array([w * 0.2, h * 0.3, w * 0.7, h * 0.8]).round()
    frame = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box.astype(int)
    frame[y1:y2, x1:x2] = 255  # pixels x1..x2-1: edges at x1 and x2
    spec = identity_spec(width=mw, height=mh, layout=layout, pad_value=0)

    tensor, t = Preprocessor(spec)(frame)

    plane = tensor[0, 0] if layout == "nchw" else tensor[0, :, :, 0]
    ys, xs = np.nonzero(plane > 127)
    found = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    back = t.to_source(found)[0]
    # Thresholding a resized edge is exact to half a model pixel: in source pixels that is
    # 0.5 / scale, so allow 1 px, or more only where the model input is coarser than 2:1.
    tol = max(1.0, 0.5 / min(t.scale_x, t.scale_y) + 0.5)
    np.testing.assert_allclose(back, box, atol=tol)
    # Centred: the padding splits evenly (within a pixel) on both axes.
    used_w, used_h = w * t.scale_x, h * t.scale_y
    assert abs(t.pad_x - (mw - used_w - t.pad_x)) <= 1.0
    assert abs(t.pad_y - (mh - used_h - t.pad_y)) <= 1.0
    assert abs(t.scale_x - t.scale_y) <= 1.0 / min(w, h)  # aspect ratio kept


def test_letterbox_fills_pad_with_pad_value() -> None:
    spec = identity_spec(width=64, height=64, pad_value=114)
    frame = np.full((32, 64, 3), 7, np.uint8)
    tensor, t = Preprocessor(spec)(frame)
    assert (t.pad_x, t.pad_y, t.scale_x, t.scale_y) == (0.0, 16.0, 1.0, 1.0)
    assert (tensor[0, :, :16] == 114).all() and (tensor[0, :, 48:] == 114).all()
    assert (tensor[0, :, 16:48] == 7).all()


def test_to_source_clips_to_frame_and_checks_shape() -> None:
    t = FrameTransform(src_w=100, src_h=50, scale_x=2.0, scale_y=2.0, pad_x=10.0, pad_y=20.0)
    out = t.to_source(np.array([[0, 0, 500, 500], [30, 40, 50, 60]], np.float64))
    np.testing.assert_allclose(out, [[0, 0, 100, 50], [10, 10, 20, 20]])
    assert out.dtype == np.float32
    assert t.to_source(np.zeros((0, 4))).shape == (0, 4)
    with pytest.raises(BadDataError, match=r"\(N, 4\)"):
        t.to_source(np.zeros((3, 5)))


def test_stretch_fills_whole_input() -> None:
    spec = identity_spec(width=200, height=100, resize="stretch", pad_value=0)
    frame = np.zeros((300, 300, 3), np.uint8)
    frame[60:240, 90:150] = 200
    tensor, t = Preprocessor(spec)(frame)
    assert (t.pad_x, t.pad_y) == (0.0, 0.0)
    assert (t.scale_x, t.scale_y) == pytest.approx((200 / 300, 100 / 300))
    ys, xs = np.nonzero(tensor[0, 0] > 100)
    back = t.to_source(np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]]))[0]
    np.testing.assert_allclose(back, [90, 60, 150, 240], atol=2.0)
    ref = reference(frame, spec)
    np.testing.assert_allclose(tensor, ref, atol=1e-4)


# --- colour, normalisation, layout ---------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("color", ["rgb", "bgr"])
def test_pure_red_lands_in_the_red_channel(layout: str, color: str) -> None:
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[..., 2] = 255  # OpenCV is BGR: index 2 is red
    spec = InputSpec(width=64, height=48, layout=layout, color=color)
    tensor, _ = Preprocessor(spec)(frame)
    chw = tensor[0] if layout == "nchw" else tensor[0].transpose(2, 0, 1)
    red = 0 if color == "rgb" else 2
    assert np.allclose(chw[red], 1.0)
    assert np.allclose(np.delete(chw, red, axis=0), 0.0)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize(
    ("mean", "std", "scale"),
    [
        (IMAGENET_MEAN, IMAGENET_STD, 1 / 255),  # torchvision
        ((0.5,), (0.5,), 1 / 255),  # [-1, 1], PaddleOCR / TF
        ((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), 1.0),  # mmdet, pixel units
    ],
)
def test_normalisation_matches_numpy_reference(
    layout: str, mean: tuple[float, ...], std: tuple[float, ...], scale: float
) -> None:
    frame = rng_frame(480, 640)
    spec = InputSpec(width=320, height=320, layout=layout, mean=mean, std=std, scale=scale)
    tensor, _ = Preprocessor(spec)(frame)
    assert tensor.dtype == np.float32
    np.testing.assert_allclose(tensor, reference(frame, spec), rtol=0, atol=2e-5)


def test_float16_and_uint8_outputs() -> None:
    frame = rng_frame(120, 160, seed=3)
    spec16 = InputSpec(width=96, height=96, mean=IMAGENET_MEAN, std=IMAGENET_STD, dtype="float16")
    t16, _ = Preprocessor(spec16)(frame)
    assert t16.dtype == np.float16
    np.testing.assert_allclose(t16.astype(np.float64), reference(frame, spec16), atol=5e-3)
    for layout in ("nchw", "nhwc"):
        spec8 = identity_spec(width=96, height=96, layout=layout, dtype="uint8")
        t8, _ = Preprocessor(spec8)(frame)
        assert t8.dtype == np.uint8
        np.testing.assert_array_equal(t8, reference(frame, spec8).astype(np.uint8))


def test_uint8_saturates_instead_of_wrapping() -> None:
    spec = InputSpec(width=8, height=8, scale=2.0, mean=(10.0,), dtype="uint8", color="bgr")
    tensor, _ = Preprocessor(spec)(np.full((8, 8, 3), 200, np.uint8))
    assert (tensor == 255).all()  # 200 * 2 - 10 = 390 -> 255, not 390 % 256


@pytest.mark.parametrize("mean", [(0.0,), IMAGENET_MEAN])
def test_nhwc_is_nchw_transposed(mean: tuple[float, ...]) -> None:
    frame = rng_frame(480, 640, seed=1)
    kw: dict[str, Any] = {"width": 256, "height": 192, "mean": mean}
    nchw, t1 = Preprocessor(InputSpec(layout="nchw", **kw))(frame)
    nhwc, t2 = Preprocessor(InputSpec(layout="nhwc", **kw))(frame)
    assert nchw.shape == (1, 3, 192, 256) and nhwc.shape == (1, 192, 256, 3)
    np.testing.assert_allclose(nhwc[0].transpose(2, 0, 1), nchw[0], atol=1e-6)
    assert t1 == t2


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gray_model_from_colour_frame(layout: str) -> None:
    frame = rng_frame(60, 80, seed=2)
    spec = InputSpec(width=80, height=60, channels=1, color="gray", layout=layout)
    tensor, _ = Preprocessor(spec)(frame)
    assert tensor.shape == ((1, 1, 60, 80) if layout == "nchw" else (1, 60, 80, 1))
    want = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255
    np.testing.assert_allclose(tensor.reshape(60, 80), want, atol=1e-6)


@pytest.mark.parametrize("shape", [(60, 80), (60, 80, 1)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gray_frame_into_colour_model(shape: tuple[int, ...], layout: str) -> None:
    frame = np.random.default_rng(4).integers(0, 256, shape, dtype=np.uint8)
    spec = InputSpec(width=80, height=60, layout=layout, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    tensor, _ = Preprocessor(spec)(frame)
    chw = tensor[0] if layout == "nchw" else tensor[0].transpose(2, 0, 1)
    g = frame.reshape(60, 80).astype(np.float64) / 255
    for c in range(3):  # R = G = B = grey, each normalised with its own mean/std
        np.testing.assert_allclose(chw[c], (g - IMAGENET_MEAN[c]) / IMAGENET_STD[c], atol=2e-5)


def test_bgra_and_non_contiguous_frames() -> None:
    frame = rng_frame(50, 70, seed=5)
    spec = InputSpec(width=64, height=64)
    want, _ = Preprocessor(spec)(frame)
    bgra = np.dstack([frame, np.full(frame.shape[:2], 9, np.uint8)])
    np.testing.assert_array_equal(Preprocessor(spec)(bgra)[0], want)
    flipped = np.ascontiguousarray(frame[::-1])[::-1]  # negative strides, same picture
    np.testing.assert_array_equal(Preprocessor(spec)(flipped)[0], want)


@pytest.mark.parametrize(
    "frame",
    [
        np.zeros((0, 0, 3), np.uint8),
        np.zeros((10, 0, 3), np.uint8),
        np.zeros((0, 10), np.uint8),
        np.zeros((10,), np.uint8),
        np.zeros((1, 10, 10, 3), np.uint8),
        np.zeros((10, 10, 2), np.uint8),
        np.zeros((10, 10, 3), np.float32),
        [[1, 2], [3, 4]],
        None,
    ],
    ids=[
        "empty",
        "zero-width",
        "zero-height-gray",
        "rank1",
        "rank4",
        "2ch",
        "float",
        "list",
        "none",
    ],
)
def test_bad_frames_raise_bad_data(frame: Any) -> None:
    with pytest.raises(BadDataError, match="frame"):
        Preprocessor(InputSpec(width=32, height=32))(frame)


# --- random frames and specs ---------------------------------------------------------------


@st.composite
def specs(draw: st.DrawFn) -> InputSpec:
    channels = draw(st.sampled_from([1, 3]))
    color = "gray" if channels == 1 else draw(st.sampled_from(["rgb", "bgr"]))
    n = draw(st.sampled_from([1, channels]))
    mean = tuple(draw(st.lists(st.floats(-300, 300), min_size=n, max_size=n)))
    std = tuple(
        draw(st.lists(st.floats(0.01, 300) | st.floats(-300, -0.01), min_size=n, max_size=n))
    )
    return InputSpec(
        width=draw(st.integers(1, 160)),
        height=draw(st.integers(1, 160)),
        channels=channels,
        color=color,
        layout=draw(st.sampled_from(["nchw", "nhwc"])),
        resize=draw(st.sampled_from(["letterbox", "stretch"])),
        pad_value=draw(st.integers(0, 255)),
        scale=draw(st.floats(1e-4, 10.0)),
        mean=mean,
        std=std,
        dtype=draw(st.sampled_from(["float32", "float16", "uint8"])),
    )


@settings(max_examples=150, deadline=None)
@given(
    spec=specs(),
    h=st.integers(1, 200),
    w=st.integers(1, 200),
    chans=st.sampled_from([None, 1, 3, 4]),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_frame_any_spec_gives_the_declared_tensor(
    spec: InputSpec, h: int, w: int, chans: int | None, seed: int
) -> None:
    shape = (h, w) if chans is None else (h, w, chans)
    frame = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    tensor, t = Preprocessor(spec)(frame)
    c = spec.channels
    want = (
        (1, c, spec.height, spec.width)
        if spec.layout == "nchw"
        else (1, spec.height, spec.width, c)
    )
    assert tensor.shape == want
    assert tensor.dtype == np.dtype(spec.dtype)
    if spec.dtype == "float32":  # float16 may overflow to inf for extreme mean/std: by design
        assert np.isfinite(tensor).all()
    # The whole model input maps onto the whole frame (letterbox: at most the pad is lost).
    full = t.to_source(np.array([[0, 0, spec.width, spec.height]]))[0]
    np.testing.assert_allclose(full, [0, 0, w, h], atol=1e-3)
    assert t.src_w == w and t.src_h == h


# --- specs for bare models -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "size", "want"),
    [
        ((1, 3, 640, 640), None, ("nchw", 3, 640, 640, "rgb")),
        ((1, 224, 224, 3), None, ("nhwc", 3, 224, 224, "rgb")),
        ((1, 1, 28, 28), None, ("nchw", 1, 28, 28, "gray")),
        ((1, 32, 100, 1), None, ("nhwc", 1, 100, 32, "gray")),
        (("N", 3, "H", "W"), (320, 256), ("nchw", 3, 320, 256, "rgb")),
        ((None, 3, None, None), (96, 64), ("nchw", 3, 96, 64, "rgb")),
        ((-1, -1, -1, 3), (96, 64), ("nhwc", 3, 96, 64, "rgb")),
        ((1, 3, 640, "W"), (512, 640), ("nchw", 3, 512, 640, "rgb")),
        ((1, 3, 640, 640), (640, 640), ("nchw", 3, 640, 640, "rgb")),
    ],
)
def test_input_spec_from_shape(
    shape: tuple[Any, ...], size: tuple[int, int] | None, want: tuple[Any, ...]
) -> None:
    spec = input_spec_from_shape(shape, input_size=size)
    assert (spec.layout, spec.channels, spec.width, spec.height, spec.color) == want
    assert spec.scale == pytest.approx(1 / 255)
    assert (spec.mean, spec.std, spec.resize, spec.dtype) == (
        (0.0,),
        (1.0,),
        "letterbox",
        "float32",
    )


@pytest.mark.parametrize(
    ("shape", "size", "reason", "match"),
    [
        ((1, 3, "H", "W"), None, "shape", "--input-size WxH"),
        ((-1, 3, -1, -1), None, "shape", "--input-size WxH"),
        ((1, 3, 640, 640), (320, 320), "shape", "fixed at 640x640"),
        ((8, 3, 224, 224), None, "shape", "batch is fixed at 8"),
        ((3, 224, 224), None, "shape", "rank 4"),
        ((1, 5, 10, 10), None, "shape", "1 or 3 channels"),
        ((1, 3, "H", "W"), (0, 10), "shape", "out of range"),
    ],
)
def test_input_spec_from_shape_errors(
    shape: tuple[Any, ...], size: tuple[int, int] | None, reason: str, match: str
) -> None:
    with pytest.raises(ModelError, match=match) as e:
        input_spec_from_shape(shape, input_size=size)
    assert e.value.reason == reason


def test_input_spec_from_shape_dtypes() -> None:
    assert input_spec_from_shape((1, 3, 8, 8), dtype="uint8").dtype == "uint8"
    assert input_spec_from_shape((1, 3, 8, 8), dtype="float16").dtype == "float16"
    with pytest.raises(ModelError, match="int64") as e:
        input_spec_from_shape((1, 3, 8, 8), dtype="int64")
    assert e.value.reason == "dtype"
