"""Pure: request bodies of the local inference API — what they are and what they hold.

Untrusted bytes are identified by their magic number (a declared content type must agree),
image dimensions are read from the PNG/JPEG header before anything is decoded (a 30 kB PNG
can declare 60,000 x 60,000 pixels), and ``.npy`` headers are checked against the bytes that
follow before an array is made (``np.load`` on a buffer allocates the declared size first).
OpenCV decoding of images is the one adapter call here (``decode_image``).
"""

from __future__ import annotations

import ast
import struct
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np

from agent.common.errors import BadDataError

Kind = Literal["jpeg", "png", "npy"]

MEDIA_TYPES: dict[str, Kind | None] = {
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/png": "png",
    "application/x-npy": "npy",
    "application/octet-stream": None,  # sniffed
}
_MAGIC: tuple[tuple[bytes, Kind], ...] = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x93NUMPY", "npy"),
)
# JPEG start-of-frame markers that carry the image size (not DHT C4, JPG C8, DAC CC)
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_NPY_DTYPES = {"float32", "float16", "uint8"}  # what model inputs take (InputSpec.dtype)


class PayloadError(BadDataError):
    """A request body the API cannot use.

    Attributes:
        status: the HTTP status that says why (400 malformed, 413 too large, 415 media type).
    """

    def __init__(self, message: str, *, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Payload:
    """A request body identified: ``kind`` and its bytes."""

    kind: Kind
    data: bytes


def sniff(data: bytes) -> Kind | None:
    """The payload kind from its magic number, or None."""
    for magic, kind in _MAGIC:
        if data.startswith(magic):
            return kind
    return None


def identify(data: bytes, content_type: str | None) -> Payload:
    """Identify a body by its magic number; a specific declared media type must agree.

    Raises:
        PayloadError: empty, an unsupported media type (415), or bytes that are not what the
            media type says (400).
    """
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media and media not in MEDIA_TYPES:
        raise PayloadError(
            f"content type {media!r} is not supported; send image/jpeg, image/png, "
            "application/x-npy (a NumPy .npy tensor) or multipart/form-data with a 'file' part",
            status=415,
        )
    if not data:
        raise PayloadError("request body is empty; expected a JPEG, PNG or .npy payload")
    found = sniff(data)
    declared = MEDIA_TYPES.get(media)
    if found is None:
        what = f"declared {media}" if media else "no content type"
        raise PayloadError(
            f"body is not a JPEG, PNG or .npy file ({what}; first bytes {data[:8]!r})"
        )
    if declared is not None and declared != found:
        raise PayloadError(f"content type says {media} but the body is a {found} file")
    return Payload(found, data)


def image_size(data: bytes, kind: Kind) -> tuple[int, int]:
    """``(width, height)`` from a PNG IHDR or a JPEG start-of-frame, without decoding.

    Raises:
        PayloadError: the header is truncated or malformed.
    """
    if kind == "png":
        # signature (8), IHDR length (4) and type (4), then width, height (big-endian)
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise PayloadError("PNG has no IHDR header: not a valid PNG image")
        w, h = struct.unpack(">II", data[16:24])
        return int(w), int(h)
    if kind == "jpeg":
        return _jpeg_size(data)
    raise PayloadError(f"{kind} is not an image")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2  # after SOI
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise PayloadError(f"JPEG marker expected at byte {i}: not a valid JPEG image")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # TEM, RSTn: no length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # EOI or SOS before any SOF
            break
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if length < 2:
            raise PayloadError(f"JPEG segment at byte {i} has length {length}")
        if marker in _SOF:
            if i + 9 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return int(w), int(h)
        i += 2 + length
    raise PayloadError("JPEG has no frame header (SOF) before its data: not a valid JPEG image")


def decode_image(payload: Payload, *, max_pixels: int) -> np.ndarray:
    """Decode a JPEG/PNG into a BGR uint8 frame, as cameras deliver them (alpha dropped,
    grey expanded, 16-bit scaled to 8).

    Raises:
        PayloadError: malformed (400), or larger than ``max_pixels`` (413).
    """
    w, h = image_size(payload.data, payload.kind)
    if w == 0 or h == 0:
        raise PayloadError(f"{payload.kind.upper()} header says {w}x{h} pixels: empty image")
    if w * h > max_pixels:
        raise PayloadError(
            f"image is {w}x{h} = {w * h / 1e6:.1f} megapixels, the limit is "
            f"{max_pixels / 1e6:.1f} ([api] max_image_mpix)",
            status=413,
        )
    buf = np.frombuffer(payload.data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    except cv2.error as e:  # OpenCV raises on some corrupt streams instead of returning None
        raise PayloadError(f"cannot decode the {payload.kind.upper()} image: {e}") from e
    if img is None or img.size == 0:
        raise PayloadError(f"cannot decode the {payload.kind.upper()} image: corrupt or truncated")
    return np.asarray(img)


def parse_npy(data: bytes) -> np.ndarray:
    """A NumPy ``.npy`` (format 1.0-3.0) of a plain numeric dtype, checked before allocation.

    Raises:
        PayloadError: malformed header, object/structured/unsupported dtype, or a data length
            that does not match the header's shape.
    """
    if not data.startswith(b"\x93NUMPY") or len(data) < 10:
        raise PayloadError("not a .npy file (magic \\x93NUMPY missing)")
    major = data[6]
    if major == 1:
        (hlen,) = struct.unpack("<H", data[8:10])
        start = 10
    elif major in (2, 3):
        if len(data) < 12:
            raise PayloadError(".npy header truncated")
        (hlen,) = struct.unpack("<I", data[8:12])
        start = 12
    else:
        raise PayloadError(f".npy format version {major} is not supported (1, 2 or 3)")
    if start + hlen > len(data) or hlen > 65536:
        raise PayloadError(f".npy header of {hlen} bytes does not fit the body")
    header = _npy_header(data[start : start + hlen])
    descr, fortran, shape = header["descr"], header["fortran_order"], header["shape"]
    try:
        dtype = np.dtype(descr)
    except (TypeError, ValueError) as e:
        raise PayloadError(f".npy dtype {descr!r} is not valid: {e}") from e
    if dtype.name not in _NPY_DTYPES or dtype.byteorder == ">":
        raise PayloadError(
            f".npy dtype {dtype.name} ({dtype.str}) is not supported; model inputs are "
            "little-endian "
            f"{sorted(_NPY_DTYPES)}"
        )
    count = 1
    for d in shape:
        count *= d
    body = data[start + hlen :]
    if count * dtype.itemsize != len(body):
        raise PayloadError(
            f".npy header says shape {list(shape)} of {dtype.name} "
            f"({count * dtype.itemsize} bytes), the body holds {len(body)}"
        )
    arr = np.frombuffer(body, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return np.array(arr, order="C", copy=True)  # owned, writable, C order (0-d stays 0-d)


def _npy_header(raw: bytes) -> dict[str, Any]:
    try:
        header = ast.literal_eval(raw.decode("latin1"))
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        # TypeError: a literal that cannot be built, e.g. {[]: 1} (an unhashable key)
        raise PayloadError(f".npy header is not a Python literal: {e}") from e
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise PayloadError(".npy header must be a dict of descr, fortran_order and shape")
    shape = header["shape"]
    if (
        not isinstance(shape, tuple)
        or len(shape) > 8
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**31 for d in shape)
    ):
        raise PayloadError(f".npy shape {shape!r} is not a tuple of at most 8 sizes")
    if not isinstance(header["fortran_order"], bool) or not isinstance(header["descr"], str):
        raise PayloadError(".npy header has a bad descr or fortran_order")
    return header
