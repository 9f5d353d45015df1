"""Pure: the analytics parts of the wire contract — object events and zone/line counts.

* ``ObjectEvent`` rides in ``InferenceEvent.objects`` on ``…/devices/D/events``: one tracked
  object entered or left a zone, stayed in it ``dwell_s``, or crossed a line. Each happens at
  most once per track and zone/line, and a frame that has any is always sent, whatever the
  pipeline's event rate policy.
* ``ZoneCount`` and ``LineCount`` ride in ``PipelineTelemetry.zones``/``lines`` on
  ``…/devices/D/telemetry``: running counts since the agent started, one row per zone or
  line and class.

Track ids are per pipeline and run from 1 at every start of the agent; ``first_seen`` tells
two objects with the same id apart.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from agent.protocol.state import MAX_REVISION, PIPELINE_PATTERN

__all__ = ["LineCount", "ObjectEvent", "ObjectEventKind", "RegionName", "ZoneCount"]

MAX_COUNT = MAX_REVISION
MAX_TRACK_ID = MAX_REVISION
RegionName = Annotated[str, StringConstraints(pattern=PIPELINE_PATTERN)]  # config's rule
Label = Annotated[str, StringConstraints(max_length=128)]
ObjectEventKind = Literal["entered", "left", "dwell", "crossed"]


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ObjectEvent(_Part):
    """One object-level event of a tracked object at a zone or line."""

    kind: ObjectEventKind = Field(
        description="entered/left/dwell (zones), crossed (lines); each once per track"
    )
    region: RegionName = Field(description="Zone or line name from the pipeline's config")
    track_id: int = Field(ge=1, le=MAX_TRACK_ID, description="Track id within the pipeline")
    label_id: int = Field(ge=0, le=1_000_000, description="Class index of the track")
    label: Label = Field(description="Class name of the track")
    first_seen: float = Field(
        ge=0, le=1e11, description="When the track was first seen, seconds since the epoch"
    )
    last_seen: float = Field(
        ge=0, le=1e11, description="When the track was last seen, seconds since the epoch"
    )
    best_score: float = Field(ge=0, le=1, description="Highest detection score of the track")
    direction: Literal["in", "out"] | None = Field(
        None,
        description="crossed only: 'in' toward the right-hand side of the line as drawn "
        "(start to end, image y down), 'out' the other way",
    )
    dwell_s: float | None = Field(
        None, ge=0, le=1e9, description="dwell and left: seconds since the track entered"
    )

    @model_validator(mode="after")
    def _shape(self) -> ObjectEvent:
        if (self.kind == "crossed") != (self.direction is not None):
            raise ValueError(f"direction goes with 'crossed' only, got kind={self.kind!r}"
                             f" direction={self.direction!r}")  # fmt: skip
        if self.last_seen < self.first_seen:
            raise ValueError(f"last_seen {self.last_seen} is before first_seen {self.first_seen}")
        return self


class ZoneCount(_Part):
    """Running counts of one zone and class since the agent started."""

    zone: RegionName = Field(description="Zone name")
    label: Label = Field(description="Class name")
    entered: int = Field(ge=0, le=MAX_COUNT, description="Tracks that entered")
    left: int = Field(ge=0, le=MAX_COUNT, description="Tracks that left (or ended inside)")
    dwell: int = Field(ge=0, le=MAX_COUNT, description="Tracks that stayed dwell_s or more")
    inside: int = Field(ge=0, le=MAX_COUNT, description="Tracks inside now")


class LineCount(_Part):
    """Running counts of one line and class since the agent started."""

    line: RegionName = Field(description="Line name")
    label: Label = Field(description="Class name")
    crossed_in: int = Field(ge=0, le=MAX_COUNT, description="Tracks that crossed 'in'")
    crossed_out: int = Field(ge=0, le=MAX_COUNT, description="Tracks that crossed 'out'")
