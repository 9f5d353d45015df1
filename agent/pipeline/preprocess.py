"""Pure: turn a camera frame into a model input tensor, and map model coordinates back.

The card's ``InputSpec`` says what the model eats; ``Preprocessor`` makes exactly that from an
OpenCV frame (HxWx3 BGR or HxW grey, uint8) in one resize and one fused affine per channel:

    y[c] = x[src(c)] * (scale / std[c]) - mean[c] / std[c]

which is ``(x * scale - mean) / std`` folded into a single multiply-add that OpenCV computes,
saturates and casts to the output dtype while writing straight into the output tensor (no
intermediate float image). Letterbox padding is written as the same affine of ``pad_value``, so
the pad and the picture agree bit for bit.

``FrameTransform`` records the geometry so post-processing can map boxes found in model-input
pixels back to source-frame pixels. Coordinates are continuous (pixel edges): model-input
``x`` maps to source ``(x - pad_x) / scale_x``, consistent with OpenCV's pixel-centre resize.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, cast

import cv2
import numpy as np
import numpy.typing as npt

from agent.common.errors import BadDataError, ModelError
from agent.protocol.card import InputSpec

__all__ = [
    "FrameTransform",
    "Preprocessor",
    "constant_feeds",
    "image_input_name",
    "input_spec_from_shape",
]

Array = npt.NDArray[Any]

_CV_DEPTH = {"float32": cv2.CV_32F, "float16": cv2.CV_16F, "uint8": cv2.CV_8U}
_MAX_SIDE = 8192  # InputSpec's bound on width/height


@dataclass(frozen=True)
class FrameTransform:
    """How model-input coordinates map back to the source frame.

    Attributes:
        src_w: source frame width in pixels.
        src_h: source frame height in pixels.
        scale_x: model-input pixels per source pixel, horizontally.
        scale_y: model-input pixels per source pixel, vertically.
        pad_x: left padding in model-input pixels (letterbox), else 0.
        pad_y: top padding in model-input pixels (letterbox), else 0.
    """

    src_w: int
    src_h: int
    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float

    def to_source(self, boxes_xyxy: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Map boxes from model-input pixels to source-frame pixels, clipped to the frame.

        Args:
            boxes_xyxy: (N, 4) array of x1, y1, x2, y2 in model-input pixels.

        Returns:
            A new (N, 4) float32 array in source pixels, each coordinate clipped to
            ``[0, src_w]`` / ``[0, src_h]``.

        Raises:
            BadDataError: ``boxes_xyxy`` is not an (N, 4) numeric array.
        """
        try:
            boxes = np.asarray(boxes_xyxy, dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise BadDataError(f"boxes must be a numeric (N, 4) array: {e}") from e
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise BadDataError(f"boxes must have shape (N, 4), got {boxes.shape}")
        out = np.empty(boxes.shape, dtype=np.float64)
        np.subtract(boxes[:, 0::2], self.pad_x, out=out[:, 0::2])
        np.subtract(boxes[:, 1::2], self.pad_y, out=out[:, 1::2])
        out[:, 0::2] /= self.scale_x
        out[:, 1::2] /= self.scale_y
        np.clip(out[:, 0::2], 0.0, float(self.src_w), out=out[:, 0::2])
        np.clip(out[:, 1::2], 0.0, float(self.src_h), out=out[:, 1::2])
        return out.astype(np.float32)


def constant_feeds(spec: InputSpec) -> dict[str, Array]:
    """The card's constant extra inputs (PaddleDetection's ``im_shape``...) as arrays."""
    return {c.name: np.asarray(c.values, dtype=c.dtype).reshape(c.shape) for c in spec.constants}


def image_input_name(spec: InputSpec, input_names: list[str] | tuple[str, ...]) -> str:
    """The one model input the frame goes to: every input the card does not feed a constant.

    Raises:
        ModelError: (reason ``"inputs"``) not exactly one such input, or a constant the
            model has no input for.
    """
    consts = {c.name for c in spec.constants}
    unknown = sorted(consts - set(input_names))
    images = [n for n in input_names if n not in consts]
    if unknown or len(images) != 1:
        why = (
            f"constants {unknown} name no model input"
            if unknown
            else (f"{len(images)} inputs {images} are left for the image")
        )
        raise ModelError(
            f"model inputs are {list(input_names)}, the card feeds constants {sorted(consts)}: "
            f"{why}; expected exactly one image input (give the others as input.constants)",
            reason="inputs",
        )
    return images[0]


@dataclass(frozen=True)
class _Geometry:
    new_w: int  # size of the resized picture inside the model input
    new_h: int
    left: int  # its offset in the model input
    top: int
    transform: FrameTransform
    crop: tuple[int, int, int, int] | None = None  # source ROI (x, y, w, h) for center_crop


def _crop_geometry(src_w: int, src_h: int, dst_w: int, dst_h: int, ratio: float) -> _Geometry:
    """center_crop: the frame scaled so it covers the input enlarged by 1/ratio (ImageNet:
    short side 256 for a 224 crop), and the input-sized centre cut out of it."""
    r = max(dst_w / src_w, dst_h / src_h) / ratio
    roi_w = max(1, min(src_w, round(dst_w / r)))
    roi_h = max(1, min(src_h, round(dst_h / r)))
    x0, y0 = (src_w - roi_w) // 2, (src_h - roi_h) // 2
    sx, sy = dst_w / roi_w, dst_h / roi_h
    t = FrameTransform(src_w, src_h, sx, sy, -x0 * sx, -y0 * sy)
    return _Geometry(dst_w, dst_h, 0, 0, t, (x0, y0, roi_w, roi_h))


def _geometry(
    src_w: int, src_h: int, dst_w: int, dst_h: int, letterbox: bool, top_left: bool = False
) -> _Geometry:
    """Where a src_w x src_h frame lands in a dst_w x dst_h model input (letterboxed
    pictures centred, or at the top-left corner as YOLOX's ``preproc`` puts them)."""
    if not letterbox:
        new_w, new_h = dst_w, dst_h
    else:
        r = min(dst_w / src_w, dst_h / src_h)
        new_w = min(dst_w, max(1, round(src_w * r)))
        new_h = min(dst_h, max(1, round(src_h * r)))
    left, top = (0, 0) if top_left else ((dst_w - new_w) // 2, (dst_h - new_h) // 2)
    # Per-axis scales from the rounded size, so the mapping is exact for what was drawn.
    t = FrameTransform(src_w, src_h, new_w / src_w, new_h / src_h, float(left), float(top))
    return _Geometry(new_w, new_h, left, top, t)


def _per_channel(values: tuple[float, ...], channels: int) -> tuple[float, ...]:
    return values * channels if len(values) == 1 else values


class Preprocessor:
    """Frame → model input tensor, as an ``InputSpec`` describes.

    It keeps no state between frames except the geometry for the last frame size (replaced
    with one reference swap), so one instance may serve several threads. Each call returns a
    NEW tensor: the caller may keep it (e.g. across a model hot swap) without it changing.

    Mean and std are given per channel in the MODEL's channel order (``mean[0]`` is R when
    ``spec.color == "rgb"``), as model cards and training code state them.
    """

    def __init__(self, spec: InputSpec, *, interpolation: int = cv2.INTER_LINEAR) -> None:
        """Precompute the fused per-channel affine and the padding values.

        Args:
            spec: the model's input spec.
            interpolation: OpenCV resize interpolation (bilinear, as YOLO/torchvision use).
        """
        self.spec = spec
        self._interp = interpolation
        c = spec.channels
        mean, std = _per_channel(spec.mean, c), _per_channel(spec.std, c)
        self._alpha = tuple(spec.scale / s for s in std)
        self._beta = tuple(-m / s for m, s in zip(mean, std, strict=True))
        self._uniform = len(set(self._alpha)) == 1 and len(set(self._beta)) == 1
        self._dtype = np.dtype(spec.dtype)
        self._depth = _CV_DEPTH[spec.dtype]
        # Source channel (in OpenCV's BGR) feeding each model channel.
        self._src = (2, 1, 0) if spec.color == "rgb" else (0, 1, 2)
        # The pad value through the same OpenCV affine as the picture: the same rounding.
        pad = np.full((1, 1), spec.pad_value, dtype=np.uint8)
        pad_px = np.array([self._affine(pad, i)[0, 0] for i in range(c)], dtype=self._dtype)
        self._pad_rows = np.ascontiguousarray(np.repeat(pad_px[:, None], spec.width, axis=1))
        self._pad_row_hwc = np.ascontiguousarray(self._pad_rows.T)
        self._last: _Geometry | None = None

    def _affine(self, plane: Array, i: int) -> Array:
        a, b = self._alpha[i], self._beta[i]
        return np.asarray(cv2.addWeighted(plane, a, plane, 0.0, b, dtype=self._depth))

    def _affine_into(self, src: Array, i: int, dst: Array) -> None:
        """dst[...] = src * alpha[i] + beta[i], saturated to dst's dtype, in one pass."""
        a, b = self._alpha[i], self._beta[i]
        _into(cv2.addWeighted(src, a, src, 0.0, b, dst=dst, dtype=self._depth), dst)

    def _geometry_for(self, w: int, h: int) -> _Geometry:
        g = self._last
        if g is None or g.transform.src_w != w or g.transform.src_h != h:
            spec = self.spec
            if spec.resize == "center_crop":
                g = _crop_geometry(w, h, spec.width, spec.height, spec.crop_ratio)
                self._last = g
                return g
            g = _geometry(
                w,
                h,
                spec.width,
                spec.height,
                spec.resize == "letterbox",
                spec.pad_position == "top_left",
            )
            self._last = g  # one reference swap: benign under threads
        return g

    def __call__(self, frame: Array) -> tuple[Array, FrameTransform]:
        """Preprocess one frame.

        Args:
            frame: HxWx3 BGR uint8 (as OpenCV gives), HxW or HxWx1 grey, or HxWx4 BGRA
                (alpha dropped).

        Returns:
            ``(tensor, transform)``: a new batch-1 tensor of shape (1, C, H, W) or (1, H, W, C)
            and dtype ``spec.dtype``, and the geometry to map model coordinates back.

        Raises:
            BadDataError: the frame is not a non-empty uint8 array of one of those shapes.
        """
        img = self._check_frame(frame)
        spec = self.spec
        g = self._geometry_for(img.shape[1], img.shape[0])
        if g.crop is not None:
            x0, y0, cw, ch = g.crop
            img = img[y0 : y0 + ch, x0 : x0 + cw]
        gray_model = spec.channels == 1
        src_is_gray = img.ndim == 2
        # Colour→grey on whichever of the frame or the resized picture is smaller.
        early_gray = (
            gray_model and not src_is_gray and img.shape[0] * img.shape[1] <= (g.new_w * g.new_h)
        )
        if early_gray:
            img = np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))
        if (img.shape[1], img.shape[0]) != (g.new_w, g.new_h):
            img = np.asarray(cv2.resize(img, (g.new_w, g.new_h), interpolation=self._interp))
        if gray_model and img.ndim == 3:
            img = np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY))

        if spec.layout == "nchw":
            out = np.empty((1, spec.channels, spec.height, spec.width), dtype=self._dtype)
            self._fill_nchw(out, img, g)
        else:
            out = np.empty((1, spec.height, spec.width, spec.channels), dtype=self._dtype)
            self._fill_nhwc(out, img, g)
        return out, g.transform

    @staticmethod
    def _check_frame(frame: object) -> Array:
        if not isinstance(frame, np.ndarray):
            raise BadDataError(f"frame must be a NumPy array, got {type(frame).__name__}")
        if frame.dtype != np.uint8:
            raise BadDataError(f"frame dtype must be uint8, got {frame.dtype}")
        if frame.ndim == 3 and frame.shape[2] == 1:
            frame = frame[:, :, 0]
        elif frame.ndim == 3 and frame.shape[2] == 4:
            frame = (
                np.asarray(cv2.cvtColor(frame, cv2.COLOR_BGRA2BGR))
                if frame.size
                else frame[..., :3]
            )
        if not (frame.ndim == 2 or (frame.ndim == 3 and frame.shape[2] == 3)):
            raise BadDataError(f"frame must be HxW, HxWx1, HxWx3 or HxWx4, got shape {frame.shape}")
        if frame.shape[0] == 0 or frame.shape[1] == 0:
            raise BadDataError(f"frame is empty: shape {frame.shape}")
        return frame

    @staticmethod
    def _fill_border(hw: Array, g: _Geometry, row: Array) -> None:
        """Set the letterbox border of an (H, W[, C]) view from one padded (W[, C]) row.

        Copying slices of a ready-made row is a plain memcpy per image row; broadcasting a
        3-vector into an interleaved image is several times slower.
        """
        t, b, left, r = g.top, g.top + g.new_h, g.left, g.left + g.new_w
        hw[:t] = row
        hw[b:] = row
        hw[t:b, :left] = row[:left]
        hw[t:b, r:] = row[r:]

    def _fill_nchw(self, out: Array, img: Array, g: _Geometry) -> None:
        planes = [img] if img.ndim == 2 else [np.asarray(p) for p in cv2.split(img)]
        ys, xs = slice(g.top, g.top + g.new_h), slice(g.left, g.left + g.new_w)
        padded = (g.new_w, g.new_h) != (self.spec.width, self.spec.height)
        for i in range(out.shape[1]):
            chan = out[0, i]
            if padded:
                self._fill_border(chan, g, self._pad_rows[i])
            plane = planes[0] if img.ndim == 2 else planes[self._src[i]]
            self._affine_into(plane, i, chan[ys, xs])

    def _fill_nhwc(self, out: Array, img: Array, g: _Geometry) -> None:
        hw = out[0]
        if (g.new_w, g.new_h) != (self.spec.width, self.spec.height):
            self._fill_border(hw, g, self._pad_row_hwc)
        view = hw[g.top : g.top + g.new_h, g.left : g.left + g.new_w]
        if self.spec.channels == 1:
            self._affine_into(img, 0, view[:, :, 0])
            return
        if img.ndim == 2:  # grey frame, colour model: R = G = B
            img = np.asarray(cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
        elif self._src[0] == 2:
            img = np.asarray(cv2.cvtColor(img, cv2.COLOR_BGR2RGB))
        if self._uniform:  # one fused pass over the interleaved picture, in model order
            self._affine_into(img, 0, view)
            return
        # Per-channel scale and offset: OpenCV multiplies/adds a per-channel Scalar, in place
        # (element-wise ops are safe in place), computing in float32 before any narrowing.
        work = view if self._dtype == np.float32 else np.empty(view.shape, np.float32)
        alpha: Any = self._alpha  # tuples are Scalars to OpenCV; its stubs list only arrays
        beta: Any = self._beta
        _into(cv2.multiply(img, alpha, dst=work, dtype=cv2.CV_32F), work)
        _into(cv2.add(work, beta, dst=work), work)
        if work is not view:
            _into(cv2.addWeighted(work, 1.0, work, 0.0, 0.0, dtype=self._depth), view)


def _into(result: Any, dst: Array) -> None:
    """Make sure an OpenCV result landed in dst (it allocates anew when it cannot use dst)."""
    if result is not dst:
        np.copyto(dst, result, casting="unsafe")


def _static(d: int | str | None) -> int | None:
    return d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None


def _image_layout(
    dims: tuple[int | str | None, ...],
) -> tuple[Literal["nchw", "nhwc"], int | str | None, int | str | None, bool]:
    """(layout, height dim, width dim, one channel) of a batch-1 image input's shape.

    Raises:
        ModelError: (reason ``"shape"``) not rank 4, a batch fixed above 1, or no 1 or 3
            channels at dim 1 or dim 3.
    """
    if len(dims) != 4:
        raise ModelError(
            f"model input has shape {list(dims)}, expected rank 4 (NCHW or NHWC image)",
            reason="shape",
        )
    batch = _static(dims[0])
    if batch is not None and batch != 1:
        raise ModelError(
            f"model input batch is fixed at {batch}, expected 1 or dynamic", reason="shape"
        )
    d1, d3 = _static(dims[1]), _static(dims[3])
    layout: Literal["nchw", "nhwc"]
    if d1 in (1, 3):
        layout, h_dim, w_dim = "nchw", dims[2], dims[3]
    elif d3 in (1, 3):
        layout, h_dim, w_dim = "nhwc", dims[1], dims[2]
    else:
        raise ModelError(
            f"model input has shape {list(dims)}: expected 1 or 3 channels at dim 1 (NCHW) "
            "or dim 3 (NHWC)",
            reason="shape",
        )
    gray = (d1 if layout == "nchw" else d3) == 1
    return layout, h_dim, w_dim, gray


def _spatial_size(
    dims: tuple[int | str | None, ...],
    h_dim: int | str | None,
    w_dim: int | str | None,
    input_size: tuple[int, int] | None,
) -> tuple[int, int]:
    """(width, height): the fixed dims, or ``input_size`` where they are dynamic.

    Raises:
        ModelError: (reason ``"shape"``) dynamic with no ``input_size``, ``input_size``
            contradicting a fixed dim, or a side out of range.
    """
    height, width = _static(h_dim), _static(w_dim)
    if input_size is not None:
        iw, ih = input_size
        if not (0 < iw <= _MAX_SIDE and 0 < ih <= _MAX_SIDE):
            raise ModelError(
                f"input size {iw}x{ih} is out of range, expected 1..{_MAX_SIDE} per side",
                reason="shape",
            )
        if (width is not None and width != iw) or (height is not None and height != ih):
            raise ModelError(
                f"model input is fixed at {width or '?'}x{height or '?'} (WxH) but input size "
                f"{iw}x{ih} was given; drop --input-size or pass a matching one",
                reason="shape",
            )
        width, height = iw, ih
    if width is None or height is None:
        raise ModelError(
            f"model input has dynamic spatial size (shape {list(dims)}); pass --input-size WxH",
            reason="shape",
        )
    if width > _MAX_SIDE or height > _MAX_SIDE:
        raise ModelError(
            f"model input is {width}x{height}, expected at most {_MAX_SIDE} per side",
            reason="shape",
        )
    return width, height


def input_spec_from_shape(
    shape: tuple[int | str | None, ...],
    *,
    input_size: tuple[int, int] | None = None,
    dtype: str = "float32",
) -> InputSpec:
    """Derive an ``InputSpec`` for a bare ONNX model (no card) from its input shape.

    Layout is NCHW when dim 1 is 1 or 3, else NHWC. Defaults for bare models: RGB (grey for one
    channel), scale 1/255, mean 0, std 1, letterbox. Dynamic dimensions are ``None``, strings
    or non-positive ints.

    Args:
        shape: the model input's shape, e.g. ``(1, 3, 640, 640)`` or ``("N", 3, "H", "W")``.
        input_size: ``(width, height)`` for dynamic spatial dimensions (``--input-size WxH``).
        dtype: the input's NumPy dtype name: float32, float16 or uint8.

    Returns:
        The derived input spec.

    Raises:
        ModelError: (reason ``"shape"``) the shape is not a batch-1 image tensor, the spatial
            size is dynamic and no ``input_size`` was given, or ``input_size`` contradicts a
            fixed size; (reason ``"dtype"``) an input dtype the preprocessor cannot make.
    """
    if dtype not in _CV_DEPTH:
        raise ModelError(
            f"model input dtype is {dtype!r}, expected one of {sorted(_CV_DEPTH)}",
            reason="dtype",
        )
    dims = tuple(shape)
    layout, h_dim, w_dim, gray = _image_layout(dims)
    width, height = _spatial_size(dims, h_dim, w_dim, input_size)
    return InputSpec(
        width=width,
        height=height,
        channels=1 if gray else 3,
        color="gray" if gray else "rgb",
        layout=layout,
        resize="letterbox",
        pad_value=114,
        scale=1.0 / 255.0,
        mean=(0.0,),
        std=(1.0,),
        dtype=cast(Literal["float32", "float16", "uint8"], dtype),  # checked above
    )
