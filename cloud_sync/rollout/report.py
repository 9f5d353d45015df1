"""Pure: what an operator reads about a rollout — a summary dict and a one-line progress."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from cloud_sync.rollout.configdoc import CONFIG_KEY, short_hash
from cloud_sync.rollout.fleet import FleetSnapshot
from cloud_sync.rollout.state import RolloutSpec, RolloutState


def soak_remaining(spec: RolloutSpec, state: RolloutState, now: datetime) -> float | None:
    """Seconds of soak left in the current stage, None when no soak is running."""
    if state.status != "running" or state.soak_started_at is None:
        return None
    return max(0.0, spec.soak_s - (now - state.soak_started_at).total_seconds())


def summary(spec: RolloutSpec, state: RolloutState, now: datetime) -> dict[str, Any]:
    """A JSON-ready summary: ids, stage, counts by outcome, soak left, gates, last events."""
    counts = state.counts()
    selected = len(state.devices)
    return {
        "id": spec.id,
        "model": spec.model,
        "version": spec.version,
        "config": short_hash(spec.config.hash) if spec.config else None,
        "pipeline": spec.pipeline,
        "target": spec.target,
        "status": state.status,
        "paused_by_gate": state.paused_by_gate,
        "stage": state.stage + 1,
        "stages": [str(s) for s in spec.stages],
        "selected": selected,
        "committed": counts["committed"],
        "failed": counts["failed"],
        "updating": counts["updating"],
        "pending": counts["pending"],
        "reverted": counts["reverted"],
        "soak_remaining_s": soak_remaining(spec, state, now),
        "gates": [
            {"name": g.name, "ok": g.ok, "value": g.value, "detail": g.detail}
            for g in state.last_gates
        ],
        "history": [
            {"at": e.at.isoformat(), "kind": e.kind, "message": e.message}
            for e in state.history[-20:]
        ],
    }


def progress_line(spec: RolloutSpec, state: RolloutState, now: datetime) -> str:
    """``rollout r1 det@2.0.0 running: stage 1/2 (10%) done 2/20 …`` in one line."""
    counts = state.counts()
    done = counts["committed"] + counts["failed"]
    stage = spec.stages[min(state.stage, len(spec.stages) - 1)]
    line = (
        f"rollout {spec.id} {spec.what} {state.status}: stage {state.stage + 1}/"
        f"{len(spec.stages)} ({stage}); devices {done}/{len(state.devices)} done "
        f"({counts['committed']} committed, {counts['failed']} failed), "
        f"{counts['updating']} updating, {counts['pending']} pending"
    )
    if counts["reverted"]:
        line += f", {counts['reverted']} reverted"
    left = soak_remaining(spec, state, now)
    if left is not None:
        line += f"; soak {left:.0f}s left"
    if state.last_gates:
        line += "; gates: " + "; ".join(
            f"{'ok' if g.ok else 'FAILED'} {g.detail}" for g in state.last_gates
        )
    return line


def config_devices(spec: RolloutSpec, state: RolloutState, fleet: FleetSnapshot) -> list[str]:
    """One line per selected device of a configuration rollout: its outcome, the hash sent
    to it, the hash it runs and its last attempt (12 hex digits each; never the document)."""
    if spec.config is None:
        return []
    lines = []
    for device_id in sorted(state.devices):
        rec = state.devices[device_id]
        view = fleet.get(device_id)
        c = view.config if view is not None else None
        running = "-" if c is None else short_hash(c.hash) if c.hash else "local file"
        line = (
            f"{device_id:<16} {rec.outcome:<9} sent {short_hash(spec.config.hash_for(device_id))}"
            f"  running {running}"
        )
        if c is not None and c.status:
            line += f"  last {short_hash(c.target_hash)} {c.status}"
        error = rec.pipelines[CONFIG_KEY].error if CONFIG_KEY in rec.pipelines else None
        if error:
            line += f"  ({error})"
        lines.append(line)
    return lines


__all__ = ["config_devices", "progress_line", "soak_remaining", "summary"]
