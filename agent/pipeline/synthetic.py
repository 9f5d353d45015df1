"""Adapter: synthetic test videos written with OpenCV (for ``bench`` and the demo).

A moving bright square on a dark, slightly noisy background, encoded as MJPEG in an AVI so
that decoding costs something real, like a camera's compressed stream.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_synthetic_video(
    path: str | Path,
    *,
    frames: int = 300,
    size: tuple[int, int] = (640, 480),
    fps: float = 30.0,
    seed: int = 0,
) -> Path:
    """Write ``frames`` frames of a moving white square; returns the path.

    Raises:
        OSError: OpenCV could not open a writer for the path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise OSError(f"OpenCV cannot write MJPEG video to {path}")
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 40, size=(h, w, 3), dtype=np.uint8)
    side = max(8, min(w, h) // 6)
    try:
        for i in range(frames):
            img = noise.copy()
            t = i / max(1, frames - 1)
            x = int((w - side) * (0.5 + 0.45 * np.sin(2 * np.pi * t)))
            y = int((h - side) * (0.5 + 0.45 * np.cos(2 * np.pi * t)))
            cv2.rectangle(img, (x, y), (x + side, y + side), (255, 255, 255), thickness=-1)
            cv2.putText(img, str(i), (10, h - 10), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (0, 200, 255), 2)
            writer.write(img)
    finally:
        writer.release()
    return path
