"""Pure: the chunked file-transfer messages (device asks for byte windows, registry answers).

Request (JSON on ``…/fetch/req``)::

    {"id": "<request id>", "path": "targets/…" | "metadata/2.root.json", "offset": 0,
     "length": 65536}

Response (binary on ``…/fetch/resp``), MQTT 3.1.1 having no properties to carry a header::

    4-byte big-endian header length | header JSON | data bytes

with header ``{"id", "path", "offset", "total", "status": "ok"|"not_found"|"error"|"bad_request",
"error"}``. ``total`` is the file size, so the device learns it from the first window. Both are
parsed from untrusted bytes and fail with ``BadMessage``, never anything else.
"""

from __future__ import annotations

import json
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.errors import BadDataError

MAX_CHUNK = 256 * 1024  # hard cap on a window, whatever a device asks for
MAX_HEADER = 4096
_PATH_PATTERN = r"^(metadata|targets)/[A-Za-z0-9._/-]{1,512}$"


class BadMessage(BadDataError):
    """A payload that does not parse or validate."""


class FetchRequest(BaseModel):
    """One window of one file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64, description="Request id, echoed in the response")
    path: str = Field(pattern=_PATH_PATTERN, description="metadata/NAME or targets/PATH")
    offset: int = Field(ge=0, le=1 << 40, description="First byte")
    length: int = Field(ge=1, le=MAX_CHUNK, description="Bytes wanted")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, payload: bytes) -> FetchRequest:
        """Raises: BadMessage."""
        try:
            req = cls.model_validate_json(payload)
        except ValidationError as e:
            raise BadMessage(
                f"bad fetch request: {e.errors()[0]['msg'] if e.errors() else e}"
            ) from e
        if ".." in req.path.split("/"):
            raise BadMessage(f"bad fetch request: path {req.path!r} climbs out of the repository")
        return req


class FetchHeader(BaseModel):
    """The header of a response."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64)
    path: str = Field(max_length=600)
    offset: int = Field(ge=0)
    total: int = Field(ge=0, description="Size of the whole file")
    status: Literal["ok", "not_found", "error", "bad_request"] = "ok"
    error: str = Field("", max_length=500)


def encode_response(header: FetchHeader, data: bytes = b"") -> bytes:
    h = header.model_dump_json().encode()
    return struct.pack(">I", len(h)) + h + data


def decode_response(payload: bytes) -> tuple[FetchHeader, bytes]:
    """Raises: BadMessage."""
    if len(payload) < 4:
        raise BadMessage(
            f"fetch response of {len(payload)} bytes is shorter than its length prefix"
        )
    (n,) = struct.unpack(">I", payload[:4])
    if n > MAX_HEADER or 4 + n > len(payload):
        raise BadMessage(f"fetch response header length {n} is out of range")
    try:
        header = FetchHeader.model_validate(json.loads(payload[4 : 4 + n]))
    except (ValueError, ValidationError) as e:
        raise BadMessage(f"bad fetch response header: {e}") from e
    data = payload[4 + n :]
    if len(data) > MAX_CHUNK:
        raise BadMessage(f"fetch response carries {len(data)} bytes, more than {MAX_CHUNK}")
    return header, data
