"""Pure: the model update state machine, crash recovery and the post-activation health window.

One attempt per pipeline moves through the phases of ``UpdatePhase``::

    waiting → fetching → verified → building → trial → active → committed
                 │  ↖ waiting  │          │         │        └──→ rolled_back
                 └─────────────┴──────────┴─────────┴──→ rejected

``fetching → waiting`` is transport trouble (broker gone): the fetch resumes later and the
version is *not* rejected. Rejected and rolled-back versions go on the pipeline's ``rejected``
list so the same desired state does not retry them in a loop.

The persisted shape of all this (``UpdateState``) is defined here and written by
``agent.update.store``; every function takes the time as ``now`` and returns new values.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from agent.common.errors import EdgefleetError
from agent.protocol.state import MAX_REVISION, PipelineName, PipelineTarget, UpdatePhase

ModelRef = PipelineTarget  # name@version: the same type the desired state uses
P = UpdatePhase
MAX_REJECTED = 64

ALLOWED: Mapping[UpdatePhase, frozenset[UpdatePhase]] = {
    # to trial: a built model whose activation waited for its maintenance window; to
    # rejected: cancelled by the operator or superseded while waiting (``retryable``)
    P.WAITING: frozenset({P.FETCHING, P.TRIAL, P.REJECTED}),
    P.FETCHING: frozenset({P.VERIFIED, P.REJECTED, P.WAITING}),
    # back to waiting: the device's disk refused (full); the version is not at fault
    P.VERIFIED: frozenset({P.BUILDING, P.REJECTED, P.WAITING}),
    P.BUILDING: frozenset({P.TRIAL, P.REJECTED, P.WAITING}),
    # back to waiting: built and checked, its activation waits for a maintenance window
    P.TRIAL: frozenset({P.ACTIVE, P.REJECTED, P.WAITING}),
    P.ACTIVE: frozenset({P.COMMITTED, P.ROLLED_BACK}),
    P.COMMITTED: frozenset(),
    P.REJECTED: frozenset(),
    P.ROLLED_BACK: frozenset(),
}
TERMINAL = frozenset({P.COMMITTED, P.REJECTED, P.ROLLED_BACK})
# After a restart these resume; the others were running the new model when the agent died.
RESUMABLE = frozenset({P.WAITING, P.FETCHING, P.VERIFIED})


class IllegalTransition(EdgefleetError):
    """A move the state machine does not allow (a bug in the caller, not bad data).

    Attributes:
        frm: the phase the attempt is in.
        to: the phase that was asked for.
    """

    def __init__(self, message: str, *, frm: UpdatePhase, to: UpdatePhase) -> None:
        super().__init__(message)
        self.frm = frm
        self.to = to


@dataclass
class UpdateAttempt:
    """One try at moving a pipeline to a model version."""

    pipeline: str
    target: ModelRef
    revision: int | None
    started_at: datetime
    updated_at: datetime
    phase: UpdatePhase = UpdatePhase.WAITING
    reason: str = ""
    tries: int = 1  # how many times this target was started (interruptions count, as boots do)
    # A rejection that is not the version's fault (cancelled by the operator, superseded by a
    # newer desired state): the version is not put on the never-retry list.
    retryable: bool = False

    @classmethod
    def start(
        cls,
        pipeline: str,
        target: ModelRef,
        *,
        revision: int | None,
        now: datetime,
        tries: int = 1,
    ) -> UpdateAttempt:
        """A new attempt in ``waiting``."""
        return cls(pipeline, target, revision, started_at=now, updated_at=now, tries=tries)

    @property
    def terminal(self) -> bool:
        """Committed, rejected or rolled back: nothing more will happen to it."""
        return self.phase in TERMINAL

    def advance(self, to: UpdatePhase, *, now: datetime, reason: str = "") -> None:
        """Move to phase ``to``.

        Raises:
            IllegalTransition: ``to`` is not allowed from the current phase; nothing changes.
        """
        if to not in ALLOWED[self.phase]:
            allowed = ", ".join(sorted(p.value for p in ALLOWED[self.phase])) or "none (final)"
            raise IllegalTransition(
                f"update {self.pipeline}:{self.target} cannot go from {self.phase.value} to"
                f" {to.value}; allowed from {self.phase.value}: {allowed}; phase unchanged",
                frm=self.phase,
                to=to,
            )
        self.phase = to
        self.reason = reason
        self.updated_at = now


class PipelineSlot(BaseModel):
    """Persisted update state of one pipeline."""

    model_config = ConfigDict(extra="forbid")

    committed: ModelRef | None = Field(None, description="Last committed version")
    previous: ModelRef | None = Field(None, description="The committed version before it")
    active: ModelRef | None = Field(None, description="Version running now (maybe on trial)")
    attempt: UpdateAttempt | None = Field(None, description="Current or last attempt")
    rejected: list[str] = Field(
        default_factory=list, max_length=MAX_REJECTED, description="name@version never retried"
    )


class UpdateState(BaseModel):
    """Everything the update logic persists (``state.json`` in the model store)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = Field(1, description="Layout version of this file")
    accepted_revision: int | None = Field(
        None, ge=1, le=MAX_REVISION, description="Highest verified desired revision accepted"
    )
    applied_revision: int | None = Field(
        None, ge=1, le=MAX_REVISION, description="Highest desired revision fully applied"
    )
    pipelines: dict[PipelineName, PipelineSlot] = Field(
        default_factory=dict, description="Per pipeline"
    )


class Decision:
    """A yes/no with the reason; truthy when yes."""

    __slots__ = ("ok", "reason")

    def __init__(self, ok: bool, reason: str) -> None:
        self.ok = ok
        self.reason = reason

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return f"Decision({self.ok}, {self.reason!r})"


def should_attempt(state: UpdateState, pipeline: str, target: ModelRef) -> Decision:
    """Whether a desired target warrants a new attempt on ``pipeline``."""
    slot = state.pipelines.get(pipeline, PipelineSlot())
    if slot.committed == target:
        return Decision(False, f"{target} is already committed on pipeline {pipeline}")
    if str(target) in slot.rejected:
        return Decision(
            False,
            f"{target} was rejected on pipeline {pipeline} before; not retried,"
            " publish a new version",
        )
    a = slot.attempt
    if a is not None and not a.terminal and a.target == target:
        return Decision(False, f"{target} is already being installed (phase {a.phase.value})")
    if a is not None and not a.terminal:
        return Decision(True, f"{target} supersedes {a.target} (in phase {a.phase.value})")
    return Decision(True, f"{target} is new for pipeline {pipeline}")


def _add_rejected(slot: PipelineSlot, ref: ModelRef) -> None:
    name = str(ref)
    if name in slot.rejected:
        slot.rejected.remove(name)
    slot.rejected.append(name)
    del slot.rejected[:-MAX_REJECTED]  # oldest go first


def record_attempt(state: UpdateState, attempt: UpdateAttempt) -> UpdateState:
    """The state after ``attempt`` reached its current phase (input is not modified)."""
    new = state.model_copy(deep=True)
    slot = new.pipelines.setdefault(attempt.pipeline, PipelineSlot())
    slot.attempt = replace(attempt)
    target = attempt.target
    if attempt.phase is P.ACTIVE:
        slot.active = target
    elif attempt.phase is P.COMMITTED:
        if slot.committed != target:
            slot.previous = slot.committed
        slot.committed = slot.active = target
        if str(target) in slot.rejected:
            slot.rejected.remove(str(target))
    elif attempt.phase in (P.REJECTED, P.ROLLED_BACK):
        if not attempt.retryable:
            _add_rejected(slot, target)
        slot.active = slot.committed
    return new


@dataclass(frozen=True)
class RecoveryAction:
    """One thing to do after a restart, for one pipeline.

    ``kind``: ``"rejected"`` (report the failed attempt), ``"run"`` (start ``model``, the last
    committed version, or nothing when ``None``), ``"resume"`` (continue the attempt).
    """

    pipeline: str
    kind: Literal["rejected", "run", "resume"]
    model: ModelRef | None
    reason: str = ""


@dataclass(frozen=True)
class Recovery:
    """The state to persist before doing anything, and what to do."""

    state: UpdateState
    actions: list[RecoveryAction]


DEFAULT_MAX_TRIES = 3


def recover_after_crash(
    state: UpdateState, *, now: datetime, max_tries: int = DEFAULT_MAX_TRIES
) -> Recovery:
    """Decide what to run after the agent (re)started with this persisted state.

    Every pipeline runs its last committed model. An attempt still waiting, fetching or
    verified resumes (its downloads were verified). One that was building, on trial or active
    when the agent died is counted the way a bootloader counts boots: a power cut or a
    watchdog reboot is not the model's fault, so it starts again (its ``tries`` one higher);
    only when ``max_tries`` starts were all cut short (a model that crashes the build or the
    trial every time) is it rejected (rolled back if it was active, the only exit the machine
    allows from there) and not retried.
    """
    new = state.model_copy(deep=True)
    actions: list[RecoveryAction] = []
    for name, slot in new.pipelines.items():
        attempt = slot.attempt
        resume = False
        if attempt is not None and not attempt.terminal:
            if attempt.phase in RESUMABLE:
                resume = True
            elif attempt.tries < max_tries:
                was = attempt.phase
                attempt = UpdateAttempt.start(
                    name, attempt.target, revision=attempt.revision, now=now,
                    tries=attempt.tries + 1,
                )  # fmt: skip
                attempt.reason = (
                    f"interrupted by agent restart during {was.value}; starting try "
                    f"{attempt.tries} of {max_tries}"
                )
                slot.attempt = attempt
                resume = True
            else:
                was = attempt.phase
                reason = (
                    f"interrupted by agent restart during {was.value}, {attempt.tries} of "
                    f"{max_tries} tries cut short: the model seems to bring the agent down"
                )
                attempt.advance(
                    P.ROLLED_BACK if was is P.ACTIVE else P.REJECTED, now=now, reason=reason
                )
                _add_rejected(slot, attempt.target)
                actions.append(RecoveryAction(name, "rejected", attempt.target, reason))
        slot.active = slot.committed
        what = "last committed version" if slot.committed else "no committed model yet"
        actions.append(RecoveryAction(name, "run", slot.committed, what))
        if resume and attempt is not None:
            why = attempt.reason or f"resume {attempt.phase.value}"
            actions.append(RecoveryAction(name, "resume", attempt.target, why))
    return Recovery(new, actions)


class HealthVerdict(NamedTuple):
    """``("pending" | "commit" | "rollback", reason in words)``."""

    outcome: Literal["pending", "commit", "rollback"]
    reason: str


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


@dataclass
class HealthWindow:
    """Watches a freshly activated model; says commit, roll back, or keep watching.

    Times are seconds on a monotonic clock, passed in. The window opens at the first
    ``observe`` (or ``start``). NaN outputs beyond ``max_nan`` and an error rate above
    ``max_error_rate`` (once ``min_frames`` are seen) roll back at once; latency is judged at
    the end of the window against the previous version's p95.
    """

    duration_s: float
    min_frames: int
    max_error_rate: float
    max_nan: int = 0
    max_latency_ratio: float = 2.0
    # Below this absolute slowdown a ratio is scheduler noise, not a regression: a 0.01 ms
    # classifier measured 0.3 ms p95 before a swap and 2.3 ms just after (warm-up, OS jitter).
    min_latency_delta_ms: float = 5.0
    started_at: float | None = None
    frames: int = field(default=0, init=False)
    errors: int = field(default=0, init=False)
    nans: int = field(default=0, init=False)
    _latencies: deque[float] = field(default_factory=lambda: deque(maxlen=10_000), init=False)

    def __post_init__(self) -> None:
        """Check the bounds.

        Raises:
            ValueError: a negative duration/count, a rate outside [0, 1] or a ratio below 1.
        """
        if self.duration_s < 0 or self.min_frames < 0 or self.max_nan < 0:
            raise ValueError(
                f"health window needs duration_s, min_frames, max_nan ≥ 0; got"
                f" {self.duration_s}, {self.min_frames}, {self.max_nan}"
            )
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ValueError(f"max_error_rate must be within [0, 1], got {self.max_error_rate}")
        if not self.max_latency_ratio >= 1.0:
            raise ValueError(f"max_latency_ratio must be ≥ 1, got {self.max_latency_ratio}")

    def start(self, now: float) -> None:
        """Open the window at ``now`` (if not yet open)."""
        if self.started_at is None:
            self.started_at = now

    def observe(self, frame_ok: bool, nan: bool, latency_ms: float, *, now: float) -> None:
        """Count one frame the new model handled (``frame_ok`` False: it raised)."""
        self.start(now)
        self.frames += 1
        if not frame_ok:
            self.errors += 1
        if nan:
            self.nans += 1
        if frame_ok and math.isfinite(latency_ms) and latency_ms >= 0:
            self._latencies.append(latency_ms)

    def verdict(self, now: float, baseline_p95_ms: float | None) -> HealthVerdict:
        """Judge the window so far.

        Args:
            now: current monotonic time, seconds.
            baseline_p95_ms: p95 latency of the previous version; ``None`` skips the check.
        """
        if self.started_at is None:
            return HealthVerdict("pending", "no frames yet")
        elapsed = max(0.0, now - self.started_at)
        if self.nans > self.max_nan:
            return HealthVerdict(
                "rollback", f"{self.nans} frames with NaN outputs > {self.max_nan} allowed"
            )
        rate = self.errors / self.frames if self.frames else 0.0
        if self.frames >= max(self.min_frames, 1) and rate > self.max_error_rate:
            return HealthVerdict(
                "rollback",
                f"error rate {rate * 100:.1f} % over {self.frames} frames >"
                f" {self.max_error_rate * 100:.1f} % allowed",
            )
        if elapsed < self.duration_s:
            return HealthVerdict(
                "pending",
                f"watching: {elapsed:.1f} of {self.duration_s:.1f} s, {self.frames} frames",
            )
        if self.frames < self.min_frames:
            return HealthVerdict(
                "pending",
                f"{self.frames} of {self.min_frames} frames seen after {elapsed:.1f} s;"
                " waiting for more",
            )
        latency = "latency not compared (no baseline)"
        if baseline_p95_ms is not None and baseline_p95_ms > 0 and self._latencies:
            p95 = _p95(list(self._latencies))
            limit = max(
                self.max_latency_ratio * baseline_p95_ms,
                baseline_p95_ms + self.min_latency_delta_ms,
            )
            if p95 > limit:
                return HealthVerdict(
                    "rollback",
                    f"p95 latency {p95:.1f} ms > {limit:.1f} ms allowed"
                    f" ({self.max_latency_ratio:.1f} × the previous version's"
                    f" {baseline_p95_ms:.1f} ms, and at least +{self.min_latency_delta_ms:g} ms)",
                )
            latency = f"p95 {p95:.1f} ms ≤ {limit:.1f} ms"
        return HealthVerdict(
            "commit",
            f"healthy: {self.frames} frames in {elapsed:.1f} s, error rate {rate * 100:.1f} %"
            f" ≤ {self.max_error_rate * 100:.1f} %, {self.nans} NaN, {latency}",
        )
