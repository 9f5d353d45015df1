"""Adapter: one pipeline — a reader thread feeding an inference thread, with hot swap.

The inference thread takes the newest frame from the slot, runs the current
``RunnableModel`` and hands the event to the sinks. The model reference is read once per
frame, so ``swap_model`` takes effect between two frames and the stream never stops.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal

import cv2

from agent.common.errors import BadDataError, ModelError
from agent.pipeline.analytics import FrameAnalytics
from agent.pipeline.clips import ClipRecorder
from agent.pipeline.gating import FrameGate
from agent.pipeline.metrics import PipelineMetrics
from agent.pipeline.model import RunnableModel, StageTimes
from agent.pipeline.postprocess import Result
from agent.pipeline.sinks import Sink
from agent.pipeline.sources import FrameReader, LatestFrameSlot, SourceSpec

log = logging.getLogger(__name__)


def claim_cores_for_inference() -> None:
    """Stop OpenCV's own thread pool from fighting the inference engine for the cores.

    Measured with ``edgefleet-agent bench`` on 2 cores (ONNX Runtime, PP-OCRv4 detector at
    640x640): with OpenCV's default pool, letterboxing a 640x480 frame took 1.6 ms p50 and the
    heat-map post-processing 3.0 ms, because they ran beside ONNX Runtime's intra-op threads;
    single-threaded they took 0.4 ms and 1.2 ms and pipeline throughput rose from 0.82 to
    0.92 of the bare backend's. Pre/post-processing of one frame is too small to be worth
    parallelising; the engine owns the cores.
    """
    cv2.setNumThreads(1)


def result_event(
    pipeline: str,
    model: RunnableModel,
    result: Result,
    times: StageTimes,
    **frame: Any,
) -> dict[str, Any]:
    """The event dict of one inference, as sinks and the local API see it: pipeline, model,
    version, the frame fields given (``frame_seq``, ``frame_time``), latency and results."""
    return {
        "pipeline": pipeline,
        "model": model.card.name,
        "version": model.card.version,
        **frame,
        "latency_ms": round(times.preprocess + times.infer + times.postprocess, 3),
        **result.to_dict(),
    }


class Pipeline:
    """Source → latest-frame slot → model → sinks, on two threads."""

    def __init__(
        self,
        name: str,
        source: SourceSpec,
        model: RunnableModel | None,
        sinks: Sequence[Sink] = (),
        *,
        loop: bool = False,
        pace: Literal["realtime", "none"] = "realtime",
        open_timeout_s: float = 5.0,
        metrics: PipelineMetrics | None = None,
        wall_clock: Callable[[], float] = time.time,
        gate: FrameGate | None = None,
        analytics: FrameAnalytics | None = None,
        clips: ClipRecorder | None = None,
    ) -> None:
        self.name = name
        self.clips = clips  # event clips: rolling recorder and cutter, started and stopped here
        self.gate = gate  # max_fps and motion gating: frames skipped before inference
        self.analytics = analytics  # tracks, zones and lines on detection results
        self.source = source
        self.metrics = metrics or PipelineMetrics()
        self.sinks = list(sinks)
        self.slot = LatestFrameSlot(blocking=(pace == "none" and source.kind == "file"))
        self.reader = FrameReader(
            source,
            self.slot,
            self.metrics,
            loop=loop,
            pace=pace,
            open_timeout_s=open_timeout_s,
            name=name,
        )
        self._model = model
        self._wall = wall_clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error = ""
        self.last_progress = time.monotonic()
        self.finished = threading.Event()
        # Called after every frame with (model, ok, nan, infer_ms): the update manager's
        # health window watches a freshly activated model through it.
        self.observer: Callable[[RunnableModel, bool, bool, float], None] | None = None

    @property
    def model(self) -> RunnableModel | None:
        return self._model

    @property
    def source_ended(self) -> bool:
        """The source has ended for good (a file without ``loop``)."""
        return self.reader.ended.is_set()

    def swap_model(self, model: RunnableModel | None) -> RunnableModel | None:
        """Replace the model between frames; returns the previous one (caller closes it)."""
        old, self._model = self._model, model
        log.info(
            "pipeline=%s swapped model %s -> %s",
            self.name,
            old.ref if old else None,
            model.ref if model else None,
        )
        return old

    def acquire_model(self) -> RunnableModel | None:
        """The current model with a lease taken (``release()`` it when done), or None.

        A model closed between reading the reference and leasing it has been swapped out:
        read again. A model closed while still current (shutdown) gives None.
        """
        while True:
            model = self._model
            if model is None or model.acquire():
                return model
            if model is self._model:
                return None

    def start(self) -> None:
        claim_cores_for_inference()
        self.metrics.start_window(time.monotonic())
        if self.clips is not None:
            self.clips.start()
        self.reader.start()
        self._thread = threading.Thread(target=self._run, name=f"infer-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self.reader.stop(timeout)
        if self._thread is not None:
            self._thread.join(timeout)
        if self.clips is not None:
            self.clips.stop()
        for s in self.sinks:
            s.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a non-looping file source has been fully processed."""
        return self.finished.wait(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                t_wait = time.perf_counter()
                frame = self.slot.take(timeout=0.5)
                waited = (time.perf_counter() - t_wait) * 1e3
                self.last_progress = time.monotonic()
                if frame is None:
                    if self.reader.ended.is_set():
                        break
                    continue
                gate = self.gate  # read once: a remote configuration may replace it
                skip = gate.check(frame.image, frame.t) if gate is not None else None
                if skip is not None:
                    self.metrics.count(f"frames_skipped_{skip}")
                    continue
                # read once, leased: a swap lands between frames, and closing the old model
                # waits for this frame
                model = self.acquire_model()
                if model is None:
                    continue
                try:
                    self.metrics.observe("capture_wait", waited)
                    self._infer_one(model, frame)
                finally:
                    model.release()
        finally:
            self.finished.set()

    def _infer_one(self, model: RunnableModel, frame: Any) -> None:
        try:
            result, times = model.infer(frame.image)
        except (ModelError, BadDataError) as e:
            self.metrics.count("errors")
            obs = self.observer
            if obs is not None:
                obs(model, False, getattr(e, "reason", "") == "nan", 0.0)
            if str(e) != self.last_error:
                log.error("pipeline=%s model=%s error=%r", self.name, model.ref, str(e))
            self.last_error = str(e)
            return
        t_sink = time.perf_counter()
        event = result_event(
            self.name,
            model,
            result,
            times,
            frame_seq=frame.seq,
            frame_time=round(self._wall() - (time.monotonic() - frame.t_capture), 3),
        )
        analytics = self.analytics
        track_ms = 0.0 if analytics is None else self._analyse(analytics, event, result, frame)
        zero = self.reader.stream_zero_wall  # file sources: lines the clips up with the reader
        if self.clips is not None and zero is not None and self.source.kind == "file":
            self.clips.recorder.anchor_first(zero)
        if self.clips is not None and event.get("objects"):
            kinds = [o["kind"] for o in event["objects"]]
            event["clip"] = self.clips.mark(event["frame_time"], kinds)
        for sink in self.sinks:
            try:
                if sink.wants_frame:
                    sink.emit_frame(event, frame.image)
                else:
                    sink.emit(event)
            except Exception as e:  # a broken sink must not stop inference
                self.metrics.count("errors")
                self.last_error = f"sink {type(sink).__name__} failed: {e}"
                log.error("pipeline=%s sink=%s error=%r", self.name, type(sink).__name__, str(e))
        done = time.monotonic()
        m = self.metrics
        m.observe("preprocess", times.preprocess)
        m.observe("infer", times.infer)
        m.observe("postprocess", times.postprocess)
        sink_ms = (time.perf_counter() - t_sink) * 1e3
        m.observe("sink", sink_ms)
        # agent overhead outside inference and capture wait: what the agent adds per frame
        m.observe("overhead", times.preprocess + times.postprocess + track_ms + sink_ms)
        m.observe("age", (done - frame.t_capture) * 1e3)
        m.count("frames_inferred")
        obs = self.observer
        if obs is not None:
            obs(model, True, False, times.infer)

    def _analyse(
        self, analytics: FrameAnalytics, event: dict[str, Any], result: Result, frame: Any
    ) -> float:
        """Tracks, zones and lines into the event; returns the time taken (ms)."""
        t0 = time.perf_counter()
        h, w = frame.image.shape[:2]
        try:
            analytics.apply(event, result, (w, h), frame.t, event["frame_time"])
        except Exception as e:  # a bug in analytics must not stop inference
            self.metrics.count("errors")
            self.last_error = f"analytics failed: {e!r}"
            log.exception("pipeline=%s analytics failed", self.name)
        ms = (time.perf_counter() - t0) * 1e3
        self.metrics.observe("track", ms)
        return ms

    def status(self, now: float, reader: str = "status") -> dict[str, Any]:
        """Everything telemetry and ``status`` show about this pipeline; fps is over the time
        since ``reader`` last asked."""
        model = self._model
        return {
            "name": self.name,
            "source": self.source.display,
            "source_state": self.reader.state,
            "model": model.ref if model else None,
            "backend": model.backend.info.name if model else None,
            "precision": model.backend.info.precision if model else None,
            "last_error": self.last_error or self.reader.last_error or None,
            **self.metrics.snapshot(now, reader),
            **(self.analytics.status() if self.analytics is not None else {}),
            **(self.clips.status() if self.clips is not None else {}),
        }
