"""Pure: the MQTT topic tree of the wire contract, built and parsed in one place.

Per device ``D`` under a configurable root (default ``edgefleet/v1``)::

    ROOT/devices/D/state        dev→cloud  retained  birth/LWT
    ROOT/devices/D/desired      cloud→dev  retained  signed desired state
    ROOT/devices/D/reported     dev→cloud  retained  per-pipeline update phase
    ROOT/devices/D/telemetry    dev→cloud
    ROOT/devices/D/events       dev→cloud
    ROOT/devices/D/fetch/req    dev→cloud  chunk requests (registry: shared subscription)
    ROOT/devices/D/fetch/req/R  dev→cloud  chunk requests for registry replica R (sticky)
    ROOT/devices/D/fetch/resp   cloud→dev  chunk responses
    ROOT/devices/D/clips/req    cloud→dev  chunk requests for the device's clips (clips/ID.mp4)
    ROOT/devices/D/clips/resp   dev→cloud  their answers (the fetch/resp format)
    ROOT/devices/D/cmd          cloud→dev
    ROOT/devices/D/cmd/result   dev→cloud
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_ROOT = "edgefleet/v1"
KINDS = (
    "state",
    "desired",
    "reported",
    "telemetry",
    "events",
    "snapshots",
    "fetch/req",
    "fetch/resp",
    "clips/req",
    "clips/resp",
    "cmd",
    "cmd/result",
)
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
REGISTRY_SHARE_GROUP = "registry"


def valid_device_id(device_id: str) -> bool:
    """Device ids are topic-safe: no ``/``, ``+``, ``#`` or spaces."""
    return bool(_ID_RE.match(device_id))


@dataclass(frozen=True)
class Topics:
    """Topic names for one root."""

    root: str = DEFAULT_ROOT

    def device(self, device_id: str, kind: str) -> str:
        """``ROOT/devices/D/KIND``.

        Raises:
            ValueError: unknown kind or a device id that is not topic-safe.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown topic kind {kind!r}; expected one of {KINDS}")
        if not valid_device_id(device_id):
            raise ValueError(f"device id {device_id!r} is not topic-safe")
        return f"{self.root}/devices/{device_id}/{kind}"

    def all_devices(self, kind: str) -> str:
        """Wildcard subscription for one kind across the fleet."""
        if kind not in KINDS:
            raise ValueError(f"unknown topic kind {kind!r}")
        return f"{self.root}/devices/+/{kind}"

    def shared(self, group: str | None, kind: str) -> str:
        """``$share/GROUP/ROOT/devices/+/KIND`` (MQTT 5 shared subscription; Mosquitto ≥ 1.6
        honours it for 3.1.1 clients too); with ``group`` None, the plain wildcard, for brokers
        without shared subscriptions (then run one worker of each kind)."""
        if group is None:
            return self.all_devices(kind)
        return f"$share/{group}/{self.all_devices(kind)}"

    def replica_requests(self, device_id: str, replica: str) -> str:
        """``ROOT/devices/D/fetch/req/R``: chunk requests for registry replica ``R`` only.

        Raises:
            ValueError: a device id or replica name that is not topic-safe.
        """
        if not valid_device_id(replica):
            raise ValueError(f"replica name {replica!r} is not topic-safe")
        return f"{self.device(device_id, 'fetch/req')}/{replica}"

    def all_replica_requests(self, replica: str) -> str:
        """Subscription of replica ``R`` to its own chunk requests, fleet-wide."""
        if not valid_device_id(replica):
            raise ValueError(f"replica name {replica!r} is not topic-safe")
        return f"{self.all_devices('fetch/req')}/{replica}"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """``(device_id, kind)`` for a device topic under this root, else None.

        A replica's chunk-request topic (``fetch/req/R``) parses as kind ``fetch/req``.
        """
        prefix = f"{self.root}/devices/"
        if not topic.startswith(prefix):
            return None
        rest = topic[len(prefix) :]
        device_id, sep, kind = rest.partition("/")
        if kind.startswith("fetch/req/") and valid_device_id(kind[len("fetch/req/") :]):
            kind = "fetch/req"
        if not sep or kind not in KINDS or not valid_device_id(device_id):
            return None
        return device_id, kind
