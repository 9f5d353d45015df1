"""Pure: the staged-rollout decision — ``decide(spec, state, fleet, now)`` → actions + new state.

One call looks at the fleet and moves the rollout on as far as it can go *now*:

1. **Select** the current stage's devices (once, when the stage starts): the targeted devices
   that have the pipeline(s) and are not ``busy`` in another rollout, ordered by
   ``sha256("ROLLOUT_ID:DEVICE_ID")``; stage k covers the first ``size_k`` of them (see
   ``stages``). Selected devices stay selected and their previous ``model@version`` (and its
   figures, when the snapshot has them) is recorded for rollback. Devices that join the fleet
   later are picked by later stages only; a stage that adds nobody is skipped.
2. **Track** each sent update from the reported phase: ``committed`` on the new version counts
   as success, ``rejected``/``rolled_back`` of the new version as failure (the agent keeps a
   rejected version on a list and does not retry it, so such a report is final).
3. **Deploy** to selected devices not yet sent, in picking order. At most ``max_concurrent``
   *online* devices are updating at once; **offline devices get their Deploy at once and hold
   no slot** (the retained desired state lets them catch up when they reconnect).
4. **Settle**: the stage has settled when every *online* selected device has finished
   (committed or failed) and at least one device of this stage has finished; offline
   unfinished devices do not hold it up and are listed as pending. The soak starts then.
5. **Gates** are evaluated when the soak has lasted ``soak_s`` (or at once after ``promote``):
   all pass → next stage, or ``completed`` after the last; one fails → ``paused`` (default),
   or with ``on_fail="rollback"`` every touched device gets a ``Revert`` to its recorded
   previous version and the rollout is ``failed``. ``failures`` gates are also checked on
   every call: their denominator is fixed, so once exceeded they stay exceeded. *Canaries*
   are all selected pipelines whose figures are on the new version (earlier stages too);
   the *baseline* is the targeted, unselected pipelines whose figures are on a version the
   selected ones ran before (see ``gates`` for the fallbacks when there is none).

A paused rollout still tracks outcomes but sends nothing. Resuming a rollout that a gate
paused accepts that stage's failing gates (the operator's call) and moves on.

A configuration rollout (``spec.config``) follows the same steps with one entry per device;
``plan_config`` holds what differs (scope, tracking, evidence, no revert).
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from datetime import datetime
from typing import Literal

from agent.protocol.state import UpdatePhase
from cloud_sync.rollout import plan_config
from cloud_sync.rollout.configdoc import CONFIG_KEY
from cloud_sync.rollout.fleet import DeviceView, FleetSnapshot, ModelRef, PipelineMetrics
from cloud_sync.rollout.gates import Evidence, GateResult, evaluate_all
from cloud_sync.rollout.stages import rank, select, stage_sizes
from cloud_sync.rollout.state import (
    ACTIVE,
    FINISHED,
    Action,
    Decision,
    Deploy,
    DeviceRecord,
    EventKind,
    Log,
    PipelineRecord,
    Revert,
    RolloutEvent,
    RolloutSpec,
    RolloutState,
    SetConfig,
    Status,
)
from cloud_sync.rollout.target import Target

_FAILED_PHASES = frozenset({UpdatePhase.REJECTED, UpdatePhase.ROLLED_BACK})
_LIST = 5  # device ids named in one history line


def names(ids: Iterable[str]) -> str:
    """``a, b, c, d, e (+3 more)``: a few ids for a history line."""
    ids = list(ids)
    more = f" (+{len(ids) - _LIST} more)" if len(ids) > _LIST else ""
    return ", ".join(ids[:_LIST]) + more


def check_now(now: datetime) -> None:
    """Refuse a naive ``now``: comparing it with stored aware times would raise later.

    Raises:
        ValueError: ``now`` has no timezone.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must carry a timezone (UTC expected), got a naive datetime")


def revert_touched(
    devices: dict[str, DeviceRecord],
) -> tuple[dict[str, DeviceRecord], list[Action], list[str]]:
    """Revert every touched pipeline to its recorded previous version (a configuration
    rollout's entries are left alone: see ``plan_config``).

    Returns:
        The updated records (reverted pipelines marked ``reverted``), the ``Revert`` actions,
        and one history line per device (also naming pipelines without a known previous
        version, which stay on the new one).
    """
    out = dict(devices)
    actions: list[Action] = []
    lines: list[str] = []
    for device_id in sorted(devices):
        rec = devices[device_id]
        pipelines = dict(rec.pipelines)
        done: list[str] = []
        for name, p in rec.pipelines.items():
            if not p.sent or p.outcome == "reverted" or name == CONFIG_KEY:
                continue
            if p.previous is None:
                lines.append(f"{device_id}/{name}: no previous version known, left as it is")
                continue
            actions.append(Revert(device_id, name, p.previous.model, p.previous.version))
            pipelines[name] = p.model_copy(update={"outcome": "reverted"})
            done.append(f"{name} → {p.previous}")
        if done:
            out[device_id] = rec.model_copy(update={"pipelines": pipelines})
            lines.append(f"{device_id}: reverting {', '.join(done)}")
    return out, actions, lines


class _Step:
    """Working copy of one decision: mutable here, frozen again in ``result``."""

    def __init__(
        self,
        spec: RolloutSpec,
        state: RolloutState,
        fleet: FleetSnapshot,
        now: datetime,
        busy: AbstractSet[tuple[str, str]],
    ) -> None:
        self.spec, self.state, self.fleet, self.now, self.busy = spec, state, fleet, now, busy
        self.target: Target = spec.parsed_target()
        self.status: Status = state.status
        self.stage = state.stage
        self.stage_started_at = state.stage_started_at
        self.soak_started_at = state.soak_started_at
        self.promote_requested = state.promote_requested
        self.paused_by_gate = state.paused_by_gate
        self.last_gates = state.last_gates
        self.devices = dict(state.devices)
        self.actions: list[Action] = []
        self.events: list[RolloutEvent] = []

    # --- small helpers -------------------------------------------------------------------

    def stage_name(self) -> str:
        return f"stage {self.stage + 1}/{len(self.spec.stages)} ({self.spec.stages[self.stage]})"

    def event(self, kind: EventKind, message: str) -> None:
        self.events.append(RolloutEvent(at=self.now, stage=self.stage, kind=kind, message=message))
        self.actions.append(Log(f"rollout {self.spec.id}: {message}"))

    def online(self, device_id: str) -> bool:
        view = self.fleet.get(device_id)
        return view is not None and view.online

    def scope(self, view: DeviceView) -> list[str]:
        """The pipelines of ``view`` this rollout would update (busy ones left out)."""
        if self.spec.config is not None:
            return plan_config.scope(self.spec.config, view, self.busy)
        names = [self.spec.pipeline] if self.spec.pipeline else sorted(view.pipelines)
        return [p for p in names if p in view.pipelines and (view.device_id, p) not in self.busy]

    def in_stage(self) -> list[DeviceRecord]:
        return [r for r in self.devices.values() if r.stage == self.stage]

    def result(self) -> Decision:
        new = self.state.model_copy(
            update={
                "status": self.status,
                "stage": self.stage,
                "stage_started_at": self.stage_started_at,
                "soak_started_at": self.soak_started_at,
                "promote_requested": self.promote_requested,
                "paused_by_gate": self.paused_by_gate,
                "last_gates": self.last_gates,
                "devices": self.devices,
                "history": self.state.history + tuple(self.events),
            }
        )
        return Decision(tuple(self.actions), new)

    # --- 1. selection --------------------------------------------------------------------

    def start_stage(self) -> Literal["started", "skipped", "failed"]:
        """Pick the stage's devices (once per stage)."""
        targeted = [v for v in self.fleet if self.target.matches(v)]
        eligible = {v.device_id: v for v in targeted if self.scope(v)}
        n = len(set(eligible) | set(self.devices))
        if n == 0:
            self.status = "failed"
            self.event(
                "failed",
                f"no device to update: target {self.spec.target!r} matches {len(targeted)} of "
                f"{len(self.fleet)} devices, 0 of them with a free pipeline "
                f"{self.spec.pipeline or '(any)'!r}",
            )
            return "failed"
        size = stage_sizes(self.spec.stages, n)[self.stage]
        new = select(self.spec.id, eligible, self.devices, size)
        self.stage_started_at, self.soak_started_at = self.now, None
        self.promote_requested = False
        if not new:
            self.event("stage_skipped", f"{self.stage_name()} adds no device ({size} of {n})")
            return "skipped"
        for device_id in new:
            self.devices[device_id] = self.record(eligible[device_id])
        self.event(
            "stage_started",
            f"{self.stage_name()}: +{len(new)} devices, {size} of {n} selected ({names(new)})",
        )
        return "started"

    def record(self, view: DeviceView) -> DeviceRecord:
        pipelines = {}
        for name in self.scope(view):
            if self.spec.config is not None:
                pipelines[name] = plan_config.record(self.spec.config, view)
                continue
            new, p = self.spec.ref, view.pipelines[name]
            prev = p.active
            if prev == new and p.phase in (None, UpdatePhase.COMMITTED):
                pipelines[name] = PipelineRecord(previous=prev, outcome="committed")
                continue
            before = p.metrics if p.metrics and p.metrics.ref == prev else None
            pipelines[name] = PipelineRecord(previous=prev, before=before)
        return DeviceRecord(
            device_id=view.device_id,
            stage=self.stage,
            rank=rank(self.spec.id, view.device_id),
            pipelines=pipelines,
        )

    # --- 2. tracking ---------------------------------------------------------------------

    def refresh(self) -> None:
        if self.spec.config is not None:
            self.devices, lines = plan_config.refresh(self.spec.config, self.devices, self.fleet)
            for line in lines:
                self.event("device_failed", line)
            return
        new = self.spec.ref
        for device_id, rec in self.devices.items():
            view = self.fleet.get(device_id)
            if view is None:
                continue
            changed = {}
            for name, p in rec.pipelines.items():
                pv = view.pipelines.get(name)
                if p.outcome != "updating" or pv is None:
                    continue
                if pv.active == new and pv.phase is UpdatePhase.COMMITTED:
                    changed[name] = p.model_copy(update={"outcome": "committed"})
                elif pv.phase in _FAILED_PHASES and pv.is_target(new):
                    phase = pv.phase.value if pv.phase else "failed"
                    why = f"{new} {phase}: {pv.last_error or 'no reason given'}"
                    changed[name] = p.model_copy(update={"outcome": "failed", "error": why[:600]})
                    self.event("device_failed", f"{device_id}/{name}: {why}")
            if changed:
                self.devices[device_id] = rec.model_copy(
                    update={"pipelines": {**rec.pipelines, **changed}}
                )

    # --- 3. deploy -----------------------------------------------------------------------

    def deploy_action(self, device_id: str, name: str) -> Action:
        if self.spec.config is not None:
            return SetConfig(device_id, self.spec.config.hash_for(device_id))
        new = self.spec.ref
        return Deploy(device_id, name, new.model, new.version)

    def deploy(self) -> None:
        cap = self.spec.max_concurrent
        in_flight = sum(
            1 for d, r in self.devices.items() if r.outcome == "updating" and self.online(d)
        )
        waiting = sorted(
            (r for r in self.devices.values() if r.outcome == "pending"), key=lambda r: r.rank
        )
        for rec in waiting:
            online = self.online(rec.device_id)
            if online:
                if cap is not None and in_flight >= cap:
                    continue  # offline ones further down still get theirs
                in_flight += 1
            pipelines = dict(rec.pipelines)
            for name, p in rec.pipelines.items():
                if p.outcome == "pending":
                    self.actions.append(self.deploy_action(rec.device_id, name))
                    pipelines[name] = p.model_copy(update={"outcome": "updating", "sent": True})
            self.devices[rec.device_id] = rec.model_copy(
                update={"pipelines": pipelines, "desired_sent_at": self.now}
            )

    # --- 4. settle and soak --------------------------------------------------------------

    def settled(self) -> bool:
        unfinished = [
            d for d, r in self.devices.items() if r.outcome not in FINISHED and self.online(d)
        ]
        return not unfinished and any(r.outcome in FINISHED for r in self.in_stage())

    def start_soak(self) -> None:
        self.soak_started_at = self.now
        mine = self.in_stage()
        ok = sum(r.outcome == "committed" for r in mine)
        bad = sum(r.outcome == "failed" for r in mine)
        pending = sorted(d for d, r in self.devices.items() if r.outcome not in FINISHED)
        msg = (
            f"{self.stage_name()}: every online device finished ({ok} committed, {bad} failed "
            f"of {len(mine)}); soak {self.spec.soak_s:g}s"
        )
        if pending:
            msg += f"; pending offline: {names(pending)}"
        self.event("soak_started", msg)

    def soak_over(self) -> bool:
        if self.soak_started_at is None:
            return False
        elapsed = (self.now - self.soak_started_at).total_seconds()
        return elapsed >= self.spec.soak_s or self.promote_requested

    # --- 5. gates ------------------------------------------------------------------------

    def evidence(self) -> Evidence:
        mine = self.in_stage()
        if self.spec.config is not None:
            return plan_config.evidence(
                self.spec.config, self.spec.what, mine, self.devices, self.fleet, self.target,
                self.busy,
            )  # fmt: skip
        new = self.spec.ref
        failed = [
            f"{r.device_id} ({'; '.join(f'{n}: {p.error}' for n, p in bad)})"
            for r in mine
            if (bad := [(n, p) for n, p in r.pipelines.items() if p.outcome == "failed"])
        ]
        canaries: list[tuple[str, PipelineMetrics]] = []
        before: list[tuple[str, PipelineMetrics]] = []
        previous: set[ModelRef] = set()
        for rec in self.devices.values():
            view = self.fleet.get(rec.device_id)
            for name, p in rec.pipelines.items():
                if p.previous is not None and p.previous != new:
                    previous.add(p.previous)
                if p.before is not None:
                    before.append((rec.device_id, p.before))
                m = view.pipelines[name].metrics if view and name in view.pipelines else None
                if m is not None and m.ref == new:
                    canaries.append((rec.device_id, m))
        baseline = [
            (v.device_id, m)
            for v in self.fleet
            if v.device_id not in self.devices and self.target.matches(v)
            for name in self.scope(v)
            if (m := v.pipelines[name].metrics) is not None and m.ref in previous
        ]
        return Evidence(new, len(mine), failed, canaries, baseline, before)

    def gates(self, only_failures: bool = False) -> list[GateResult]:
        gates = [g for g in self.spec.gates if g.metric == "failures" or not only_failures]
        return evaluate_all(gates, self.evidence()) if gates else []

    def waived(self) -> bool:
        return self.state.waived_stage == self.stage

    def fail(self, results: list[GateResult], early: bool) -> None:
        bad = [r for r in results if not r.ok]
        when = "before the soak ended" if early else "after the soak"
        self.last_gates = tuple(results)
        self.event(
            "gates_failed",
            f"{self.stage_name()} failed {when}: " + "; ".join(r.detail for r in bad),
        )
        if self.spec.on_fail == "pause":
            self.status, self.paused_by_gate = "paused", True
            # a configuration rollout has nothing to revert: each device kept what worked
            undo = "stops it (configuration rollouts do not revert)" if self.spec.config else (
                "reverts")  # fmt: skip
            self.event("paused", f"paused by the failing gate; resume accepts it, abort {undo}")
            return
        self.devices, actions, lines = revert_touched(self.devices)
        self.actions.extend(actions)
        for line in lines:
            self.event("reverted", line)
        self.status = "failed"
        self.event("failed", f"rolled back after {', '.join(r.name for r in bad)} failed")

    def advance(self, results: list[GateResult]) -> None:
        self.last_gates = tuple(results)
        bad = [r for r in results if not r.ok]
        if bad:
            msg = "operator accepted failing gates: " + "; ".join(r.detail for r in bad)
        else:
            msg = "; ".join(r.detail for r in results) or "no gates"
        self.event("gates_passed", f"{self.stage_name()} done: {msg}")
        self.next_stage()

    def next_stage(self) -> None:
        self.stage_started_at = self.soak_started_at = None
        self.promote_requested = False
        if self.stage + 1 < len(self.spec.stages):
            self.stage += 1
            return
        self.status = "completed"
        c = RolloutState(devices=self.devices).counts()
        self.event(
            "completed",
            f"{self.spec.what} committed on {c['committed']} devices, {c['failed']} failed, "
            f"{c['updating'] + c['pending']} pending (offline)",
        )

    # --- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Steps 1-5 until the rollout has to wait; skipped and passed stages go on at once."""
        while self.status == "running":
            if self.stage_started_at is None:
                started = self.start_stage()
                if started == "failed":
                    return
                if started == "skipped":
                    self.next_stage()  # nobody new, nothing to judge
                    continue
            early = [] if self.waived() else self.gates(only_failures=True)
            if any(not r.ok for r in early):
                self.fail(early, early=True)
                return
            self.deploy()
            if self.soak_started_at is None:
                if not self.settled():
                    return
                self.start_soak()
            if not self.soak_over():
                return
            results = self.gates()
            if any(not r.ok for r in results) and not self.waived():
                self.fail(results, early=False)
                return
            self.advance(results)


def needs_metrics(spec: RolloutSpec, state: RolloutState) -> bool:
    """Pure: whether ``decide(spec, state, …)`` can read the snapshot's ``metrics`` at all.

    Metrics are read when a stage starts (each selected pipeline's figures on its previous
    version are recorded) and by the gates at the end of a soak. While a stage installs (its
    soak not started, ``soak_s > 0``, no promote pending), ``decide`` only tracks phases,
    deploys and at most starts the soak; a paused rollout only tracks phases. Then an adapter
    may hand ``decide`` a snapshot without metrics and get the same decision: at 1,000 devices
    the window's telemetry is most of what a controller tick reads.
    """
    if state.status != "running":
        return False
    if state.stage_started_at is None or state.soak_started_at is not None:
        return True
    return spec.soak_s <= 0 or state.promote_requested


def decide(
    spec: RolloutSpec,
    state: RolloutState,
    fleet: FleetSnapshot,
    now: datetime,
    busy: AbstractSet[tuple[str, str]] = frozenset(),
) -> Decision:
    """Move the rollout on as far as the fleet allows at ``now`` (see the module docstring).

    Args:
        spec: what the operator asked for.
        state: the state the last decision returned (``start(spec, now)`` at first).
        fleet: the devices as last reported, metrics over the soak window.
        now: the time of this decision (timezone-aware).
        busy: ``(device_id, pipeline)`` pairs another active rollout holds; never selected.

    Returns:
        The actions to carry out, in order, and the state to store after them.

    Raises:
        ValueError: ``now`` is naive.
    """
    check_now(now)
    if state.status not in ACTIVE:
        return Decision((), state)
    step = _Step(spec, state, fleet, now, busy)
    step.refresh()
    if state.status == "running":
        step.run()
    return step.result()


__all__ = [
    "check_now",
    "decide",
    "names",
    "needs_metrics",
    "revert_touched",
]
