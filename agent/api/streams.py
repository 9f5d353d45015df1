"""Adapter: the local API's routes for the running stream pipelines — what runs
(``GET /v1/pipelines``), each one's latest result with its track ids and zone/line counts
(``GET /v1/pipelines/{name}/latest``) and its results live as Server-Sent Events
(``GET /v1/pipelines/{name}/results``).

The SSE stream sends one ``result`` event per processed frame (``id`` is the result's number
in the pipeline's feed, ``data`` the event JSON, as sinks see it), a ``dropped`` event before
a result when the client fell behind and its oldest results were dropped (how many, and in
all), a ``: keep-alive`` comment when nothing came for a while, and an ``end`` event when the
pipeline or the API stops. Results come from ``agent.api.feed``; nothing here runs on the
inference thread.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from agent.api.feed import ResultFeed, StreamHub, Subscription
from agent.api.gate import ApiError
from agent.pipeline.runner import Pipeline
from agent.protocol.analytics import LineCount, ObjectEvent, ZoneCount

HEARTBEAT_S = 15.0  # a comment this often keeps proxies from timing an idle stream out

# --- documented shapes ------------------------------------------------------------------------


class PipelineInfo(BaseModel):
    """One running stream pipeline."""

    name: str
    source: str = Field(description="The source, credentials removed")
    state: str = Field(description="The source's state: connecting, streaming, waiting, ended")
    ready: bool = Field(description="False while the pipeline waits for its model")
    model: str | None = Field(description="Model name (card)")
    version: str | None = None
    task: str | None = None
    fps: float = Field(description="Results per second over the last 64 results; 0 when idle")
    results: int = Field(description="Results published since the API started")
    tracking: bool = Field(description="Tracking (and zones/lines) on: results carry track ids")


class PipelineList(BaseModel):
    pipelines: list[PipelineInfo]


class TrackedDetection(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in source-frame pixels")
    score: float
    label_id: int
    label: str
    track_id: int | None = Field(None, description="The object's track (tracking on; absent "
                                 "for a detection no track holds yet)")  # fmt: skip


class StreamResult(BaseModel):
    """One processed frame, as the pipeline's sinks get it."""

    model_config = ConfigDict(extra="allow")

    pipeline: str
    model: str
    version: str
    frame_seq: int = Field(description="Frame number within the source (counts dropped frames)")
    frame_time: float = Field(description="Capture time, seconds since the Unix epoch")
    latency_ms: float
    task: str
    detections: list[TrackedDetection] | None = None
    objects: list[ObjectEvent] | None = Field(
        None, description="Object events of this frame: entered/left/dwell/crossed"
    )


class LatestResult(BaseModel):
    """A pipeline's newest result and its running counts."""

    pipeline: str
    seq: int = Field(description="The result's number since the API started (the SSE id)")
    age_s: float = Field(description="Seconds since the result was published")
    result: StreamResult
    tracks_active: int | None = Field(None, description="Tracks alive now (tracking on)")
    tracks_started: int | None = Field(None, description="Track ids issued so far")
    zones: list[ZoneCount] | None = Field(None, description="Counts per zone and class, now")
    lines: list[LineCount] | None = Field(None, description="Counts per line and class, now")


_SSE_EXAMPLE = (
    "id: 42\nevent: result\n"
    'data: {"pipeline":"entrance","model":"det","version":"1.3.2","frame_seq":1057,...}\n\n'
    'event: dropped\ndata: {"dropped":3,"total":3}\n\n'
    ": keep-alive\n\n"
    'event: end\ndata: {"reason":"the agent\'s local API is stopping"}\n\n'
)

_SSE_RESPONSE = {
    "description": "Server-Sent Events: `result` (one per processed frame, data as in "
    "`/latest`'s `result`, id its number), `dropped` (results this client fell behind on), "
    "`end` (the pipeline or the API stopped)",
    "content": {"text/event-stream": {"schema": {"type": "string"}, "example": _SSE_EXAMPLE}},
}

# --- the routes -------------------------------------------------------------------------------


def find_pipeline(pipelines: list[Pipeline], name: str) -> Pipeline:
    """The pipeline named ``name`` (pipeline names only; models are not streams).

    Raises:
        ApiError: 404 when there is none.
    """
    for pipe in pipelines:
        if pipe.name == name:
            return pipe
    raise ApiError(404, f"no pipeline named {name!r}; pipelines {[p.name for p in pipelines]}")


def pipeline_info(pipe: Pipeline, feed: ResultFeed, now: float) -> dict[str, Any]:
    model = pipe.model
    latest = feed.latest
    return {
        "name": pipe.name,
        "source": pipe.source.display,
        "state": pipe.reader.state,
        "ready": model is not None,
        "model": model.card.name if model else None,
        "version": model.card.version if model else None,
        "task": model.card.task if model else None,
        "fps": feed.fps(now),
        "results": latest.seq if latest else 0,
        "tracking": pipe.analytics is not None,
    }


def latest_body(pipe: Pipeline, feed: ResultFeed, now: float) -> dict[str, Any]:
    """What ``/latest`` answers: the newest result, and the running counts now.

    Raises:
        ApiError: 503 before the first result.
    """
    last = feed.latest
    if last is None:
        raise ApiError(
            503, f"pipeline {pipe.name} has published no result yet", headers={"Retry-After": "1"}
        )
    body = {
        "pipeline": pipe.name,
        "seq": last.seq,
        "age_s": round(max(now - last.t, 0.0), 3),
        "result": last.event,
    }
    if pipe.analytics is not None:
        body.update(pipe.analytics.status())
    return body


def add_stream_routes(
    app: FastAPI,
    hub: StreamHub,
    authorize: Callable[[Request], None],
    *,
    errors: dict[int | str, dict[str, Any]],
    secured: dict[str, Any],
    heartbeat_s: float = HEARTBEAT_S,
) -> None:
    """``/v1/pipelines``, ``/v1/pipelines/{name}/latest`` and ``/v1/pipelines/{name}/results``,
    over the pipelines running at each request (``hub.pipelines``)."""

    @app.get(
        "/v1/pipelines",
        response_model=PipelineList,
        responses={401: errors[401]},
        tags=["pipelines"],
        openapi_extra=secured,
    )
    async def list_pipelines(request: Request) -> Response:
        """Each running stream pipeline: source, model and version, results per second, state."""
        authorize(request)
        now = time.monotonic()
        return JSONResponse(
            {"pipelines": [pipeline_info(p, feed, now) for p, feed in hub.running()]}
        )

    @app.get(
        "/v1/pipelines/{name}/latest",
        response_model=LatestResult,
        responses={401: errors[401], 404: errors[404], 503: {**errors[503],
                   "description": "No result yet (no model, or no frame processed yet)"}},
        tags=["pipelines"],
        openapi_extra=secured,
    )  # fmt: skip
    async def latest(name: str, request: Request) -> Response:
        """The pipeline's newest result: frame number and time, detections with their track
        ids, the frame's object events, and the zone/line counts as of this answer."""
        authorize(request)
        pipe = find_pipeline(hub.pipelines, name)
        return JSONResponse(latest_body(pipe, hub.feed(pipe), time.monotonic()))

    @app.get(
        "/v1/pipelines/{name}/results",
        response_class=StreamingResponse,
        responses={
            200: _SSE_RESPONSE,
            401: errors[401],
            404: errors[404],
            429: {**errors[429], "description": "[api] max_streams streams open already"},
        },
        tags=["pipelines"],
        openapi_extra=secured,
    )
    async def results(name: str, request: Request) -> Response:
        """The pipeline's results live, one event per processed frame. A client that reads
        slower than the pipeline produces loses its oldest results (``[api] stream_queue``
        are held per client) and is told how many; the pipeline never waits for it."""
        authorize(request)
        feed, sub = hub.subscribe(find_pipeline(hub.pipelines, name))
        return StreamingResponse(
            _events(hub, feed, sub, heartbeat_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )


def _sse(event: str, data: str, seq: int | None = None) -> bytes:
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


async def _events(
    hub: StreamHub, feed: ResultFeed, sub: Subscription, heartbeat_s: float
) -> AsyncIterator[bytes]:
    """The SSE body of one subscription; releases it however the stream ends (end event,
    client gone, server cancelling)."""
    announced = 0
    try:
        yield b": results of pipeline " + feed.pipeline.encode() + b"\n\n"
        while True:
            got = await sub.next(heartbeat_s)
            if got is None:
                yield b": keep-alive\n\n"
            elif isinstance(got, str):
                yield _sse("end", _dumps({"reason": got}))
                return
            else:
                if got.dropped:
                    announced += got.dropped
                    yield _sse("dropped", _dumps({"dropped": got.dropped, "total": announced}))
                try:
                    data = _dumps(got.event)
                except ValueError as e:  # a non-finite number: say so, keep streaming
                    yield _sse("error", _dumps({"seq": got.seq, "error": str(e)}))
                    continue
                yield _sse("result", data, got.seq)
    finally:
        hub.release(feed, sub)
