"""Pure: what the rollout logic sees of the fleet — one ``FleetSnapshot`` of ``DeviceView``s.

An adapter builds the snapshot from the ingest store (birth/LWT state, retained ``reported``
state, telemetry aggregated over the soak window) and hands it to ``plan.decide``; nothing in
here reads a clock, a database or the network.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.protocol.state import PipelineTarget, UpdatePhase

ModelRef = PipelineTarget  # name@version, the type the desired state uses


@dataclass(frozen=True)
class PipelineMetrics:
    """Telemetry of one pipeline over the soak window, all from one model version.

    Attributes:
        model: model the numbers belong to.
        version: its version.
        frames: frames inferred in the window.
        errors: inference errors in the window.
        fps: mean output frames per second, None when unknown.
        p95_ms: 95th percentile end-to-end latency in milliseconds, None when unknown.
        top1: classifier top-1 label → count (empty for other tasks).
    """

    model: str
    version: str
    frames: int = 0
    errors: int = 0
    fps: float | None = None
    p95_ms: float | None = None
    top1: Mapping[str, int] = field(default_factory=dict)

    @property
    def ref(self) -> ModelRef:
        """``model@version`` of the numbers."""
        return ModelRef(model=self.model, version=self.version)


@dataclass(frozen=True)
class PipelineView:
    """One pipeline of a device as last reported.

    Attributes:
        active_model: model running now (None: nothing reported yet).
        active_version: its version.
        phase: update phase of the current or last attempt (None: never updated).
        target_model: model of the current or last attempt.
        target_version: its version.
        last_error: why the last attempt failed.
        metrics: telemetry over the soak window (None: none received).
    """

    active_model: str | None = None
    active_version: str | None = None
    phase: UpdatePhase | None = None
    target_model: str | None = None
    target_version: str | None = None
    last_error: str | None = None
    metrics: PipelineMetrics | None = None

    @property
    def active(self) -> ModelRef | None:
        """The running ``model@version``, None when not known."""
        if self.active_model is None or self.active_version is None:
            return None
        return ModelRef(model=self.active_model, version=self.active_version)

    def is_target(self, ref: ModelRef) -> bool:
        """Whether the current or last update attempt was for ``ref``."""
        return self.target_model == ref.model and self.target_version == ref.version


@dataclass(frozen=True)
class ConfigView:
    """The pipeline configuration a device reported (``ReportedState.config``).

    Attributes:
        hash: hash of the remote configuration running (None: its local file's).
        target_hash: hash of the last configuration it attempted.
        status: outcome of that attempt: applying, applied, rejected or rolled_back.
        reason: why it was rejected or rolled back.
    """

    hash: str | None = None
    target_hash: str | None = None
    status: str | None = None
    reason: str | None = None


@dataclass(frozen=True)
class DeviceView:
    """One device: whether it is connected, how it is labelled, what its pipelines run.

    Attributes:
        device_id: the device.
        online: its last birth/LWT message said online.
        groups: groups the operator put it in.
        tags: its tags (``site=berlin``).
        pipelines: pipeline name → what it runs.
        config: the pipeline configuration it reported (None: none reported).
        contract: the wire contract version of its birth message (None: not known).
    """

    device_id: str
    online: bool = True
    groups: frozenset[str] = frozenset()
    tags: Mapping[str, str] = field(default_factory=dict)
    pipelines: Mapping[str, PipelineView] = field(default_factory=dict)
    config: ConfigView | None = None
    contract: str | None = None


class FleetSnapshot:
    """The fleet at one moment: devices by id (ids must be unique)."""

    __slots__ = ("_by_id",)

    def __init__(self, devices: Iterable[DeviceView] = ()) -> None:
        """Index ``devices`` by id.

        Raises:
            ValueError: a device id appears twice.
        """
        by_id: dict[str, DeviceView] = {}
        for d in devices:
            if d.device_id in by_id:
                raise ValueError(f"device {d.device_id!r} appears twice in the fleet snapshot")
            by_id[d.device_id] = d
        self._by_id: Mapping[str, DeviceView] = MappingProxyType(by_id)

    def get(self, device_id: str) -> DeviceView | None:
        """The device, None when the snapshot does not hold it."""
        return self._by_id.get(device_id)

    def __iter__(self) -> Iterator[DeviceView]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._by_id
