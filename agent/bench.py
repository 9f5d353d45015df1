"""Adapter: ``edgefleet-agent bench`` — bare backend throughput vs the full pipeline, same run.

Three phases on one model:
1. backend: a tight ``run`` loop on one pre-processed frame (the ceiling);
2. pipeline: the real reader thread + slot + pre/post-processing + sink over the source, with
   back-pressure for files so every frame is inferred;
3. overload (synthetic source only): the source plays at twice the backend's rate, so the
   latest-frame slot must drop frames; reports how old a frame is when its result is emitted,
   against the model's inference time.
Results are ratios against the backend measured in the same run, since machines are noisy.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2

from agent.common.errors import SourceError
from agent.pipeline.model import RunnableModel
from agent.pipeline.runner import Pipeline
from agent.pipeline.sinks import CallbackSink
from agent.pipeline.sources import open_capture, parse_source
from agent.pipeline.synthetic import write_synthetic_video


class _Counter:
    def __init__(self, limit: int) -> None:
        self.n = 0
        self.first = 0.0
        self.last = 0.0
        self.limit = limit
        self.done = threading.Event()

    def __call__(self, event: dict[str, Any]) -> None:
        now = time.perf_counter()
        if self.n == 0:
            self.first = now
        self.last = now
        self.n += 1
        if self.n >= self.limit:
            self.done.set()

    def fps(self) -> float:
        return (
            (self.n - 1) / (self.last - self.first)
            if self.n > 1 and self.last > self.first
            else 0.0
        )


def _first_frame(source: str) -> Any:
    cap = open_capture(parse_source(source))
    try:
        ok, img = cap.read()
    finally:
        cap.release()
    if not ok:
        raise SourceError(f"could not read a frame from {source}", source=source)
    return img


def bench_backend(model: RunnableModel, image: Any, runs: int, warmup: int = 5) -> dict[str, float]:
    """Frames per second of ``backend.run`` alone on one pre-processed frame."""
    tensor, _ = model.preprocessor(image)
    feeds = model.feeds(tensor)
    for _ in range(warmup):
        model.backend.run(feeds)
    t0 = time.perf_counter()
    for _ in range(runs):
        model.backend.run(feeds)
    dt = time.perf_counter() - t0
    return {"fps": runs / dt, "infer_ms": dt / runs * 1e3}


def bench_pipeline(
    model: RunnableModel, source: str, frames: int, *, pace: str = "none", timeout_s: float = 600
) -> dict[str, Any]:
    """Run the real pipeline until ``frames`` results (or the file ends)."""
    counter = _Counter(frames)
    spec = parse_source(source)
    pipe = Pipeline("bench", spec, model, [CallbackSink(counter)], pace=pace)  # type: ignore[arg-type]
    pipe.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not counter.done.is_set() and not pipe.finished.is_set():
            if time.monotonic() > deadline:
                break
            counter.done.wait(0.1)
    finally:
        pipe.stop()
    snap = pipe.metrics.snapshot(time.monotonic())
    return {
        "fps": counter.fps(),
        "frames": counter.n,
        "read": snap["frames_read"],
        "dropped": snap["frames_dropped"],
        "errors": snap["errors"],
        "latency_ms": snap["latency_ms"],
    }


def run_bench(
    model: RunnableModel,
    *,
    source: str | None = None,
    frames: int = 300,
    overload: bool = True,
    progress: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """All phases; returns the JSON-ready report."""
    with tempfile.TemporaryDirectory(prefix="edgefleet-bench-") as tmp:
        synthetic = source is None
        if source is None:
            progress(f"writing a synthetic 640x480 MJPEG video of {frames} frames")
            source = str(write_synthetic_video(Path(tmp) / "bench.avi", frames=frames))
        image = _first_frame(source)
        progress(f"backend: {frames} runs of {model.backend.info.name} on one frame")
        backend = bench_backend(model, image, frames)
        progress("pipeline: reader thread → slot → pre → infer → post → sink")
        pipe = bench_pipeline(model, source, frames)
        report: dict[str, Any] = {
            "model": model.ref,
            "backend": model.backend.info.name,
            "precision": model.backend.info.precision,
            "input": f"{model.card.input.width}x{model.card.input.height}",
            "backend_fps": round(backend["fps"], 2),
            "pipeline_fps": round(pipe["fps"], 2),
            "ratio": round(pipe["fps"] / backend["fps"], 4) if backend["fps"] else 0.0,
            "frames": pipe["frames"],
            "dropped": pipe["dropped"],
            "errors": pipe["errors"],
            "backend_infer_ms": round(backend["infer_ms"], 3),
            "latency_ms": pipe["latency_ms"],
        }
        if overload and synthetic:
            fps = max(2.0, 2.0 * backend["fps"])
            n = max(60, min(frames, int(fps * 10)))
            progress(f"overload: source at {fps:.0f} fps (2x the backend), {n} frames")
            over_src = write_synthetic_video(Path(tmp) / "overload.avi", frames=n, fps=fps)
            cap = cv2.VideoCapture(str(over_src))
            src_fps = cap.get(cv2.CAP_PROP_FPS)
            cap.release()
            over = bench_pipeline(model, str(over_src), n, pace="realtime")
            age = over["latency_ms"].get("age", {})
            infer = over["latency_ms"].get("infer", {})
            report["overload"] = {
                "source_fps": round(src_fps, 1),
                "frames_read": over["read"],
                "frames_inferred": over["frames"],
                "dropped": over["dropped"],
                "age_p99_ms": age.get("p99"),
                "infer_p50_ms": infer.get("p50"),
                "age_p99_over_infer": round(age["p99"] / infer["p50"], 3)
                if age and infer
                else None,
            }
    return report


def format_report(r: dict[str, Any]) -> str:
    """Human-readable table of a bench report."""
    lines = [
        f"model {r['model']} on {r['backend']} ({r['precision']}), input {r['input']}",
        f"backend   {r['backend_fps']:8.2f} fps  ({r['backend_infer_ms']:.2f} ms/inference)",
        f"pipeline  {r['pipeline_fps']:8.2f} fps  ratio {r['ratio']:.3f}  "
        f"frames {r['frames']}  dropped {r['dropped']}  errors {r['errors']}",
        f"{'stage':<13}{'p50':>9}{'p95':>9}{'p99':>9}  (ms)",
    ]
    for stage, p in r["latency_ms"].items():
        if p:
            lines.append(f"{stage:<13}{p['p50']:9.3f}{p['p95']:9.3f}{p['p99']:9.3f}")
    o = r.get("overload")
    if o:
        lines.append(
            f"overload  source {o['source_fps']} fps: read {o['frames_read']}, inferred "
            f"{o['frames_inferred']}, dropped {o['dropped']}; frame age p99 {o['age_p99_ms']} ms "
            f"= {o['age_p99_over_infer']}x inference p50"
        )
    return "\n".join(lines)
