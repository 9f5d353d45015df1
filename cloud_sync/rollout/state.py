"""Pure: the persisted shapes of a staged rollout — spec, state, device records, events — and
the actions a decision asks the adapter to carry out.

``RolloutSpec`` is what the operator asked for (``edgefleet rollout start``); ``RolloutState``
is everything the controller must remember between two decisions (JSON via pydantic, so an
adapter can store it anywhere). Both are frozen: ``plan.decide`` returns a new state.

A rollout carries **either** a model version (``model``, ``version``) **or** a pipeline
configuration (``config``, see ``configdoc``), never both: each has its own success signal
(committed version vs applied configuration hash) and its own abort semantics, and the two
kinds may run at once on the same device (the publisher keeps the other's part of the
desired state).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.protocol.state import ModelName, PipelineName, Version
from cloud_sync.rollout.configdoc import RolloutConfig, short_hash
from cloud_sync.rollout.fleet import ModelRef, PipelineMetrics
from cloud_sync.rollout.gates import Gate, GateResult, parse_gate
from cloud_sync.rollout.stages import Stage, normalize_stages
from cloud_sync.rollout.target import Target, parse_target

Status = Literal["running", "paused", "completed", "failed", "aborted"]
Outcome = Literal["pending", "updating", "committed", "failed", "reverted"]
EventKind = Literal[
    "started",
    "stage_started",
    "stage_skipped",
    "soak_started",
    "device_failed",
    "gates_passed",
    "gates_failed",
    "paused",
    "resumed",
    "promoted",
    "reverted",
    "completed",
    "failed",
    "aborted",
]
ACTIVE: frozenset[Status] = frozenset({"running", "paused"})
FINISHED: frozenset[Outcome] = frozenset({"committed", "failed"})
ROLLOUT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class RolloutSpec(BaseModel):
    """What the operator asked for. Stages and gates may be given as text (``"5%"``,
    ``"failures<2%"``); stages are checked to increase and get a final ``100%`` when missing."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=ROLLOUT_ID_PATTERN, description="Rollout id; seeds device choice")
    model: ModelName | None = Field(None, description="Model to roll out (or a config)")
    version: Version | None = Field(None, description="Its version")
    config: RolloutConfig | None = Field(
        None, description="Pipeline configuration to roll out instead of a model version"
    )
    pipeline: PipelineName | None = Field(
        None, description="Pipeline to update; None = every pipeline of each device"
    )
    target: str = Field(min_length=1, max_length=2000, description="Target expression")
    stages: tuple[Stage, ...] = Field(
        default=(), validate_default=True, description="Cumulative stages, the last 100%"
    )
    soak_s: float = Field(600.0, ge=0, le=30 * 86400, description="Soak after each stage, s")
    gates: tuple[Gate, ...] = Field(default=(), description="Checked after each soak")
    max_concurrent: int | None = Field(
        None, ge=1, le=1_000_000, description="Online devices updating at once (None: no cap)"
    )
    on_fail: Literal["pause", "rollback"] = Field("pause", description="When a gate fails")

    @field_validator("stages", mode="before")
    @classmethod
    def _stages(cls, v: Any) -> Any:
        if not isinstance(v, (list, tuple)):
            return v
        # stored JSON holds stages as objects ({"percent": 10.0, "count": null})
        return normalize_stages(Stage.model_validate(s) if isinstance(s, dict) else s for s in v)

    @field_validator("gates", mode="before")
    @classmethod
    def _gates(cls, v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return tuple(parse_gate(g) if isinstance(g, str) else g for g in v)
        return v

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        parse_target(v)  # raises ValueError naming the bad token
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> RolloutSpec:
        has_model = self.model is not None or self.version is not None
        if self.config is None and (self.model is None or self.version is None):
            raise ValueError("a rollout needs a model and a version, or a configuration")
        if self.config is not None:
            if has_model:
                raise ValueError(
                    "a rollout carries a model version or a configuration, not both; "
                    "start two rollouts"
                )
            if self.pipeline is not None:
                raise ValueError("a configuration rollout covers all pipelines; drop --pipeline")
            if self.on_fail == "rollback":
                raise ValueError(
                    "a configuration rollout does not revert devices (each keeps its last good "
                    "configuration by itself); use on_fail 'pause', and roll out the previous "
                    "file to undo"
                )
        return self

    @property
    def ref(self) -> ModelRef:
        """``model@version`` being rolled out.

        Raises:
            ValueError: this is a configuration rollout.
        """
        if self.model is None or self.version is None:
            raise ValueError(f"rollout {self.id} rolls out a configuration, not a model")
        return ModelRef(model=self.model, version=self.version)

    @property
    def what(self) -> str:
        """What is rolled out, for the operator: ``det@2.0.0`` or ``config 1a2b3c4d5e6f``."""
        if self.config is not None:
            return f"config {short_hash(self.config.hash)}"
        return str(self.ref)

    def parsed_target(self) -> Target:
        """The target expression, parsed."""
        return parse_target(self.target)


class PipelineRecord(BaseModel):
    """One pipeline of a selected device.

    ``sent`` is False for a pipeline that already ran the new version when it was selected:
    it counts as committed but was never touched, so abort and rollback leave it alone.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    previous: ModelRef | None = Field(None, description="What it ran when selected")
    before: PipelineMetrics | None = Field(None, description="Its figures on that version")
    outcome: Outcome = Field("pending", description="Where its update stands")
    sent: bool = Field(False, description="A Deploy went out for it")
    error: str | None = Field(None, max_length=600, description="Why the update failed")


class DeviceRecord(BaseModel):
    """A device this rollout selected, with what it ran before."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    device_id: str = Field(description="The device")
    stage: int = Field(ge=0, description="Index of the stage that selected it")
    rank: str = Field(description="Its picking-order key (sha256 hex)")
    pipelines: dict[str, PipelineRecord] = Field(description="Pipelines this rollout updates")
    desired_sent_at: datetime | None = Field(None, description="When its Deploy went out")

    @property
    def outcome(self) -> Outcome:
        """The device's outcome, from its pipelines': the first of reverted, pending,
        updating, failed that one of them has, else committed. A device has *finished* when
        it is committed or failed."""
        outcomes = {p.outcome for p in self.pipelines.values()}
        order: tuple[Outcome, ...] = ("reverted", "pending", "updating", "failed")
        return next((o for o in order if o in outcomes), "committed")

    @property
    def touched(self) -> bool:
        """Whether a Deploy was sent for any of its pipelines."""
        return any(p.sent for p in self.pipelines.values())


class RolloutEvent(BaseModel):
    """One line of a rollout's history."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: datetime = Field(description="When (the decision's now)")
    stage: int = Field(ge=0, description="Stage index at the time")
    kind: EventKind = Field(description="What happened")
    message: str = Field(description="What and why, with numbers")


class RolloutState(BaseModel):
    """What a rollout remembers between decisions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    status: Status = Field("running", description="running, paused, completed, failed, aborted")
    stage: int = Field(0, ge=0, description="Index of the current stage")
    stage_started_at: datetime | None = Field(
        None, description="When the current stage picked its devices (None: not yet)"
    )
    soak_started_at: datetime | None = Field(
        None, description="When every online device of the stage had finished"
    )
    promote_requested: bool = Field(False, description="Skip the rest of the current soak")
    paused_by_gate: bool = Field(False, description="The pause came from a failing gate")
    waived_stage: int | None = Field(
        None, description="Stage whose failing gates the operator accepted by resuming"
    )
    devices: dict[str, DeviceRecord] = Field(default_factory=dict, description="Selected ones")
    last_gates: tuple[GateResult, ...] = Field(default=(), description="Latest gate results")
    history: tuple[RolloutEvent, ...] = Field(default=(), description="Events, oldest first")

    def counts(self) -> Counter[Outcome]:
        """Selected devices by outcome."""
        return Counter(r.outcome for r in self.devices.values())


@dataclass(frozen=True)
class Deploy:
    """Set ``device_id``'s desired ``pipeline`` to ``model@version`` (the new version)."""

    device_id: str
    pipeline: str
    model: str
    version: str


@dataclass(frozen=True)
class Revert:
    """Set ``device_id``'s desired ``pipeline`` back to ``model@version`` (what it ran)."""

    device_id: str
    pipeline: str
    model: str
    version: str


@dataclass(frozen=True)
class SetConfig:
    """Send ``device_id`` the rollout's configuration (its document hashes to ``hash``)."""

    device_id: str
    hash: str


@dataclass(frozen=True)
class Log:
    """Tell the operator (one line, already in the rollout's history)."""

    message: str


Action = Deploy | Revert | SetConfig | Log


@dataclass(frozen=True)
class Decision:
    """What to do now and the state to store once it is done."""

    actions: tuple[Action, ...]
    new_state: RolloutState


__all__ = [
    "ACTIVE",
    "FINISHED",
    "Action",
    "Decision",
    "Deploy",
    "DeviceRecord",
    "EventKind",
    "Log",
    "Outcome",
    "PipelineRecord",
    "Revert",
    "RolloutEvent",
    "RolloutSpec",
    "RolloutState",
    "SetConfig",
    "Status",
]
