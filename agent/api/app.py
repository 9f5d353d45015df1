"""Adapter: the local inference API as a FastAPI application (routes, auth, errors, limits).

``create_app(pipelines, ...)`` builds it over the agent's own ``Pipeline`` objects; the
``InferenceGate`` does the work. Every error is JSON ``{"error": "..."}``. The OpenAPI document
(``/openapi.json``, committed as ``docs/openapi.json``) does not depend on the configuration.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent import __version__
from agent.api.clips import add_clip_routes
from agent.api.feed import StreamHub
from agent.api.gate import ApiError, InferenceGate, model_info
from agent.api.payload import PayloadError, identify
from agent.api.streams import HEARTBEAT_S, add_stream_routes
from agent.pipeline.clips import ClipLibrary
from agent.pipeline.runner import Pipeline

log = logging.getLogger(__name__)

API_TITLE = "edgefleet local inference API"

# --- documented shapes (responses are built as plain dicts; these describe them) -------------


class ErrorBody(BaseModel):
    """Every non-200 answer."""

    error: str = Field(description="What went wrong, in words")


class TensorInfo(BaseModel):
    """The tensor ``.npy`` requests must carry."""

    shape: list[int] = Field(description="Batch-1 input shape, e.g. [1, 3, 224, 224]")
    dtype: str = Field(description="float32, float16 or uint8")


class ModelInfo(BaseModel):
    """One pipeline and the model it runs now."""

    model_config = ConfigDict(extra="allow")

    pipeline: str
    ready: bool = Field(description="False while the pipeline waits for its model")
    name: str | None = Field(description="Model name (card)")
    version: str | None = None
    task: str | None = None
    backend: str | None = Field(None, description="onnxruntime or tensorrt")
    device: str | None = None
    precision: str | None = Field(None, description="fp32, fp16 or int8")
    input: dict[str, Any] | None = Field(None, description="The card's input spec")
    tensor: TensorInfo | None = None
    labels: list[str] | None = None


class ModelList(BaseModel):
    models: list[ModelInfo]


class Classification(BaseModel):
    label_id: int
    label: str
    score: float | None


class Detection(BaseModel):
    box: list[float | None] = Field(description="x1, y1, x2, y2 in image pixels")
    score: float | None
    label_id: int
    label: str


class InferenceResult(BaseModel):
    """The pipeline event structure (without frame fields)."""

    model_config = ConfigDict(extra="allow")

    pipeline: str
    model: str
    version: str
    latency_ms: float = Field(description="Pre-processing + inference + post-processing")
    task: str
    classifications: list[Classification] | None = None
    detections: list[Detection] | None = None
    summary: dict[str, Any] | None = None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    reasons: list[str]


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": why}
    for code, why in {
        400: "Malformed image or tensor",
        401: "Missing or wrong bearer token",
        404: "No such pipeline or model",
        413: "Body or image too large",
        415: "Unsupported content type",
        422: "Tensor shape or dtype not the model's",
        429: "Too many requests in flight (see Retry-After)",
        503: "The pipeline has no model yet",
    }.items()
}
# bearer auth: required when the agent has a token (always off loopback), else optional
_SECURED: dict[str, Any] = {"security": [{"bearer": []}, {}]}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
_INFER_BODY = {
    "requestBody": {
        "required": True,
        "description": "A JPEG or PNG image (decoded like a camera frame), or a NumPy .npy "
        "tensor already preprocessed to the model input (batch 1, see GET /v1/models); as the "
        "raw body or as the 'file' part of a multipart form.",
        "content": {
            "image/jpeg": _BINARY,
            "image/png": _BINARY,
            "application/x-npy": _BINARY,
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


# --- body size limit (pure ASGI, so 413 comes before the body is read) ------------------------


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413: by Content-Length up front, else while
    the body streams in.

    A body still being sent is read and discarded (up to ``drain_bytes``) before answering:
    closing the connection on a client that is still writing makes its TCP stack reset it,
    and the client never reads the 413 (httpx: "peer closed connection"). A client that sent
    ``Expect: 100-continue`` (curl does for large bodies) gets the 413 before sending anything.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = 4 * max_bytes + (1 << 20)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        if b"content-length" in headers:
            try:
                declared = int(headers[b"content-length"])
            except ValueError:
                await _json(send, 400, "Content-Length is not a number")
                return
            if declared > self.max_bytes:
                if b"100-continue" not in headers.get(b"expect", b"").lower():
                    await self._drain(receive, 0, declared)
                await _json(send, 413, self._message(declared))
                return
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
                if not msg.get("more_body", False):
                    seen = -1  # complete: nothing left to drain
            return msg

        async def tracked(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited, tracked)
        except _TooLarge:
            if started:
                raise
            total = await self._drain(receive, seen, None)
            await _json(send, 413, self._message(total))

    async def _drain(self, receive: Receive, seen: int, declared: int | None) -> int:
        """Read and drop the rest of the body, up to ``drain_bytes``; returns bytes seen."""
        if declared is not None and declared > self.drain_bytes:
            return declared
        while seen <= self.drain_bytes:
            msg = await receive()
            if msg["type"] != "http.request":
                break
            seen += len(msg.get("body", b""))
            if not msg.get("more_body", False):
                break
        return seen

    def _message(self, size: int) -> str:
        return (
            f"request body of {size} bytes exceeds the limit of {self.max_bytes} bytes "
            "([api] max_body_mb)"
        )


async def _json(send: Send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


# --- the application --------------------------------------------------------------------------


def create_app(
    pipelines: Sequence[Pipeline],
    *,
    token: str | None = None,
    max_concurrent: int = 2,
    max_queue: int = 8,
    max_body_bytes: int = 8 << 20,
    max_image_pixels: int = 40_000_000,
    clips: ClipLibrary | None = None,
    max_streams: int = 8,
    stream_queue: int = 32,
    stream_heartbeat_s: float = HEARTBEAT_S,
) -> FastAPI:
    """The API over ``pipelines`` (read live: swaps, deliveries, pipelines added and removed
    show at once).

    Args:
        pipelines: the agent's pipelines, the list it changes in place (never copied here);
            a request names one, or the model one runs. After the set changes, call
            ``app.state.streams.sync()`` so an added pipeline gets its result feed.
        token: bearer token required on ``/readyz`` and ``/v1/*`` when set.
        max_concurrent: inferences at once (the worker pool's size).
        max_queue: requests waiting beyond those before 429.
        max_body_bytes: larger bodies get 413.
        max_image_pixels: larger decoded images get 413.
        clips: the agent's event clips (``/v1/clips``), None when no pipeline records any.
        max_streams: result streams (SSE) open at once; more get 429.
        stream_queue: results held per stream client; beyond, its oldest are dropped.
        stream_heartbeat_s: a keep-alive comment on a stream after this long without results.

    The gate is ``app.state.gate``, the result feeds ``app.state.streams`` (a ``StreamHub``
    attached to the pipelines as a sink): call ``app.state.streams.close()`` before stopping
    the server (streams end) and ``app.state.gate.close()`` after.
    """
    gate = InferenceGate(
        pipelines,
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        max_image_pixels=max_image_pixels,
    )
    app = FastAPI(
        title=API_TITLE,
        version=__version__,
        description="Answers from the device's active models on demand, and the results of its "
        "running stream pipelines (latest and live). Loopback only unless configured; a bearer "
        "token is required when bound elsewhere.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.gate = gate
    streams = StreamHub(pipelines, max_streams=max_streams, queue_size=stream_queue)
    app.state.streams = streams
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    _add_error_handlers(app)
    authorize = _authorizer(token)
    _add_routes(app, gate, authorize)
    add_clip_routes(app, clips, authorize, _ERRORS, _SECURED)
    add_stream_routes(app, streams, authorize, errors=_ERRORS, secured=_SECURED,
                      heartbeat_s=stream_heartbeat_s)  # fmt: skip
    return app


def _authorizer(token: str | None) -> Callable[[Request], None]:
    """The bearer-token check the secured routes call (no-op without a token)."""
    expected = token.encode() if token is not None else None

    def authorize(request: Request) -> None:
        """Check the bearer token (a plain call, not a FastAPI dependency: dependency
        resolution cost ~0.3 ms of CPU per request here, measured with yappi)."""
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), expected):
            raise ApiError(
                401,
                "missing or wrong bearer token (Authorization: Bearer ...)",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return authorize


def _add_error_handlers(app: FastAPI) -> None:
    """Every error as JSON ``{"error": "..."}``."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> Response:
        return JSONResponse({"error": e.message}, e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
        return JSONResponse({"error": str(e.detail)}, e.status_code, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> Response:
        parts = [f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"error": "; ".join(parts) or "invalid request"}, 422)


def _add_routes(app: FastAPI, gate: InferenceGate, authorize: Callable[[Request], None]) -> None:
    """The health, readiness, model list and inference routes."""

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> dict[str, str]:
        """The process is alive (no auth: for supervisors and probes)."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={
            503: {"model": Readiness, "description": "Not ready, with reasons"},
            401: _ERRORS[401],
        },
        tags=["health"],
        openapi_extra=_SECURED,
    )
    async def readyz(request: Request) -> Response:
        """Every pipeline has a model loaded; 503 with the reasons otherwise."""
        authorize(request)
        reasons = gate.readiness()
        return JSONResponse({"ready": not reasons, "reasons": reasons}, 503 if reasons else 200)

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses={401: _ERRORS[401]},
        tags=["models"],
        openapi_extra=_SECURED,
    )
    async def list_models(request: Request) -> Response:
        """Each pipeline with its model: version, backend, precision, task and input spec."""
        authorize(request)
        return JSONResponse({"models": [model_info(p) for p in gate.pipelines]})

    @app.post(
        "/v1/models/{name}/infer",
        response_model=InferenceResult,
        responses={k: v for k, v in _ERRORS.items()},
        openapi_extra={**_INFER_BODY, **_SECURED},
        tags=["models"],
    )
    async def infer(name: str, request: Request) -> Response:
        """Infer on one image or tensor with the pipeline's (or model's) active model.

        ``name`` is a pipeline name, or a model name (the first pipeline running it).
        """
        authorize(request)
        pipe = gate.resolve(name)
        payload = await _read_payload(request)
        return JSONResponse(await gate.infer(pipe, payload))


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document plus the bearer security scheme the routes name."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        doc = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        doc.setdefault("components", {})["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "[api] token, token_file or EDGEFLEET_API_TOKEN",
            }
        }
        app.openapi_schema = doc
    return app.openapi_schema


async def _read_payload(request: Request) -> Any:
    """The body as a ``Payload``: raw with its content type, or a multipart 'file' part.

    Raises:
        ApiError: 4xx for what the body or its content type is.
    """
    ctype = request.headers.get("content-type", "")
    try:
        if ctype.split(";", 1)[0].strip().lower() == "multipart/form-data":
            return await _read_multipart(request)
        return identify(await request.body(), ctype)
    except PayloadError as e:
        raise ApiError(e.status, str(e)) from e


async def _read_multipart(request: Request) -> Any:
    from starlette.datastructures import UploadFile

    try:
        form = await request.form(max_files=1, max_fields=8)
    except StarletteHTTPException as e:
        raise ApiError(e.status_code, f"bad multipart body: {e.detail}") from e
    except (ValueError, KeyError, AssertionError) as e:  # python-multipart parse errors
        raise ApiError(400, f"bad multipart body: {e}") from e
    try:
        part = form.get("file")
        if not isinstance(part, UploadFile):
            raise ApiError(400, "multipart body needs a 'file' part holding the image or tensor")
        data = await part.read()
        return identify(data, part.content_type or "application/octet-stream")
    finally:
        await form.close()
