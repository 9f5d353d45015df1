"""Pure: per-pipeline counters and per-stage latency percentiles.

A fixed-size ring of recent samples per stage (default 2048) keeps memory flat for a device
that runs for months and makes percentiles reflect recent behaviour. ``snapshot`` is cheap
enough to call every telemetry interval.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COUNTERS = (
    "frames_read",
    "frames_inferred",
    "frames_dropped",
    "reconnects",
    "errors",
    "source_failures",
    "frames_skipped_max_fps",  # agent.protocol.telemetry.SkipReason
    "frames_skipped_no_motion",
)


class LatencyRing:
    """The last ``size`` latency samples of one stage, in milliseconds."""

    def __init__(self, size: int = 2048) -> None:
        self._buf = np.zeros(size, dtype=np.float64)
        self._n = 0  # samples ever added
        self._sum = 0.0  # and their total (ms): a Prometheus summary's _count and _sum

    def add(self, ms: float) -> None:
        self._buf[self._n % self._buf.size] = ms
        self._n += 1
        self._sum += ms

    def values(self) -> np.ndarray:
        out: np.ndarray = self._buf[: min(self._n, self._buf.size)].copy()
        return out

    def percentiles(self) -> dict[str, float]:
        """p50/p95/p99/max/mean/n of what the ring holds, plus ``count`` and ``sum`` of every
        sample since the start; empty dict when it holds nothing.

        The percentiles are ``np.percentile``'s default (linear interpolation between the
        closest ranks), read off one sort: ``np.percentile`` costs 50-150 µs a call in
        overhead, paid per stage at every snapshot.
        """
        v = self.values()
        if v.size == 0:
            return {}
        v.sort()
        return {
            "p50": round(_ranked(v, 0.50), 3),
            "p95": round(_ranked(v, 0.95), 3),
            "p99": round(_ranked(v, 0.99), 3),
            "max": round(float(v[-1]), 3),
            "mean": round(float(v.mean()), 3),
            "n": int(v.size),
            "count": self._n,
            "sum": round(self._sum, 3),
        }


def _ranked(ordered: np.ndarray, q: float) -> float:
    """The ``q`` quantile of sorted ``ordered`` (non-empty), linearly interpolated."""
    pos = q * (ordered.size - 1)
    lo = int(pos)
    a = float(ordered[lo])
    if lo + 1 >= ordered.size:
        return a
    return a + (float(ordered[lo + 1]) - a) * (pos - lo)


@dataclass
class PipelineMetrics:
    """Counters and latency rings of one pipeline; thread-safe."""

    ring_size: int = 2048
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    _rings: dict[str, LatencyRing] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    # One fps window per reader (status file, telemetry…), so readers polling at different
    # intervals do not shorten each other's window.
    _fps_marks: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    # Where a reader's first window starts (set when the pipeline starts): a new reader's
    # first snapshot gives the fps since then instead of 0.
    _origin: tuple[float, int, int] | None = None

    def start_window(self, now: float) -> None:
        """Mark the pipeline's start: first snapshots of every reader measure from here."""
        with self._lock:
            c = self.counters
            self._origin = (now, c["frames_read"], c["frames_inferred"])

    def count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] = self.counters.get(name, 0) + n

    def observe(self, stage: str, ms: float) -> None:
        with self._lock:
            ring = self._rings.get(stage)
            if ring is None:
                ring = self._rings[stage] = LatencyRing(self.ring_size)
            ring.add(ms)

    def latency(self) -> dict[str, dict[str, float]]:
        with self._lock:
            return {k: r.percentiles() for k, r in self._rings.items()}

    def snapshot(self, now: float, reader: str = "status") -> dict[str, Any]:
        """Counters, fps in/out since ``reader``'s previous snapshot, and stage percentiles."""
        with self._lock:
            counters = dict(self.counters)
            rings = {k: r.percentiles() for k, r in self._rings.items()}
            mark = self._fps_marks.get(reader, self._origin)
            self._fps_marks[reader] = (now, counters["frames_read"], counters["frames_inferred"])
        fps_in = fps_out = 0.0
        if mark is not None and now > mark[0]:
            dt = now - mark[0]
            fps_in = (counters["frames_read"] - mark[1]) / dt
            fps_out = (counters["frames_inferred"] - mark[2]) / dt
        return {
            **counters,
            "fps_in": round(fps_in, 2),
            "fps_out": round(fps_out, 2),
            "latency_ms": rings,
        }
