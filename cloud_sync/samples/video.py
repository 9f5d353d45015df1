"""Adapter: the test videos — digits and a moving blob, written losslessly with OpenCV or ffmpeg.

Lossless (FFV1) so that a decoded frame equals the frame written, pixel for pixel: tests compare
what the pipeline sees against the ground truth these functions return.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from cloud_sync.samples.blobdet import Box, blob_frame


def _write_video(path: Path, frames: Sequence[np.ndarray], fps: int, codec: str) -> None:
    """Write BGR frames losslessly: cv2.VideoWriter, else pipe raw frames to ffmpeg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*codec), fps, (w, h), True)
    if writer.isOpened():
        for f in frames:
            writer.write(f)
        writer.release()
        return
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError(f"cv2 cannot write {codec} to {path} and ffmpeg is not on PATH")
    if codec != "FFV1":
        raise RuntimeError(f"cv2 cannot write {codec}; the ffmpeg fallback writes FFV1 only")
    cmd = [ffmpeg, "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24"]
    cmd += ["-s", f"{w}x{h}", "-r", str(fps), "-i", "-", "-c:v", "ffv1", "-pix_fmt", "bgr0"]
    subprocess.run([*cmd, str(path)], input=b"".join(f.tobytes() for f in frames), check=True)


def write_digit_video(
    path: Path,
    images_uint8: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    *,
    scale: int = 20,
    fps: int = 25,
    codec: str = "FFV1",
) -> list[int]:
    """One frame per 8x8 digit, nearest-neighbour upscaled by ``scale`` (so INTER_AREA back to
    8x8 recovers the exact pixels), as 3-channel grey BGR, in a lossless codec (FFV1 in .mkv/.avi).

    Returns:
        The label of each frame, in order.

    Raises:
        ValueError: images and labels disagree in count, or images are not [n,8,8] uint8.
    """
    images = np.asarray(images_uint8)
    if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(labels):
        raise ValueError(
            f"expected uint8 [n,H,W] images and n labels, got {images.dtype} {images.shape} "
            f"and {len(labels)} labels"
        )
    frames = [
        cv2.cvtColor(np.kron(img, np.ones((scale, scale), np.uint8)), cv2.COLOR_GRAY2BGR)
        for img in images
    ]
    _write_video(Path(path), frames, fps, codec)
    return [int(lb) for lb in labels]


def blob_track(
    n_frames: int, size: tuple[int, int] = (640, 480), *, side: int = 64
) -> list[list[Box]]:
    """Ground truth for ``write_blob_video``: one square bouncing around the frame."""
    w, h = size
    boxes = []
    for t in range(n_frames):
        # triangle waves with coprime periods, so the square visits the whole frame
        px, py = (t * 11) % (2 * (w - side)), (t * 7) % (2 * (h - side))
        x = px if px <= w - side else 2 * (w - side) - px
        y = py if py <= h - side else 2 * (h - side) - py
        boxes.append([(x, y, x + side, y + side)])
    return boxes


def write_blob_video(
    path: Path, n_frames: int, size: tuple[int, int] = (640, 480), fps: int = 25
) -> list[list[Box]]:
    """A lossless FFV1 video of a white 64-px square moving on a dark (20) background.

    Returns:
        Per frame, the ground-truth boxes as (x1, y1, x2, y2) frame pixels, x2/y2 exclusive.
    """
    track = blob_track(n_frames, size)
    frames = [blob_frame(size, boxes[0]) for boxes in track]
    _write_video(Path(path), frames, fps, "FFV1")
    return track
