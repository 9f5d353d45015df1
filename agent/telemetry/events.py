"""Inference events to the cloud: a pure policy and the MQTT sink that applies it.

``EventPolicy`` (pure, explicit ``now``) decides which results leave the device: ``every``
frame, on ``change`` of what was seen (top-1 label, or the multiset of detected labels), or at
most ``max_per_s`` per second (token bucket). A frame with object events (a track entered,
left or dwelt in a zone, or crossed a line) is always sent under any policy but ``off``: those
happen once per track, and a count that misses one is wrong for good. Only results leave: raw
frames never do. ``MqttEventSink`` (adapter) validates each chosen event against the contract
and puts it in the outbox, so events, like telemetry, survive outages within the outbox's bound;
a frame with more object events than fit one message goes as several.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError

from agent.common.errors import EdgefleetError
from agent.pipeline.sinks import Sink
from agent.protocol.telemetry import InferenceEvent
from agent.telemetry.outbox import Outbox

log = logging.getLogger(__name__)
PolicyName = Literal["every", "change", "rate"]
# Object events per message: ~300 bytes each, so a message stays far below the 64 KiB limit
# even with the frame's detections in the first one.
OBJECTS_PER_MESSAGE = 100


def signature(event: Mapping[str, Any]) -> tuple[str, ...]:
    """Pure: what an event "saw", for the ``change`` policy."""
    classes = event.get("classifications") or []
    if classes:
        return ("cls", str(classes[0].get("label")))
    dets = event.get("detections") or []
    labels = Counter(str(d.get("label")) for d in dets)
    return ("det", *sorted(f"{k}x{v}" for k, v in labels.items()))


@dataclass
class EventPolicy:
    """Which events to send. Pure: pass ``now`` (seconds, monotonic)."""

    name: PolicyName = "rate"
    max_per_s: float = 1.0
    _last_sig: tuple[str, ...] | None = field(default=None, init=False)
    _tokens: float = field(default=1.0, init=False)
    _t: float | None = field(default=None, init=False)

    def allow(self, event: Mapping[str, Any], now: float) -> bool:
        if self.name == "every" or event.get("objects"):
            return True
        if self.name == "change":
            sig = signature(event)
            changed = sig != self._last_sig
            self._last_sig = sig
            return changed
        # rate: a token bucket of depth 1 refilled at max_per_s
        if self._t is not None:
            self._tokens = min(1.0, self._tokens + (now - self._t) * self.max_per_s)
        self._t = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class MqttEventSink(Sink):
    """Sends the events its policy allows, through the outbox."""

    def __init__(
        self,
        device_id: str,
        outbox: Outbox,
        topic: str,
        policy: EventPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.device_id = device_id
        self.outbox = outbox
        self.topic = topic
        self.policy = policy
        self.clock = clock
        self.sent = 0
        self.skipped = 0

    def emit(self, event: dict[str, Any]) -> None:
        if not self.policy.allow(event, self.clock()):
            self.skipped += 1
            return
        try:
            payloads = [
                InferenceEvent.from_pipeline_event(self.device_id, part).encode()
                for part in split_objects(event)
            ]
        except (ValidationError, EdgefleetError) as e:
            raise EdgefleetError(f"event of pipeline {event.get('pipeline')} not sent: {e}") from e
        for payload in payloads:
            self.outbox.put(self.topic, payload, qos=1)
        self.sent += 1


def split_objects(event: dict[str, Any], per: int = OBJECTS_PER_MESSAGE) -> list[dict[str, Any]]:
    """Pure: the event as one or more messages of at most ``per`` object events each; the
    frame's other results ride in the first only."""
    objects = event.get("objects") or []
    if len(objects) <= per:
        return [event]
    parts = [{**event, "objects": objects[:per]}]
    rest = {k: v for k, v in event.items() if k not in ("classifications", "detections", "summary")}
    parts += [{**rest, "objects": objects[i : i + per]} for i in range(per, len(objects), per)]
    return parts
