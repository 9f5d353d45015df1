"""Adapter: opt-in camera snapshots — a JPEG of the frame at most once per ``every_s``.

Frames never leave the device unless a pipeline sets ``[pipelines.snapshots]``. The sink
encodes on the inference thread (about 2 ms for 640x480 at quality 80, once per interval) and
puts the ``Snapshot`` message in the outbox like events, so it survives outages within the
outbox's bound.
"""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np

from agent.common.errors import EdgefleetError
from agent.pipeline.sinks import Sink
from agent.protocol.telemetry import Snapshot
from agent.telemetry.outbox import Outbox


def encode_jpeg(image: np.ndarray, *, max_width: int, quality: int) -> tuple[bytes, int, int]:
    """JPEG bytes of a BGR frame, downscaled to ``max_width`` (aspect kept); with its size.

    Raises:
        EdgefleetError: OpenCV could not encode the frame.
    """
    h, w = image.shape[:2]
    if w > max_width:
        h, w = max(1, round(h * max_width / w)), max_width
        image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise EdgefleetError(f"could not encode a {w}x{h} frame as JPEG")
    return buf.tobytes(), w, h


def snapshot_message(
    device_id: str, event: dict[str, Any], image: np.ndarray, *, max_width: int, quality: int
) -> tuple[Snapshot, bytes]:
    """The ``Snapshot`` of one inferred frame (its event names pipeline, model and frame), with
    the JPEG bytes in it.

    Raises:
        EdgefleetError: OpenCV could not encode the frame.
    """
    jpeg, w, h = encode_jpeg(image, max_width=max_width, quality=quality)
    msg = Snapshot(
        device_id=device_id,
        pipeline=event["pipeline"],
        model=event.get("model"),
        version=event.get("version"),
        frame_seq=event["frame_seq"],
        frame_time=event["frame_time"],
        width=w,
        height=h,
        jpeg_b64=base64.b64encode(jpeg).decode("ascii"),
    )
    return msg, jpeg


class FrameGrab(Sink):
    """A one-shot sink: keeps the next inferred frame and its event (``snapshot`` command).

    Added to a pipeline's sinks by replacing the list (the inference thread iterates the list
    it read), and taken out the same way once it holds a frame.
    """

    wants_frame = True

    def __init__(self) -> None:
        self.got = threading.Event()
        self.event: dict[str, Any] = {}
        self.image: Any = None

    def emit(self, event: dict[str, Any]) -> None:
        """Without its frame an event has nothing to snapshot."""

    def emit_frame(self, event: dict[str, Any], image: Any) -> None:
        if not self.got.is_set():
            self.event, self.image = dict(event), image.copy()
            self.got.set()


class SnapshotSink(Sink):
    """Puts one ``Snapshot`` per ``every_s`` in the outbox."""

    wants_frame = True

    def __init__(
        self,
        device_id: str,
        outbox: Outbox,
        topic: str,
        *,
        every_s: float,
        jpeg_quality: int = 80,
        max_width: int = 640,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.outbox = outbox
        self.topic = topic
        self.every_s = every_s
        self.jpeg_quality = jpeg_quality
        self.max_width = max_width
        self.clock = clock
        self.sent = 0
        self._next: float | None = None

    def emit(self, event: dict[str, Any]) -> None:
        """Without its frame an event has nothing to snapshot."""

    def emit_frame(self, event: dict[str, Any], image: Any) -> None:
        now = self.clock()
        if self._next is not None and now < self._next:
            return
        self._next = now + self.every_s
        msg, _ = snapshot_message(self.device_id, event, image, max_width=self.max_width,
                                  quality=self.jpeg_quality)  # fmt: skip
        self.outbox.put(self.topic, msg.encode(), qos=1)
        self.sent += 1
