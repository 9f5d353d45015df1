"""Pure: which frames to infer — a ``max_fps`` cap and motion gating.

``FrameGate.check(image, now)`` answers ``None`` (infer this frame) or the reason to skip it:

* ``"max_fps"``: the last inference was less than ``1/max_fps`` ago. The schedule advances by
  exactly one period per inferred frame (not from the frame's own time), with a quarter period
  of slack, so a 30 fps camera capped at 15 infers every other frame and not every third when
  frame times jitter.
* ``"no_motion"``: the frame differs from the last *inferred* frame in fewer than
  ``min_changed`` of its pixels (grey level moved more than ``pixel_threshold``, compared on a
  blurred thumbnail about ``width`` pixels wide), and the last inference is less than
  ``max_skip_s`` old. Comparing with the last inferred frame rather than the previous one
  means slow changes add up until they count.

The thumbnail is taken by striding the frame (no full-frame resize), so the check costs a few
tens of microseconds even at 1080p; on an idle scene it saves the whole inference
(``scripts/bench_tracking.py`` measures how much CPU).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import cv2
import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from agent.pipeline.config import MotionConfig, PipelineConfig

__all__ = ["FrameGate", "MotionGate", "RateGate", "SkipReason", "gate_from_config"]

SkipReason = Literal["max_fps", "no_motion"]  # agent.protocol.telemetry.SkipReason
U8 = npt.NDArray[np.uint8]


class RateGate:
    """At most ``max_fps`` inferences per second, on the frames' own clock."""

    def __init__(self, max_fps: float) -> None:
        self.period = 1.0 / max_fps
        self._next: float | None = None

    def due(self, now: float) -> bool:
        return self._next is None or now >= self._next - self.period / 4

    def taken(self, now: float) -> None:
        """Record an inference at ``now``."""
        if self._next is None or now - self._next > self.period:
            # first frame, or after a gap (source stall, motion skips): restart from now,
            # never catch up in a burst
            self._next = now + self.period
        else:
            self._next += self.period


class MotionGate:
    """Change of a frame against the last inferred one, on a small blurred grey thumbnail."""

    def __init__(
        self,
        *,
        pixel_threshold: int = 25,
        min_changed: float = 0.002,
        max_skip_s: float = 2.0,
        width: int = 160,
    ) -> None:
        self.pixel_threshold = pixel_threshold
        self.min_changed = min_changed
        self.max_skip_s = max_skip_s
        self.width = width
        self._ref: U8 | None = None
        self._ref_t = 0.0
        self._pending: U8 | None = None
        self.last_changed = 0.0  # fraction of pixels changed in the last check

    def thumbnail(self, image: U8) -> U8:
        step = max(1, image.shape[1] // self.width)
        small = np.ascontiguousarray(image[::step, ::step])
        grey = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
        return np.asarray(cv2.GaussianBlur(grey, (5, 5), 0), dtype=np.uint8)

    def still(self, image: U8, now: float) -> bool:
        """True when the frame may be skipped: no change beyond the thresholds, and the last
        inference recent enough. Call ``taken`` when the frame is inferred after all."""
        thumb = self.thumbnail(image)
        self._pending = thumb
        ref = self._ref
        if ref is None or ref.shape != thumb.shape or now - self._ref_t >= self.max_skip_s:
            self.last_changed = 1.0
            return False
        diff = cv2.absdiff(thumb, ref)
        self.last_changed = float(np.count_nonzero(diff > self.pixel_threshold)) / diff.size
        return self.last_changed < self.min_changed

    def taken(self, now: float) -> None:
        """The frame just checked is being inferred: it becomes the reference."""
        if self._pending is not None:
            self._ref, self._ref_t, self._pending = self._pending, now, None


class FrameGate:
    """``max_fps`` first (cheapest), then motion; ``None`` means infer."""

    def __init__(self, rate: RateGate | None = None, motion: MotionGate | None = None) -> None:
        self.rate = rate
        self.motion = motion

    def check(self, image: U8, now: float) -> SkipReason | None:
        """Decide for one frame; an inferred frame is recorded as such at once."""
        if self.rate is not None and not self.rate.due(now):
            return "max_fps"
        if self.motion is not None and self.motion.still(image, now):
            return "no_motion"
        if self.rate is not None:
            self.rate.taken(now)
        if self.motion is not None:
            self.motion.taken(now)
        return None


def motion_gate(cfg: MotionConfig) -> MotionGate:
    return MotionGate(
        pixel_threshold=cfg.pixel_threshold,
        min_changed=cfg.min_changed,
        max_skip_s=cfg.max_skip_s,
        width=cfg.width,
    )


def gate_from_config(cfg: PipelineConfig) -> FrameGate | None:
    """The gate of a pipeline's ``max_fps`` and ``[pipelines.motion]``; None when neither."""
    if cfg.max_fps is None and cfg.motion is None:
        return None
    rate = RateGate(cfg.max_fps) if cfg.max_fps is not None else None
    return FrameGate(rate, motion_gate(cfg.motion) if cfg.motion is not None else None)
