"""Pipeline harness: a local ONNX model on ONNX Runtime, ready for a ``Pipeline``, a sink
callback that collects the events with the time each arrived, and a pipeline on a live UDP
stream that reconnects quickly."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.pipeline.model import RunnableModel, card_for_local_model
from agent.pipeline.runner import Pipeline
from agent.pipeline.sinks import CallbackSink
from agent.pipeline.sources import parse_source


def local_model(path: Path) -> RunnableModel:
    """The model file ``path`` on ONNX Runtime, its card read from the model itself."""
    backend = OnnxRuntimeBackend(path)
    return RunnableModel(card_for_local_model(path, backend), backend)


class Collect:
    """A ``CallbackSink`` callback: every event, and its arrival (``time.monotonic()``)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, e: dict[str, Any]) -> None:
        with self.lock:
            self.events.append(e)
            self.times.append(time.monotonic())


def udp_pipeline(url: str, model: Path, sink: Collect, open_timeout_s: float) -> Pipeline:
    """Pipeline ``udp`` (not started) running ``model`` on the stream ``url`` into ``sink``;
    its reader retries after 0.2 s, backing off to 1 s at most."""
    pipe = Pipeline(
        "udp",
        parse_source(url),
        local_model(model),
        [CallbackSink(sink)],
        open_timeout_s=open_timeout_s,
    )
    pipe.reader.backoff.base_s = 0.2
    pipe.reader.backoff.cap_s = 1.0
    return pipe
