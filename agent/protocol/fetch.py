"""Pure: the chunked file-transfer messages (device asks for byte windows, registry answers).

Request (JSON on ``…/fetch/req``)::

    {"id": "<request id>", "path": "targets/…" | "metadata/2.root.json", "offset": 0,
     "length": 65536, "sent_at": 1768465800.25, "timeout_s": 0.8, "busy_ok": true}

``sent_at``, ``timeout_s`` and ``busy_ok`` are optional (flow control; a request without them
is admitted like any other, but while its transfer waits in line it gets no answer at all,
since the device would not understand ``busy``; it is served when it asks again after its own
timeout): ``sent_at`` is the device's wall clock when it sent the request
and ``timeout_s`` how long it waits for the answer before asking again. The registry estimates
the request's queueing delay from ``sent_at`` against the smallest ``receive - sent_at`` it has
seen from that device (clock skew cancels out) and drops, unanswered, a request that waited
longer than ``timeout_s``: the device has asked again already. ``busy_ok`` says the device
understands the ``busy`` status.

Response (binary on ``…/fetch/resp``), MQTT 3.1.1 having no properties to carry a header::

    4-byte big-endian header length | header JSON | data bytes

with header ``{"id", "path", "offset", "total", "status": "ok"|"not_found"|"error"|"bad_request"
|"busy", "error", "retry_after_s"}``. ``total`` is the file size, so the device learns it from
the first window. Both are parsed from untrusted bytes and fail with ``BadMessage``, never
anything else: a request is at most ``MAX_REQUEST`` bytes, a header ``MAX_HEADER`` and the data
``MAX_CHUNK``; offsets and sizes are at most ``MAX_FILE`` (1 TiB); JSON nested deeper than
pydantic's parser allows (a few hundred levels) or holding numbers out of range is refused.

``busy`` (only ever sent to a request with ``busy_ok``): the registry is serving as many
transfers as it admits; no data, ``total`` 0, and ``retry_after_s`` (present only on ``busy``)
says when to ask again. Waiting transfers are admitted first come, first served, as long as the
device keeps asking at about that pace; the wait is not a failure. ``retry_after_s`` is left out
of every other header, so devices that predate it parse those unchanged.

Sticky transfers (request flag ``sticky_ok``): registry replicas split requests through a
shared subscription, message by message, but admit transfers each on its own. An ``ok`` answer
to a ``sticky_ok`` request names its ``replica``; the device sends the rest of that transfer
to ``ROOT/devices/D/fetch/req/REPLICA``, which only that replica subscribes to, so the
replica that admitted a transfer serves all of it and frees its place at the last window. A
device goes back to the shared topic when that replica answers ``busy`` or stops answering
(restarted, gone). ``replica`` is only ever sent to a request with ``sticky_ok``.
"""

from __future__ import annotations

import struct
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from agent.protocol.wire import BadMessage

MAX_CHUNK = 256 * 1024  # hard cap on a window, whatever a device asks for
MAX_HEADER = 4096
MAX_REQUEST = 4096  # bytes of a request; a real one is about 250
MAX_FILE = 1 << 40  # bytes of a registry file, and so of any offset or size on the wire
# clips/ID.mp4: a device's event clip, asked for by the cloud on clips/req (contract 1.2)
_PATH_PATTERN = r"^(metadata|targets|clips|uploads)/[A-Za-z0-9._/-]{1,512}$"
_FLOW_FIELDS = ("sent_at", "timeout_s", "busy_ok", "sticky_ok")
_REPLICA_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # topic-safe, like a device id


class FetchRequest(BaseModel):
    """One window of one file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64, description="Request id, echoed in the response")
    path: str = Field(
        pattern=_PATH_PATTERN,
        description="metadata/NAME or targets/PATH (registry); clips/ID.mp4 or uploads/ID (device)",
    )
    offset: int = Field(ge=0, le=MAX_FILE, description="First byte")
    length: int = Field(ge=1, le=MAX_CHUNK, description="Bytes wanted")
    sent_at: float | None = Field(
        None, ge=0, le=1e11, description="Device wall clock at sending, seconds since the epoch"
    )
    timeout_s: float | None = Field(
        None, gt=0, le=3600, description="How long the device waits for this answer"
    )
    busy_ok: bool = Field(
        False, description="The device understands status busy (with retry_after_s)"
    )
    sticky_ok: bool = Field(
        False, description="The device understands replica in answers (sticky transfers)"
    )

    @model_serializer(mode="wrap")
    def _omit_unset_flow_fields(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Flow-control fields left at their defaults are not written: such a request is
        byte for byte what a registry predating them accepts."""
        out: dict[str, Any] = handler(self)
        for name in _FLOW_FIELDS:
            if out.get(name) in (None, False):
                out.pop(name, None)
        return out

    def encode(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, payload: bytes) -> FetchRequest:
        """Raises: BadMessage."""
        if len(payload) > MAX_REQUEST:
            raise BadMessage(
                f"fetch request of {len(payload)} bytes is over the {MAX_REQUEST}-byte limit"
            )
        try:
            req = cls.model_validate_json(payload)
        except ValidationError as e:
            raise BadMessage(
                f"bad fetch request: {e.errors()[0]['msg'] if e.errors() else e}"
            ) from e
        except (ValueError, RecursionError) as e:  # defensive: the parser's own limits
            raise BadMessage(f"bad fetch request: {type(e).__name__}: {str(e)[:200]}") from e
        if ".." in req.path.split("/"):
            raise BadMessage(f"bad fetch request: path {req.path!r} climbs out of the repository")
        return req


class FetchHeader(BaseModel):
    """The header of a response."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=64)
    path: str = Field(max_length=600)
    offset: int = Field(ge=0, le=MAX_FILE)
    total: int = Field(ge=0, le=MAX_FILE, description="Size of the whole file")
    status: Literal["ok", "not_found", "error", "bad_request", "busy"] = "ok"
    error: str = Field("", max_length=500)
    retry_after_s: float | None = Field(
        None, ge=0, le=3600, description="With status busy: seconds to wait before asking again"
    )
    replica: str | None = Field(
        None,
        pattern=_REPLICA_PATTERN,
        description="To a request with sticky_ok: the replica that answered; send the rest of "
        "the transfer to ROOT/devices/D/fetch/req/REPLICA",
    )


def encode_response(header: FetchHeader, data: bytes = b"") -> bytes:
    """The binary response: length prefix, header JSON (``retry_after_s`` only when set), data."""
    h = header.model_dump_json(exclude_none=True).encode()
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
    # pydantic's own JSON parser, as for every other message: it refuses nesting deeper than
    # a few hundred levels, numbers out of range and invalid UTF-8 with a ValidationError.
    # json.loads raised RecursionError on a 1,500-deep header, which ended paho's thread.
    try:
        header = FetchHeader.model_validate_json(payload[4 : 4 + n])
    except ValidationError as e:
        errors = e.errors(include_url=False, include_input=False)
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors else ""
        what = errors[0]["msg"] if errors else str(e)[:200]
        raise BadMessage(f"bad fetch response header: {where or '<root>'}: {what}") from e
    except (ValueError, RecursionError) as e:  # defensive: the parser's own limits
        raise BadMessage(f"bad fetch response header: {type(e).__name__}: {str(e)[:200]}") from e
    data = payload[4 + n :]
    if len(data) > MAX_CHUNK:
        raise BadMessage(f"fetch response carries {len(data)} bytes, more than {MAX_CHUNK}")
    return header, data
