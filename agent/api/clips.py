"""Adapter: the local API's clip routes — ``GET /v1/clips`` and ``GET /v1/clips/{id}``.

Clips are the MP4s ``agent.pipeline.clips`` cuts around object events; the list shows each
clip's times and size, the second route streams one (``video/mp4``, with HTTP range support
from Starlette's ``FileResponse``). Ids are checked by ``segments.parse_clip_id`` before any
path is built: ``../`` or a slash never reaches the disk.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from agent.api.gate import ApiError
from agent.pipeline.clips import ClipLibrary, ClipNotFound


class ClipInfo(BaseModel):
    """One finished clip."""

    id: str = Field(description="PIPELINE.MILLISECONDS, as in the events' 'clip' field")
    pipeline: str
    start: float = Field(description="Wall time of the clip's first frame (s since the epoch)")
    end: float = Field(description="Wall time of its end")
    first_event: float = Field(description="Wall time of the first object event it covers")
    last_event: float = Field(description="Wall time of the last one")
    stream_start: float = Field(description="Its start on the recorder's stream clock")
    stream_end: float = Field(description="Its end on that clock (a file: seconds in)")
    pre_s: float
    post_s: float
    kinds: list[str] = Field(description="Object event kinds in the clip")
    complete: bool = Field(description="The whole pre and post roll was recorded")
    bytes: int = Field(description="Size of the MP4")


class ClipList(BaseModel):
    clips: list[ClipInfo]


def add_clip_routes(
    app: FastAPI,
    library: ClipLibrary | None,
    authorize: Callable[[Request], None],
    errors: dict[int | str, dict[str, Any]],
    secured: dict[str, Any],
) -> None:
    """The two clip routes; without a library (no pipeline has clips) the list is empty."""

    @app.get(
        "/v1/clips",
        response_model=ClipList,
        responses={401: errors[401]},
        tags=["clips"],
        openapi_extra=secured,
    )
    async def list_clips(request: Request, pipeline: str | None = None) -> Response:
        """Finished event clips, oldest first (``?pipeline=NAME`` for one pipeline's)."""
        authorize(request)
        if library is None:
            return JSONResponse({"clips": []})
        if pipeline is not None and not _safe_name(pipeline):
            raise ApiError(400, f"pipeline {pipeline[:80]!r} is not a pipeline name")
        return JSONResponse({"clips": library.clips(pipeline)})

    @app.get(
        "/v1/clips/{clip_id}",
        response_class=FileResponse,
        responses={
            200: {"content": {"video/mp4": {}}, "description": "The clip (MP4)"},
            400: {**errors[400], "description": "Not a clip id"},
            401: errors[401],
            404: {**errors[404], "description": "No such clip (pending, evicted, never made)"},
        },
        tags=["clips"],
        openapi_extra=secured,
    )
    async def get_clip(clip_id: str, request: Request) -> Response:
        """One clip as MP4 (H.264 as the camera sent it, never re-encoded)."""
        authorize(request)
        if library is None:
            raise ApiError(404, f"no clip {clip_id[:80]!r}: no pipeline records clips")
        try:
            path = library.path(clip_id)
        except ValueError as e:
            raise ApiError(400, str(e)) from e
        except ClipNotFound as e:
            raise ApiError(404, str(e)) from e
        return FileResponse(path, media_type="video/mp4", filename=path.name)


def _safe_name(name: str) -> bool:
    import re

    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name) is not None
