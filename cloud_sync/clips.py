"""Adapter: ``edgefleet clip get DEVICE CLIP [-o FILE]`` — fetch a device's event clip over MQTT
(and, for ``edgefleet device cmd``, the uploads its commands leave: ``fetch_upload``).

The device keeps its clips (``agent.pipeline.clips``) and answers chunk requests for
``clips/ID.mp4`` on ``ROOT/devices/D/clips/req`` (``agent.sync.clips``). This command asks
with the device's own chunk client (``agent.update.transfer.client.ChunkClient``: windows in
flight, adaptive timeouts, retries), pointed at the clip topics, and writes the MP4
atomically. It connects as an operator identity (``mqtts://`` takes the service TLS settings
from the environment, as ``edgefleet deploy`` does); the broker ACL lets operators write
``clips/req`` and read ``clips/resp``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from agent.common.errors import BadDataError, TransportError
from agent.common.mqtt import connect_service, service_client
from agent.protocol.telemetry import CLIP_ID_PATTERN
from agent.protocol.topics import DEFAULT_ROOT, valid_device_id

MAX_CLIP_BYTES = 4 << 30  # far above any clip a device's budget lets it keep
MAX_UPLOAD_BYTES = 64 << 20  # a log extract is at most 4 MiB before gzip, a snapshot 2 MiB


def fetch_clip(
    broker_url: str,
    device_id: str,
    clip_id: str,
    dest: Path,
    *,
    topic_root: str = DEFAULT_ROOT,
    timeout_s: float = 5.0,
    max_bytes: int = MAX_CLIP_BYTES,
) -> int:
    """Download one clip to ``dest`` (replaced atomically); returns its size.

    Raises:
        ValueError: a device or clip id that is not valid.
        RemoteNotFoundError: the device has no such clip (not cut yet, evicted).
        RequestRefusedError, ChunkProtocolError: the device refused or answered nonsense.
        ChunkTimeoutError, TransportError: the broker or device did not answer.
    """
    import re

    from agent.update.transfer.client import ChunkClient

    if not valid_device_id(device_id):
        raise ValueError(f"device id {device_id!r} is not topic-safe")
    if not re.fullmatch(CLIP_ID_PATTERN[1:-1], clip_id):
        raise ValueError(f"clip id {clip_id!r} is not PIPELINE.MILLISECONDS")
    client_id = f"edgefleet-clip-{device_id}-{int(time.time() * 1000) % 10**9}"
    client = service_client(client_id, broker_url)
    connect_service(client, broker_url)
    try:
        chunks = ChunkClient(client, device_id, root=topic_root, kinds=("clips/req", "clips/resp"),
                             request_timeout_s=timeout_s, retries=3)  # fmt: skip
        try:
            return chunks.fetch_file(f"clips/{clip_id}.mp4", dest, max_length=max_bytes)
        finally:
            chunks.close()
    finally:
        client.disconnect()
        client.loop_stop()


def fetch_upload(
    client: mqtt.Client,
    device_id: str,
    upload_id: str,
    dest: Path,
    *,
    topic_root: str = DEFAULT_ROOT,
    timeout_s: float = 5.0,
    progress: Callable[[str], None] | None = None,
) -> int:
    """Download a command's upload (``uploads/ID``: a log extract, a snapshot) over ``client``
    (connected) with the chunk protocol, as clips are fetched; its size.

    Raises:
        RemoteNotFoundError, RequestRefusedError, ChunkProtocolError, ChunkTimeoutError: as
            ``ChunkClient.fetch_file``.
    """
    from agent.update.transfer.client import ChunkClient

    def on_progress(done: int, total: int) -> None:
        if progress is not None:
            progress(f"fetching {upload_id}: {done}/{total} bytes")

    chunks = ChunkClient(client, device_id, root=topic_root, kinds=("clips/req", "clips/resp"),
                         request_timeout_s=timeout_s, retries=3)  # fmt: skip
    try:
        return chunks.fetch_file(f"uploads/{upload_id}", dest, max_length=MAX_UPLOAD_BYTES,
                                 progress=on_progress)  # fmt: skip
    finally:
        chunks.close()


def add_clip_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    c = sub.add_parser("clip", help="event clips kept on devices")
    csub = c.add_subparsers(dest="clip_cmd", required=True)
    g = csub.add_parser("get", help="download a device's event clip (the 'clip' of its events)")
    g.add_argument("device", metavar="DEVICE")
    g.add_argument("clip", metavar="CLIP", help="clip id, e.g. gate.1764793537123")
    g.add_argument("-o", "--output", default=None, help="file to write (default: CLIP.mp4)")
    g.add_argument("--broker", required=True, help="mqtt://host:port or mqtts://host:port")
    g.add_argument("--topic-root", default=DEFAULT_ROOT)
    g.add_argument("--timeout", type=float, default=5.0, help="seconds per window (retried)")
    g.set_defaults(fn=_get)


def _get(args: argparse.Namespace) -> int:
    from agent.update.transfer.errors import RemoteNotFoundError

    dest = Path(args.output or f"{args.clip}.mp4")
    try:
        n = fetch_clip(args.broker, args.device, args.clip, dest, topic_root=args.topic_root,
                       timeout_s=args.timeout)  # fmt: skip
    except ValueError as e:
        print(f"edgefleet clip get: {e}", file=sys.stderr)
        return 2
    except RemoteNotFoundError as e:
        print(f"edgefleet clip get: device {args.device} has no clip {args.clip}: {e}",
              file=sys.stderr)  # fmt: skip
        return 1
    except (BadDataError, TransportError) as e:
        print(f"edgefleet clip get: {e}", file=sys.stderr)
        return 1
    print(f"{dest}: {n} bytes")
    return 0
