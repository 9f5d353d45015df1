"""Pure: the state messages of the wire contract (desired, reported, birth/LWT).

* ``…/devices/D/desired`` (cloud→device, retained) carries a ``SignedDesired``: a
  ``DesiredState`` body plus TUF-style ``signatures`` over the canonical JSON of the body
  (see ``agent.protocol.desired`` for signing and verification).
* ``…/devices/D/reported`` (device→cloud, retained) carries a ``ReportedState``: per pipeline
  the running model, the update phase and the last error.
* ``…/devices/D/state`` (device→cloud, retained) carries a ``DeviceState``: the birth message
  at connect and, as the broker's last will, the same with ``online: false``.

Every message is parsed from untrusted bytes by ``decode`` and fails with ``BadMessage`` (and
nothing else) when it is oversized, not JSON or does not validate (``agent.protocol.wire``).
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone
from enum import Enum
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from agent.protocol import CONTRACT_VERSION
from agent.protocol.card import Precision
from agent.protocol.sealed import redact
from agent.protocol.wire import WireMessage

MAX_PIPELINES = 64
MAX_SIGNATURES = 32
MAX_ERROR_TEXT = 500

# Same rules as agent/protocol/topics.py and agent/config.py, so that every id that is valid in
# a config is valid on the wire and in a topic.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
PIPELINE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
# semver.org 2.0.0 (digits spelled [0-9]: the Rust regex engine's \d matches any Unicode digit).
SEMVER_PATTERN = (
    r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)"
    r"(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$"
)
CONTRACT_PATTERN = r"^[0-9]{1,4}\.[0-9]{1,4}$"
MAX_REVISION = 2**53 - 1  # exact in every JSON implementation
# A revision more than this above the last one accepted is refused by devices and never
# issued by the registry (one deploy adds 1), so no single message, even validly signed, can
# push a device to MAX_REVISION and leave it unable to take another desired state.
MAX_REVISION_STEP = 1_000_000

DeviceId = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
PipelineName = Annotated[str, StringConstraints(pattern=PIPELINE_PATTERN)]
GroupName = Annotated[str, StringConstraints(pattern=DEVICE_ID_PATTERN)]
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]
Version = Annotated[str, StringConstraints(max_length=64, pattern=SEMVER_PATTERN)]
Contract = Annotated[str, StringConstraints(pattern=CONTRACT_PATTERN)]


def report_text(v: object) -> object:
    """A reported text as it may be sent: a camera URL's password masked (before the cut,
    which could leave a password without its '@'; ingest decodes with these models too), and a
    long traceback cut to its start so the report stays small enough to send."""
    if isinstance(v, str):
        v = redact(v)
        if len(v) > MAX_ERROR_TEXT:
            return v[: MAX_ERROR_TEXT - 1] + "…"
    return v


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("timestamp must carry a timezone (UTC expected), got a naive one")
    return value.astimezone(timezone.utc)


# --- desired ---------------------------------------------------------------------------------

CONFIG_HASH_PATTERN = r"^[0-9a-f]{64}$"
MAX_CONFIG_TEXT = 48 * 1024  # characters; the whole message must fit MAX_MESSAGE


class ConfigTarget(BaseModel):
    """A pipeline configuration the cloud wants a device to run (``DesiredState.config``).

    ``document`` is JSON text ``{"pipelines": [...]}``: the ``[[pipelines]]`` tables of the
    agent's config file. It travels as text because the signed body is canonical JSON, which
    has no floats (thresholds are floats). The device validates it with the same pydantic
    models as its local file (``agent.pipeline.config``) and refuses the whole configuration
    when any table is invalid. Settings that must never be changed remotely (data dir, trust
    root, broker credentials) have no place here. A string that holds a secret (a camera URL
    with a password) is sealed to the device's enrolled key (``sealed:v1:…``, see
    ``agent.protocol.sealed``) and opened only on the device.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    hash: str = Field(
        pattern=CONFIG_HASH_PATTERN, description="sha256 (hex) of 'document' encoded as UTF-8"
    )
    document: str = Field(
        max_length=MAX_CONFIG_TEXT,
        description='JSON text {"pipelines": [...]}: the [[pipelines]] tables of the agent config',
    )

    @model_validator(mode="after")
    def _hash_matches(self) -> ConfigTarget:
        if config_hash(self.document) != self.hash:
            raise ValueError("config hash does not match its document")
        return self


def config_hash(document: str) -> str:
    """The hash a ``ConfigTarget`` carries and a device reports: sha256 of the UTF-8 text."""
    return hashlib.sha256(document.encode("utf-8")).hexdigest()


class PipelineTarget(BaseModel):
    """The model version one pipeline should run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: ModelName = Field(description="Registry model name, e.g. 'det'")
    version: Version = Field(description="Semantic version of the model, e.g. '1.4.0'")

    def __str__(self) -> str:
        return f"{self.model}@{self.version}"


class DesiredState(WireMessage):
    """What the cloud wants a device to run: the body that gets signed."""

    type: Literal["desired"] = Field("desired", description="Message kind, always 'desired'")
    device_id: DeviceId = Field(description="The one device this state is for")
    revision: int = Field(
        ge=1, le=MAX_REVISION, description="Monotonic; a device never goes back to a lower one"
    )
    issued_at: datetime = Field(description="When the cloud issued this revision (UTC)")
    contract: Contract = Field(CONTRACT_VERSION, description="Wire contract version MAJOR.MINOR")
    pipelines: dict[PipelineName, PipelineTarget] = Field(
        default_factory=dict,
        max_length=MAX_PIPELINES,
        description="Pipeline name → model version it should run",
    )
    config: ConfigTarget | None = Field(
        None,
        description="Pipeline configuration to run (contract 1.3); absent: keep the one running",
    )

    @field_validator("issued_at")
    @classmethod
    def _issued_utc(cls, v: datetime) -> datetime:
        return _utc(v)


class SignatureEntry(BaseModel):
    """One signature of a desired state, as in TUF metadata."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keyid: str = Field(
        min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$", description="Signing key id"
    )
    sig: str = Field(
        max_length=16384, pattern=r"^[0-9a-fA-F]*$", description="Hex signature over the body"
    )


class SignedDesired(WireMessage):
    """The retained envelope on ``…/devices/D/desired``: body plus signatures."""

    signed: DesiredState = Field(description="The desired state that was signed")
    signatures: list[SignatureEntry] = Field(
        default_factory=list, max_length=MAX_SIGNATURES, description="Signatures over 'signed'"
    )


# --- reported --------------------------------------------------------------------------------


class UpdatePhase(str, Enum):
    """Where a pipeline's model update stands (the allowed moves live in update/machine.py)."""

    WAITING = "waiting"
    FETCHING = "fetching"
    VERIFIED = "verified"
    BUILDING = "building"
    TRIAL = "trial"
    ACTIVE = "active"
    COMMITTED = "committed"
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"


class Progress(BaseModel):
    """Work done out of a total (bytes fetched, build steps)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    done: int = Field(ge=0, le=1 << 50, description="Units done")
    total: int = Field(ge=0, le=1 << 50, description="Units in all (0 = unknown)")

    @model_validator(mode="after")
    def _bounded(self) -> Progress:
        if self.total and self.done > self.total:
            raise ValueError(f"progress done={self.done} exceeds total={self.total}")
        return self


class PipelineReport(BaseModel):
    """What one pipeline runs and where its update stands."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: PipelineName = Field(description="Pipeline name from the agent config")
    phase: UpdatePhase = Field(description="Update phase of the current or last attempt")
    active_model: ModelName | None = Field(None, description="Model running now")
    active_version: Version | None = Field(None, description="Its version")
    backend: str | None = Field(None, max_length=64, description="e.g. onnxruntime-cuda, tensorrt")
    precision: Precision | None = Field(None, description="fp32, fp16 or int8")
    target_model: ModelName | None = Field(None, description="Model being installed, if any")
    target_version: Version | None = Field(None, description="Its version")
    progress: Progress | None = Field(None, description="Progress of the current phase")
    last_error: str | None = Field(
        None, max_length=MAX_ERROR_TEXT, description="Why the last attempt failed (cut to fit)"
    )
    updated_at: datetime = Field(description="When this entry last changed (UTC)")
    waiting: str | None = Field(
        None,
        max_length=MAX_ERROR_TEXT,
        description="What the update waits for, in words (e.g. a maintenance window; 1.3)",
    )
    source_ended: bool = Field(
        False, description="The pipeline's source has ended (a file without loop; 1.3)"
    )

    @field_validator("last_error", "waiting", mode="before")
    @classmethod
    def _cut_error(cls, v: object) -> object:
        return report_text(v)

    @field_validator("updated_at")
    @classmethod
    def _updated_utc(cls, v: datetime) -> datetime:
        return _utc(v)


class ConfigStatus(str, Enum):
    """Where the device's last remote configuration attempt stands."""

    APPLYING = "applying"  # applied, health window running
    APPLIED = "applied"  # running and healthy
    REJECTED = "rejected"  # invalid (or not openable): never applied, previous one kept
    ROLLED_BACK = "rolled_back"  # applied, failed its health window, previous one restored


class ConfigReport(BaseModel):
    """Which pipeline configuration runs, and how the last remote one went (contract 1.3)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hash: str | None = Field(
        None,
        pattern=CONFIG_HASH_PATTERN,
        description="Hash of the remote configuration running; null: the local file's",
    )
    revision: int | None = Field(
        None, ge=1, le=MAX_REVISION, description="Desired revision that carried the last attempt"
    )
    target_hash: str | None = Field(
        None, pattern=CONFIG_HASH_PATTERN, description="Hash of the last configuration attempted"
    )
    status: ConfigStatus | None = Field(None, description="Outcome of the last attempt")
    reason: str | None = Field(
        None, max_length=MAX_ERROR_TEXT, description="Why it was rejected or rolled back"
    )
    updated_at: datetime = Field(description="When this entry last changed (UTC)")

    @field_validator("reason", mode="before")
    @classmethod
    def _cut_reason(cls, v: object) -> object:
        return report_text(v)

    @field_validator("updated_at")
    @classmethod
    def _updated_utc(cls, v: datetime) -> datetime:
        return _utc(v)


class ReportedState(WireMessage):
    """The retained per-device report on ``…/devices/D/reported``."""

    type: Literal["reported"] = Field("reported", description="Message kind, always 'reported'")
    device_id: DeviceId = Field(description="Reporting device")
    desired_revision: int | None = Field(
        None, ge=1, le=MAX_REVISION, description="Last desired revision applied (or seen)"
    )
    pipelines: list[PipelineReport] = Field(
        default_factory=list, max_length=MAX_PIPELINES, description="One entry per pipeline"
    )
    contract: Contract = Field(CONTRACT_VERSION, description="Wire contract version")
    config: ConfigReport | None = Field(
        None, description="Pipeline configuration running and the last remote attempt (1.3)"
    )

    @model_validator(mode="after")
    def _unique(self) -> ReportedState:
        names = [p.name for p in self.pipelines]
        if len(set(names)) != len(names):
            raise ValueError(f"pipeline names repeat: {sorted(names)}")
        return self


# --- birth / LWT -----------------------------------------------------------------------------


class DeviceState(WireMessage):
    """Birth message and last will on ``…/devices/D/state``."""

    type: Literal["state"] = Field("state", description="Message kind, always 'state'")
    device_id: DeviceId = Field(description="The device")
    online: bool = Field(description="True in the birth message, false in the last will")
    agent_version: str = Field(max_length=64, description="edgefleet agent version")
    profile: str = Field(max_length=64, description="Device profile name, e.g. jetson-orin-nano")
    contract: Contract = Field(CONTRACT_VERSION, description="Wire contract version")
    pipelines: list[PipelineName] = Field(
        default_factory=list, max_length=MAX_PIPELINES, description="Configured pipelines"
    )
    tags: dict[Annotated[str, StringConstraints(max_length=64)], str] = Field(
        default_factory=dict, max_length=64, description="Tags for rollout targeting"
    )
    groups: list[GroupName] = Field(
        default_factory=list, max_length=64, description="Groups for rollout targeting"
    )

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: dict[str, str]) -> dict[str, str]:
        # same rule as AgentConfig.tags, values bounded
        for k, val in v.items():
            if not k or not all(c.isalnum() or c in "_-." for c in k):
                raise ValueError(f"tag key {k!r} may hold only letters, digits, '_', '-', '.'")
            if len(val) > 256:
                raise ValueError(f"tag {k!r} value is {len(val)} characters, at most 256")
        return v


def contract_at_least(contract: str, want: tuple[int, int]) -> bool:
    """Whether contract ``"MAJOR.MINOR"`` is ``want`` or later (``"1"`` is 1.0; anything
    else that is not MAJOR.MINOR: False)."""
    major, _, minor = contract.partition(".")
    try:
        return (int(major), int(minor or 0)) >= want
    except ValueError:
        return False


def contract_major(contract: str) -> int:
    """``"1.3"`` → 1.

    Raises:
        ValueError: not MAJOR.MINOR.
    """
    major, _, _minor = contract.partition(".")
    return int(major)


__all__ = [
    "ConfigReport",
    "ConfigStatus",
    "ConfigTarget",
    "DesiredState",
    "DeviceState",
    "PipelineReport",
    "PipelineTarget",
    "Progress",
    "ReportedState",
    "SignatureEntry",
    "SignedDesired",
    "UpdatePhase",
    "config_hash",
    "contract_at_least",
    "contract_major",
]
