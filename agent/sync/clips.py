"""Adapter: the device answers chunk requests for its event clips and command uploads
(``clips/req`` → ``clips/resp``).

The cloud (``edgefleet clip get``, ``edgefleet device cmd … logs``) asks with the chunk
protocol's ``FetchRequest`` for ``clips/ID.mp4`` or ``uploads/ID`` (a log extract or snapshot
a command made, ``agent.sync.uploads``) on ``ROOT/devices/D/clips/req``; each request gets one
answer in the ``fetch/resp`` format on ``ROOT/devices/D/clips/resp``: ``ok`` with the window
and the file's size, ``not_found`` for a clip not cut yet or evicted (or an upload cleaned up),
``bad_request`` for anything that is not such a path (``..``, slashes, other folders, a
malformed id: refused before the disk is touched). Only the operator identities may write
``clips/req`` and only this device reads it (``cloud_sync.acl``). Answers are sent straight
away at QoS 1, not through the outbox: a fetch is interactive, and the requester asks again
for what it missed.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import paho.mqtt.client as mqtt

from agent.common.mqtt import CallbackGuard
from agent.pipeline.clips import ClipLibrary, ClipNotFound
from agent.protocol.fetch import FetchHeader, FetchRequest, encode_response
from agent.protocol.topics import DEFAULT_ROOT, Topics
from agent.sync.uploads import UploadNotFound, UploadStore

log = logging.getLogger(__name__)

__all__ = ["ClipResponder", "answer"]

Status = Literal["not_found", "error", "bad_request"]


def answer(
    library: ClipLibrary | None, payload: bytes, uploads: UploadStore | None = None
) -> tuple[FetchHeader, bytes]:
    """The answer to one request (pure but for reading the file).

    Raises:
        BadMessage: the request does not parse (no id to answer to).
    """
    req = FetchRequest.decode(payload)

    def refuse(status: Status, why: str) -> tuple[FetchHeader, bytes]:
        return FetchHeader(id=req.id, path=req.path, offset=req.offset, total=0,
                           status=status, error=why[:500]), b""  # fmt: skip

    folder, _, name = req.path.partition("/")
    if folder == "uploads":
        if uploads is None:
            return refuse("not_found", "this device keeps no uploads")
        try:
            path = uploads.path(name)
        except ValueError as e:
            return refuse("bad_request", str(e))
        except UploadNotFound as e:
            return refuse("not_found", str(e))
    elif folder != "clips" or not name.endswith(".mp4"):
        return refuse("bad_request", f"{req.path!r} is not clips/ID.mp4 or uploads/ID")
    elif library is None:
        return refuse("not_found", "no pipeline of this device records clips")
    else:
        try:
            path = library.path(name[: -len(".mp4")])
        except ValueError as e:
            return refuse("bad_request", str(e))
        except ClipNotFound as e:
            return refuse("not_found", str(e))
    try:
        with open(path, "rb") as fh:
            total = fh.seek(0, 2)
            fh.seek(min(req.offset, total))
            data = fh.read(req.length)
    except FileNotFoundError:  # evicted between the lookup and the read
        return refuse("not_found", f"{folder} {name} was just removed")
    except OSError as e:
        return refuse("error", f"cannot read {folder} {name}: {e}")
    return FetchHeader(id=req.id, path=req.path, offset=req.offset, total=total), data


class ClipResponder:
    """Subscribes to this device's ``clips/req`` and answers each request.

    Args:
        client: the device session's paho client (its loop running).
        device_id: this device.
        library: the clips under ``DATA_DIR/clips`` (None: no pipeline records clips).
        root: topic root.
        uploads: what commands left for the cloud to fetch (``DATA_DIR/uploads``).

    Call ``subscribe()`` after each (re)connect (``DeviceSession.on_connected``).
    """

    def __init__(
        self,
        client: mqtt.Client,
        device_id: str,
        library: ClipLibrary | None,
        *,
        root: str = DEFAULT_ROOT,
        uploads: UploadStore | None = None,
    ) -> None:
        topics = Topics(root)
        self.req_topic = topics.device(device_id, "clips/req")
        self.resp_topic = topics.device(device_id, "clips/resp")
        self.device_id = device_id
        self.library = library
        self.uploads = uploads
        self.client = client
        self.answered = 0
        self.guard = CallbackGuard(f"device={device_id} clips")
        client.message_callback_add(self.req_topic, self.guard.wrap(self._on_request))

    def subscribe(self) -> None:
        self.client.subscribe(self.req_topic, qos=1)

    def close(self) -> None:
        self.client.message_callback_remove(self.req_topic)

    def _on_request(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        # BadMessage: the guard counts it
        header, data = answer(self.library, bytes(msg.payload), self.uploads)
        self.client.publish(self.resp_topic, encode_response(header, data), qos=1)
        self.answered += 1
        if header.status != "ok":
            log.info("device=%s file request %s: %s %s", self.device_id, header.path,
                     header.status, header.error)  # fmt: skip
