"""Adapter: video sources through OpenCV, a latest-frame slot, and the reader thread.

The reader thread pulls frames as fast as the source delivers them into a one-frame slot; the
inference thread always takes the newest, so latency never builds up behind a slow model.
Frames overwritten before anyone took them are counted as dropped. A file can instead be read
with back-pressure (``pace="none"``) so that every frame is inferred (benchmarks, accuracy
runs). A source that drops is reopened with capped exponential backoff and jitter.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from agent.common.backoff import Backoff
from agent.common.errors import SourceError
from agent.pipeline.metrics import PipelineMetrics
from agent.protocol.sealed import redact

log = logging.getLogger(__name__)

SourceKind = Literal["device", "file", "url", "gstreamer"]
_URL_RE = re.compile(r"^(rtsp|rtsps|rtmp|udp|tcp|http|https|srt)://", re.IGNORECASE)


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source string.

    Attributes:
        kind: device index, file, network URL or GStreamer pipeline.
        target: what is handed to ``cv2.VideoCapture``.
    """

    kind: SourceKind
    target: str | int

    @property
    def display(self) -> str:
        """The source with any ``user:password@`` removed and sealed values shortened
        (``redact``), for logs, telemetry and reports."""
        return redact(re.sub(r"//[^/@]*@", "//***@", str(self.target)))


def parse_source(source: str | int) -> SourceSpec:
    """Classify a configured source.

    ``0`` or ``"0"`` is a camera index, ``/dev/videoN`` a V4L2 device, a string with ``!`` a
    GStreamer pipeline, ``scheme://`` a network stream, anything else a file path.
    """
    if isinstance(source, int):
        return SourceSpec("device", source)
    s = source.strip()
    if s.isdigit():
        return SourceSpec("device", int(s))
    if re.fullmatch(r"/dev/video\d+", s):
        return SourceSpec("device", s)
    if "!" in s:
        return SourceSpec("gstreamer", s)
    if _URL_RE.match(s):
        return SourceSpec("url", s)
    return SourceSpec("file", s)


def gstreamer_support() -> tuple[bool, str]:
    """Whether this OpenCV build can open GStreamer pipelines, and why not."""
    info = cv2.getBuildInformation()
    m = re.search(r"GStreamer:\s*(\S+)", info)
    if m and m.group(1).upper() != "NO":
        return True, f"GStreamer {m.group(1)}"
    return False, (
        f"this OpenCV ({cv2.__version__}, {cv2.__file__}) is built without GStreamer "
        "(PyPI's opencv-python wheels are); on a Jetson use JetPack's system OpenCV "
        "(python3-opencv / nvidia-opencv, install the agent's venv with "
        "--system-site-packages and without opencv-python from pip)"
    )


@dataclass
class Frame:
    """One decoded frame.

    Attributes:
        image: HxWx3 BGR uint8.
        seq: running number from the source (counts every frame read, dropped or not).
        t_capture: ``time.monotonic()`` when the read returned.
        t_stream: the frame's time in the stream on the same clock, when it is not its
            capture time: a file read as fast as it is taken (pace ``none``) is timed by its
            fps, so tracking and rate control see the video's time, not the reading speed.
    """

    image: np.ndarray
    seq: int
    t_capture: float
    t_stream: float | None = None

    @property
    def t(self) -> float:
        """The frame's time for tracking and rate control (monotonic seconds)."""
        return self.t_capture if self.t_stream is None else self.t_stream


class LatestFrameSlot:
    """A one-frame mailbox: ``put`` replaces, ``take`` waits for a frame newer than the last.

    With ``blocking=True`` the producer waits until the previous frame was taken instead of
    overwriting it (back-pressure, nothing dropped).
    """

    def __init__(self, *, blocking: bool = False) -> None:
        self._cond = threading.Condition()
        self._frame: Frame | None = None
        self._blocking = blocking
        self._closed = False
        self.dropped = 0

    def put(self, frame: Frame, timeout: float | None = None) -> bool:
        """Offer a frame; returns False when the slot is closed (or blocked past ``timeout``)."""
        with self._cond:
            if self._blocking:
                ok = self._cond.wait_for(lambda: self._frame is None or self._closed, timeout)
                if not ok:
                    return False
            if self._closed:
                return False
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
            self._cond.notify_all()
            return True

    def take(self, timeout: float) -> Frame | None:
        """The newest frame not yet taken, or None after ``timeout`` seconds / when closed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._frame is not None or self._closed, timeout):
                return None
            frame, self._frame = self._frame, None
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def open_capture(spec: SourceSpec, *, timeout_s: float = 5.0) -> cv2.VideoCapture:
    """Open a ``cv2.VideoCapture`` for a source.

    Raises:
        SourceError: the source cannot be opened (with the reason where OpenCV gives none).
    """
    if spec.kind == "gstreamer":
        ok, why = gstreamer_support()
        if not ok:
            raise SourceError(f"cannot open GStreamer pipeline: {why}", source=spec.display)
        cap = cv2.VideoCapture(str(spec.target), cv2.CAP_GSTREAMER)
    elif spec.kind == "file":
        if not Path(str(spec.target)).is_file():
            raise SourceError(f"video file {spec.target} does not exist", source=spec.display)
        cap = cv2.VideoCapture(str(spec.target), cv2.CAP_FFMPEG)
    elif spec.kind == "url":
        ms = int(timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, ms]
        cap = cv2.VideoCapture(str(spec.target), cv2.CAP_FFMPEG, params)
    else:
        cap = cv2.VideoCapture(spec.target)
    if not cap.isOpened():
        cap.release()
        raise SourceError(
            f"OpenCV could not open {spec.kind} source {spec.display}", source=spec.display
        )
    return cap


class FrameReader:
    """The reader thread of one pipeline: source → latest-frame slot, with reconnects."""

    def __init__(
        self,
        spec: SourceSpec,
        slot: LatestFrameSlot,
        metrics: PipelineMetrics,
        *,
        loop: bool = False,
        pace: Literal["realtime", "none"] = "realtime",
        backoff: Backoff | None = None,
        open_timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "source",
    ) -> None:
        self.spec = spec
        self.slot = slot
        self.metrics = metrics
        self.loop = loop
        self.pace = pace
        self.backoff = backoff or Backoff()
        self.open_timeout_s = open_timeout_s
        self.clock = clock
        self.name = name
        self.state: Literal["connecting", "streaming", "waiting", "ended", "stopped"] = "connecting"
        self.last_error: str = ""
        self.opened_once = threading.Event()
        self.ended = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._seq = 0
        # a file source: where its stream time 0 falls on the wall clock, from the last frame
        # read (wall time minus its place in the file); it moves when reading falls behind.
        # The clip recorder lines its segments up with it.
        self.stream_zero_wall: float | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"reader-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.slot.close()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                cap = open_capture(self.spec, timeout_s=self.open_timeout_s)
            except SourceError as e:
                self._failed(str(e))
                continue
            if self.opened_once.is_set():
                self.metrics.count("reconnects")
            self.opened_once.set()
            self.backoff.succeeded()
            self.state = "streaming"
            try:
                finished = self._pump(cap)
            finally:
                cap.release()
            if finished and self._stop.is_set():
                break
            if finished:
                self.state = "ended"
                self.ended.set()
                self.slot.close()
                return
            self._failed(f"{self.spec.kind} source {self.spec.display} stopped delivering frames")
        self.state = "stopped"

    def _failed(self, why: str) -> None:
        self.metrics.count("source_failures")
        self.last_error = why
        self.state = "waiting"
        delay = self.backoff.failed(self.clock())
        log.warning(
            "source=%s pipeline=%s error=%r retry_in_s=%.2f",
            self.spec.display,
            self.name,
            why,
            delay,
        )
        self._stop.wait(delay)

    def _pump(self, cap: cv2.VideoCapture) -> bool:
        """Read until the source fails (False) or a non-looping file ends (True)."""
        period = stream_period = nominal = 0.0
        if self.spec.kind == "file":
            fps = cap.get(cv2.CAP_PROP_FPS)
            nominal = 1.0 / fps if fps and 0 < fps < 1000 else 1.0 / 30
            if self.pace == "realtime":
                period = nominal
            else:
                stream_period = nominal
        next_due = stream_t = self.clock()
        while not self._stop.is_set():
            ok, image = cap.read()
            if not ok or image is None:
                if self.spec.kind == "file":
                    if self.loop and self._seq > 0:
                        cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
                        continue
                    return True
                return False
            now = self.clock()
            if period:
                next_due += period
                if next_due > now:
                    self._stop.wait(next_due - now)
                    now = self.clock()
                else:
                    next_due = now  # fell behind: don't burst to catch up
            self._seq += 1
            if nominal:
                self.stream_zero_wall = time.time() - (self._seq - 1) * nominal
            self.metrics.count("frames_read")
            before = self.slot.dropped
            t_stream = None
            if stream_period:
                t_stream, stream_t = stream_t, stream_t + stream_period
            if not self.slot.put(Frame(image, self._seq, now, t_stream), timeout=None):
                return True
            if self.slot.dropped != before:
                self.metrics.count("frames_dropped", self.slot.dropped - before)
        return True
