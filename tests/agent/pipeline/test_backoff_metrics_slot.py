"""Pure parts of the pipeline: backoff schedule, latency percentiles, the latest-frame slot."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.common.backoff import Backoff
from agent.pipeline.metrics import LatencyRing, PipelineMetrics
from agent.pipeline.sources import Frame, LatestFrameSlot, parse_source


def test_backoff_grows_exponentially_and_is_capped() -> None:
    b = Backoff(base_s=1.0, cap_s=10.0, jitter=0.0)
    delays = [b.failed(now=100.0) for _ in range(8)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0, 10.0]
    assert not b.ready(105.0) and b.ready(110.0)
    b.succeeded()
    assert b.failed(now=0.0) == 1.0


@given(st.integers(min_value=0, max_value=2**32 - 1), st.integers(min_value=1, max_value=60))
def test_backoff_full_jitter_stays_within_ceiling(seed: int, n: int) -> None:
    b = Backoff(base_s=0.5, cap_s=30.0, jitter=1.0, rng=random.Random(seed))
    for i in range(n):
        d = b.failed(now=0.0)
        assert 0.0 <= d <= min(30.0, 0.5 * 2**i)


def test_latency_ring_percentiles_match_numpy_and_forget_old_samples() -> None:
    ring = LatencyRing(size=100)
    for v in range(1000):  # only the last 100 (900..999) remain
        ring.add(float(v))
    p = ring.percentiles()
    ref = np.arange(900, 1000, dtype=float)
    assert p["n"] == 100
    assert p["p50"] == pytest.approx(np.percentile(ref, 50))
    assert p["p99"] == pytest.approx(np.percentile(ref, 99))
    assert p["max"] == 999.0
    assert LatencyRing().percentiles() == {}


@given(
    st.lists(st.floats(min_value=0.0, max_value=1e5, allow_nan=False), min_size=1, max_size=300),
    st.integers(min_value=1, max_value=128),
)
def test_latency_ring_percentiles_equal_numpy_on_any_samples(xs: list[float], size: int) -> None:
    ring = LatencyRing(size=size)
    for x in xs:
        ring.add(x)
    held = np.array(xs[-size:])  # the ring keeps the last `size`, in any order
    p = ring.percentiles()
    for name, q in (("p50", 50), ("p95", 95), ("p99", 99)):
        assert p[name] == pytest.approx(round(float(np.percentile(held, q)), 3), abs=1.1e-3)
    assert p["max"] == round(float(held.max()), 3) and p["n"] == held.size
    assert p["mean"] == pytest.approx(round(float(held.mean()), 3), abs=1.1e-3)


def test_metrics_snapshot_fps_from_counter_deltas() -> None:
    m = PipelineMetrics()
    m.snapshot(now=10.0)
    m.count("frames_read", 60)
    m.count("frames_inferred", 30)
    m.observe("infer", 5.0)
    s = m.snapshot(now=12.0)
    assert s["fps_in"] == 30.0 and s["fps_out"] == 15.0
    assert s["latency_ms"]["infer"]["p50"] == 5.0


def test_fps_windows_are_per_reader() -> None:
    m = PipelineMetrics()
    m.snapshot(now=0.0, reader="status")
    m.snapshot(now=0.0, reader="telemetry")
    m.count("frames_inferred", 20)
    assert m.snapshot(now=2.0, reader="status")["fps_out"] == 10.0
    m.count("frames_inferred", 20)
    assert m.snapshot(now=4.0, reader="status")["fps_out"] == 10.0
    # telemetry's window spans both status reads: 40 frames over 10 s
    assert m.snapshot(now=10.0, reader="telemetry")["fps_out"] == 4.0


def test_first_snapshot_of_a_new_reader_measures_from_the_start() -> None:
    m = PipelineMetrics()
    assert m.snapshot(now=1.0, reader="a")["fps_out"] == 0.0  # no start mark: no window yet
    m.start_window(now=2.0)
    m.count("frames_inferred", 30)
    # a reader that appears later (a first Prometheus scrape) sees the fps since the start
    assert m.snapshot(now=5.0, reader="prometheus")["fps_out"] == 10.0
    m.count("frames_inferred", 10)
    assert m.snapshot(now=6.0, reader="prometheus")["fps_out"] == 10.0


def _frame(i: int) -> Frame:
    return Frame(np.zeros((2, 2, 3), np.uint8), i, float(i))


def test_slot_keeps_only_newest_and_counts_drops() -> None:
    slot = LatestFrameSlot()
    for i in range(1, 6):
        assert slot.put(_frame(i))
    got = slot.take(timeout=0.1)
    assert got is not None and got.seq == 5
    assert slot.dropped == 4
    assert slot.take(timeout=0.05) is None  # nothing newer


def test_blocking_slot_applies_back_pressure_and_drops_nothing() -> None:
    slot = LatestFrameSlot(blocking=True)
    taken: list[int] = []

    def consume() -> None:
        while True:
            f = slot.take(timeout=2.0)
            if f is None:
                return
            taken.append(f.seq)

    t = threading.Thread(target=consume)
    t.start()
    for i in range(1, 201):
        assert slot.put(_frame(i))
    slot.close()
    t.join(5)
    assert slot.dropped == 0
    assert taken == list(range(1, 201))


def test_closed_slot_refuses_and_wakes_waiters() -> None:
    slot = LatestFrameSlot(blocking=True)
    slot.put(_frame(1))
    threading.Timer(0.05, slot.close).start()
    assert slot.put(_frame(2)) is False  # was blocked, woken by close


@pytest.mark.parametrize(
    ("text", "kind", "target"),
    [
        (0, "device", 0),
        ("1", "device", 1),
        ("/dev/video2", "device", "/dev/video2"),
        ("rtsp://user:pw@10.0.0.5/stream", "url", "rtsp://user:pw@10.0.0.5/stream"),
        ("udp://127.0.0.1:5000", "url", "udp://127.0.0.1:5000"),
        ("HTTP://cam.local/mjpg", "url", "HTTP://cam.local/mjpg"),
        (
            "nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink",
            "gstreamer",
            "nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink",
        ),
        ("/data/clip.mp4", "file", "/data/clip.mp4"),
        ("clip.mkv", "file", "clip.mkv"),
    ],
)
def test_parse_source(text: str | int, kind: str, target: str | int) -> None:
    spec = parse_source(text)
    assert (spec.kind, spec.target) == (kind, target)


def test_source_display_hides_credentials() -> None:
    assert parse_source("rtsp://admin:secret@10.0.0.5/s").display == "rtsp://***@10.0.0.5/s"
