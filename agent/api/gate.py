"""Adapter: what the HTTP layer asks of the agent — find a pipeline's model, admit a request
within the concurrency and queue bounds, and run it on the pipeline's own ``RunnableModel`` in
a thread pool (never on the event loop).

The model is leased for the duration of one request (``Pipeline.acquire_model``), so an update
that swaps the pipeline's model and closes the old one lets the requests still on the old
model finish: a hot swap never fails a request.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agent.api.payload import Payload, PayloadError, decode_image, parse_npy
from agent.common.errors import BadDataError, ModelError
from agent.pipeline.model import RunnableModel
from agent.pipeline.runner import Pipeline, result_event


class ApiError(Exception):
    """An answer other than 200, with its status, message and extra headers."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def model_info(pipe: Pipeline) -> dict[str, Any]:
    """What ``GET /v1/models`` says about one pipeline's model (``ready`` false without one)."""
    model = pipe.model
    if model is None:
        return {"pipeline": pipe.name, "ready": False, "name": None, "version": None}
    card, info = model.card, model.backend.info
    return {
        "pipeline": pipe.name,
        "ready": True,
        "name": card.name,
        "version": card.version,
        "task": card.task,
        "backend": info.name,
        "device": info.device,
        "precision": info.precision,
        "input": card.input.model_dump(mode="json"),
        "tensor": {"shape": list(model.tensor_shape), "dtype": card.input.dtype},
        "labels": list(card.labels),
    }


class InferenceGate:
    """Admission control and the worker pool for API inferences.

    At most ``max_concurrent`` requests run and ``max_queue`` wait; one more is refused
    (``ApiError`` 429 with ``Retry-After``) without touching the model.
    """

    def __init__(
        self,
        pipelines: Sequence[Pipeline],
        *,
        max_concurrent: int,
        max_queue: int,
        max_image_pixels: int,
    ) -> None:
        self._pipelines = pipelines  # the agent's live list: remote configuration changes it
        self.max_concurrent = max_concurrent
        self.max_queue = max_queue
        self.max_image_pixels = max_image_pixels
        self._pool = ThreadPoolExecutor(max_workers=max_concurrent, thread_name_prefix="api-infer")
        self._lock = threading.Lock()
        self._admitted = 0
        self._latency_ms = 10.0  # moving average, for Retry-After
        self.refused = 0

    @property
    def pipelines(self) -> list[Pipeline]:
        """The pipelines running now (a copy: another thread may add or remove one)."""
        return list(self._pipelines)

    def resolve(self, name: str) -> Pipeline:
        """The pipeline named ``name``, else the first whose current model is named ``name``.

        Raises:
            ApiError: 404 when nothing matches.
        """
        pipes = self.pipelines
        for pipe in pipes:
            if pipe.name == name:
                return pipe
        for pipe in pipes:
            model = pipe.model
            if model is not None and model.card.name == name:
                return pipe
        known = [p.name for p in pipes]
        models = sorted({p.model.card.name for p in pipes if p.model is not None})
        raise ApiError(
            404, f"no pipeline or model named {name!r}; pipelines {known}, models {models}"
        )

    def readiness(self) -> list[str]:
        """Why the agent is not ready (empty when every pipeline has a model)."""
        return [
            f"pipeline {p.name} has no model loaded (waiting for delivery)"
            for p in self.pipelines
            if p.model is None
        ]

    async def infer(self, pipe: Pipeline, payload: Payload) -> dict[str, Any]:
        """Run one request on a worker thread.

        Raises:
            ApiError: 429 over the bounds, 4xx for bad input, 503 without a model, 500 when
                the backend fails.
        """
        with self._lock:
            if self._admitted >= self.max_concurrent + self.max_queue:
                self.refused += 1
                raise ApiError(
                    429,
                    f"busy: {self._admitted} requests running or queued "
                    f"(max_concurrent {self.max_concurrent} + max_queue {self.max_queue}); "
                    "retry later",
                    headers={"Retry-After": str(self._retry_after())},
                )
            self._admitted += 1
        try:
            fut = self._pool.submit(self._run, pipe, payload)
        except RuntimeError:  # pool shut down: the server is stopping
            self._leave(None)
            raise ApiError(503, "the agent is stopping") from None
        # counted until the worker is done, even if the client goes away meanwhile
        fut.add_done_callback(self._leave)
        return await asyncio.wrap_future(fut)

    def _leave(self, _: object) -> None:
        with self._lock:
            self._admitted -= 1

    def _retry_after(self) -> int:
        waves = (self._admitted + 1) / self.max_concurrent
        return max(1, math.ceil(waves * self._latency_ms / 1000))

    def _run(self, pipe: Pipeline, payload: Payload) -> dict[str, Any]:
        try:
            if payload.kind == "npy":
                data = parse_npy(payload.data)
            else:
                data = decode_image(payload, max_pixels=self.max_image_pixels)
        except PayloadError as e:
            raise ApiError(e.status, str(e)) from e
        model = pipe.acquire_model()
        if model is None:
            raise ApiError(503, f"pipeline {pipe.name} has no model loaded (waiting for delivery)")
        try:
            return self._infer(pipe, model, payload, data)
        finally:
            model.release()

    def _infer(
        self, pipe: Pipeline, model: RunnableModel, payload: Payload, data: Any
    ) -> dict[str, Any]:
        try:
            if payload.kind == "npy":
                result, times = model.infer_tensor(data)
            else:
                result, times = model.infer(data)
        except ModelError as e:  # the model failed on good input: our side
            raise ApiError(500, f"inference failed on {model.ref}: {e}") from e
        except BadDataError as e:
            raise ApiError(422, str(e)) from e
        event = result_event(pipe.name, model, result, times)
        total = times.preprocess + times.infer + times.postprocess
        self._latency_ms = 0.9 * self._latency_ms + 0.1 * total
        return event

    def close(self) -> None:
        """Stop taking work; waits for running inferences."""
        self._pool.shutdown(wait=True, cancel_futures=True)
