"""A white image with three lines of black text and each line's box: what a text detector
(PP-OCR's DBNet, post-processed as a heat map) must find one region for."""

from __future__ import annotations

import cv2
import numpy as np

LINES = [  # text, origin (bottom-left), font scale, thickness
    ("EDGEFLEET AGENT", (40, 80), 1.5, 3),
    ("model det@1.4.0 ok", (40, 170), 1.2, 2),
    ("Jetson Orin Nano", (60, 260), 1.0, 2),
]


def text_lines_image(height: int, width: int) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """The BGR image of ``LINES`` and each line's box ``(x1, y1, x2, y2)``, baseline included."""
    img = np.full((height, width, 3), 255, np.uint8)
    truth = []
    for text, org, scale, thick in LINES:
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)
        cv2.putText(img, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), thick, cv2.LINE_AA)
        truth.append((org[0], org[1] - th, org[0] + tw, org[1] + base))
    return img, truth
