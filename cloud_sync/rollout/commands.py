"""Pure: the operator's commands on a rollout — start, pause, resume, promote, abort.

Each takes the stored state and ``now`` and returns a ``Decision`` (actions and the new state),
like ``plan.decide``; none of them reads a clock or touches the fleet.
"""

from __future__ import annotations

from datetime import datetime

from cloud_sync.rollout.plan import check_now, revert_touched
from cloud_sync.rollout.state import (
    ACTIVE,
    Decision,
    EventKind,
    Log,
    Revert,
    RolloutEvent,
    RolloutSpec,
    RolloutState,
    Status,
)


def start(spec: RolloutSpec, now: datetime) -> RolloutState:
    """A new, running rollout; the first ``decide`` selects and deploys stage 1."""
    check_now(now)
    stages = ", ".join(str(s) for s in spec.stages)
    gates = ", ".join(g.name for g in spec.gates) or "none"
    scope = spec.pipeline or "every pipeline"
    if spec.config is not None:
        n = len(spec.config.sealed)
        sealed = f", secrets {list(spec.config.secrets)} sealed for {n} devices"
        scope = f"[[pipelines]] of {spec.config.source or 'a file'}" + (
            sealed if spec.config.secrets else ""
        )
    msg = (
        f"rollout {spec.id}: {spec.what} to {spec.target!r} ({scope}); stages {stages}; "
        f"soak {spec.soak_s:g}s; gates {gates}; on failure {spec.on_fail}"
    )
    return RolloutState(history=(RolloutEvent(at=now, stage=0, kind="started", message=msg),))


def _command(
    state: RolloutState, now: datetime, kind: EventKind, msg: str, **changes: object
) -> Decision:
    check_now(now)
    event = RolloutEvent(at=now, stage=state.stage, kind=kind, message=msg)
    new = state.model_copy(update={**changes, "history": (*state.history, event)})
    return Decision((Log(msg),), new)


def _require(state: RolloutState, allowed: frozenset[Status], what: str) -> None:
    if state.status not in allowed:
        raise ValueError(f"cannot {what} a rollout that is {state.status}")


def pause(state: RolloutState, now: datetime, why: str = "operator") -> Decision:
    """Stop sending updates; outcomes are still tracked.

    Raises:
        ValueError: the rollout is not running.
    """
    _require(state, frozenset({"running"}), "pause")
    return _command(state, now, "paused", f"paused: {why}", status="paused", paused_by_gate=False)


def resume(state: RolloutState, now: datetime, why: str = "operator") -> Decision:
    """Go on. After a gate paused the rollout, this accepts the stage's failing gates.

    Raises:
        ValueError: the rollout is not paused.
    """
    _require(state, frozenset({"paused"}), "resume")
    changes: dict[str, object] = {"status": "running", "paused_by_gate": False}
    msg = f"resumed: {why}"
    if state.paused_by_gate:
        changes["waived_stage"] = state.stage
        msg += f"; failing gates of stage {state.stage + 1} accepted"
    return _command(state, now, "resumed", msg, **changes)


def promote(state: RolloutState, now: datetime, why: str = "operator") -> Decision:
    """Skip the rest of the current soak: gates are evaluated as soon as the stage has settled.

    Raises:
        ValueError: the rollout is not running (resume a paused one first).
    """
    _require(state, frozenset({"running"}), "promote")
    return _command(
        state,
        now,
        "promoted",
        f"promoted: {why}; soak of stage {state.stage + 1} skipped",
        promote_requested=True,
    )


def abort(spec: RolloutSpec, state: RolloutState, now: datetime, why: str = "operator") -> Decision:
    """Stop for good and send every touched device back to its previous version.

    Devices that already ran the new version when selected, and devices never sent a Deploy,
    are left alone. A configuration rollout sends nothing: each device keeps the configuration
    it was sent (or, where that failed, the previous one it restored by itself).

    Raises:
        ValueError: the rollout has already ended.
    """
    _require(state, ACTIVE, "abort")
    check_now(now)
    devices, actions, lines = revert_touched(state.devices)
    events = [RolloutEvent(at=now, stage=state.stage, kind="reverted", message=m) for m in lines]
    msg = f"rollout {spec.id} aborted: {why}; {sum(isinstance(a, Revert) for a in actions)} reverts"
    if spec.config is not None:
        msg += (
            f"; devices sent {spec.what} keep it (configuration rollouts do not revert: roll "
            "out the previous file to undo)"
        )
    events.append(RolloutEvent(at=now, stage=state.stage, kind="aborted", message=msg))
    new = state.model_copy(
        update={"status": "aborted", "devices": devices, "history": (*state.history, *events)}
    )
    logs = [Log(e.message) for e in events]
    return Decision((*actions, *logs), new)


__all__ = [
    "abort",
    "pause",
    "promote",
    "resume",
    "start",
]
