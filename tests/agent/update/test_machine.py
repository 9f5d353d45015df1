"""Update state machine: transition tables, outcomes, crash recovery, health window."""

from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone

import pytest

from agent.protocol.state import UpdatePhase
from agent.update.machine import (
    ALLOWED,
    IllegalTransition,
    ModelRef,
    PipelineSlot,
    UpdateAttempt,
    UpdateState,
    record_attempt,
    recover_after_crash,
    should_attempt,
)
from agent.update.machine import HealthWindow as HW

P = UpdatePhase
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
OLD = ModelRef(model="det", version="1.3.2")
NEW = ModelRef(model="det", version="1.4.0")
PREV = ModelRef(model="det", version="1.2.0")

HAPPY = [P.FETCHING, P.VERIFIED, P.BUILDING, P.TRIAL, P.ACTIVE, P.COMMITTED]
ALLOWED_PAIRS = [
    (P.WAITING, P.FETCHING),
    (P.WAITING, P.TRIAL),  # a built model's maintenance window opened
    (P.WAITING, P.REJECTED),  # cancelled or superseded while waiting
    (P.FETCHING, P.VERIFIED),
    (P.FETCHING, P.REJECTED),
    (P.FETCHING, P.WAITING),
    (P.VERIFIED, P.BUILDING),
    (P.VERIFIED, P.REJECTED),
    (P.VERIFIED, P.WAITING),
    (P.BUILDING, P.TRIAL),
    (P.BUILDING, P.REJECTED),
    (P.BUILDING, P.WAITING),
    (P.TRIAL, P.ACTIVE),
    (P.TRIAL, P.REJECTED),
    (P.TRIAL, P.WAITING),  # built and checked, waits for its maintenance window
    (P.ACTIVE, P.COMMITTED),
    (P.ACTIVE, P.ROLLED_BACK),
]
FORBIDDEN_PAIRS = [
    (a, b) for a, b in itertools.product(P, P) if (a, b) not in ALLOWED_PAIRS
]  # every other move, including staying put and leaving a final phase


def attempt_in(phase: UpdatePhase, target: ModelRef = NEW) -> UpdateAttempt:
    return UpdateAttempt("front", target, revision=8, started_at=T0, updated_at=T0, phase=phase)


def test_table_matches_the_documented_machine() -> None:
    assert sorted((a, b) for a, tos in ALLOWED.items() for b in tos) == sorted(ALLOWED_PAIRS)
    assert len(FORBIDDEN_PAIRS) == 81 - 17


@pytest.mark.parametrize(("frm", "to"), ALLOWED_PAIRS)
def test_allowed_transition(frm: UpdatePhase, to: UpdatePhase) -> None:
    a = attempt_in(frm)
    later = T0 + timedelta(seconds=5)
    a.advance(to, now=later, reason="because")
    assert (a.phase, a.updated_at, a.reason, a.started_at) == (to, later, "because", T0)


@pytest.mark.parametrize(("frm", "to"), FORBIDDEN_PAIRS)
def test_forbidden_transition(frm: UpdatePhase, to: UpdatePhase) -> None:
    a = attempt_in(frm)
    with pytest.raises(IllegalTransition) as ei:
        a.advance(to, now=T0 + timedelta(seconds=1))
    assert (ei.value.frm, ei.value.to) == (frm, to)
    assert a.phase is frm and a.updated_at == T0
    assert f"cannot go from {frm.value} to {to.value}" in str(ei.value)


def test_happy_path_and_outcome_in_state() -> None:
    state = UpdateState(pipelines={"front": PipelineSlot(committed=OLD, previous=PREV, active=OLD)})
    a = UpdateAttempt.start("front", NEW, revision=8, now=T0)
    assert a.phase is P.WAITING and not a.terminal
    for i, phase in enumerate(HAPPY):
        a.advance(phase, now=T0 + timedelta(seconds=i))
        new = record_attempt(state, a)
        slot = new.pipelines["front"]
        assert slot.attempt is not None and slot.attempt.phase is phase
        if phase is P.ACTIVE:
            assert (slot.active, slot.committed) == (NEW, OLD)
        state = new
    slot = state.pipelines["front"]
    assert (slot.committed, slot.previous, slot.active) == (NEW, OLD, NEW)
    assert a.terminal


@pytest.mark.parametrize("outcome", [P.REJECTED, P.ROLLED_BACK])
def test_failed_attempt_keeps_committed_and_is_remembered(outcome: UpdatePhase) -> None:
    state = UpdateState(pipelines={"front": PipelineSlot(committed=OLD, active=NEW)})
    a = attempt_in(P.ACTIVE if outcome is P.ROLLED_BACK else P.TRIAL)
    a.advance(outcome, now=T0, reason="golden outputs differ")
    new = record_attempt(state, a)
    slot = new.pipelines["front"]
    assert (slot.committed, slot.active, slot.rejected) == (OLD, OLD, ["det@1.4.0"])
    assert state.pipelines["front"].rejected == []  # input untouched
    assert not should_attempt(new, "front", NEW)


def test_record_attempt_copies_the_attempt() -> None:
    a = attempt_in(P.FETCHING)
    new = record_attempt(UpdateState(), a)
    a.advance(P.VERIFIED, now=T0)
    stored = new.pipelines["front"].attempt
    assert stored is not None and stored.phase is P.FETCHING


@pytest.mark.parametrize(
    ("slot", "target", "ok", "fragment"),
    [
        (PipelineSlot(), NEW, True, "is new"),
        (PipelineSlot(committed=NEW, active=NEW), NEW, False, "already committed"),
        (PipelineSlot(committed=OLD, rejected=["det@1.4.0"]), NEW, False, "rejected"),
        (PipelineSlot(committed=OLD, rejected=["det@1.4.0"]), PREV, True, "is new"),
        (PipelineSlot(attempt=attempt_in(P.BUILDING)), NEW, False, "phase building"),
        (PipelineSlot(attempt=attempt_in(P.BUILDING, OLD)), NEW, True, "supersedes det@1.3.2"),
        (PipelineSlot(committed=OLD, attempt=attempt_in(P.COMMITTED, OLD)), NEW, True, "new"),
    ],
)
def test_should_attempt(slot: PipelineSlot, target: ModelRef, ok: bool, fragment: str) -> None:
    d = should_attempt(UpdateState(pipelines={"front": slot}), "front", target)
    assert bool(d) is ok and d.ok is ok
    assert fragment in d.reason


@pytest.mark.parametrize(
    ("phase", "after", "rejected", "kinds"),
    [
        (None, None, [], ["run"]),
        (P.WAITING, P.WAITING, [], ["run", "resume"]),
        (P.FETCHING, P.FETCHING, [], ["run", "resume"]),
        (P.VERIFIED, P.VERIFIED, [], ["run", "resume"]),
        (P.BUILDING, P.REJECTED, ["det@1.4.0"], ["rejected", "run"]),
        (P.TRIAL, P.REJECTED, ["det@1.4.0"], ["rejected", "run"]),
        (P.ACTIVE, P.ROLLED_BACK, ["det@1.4.0"], ["rejected", "run"]),
        (P.COMMITTED, P.COMMITTED, [], ["run"]),
        (P.REJECTED, P.REJECTED, [], ["run"]),
        (P.ROLLED_BACK, P.ROLLED_BACK, [], ["run"]),
    ],
)
def test_recover_after_crash(
    phase: UpdatePhase | None,
    after: UpdatePhase | None,
    rejected: list[str],
    kinds: list[str],
) -> None:
    attempt = attempt_in(phase) if phase else None
    active = NEW if phase is P.ACTIVE else OLD
    state = UpdateState(
        accepted_revision=8,
        pipelines={"front": PipelineSlot(committed=OLD, active=active, attempt=attempt)},
    )
    later = T0 + timedelta(minutes=3)
    rec = recover_after_crash(state, now=later, max_tries=1)  # its last try: rejected
    slot = rec.state.pipelines["front"]
    assert [a.kind for a in rec.actions] == kinds
    run = next(a for a in rec.actions if a.kind == "run")
    assert run.model == OLD and slot.active == OLD and slot.committed == OLD
    assert slot.rejected == rejected
    assert (slot.attempt.phase if slot.attempt else None) is after
    if rejected:
        assert phase is not None
        why = f"interrupted by agent restart during {phase.value}, 1 of 1 tries cut short"
        assert slot.attempt is not None and slot.attempt.reason.startswith(why)
        assert slot.attempt.updated_at == later
        assert rec.actions[0].reason.startswith(why) and rec.actions[0].model == NEW
        assert not should_attempt(rec.state, "front", NEW)
    # pure: the input is untouched
    assert state.pipelines["front"].active == active
    assert (state.pipelines["front"].attempt.phase if attempt else None) is phase


@pytest.mark.parametrize("phase", [P.BUILDING, P.TRIAL, P.ACTIVE])
def test_an_interrupted_update_starts_again_until_its_tries_are_used_up(
    phase: UpdatePhase,
) -> None:
    """Counted like boots: a power cut during a build is not the model's fault."""
    state = UpdateState(
        pipelines={"front": PipelineSlot(committed=OLD, active=OLD, attempt=attempt_in(phase))}
    )
    for n in (2, 3):
        rec = recover_after_crash(state, now=T0, max_tries=3)
        slot = rec.state.pipelines["front"]
        assert slot.attempt is not None
        assert (slot.attempt.phase, slot.attempt.tries) == (P.WAITING, n)
        assert f"starting try {n} of 3" in slot.attempt.reason
        assert [a.kind for a in rec.actions] == ["run", "resume"] and not slot.rejected
        assert slot.active == OLD  # the committed model runs meanwhile
        # the new try gets as far as the same phase and is cut short again
        a = slot.attempt
        for to in (P.FETCHING, P.VERIFIED, P.BUILDING, P.TRIAL, P.ACTIVE):
            a.advance(to, now=T0)
            if to is phase:
                break
        state = record_attempt(rec.state, a)
    rec = recover_after_crash(state, now=T0, max_tries=3)
    slot = rec.state.pipelines["front"]
    assert slot.rejected == ["det@1.4.0"] and rec.actions[0].kind == "rejected"
    assert "3 of 3 tries cut short" in rec.actions[0].reason
    UpdateState.model_validate_json(rec.state.model_dump_json())  # tries persists


def test_state_files_without_tries_still_load() -> None:
    a = attempt_in(P.BUILDING)
    raw = UpdateState(pipelines={"front": PipelineSlot(attempt=a)}).model_dump(mode="json")
    del raw["pipelines"]["front"]["attempt"]["tries"]
    loaded = UpdateState.model_validate(raw)
    assert loaded.pipelines["front"].attempt is not None
    assert loaded.pipelines["front"].attempt.tries == 1


def test_recover_without_committed_model_runs_nothing() -> None:
    state = UpdateState(pipelines={"a": PipelineSlot(attempt=attempt_in(P.TRIAL))})
    rec = recover_after_crash(state, now=T0, max_tries=1)
    assert [(x.kind, x.model) for x in rec.actions] == [("rejected", NEW), ("run", None)]


def test_rejected_list_is_bounded() -> None:
    state = UpdateState()
    for i in range(70):
        a = attempt_in(P.TRIAL, ModelRef(model="det", version=f"1.0.{i}"))
        a.advance(P.REJECTED, now=T0)
        state = record_attempt(state, a)
    rejected = state.pipelines["front"].rejected
    assert len(rejected) == 64 and rejected[-1] == "det@1.0.69" and "det@1.0.5" not in rejected
    UpdateState.model_validate_json(state.model_dump_json())  # still within the schema


# --- health window ---------------------------------------------------------------------------


def feed(w: HW, n: int, *, errors: int = 0, nans: int = 0, latency: float = 10.0,
         t0: float = 100.0, dt: float = 0.1) -> float:  # fmt: skip
    """n frames, the first `errors` failing and the first `nans` with NaN; returns last time."""
    t = t0
    for i in range(n):
        t = t0 + i * dt
        w.observe(i >= errors, i < nans, latency, now=t)
    return t


def window(**kw: float) -> HW:
    args = {"duration_s": 30.0, "min_frames": 50, "max_error_rate": 0.05, "max_nan": 0,
            "max_latency_ratio": 2.0} | kw  # fmt: skip
    return HW(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("frames", "errors", "nans", "latency", "at", "baseline", "outcome", "reason"),
    [
        (0, 0, 0, 10.0, 200.0, 10.0, "pending", "no frames yet"),
        (10, 0, 0, 10.0, 101.0, 10.0, "pending", "watching: 1.0 of 30.0 s, 10 frames"),
        (10, 0, 0, 10.0, 140.0, 10.0, "pending", "10 of 50 frames seen after 40.0 s"),
        (50, 6, 0, 10.0, 105.0, 10.0, "rollback",
         "error rate 12.0 % over 50 frames > 5.0 % allowed"),
        (10, 6, 0, 10.0, 105.0, 10.0, "pending", "watching"),  # too few frames to judge yet
        (50, 2, 0, 10.0, 130.0, 10.0, "commit", "error rate 4.0 % ≤ 5.0 %"),
        (50, 3, 0, 10.0, 130.0, 10.0, "rollback", "error rate 6.0 %"),
        (5, 0, 1, 10.0, 100.5, 10.0, "rollback", "1 frames with NaN outputs > 0 allowed"),
        (60, 0, 0, 25.0, 130.0, 10.0, "rollback",
         "p95 latency 25.0 ms > 20.0 ms allowed (2.0 × the previous version's 10.0 ms"),
        # sub-millisecond models: a big ratio but a tiny absolute change is noise, not a
        # regression (floor: +5 ms over the baseline)
        (60, 0, 0, 2.3, 130.0, 0.3, "commit", "p95 2.3 ms ≤ 5.3 ms"),
        (60, 0, 0, 5.4, 130.0, 0.3, "rollback", "p95 latency 5.4 ms > 5.3 ms allowed"),
        (60, 0, 0, 19.0, 130.0, 10.0, "commit", "p95 19.0 ms ≤ 20.0 ms"),
        (60, 0, 0, 25.0, 130.0, None, "commit", "no baseline"),
        (60, 0, 0, 10.0, 129.9, 10.0, "pending", "watching: 29.9 of 30.0 s"),
    ],
)  # fmt: skip
def test_health_window(frames: int, errors: int, nans: int, latency: float, at: float,
                       baseline: float | None, outcome: str, reason: str) -> None:  # fmt: skip
    w = window()
    feed(w, frames, errors=errors, nans=nans, latency=latency)
    verdict, why = w.verdict(at, baseline)
    assert (verdict, reason in why) == (outcome, True), why


def test_health_window_latency_uses_p95_not_max() -> None:
    w = window(min_frames=100)
    feed(w, 96, latency=10.0)
    feed(w, 4, latency=500.0, t0=200.0)  # 4 % outliers stay above the 95th percentile
    assert w.verdict(231.0, 10.0).outcome == "commit"
    feed(w, 2, latency=500.0, t0=232.0)  # now 6 of 102
    assert w.verdict(233.0, 10.0).outcome == "rollback"


def test_health_window_failed_frames_do_not_count_for_latency() -> None:
    w = window(min_frames=20, max_error_rate=0.5)
    for i in range(20):
        w.observe(i % 4 != 0, False, 900.0 if i % 4 == 0 else 10.0, now=100.0 + i)
    verdict = w.verdict(131.0, 10.0)
    assert verdict.outcome == "commit" and "error rate 25.0 %" in verdict.reason


def test_health_window_zero_min_frames_commits_after_duration() -> None:
    w = window(min_frames=0, duration_s=10.0)
    w.start(100.0)
    assert w.verdict(105.0, None).outcome == "pending"
    assert w.verdict(110.0, None).outcome == "commit"


@pytest.mark.parametrize(
    "kw",
    [{"duration_s": -1.0}, {"min_frames": -1}, {"max_error_rate": 1.5}, {"max_nan": -1},
     {"max_latency_ratio": 0.5}, {"max_latency_ratio": float("nan")}],
)  # fmt: skip
def test_health_window_bounds(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        window(**kw)
