"""Staged rollouts (cloud_sync/rollout): target expressions, stages, gates, and ``decide`` driven
over simulated fleets with explicit times."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol.state import UpdatePhase
from cloud_sync.rollout import (
    Action,
    Decision,
    Deploy,
    DeviceView,
    Evidence,
    FleetSnapshot,
    Log,
    ModelRef,
    PipelineMetrics,
    PipelineView,
    Revert,
    RolloutSpec,
    RolloutState,
    abort,
    decide,
    evaluate,
    needs_metrics,
    normalize_stages,
    parse_gate,
    parse_stage,
    parse_target,
    pause,
    promote,
    resume,
    selection_order,
    start,
)
from cloud_sync.rollout.gates import total_variation
from cloud_sync.rollout.stages import select, stage_sizes

P = UpdatePhase
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=timezone.utc)
OLD = ModelRef(model="det", version="1.0.0")
NEW = ModelRef(model="det", version="2.0.0")
OTHER = ModelRef(model="det", version="0.9.0")


def ids(n: int, prefix: str = "cam") -> list[str]:
    return [f"{prefix}-{i:04d}" for i in range(n)]


def metrics(ref: ModelRef, p95: float = 10.0, fps: float = 30.0, **kw: object) -> PipelineMetrics:
    return PipelineMetrics(ref.model, ref.version, p95_ms=p95, fps=fps, **kw)  # type: ignore[arg-type]


def view(
    device_id: str,
    *,
    online: bool = True,
    groups: Iterable[str] = (),
    tags: dict[str, str] | None = None,
    active: ModelRef = OLD,
    pipelines: Sequence[str] = ("front",),
) -> DeviceView:
    pv = PipelineView(
        active_model=active.model,
        active_version=active.version,
        phase=P.COMMITTED,
        metrics=metrics(active),
    )
    return DeviceView(
        device_id, online, frozenset(groups), tags or {}, dict.fromkeys(pipelines, pv)
    )


def spec(**kw: object) -> RolloutSpec:
    base: dict[str, object] = {
        "id": "r1",
        "model": NEW.model,
        "version": NEW.version,
        "pipeline": "front",
        "target": "*",
        "stages": ["10%", "50%"],
        "soak_s": 600,
        "gates": [],
    }
    base.update(kw)
    return RolloutSpec.model_validate(base)


def deploys(actions: Iterable[Action]) -> list[str]:
    return [a.device_id for a in actions if isinstance(a, Deploy)]


def reverts(actions: Iterable[Action]) -> list[tuple[str, str, str]]:
    return [
        (a.device_id, a.pipeline, f"{a.model}@{a.version}")
        for a in actions
        if isinstance(a, Revert)
    ]


# --- a small fleet simulator -------------------------------------------------------------------


@dataclass
class SimDevice:
    """A device as the agent would behave: applies its retained desired state when online."""

    device_id: str
    online: bool = True
    tags: dict[str, str] = field(default_factory=dict)
    groups: frozenset[str] = frozenset()
    active: dict[str, ModelRef] = field(default_factory=lambda: {"front": OLD})
    phase: dict[str, UpdatePhase] = field(default_factory=lambda: {"front": P.COMMITTED})
    target: dict[str, ModelRef | None] = field(default_factory=lambda: {"front": None})
    desired: dict[str, ModelRef] = field(default_factory=dict)
    behaviour: str = "good"  # good | reject | rollback | stuck
    error: str | None = None


class Sim:
    """Devices plus the figures each reports for a version (``figures(device, ref)``)."""

    def __init__(
        self,
        devices: Iterable[SimDevice],
        figures: Callable[[str, ModelRef], PipelineMetrics | None] | None = None,
    ) -> None:
        self.devices = {d.device_id: d for d in devices}
        self.figures = figures or (lambda _d, ref: metrics(ref))
        self.sent: list[Action] = []

    def apply(self, actions: Iterable[Action]) -> None:
        for a in actions:
            if isinstance(a, (Deploy, Revert)):
                self.sent.append(a)
                self.devices[a.device_id].desired[a.pipeline] = ModelRef(
                    model=a.model, version=a.version
                )

    def tick(self) -> None:
        """One step of every online device toward its desired state (fetch, then finish)."""
        for d in self.devices.values():
            if not d.online:
                continue
            for name, want in d.desired.items():
                gave_up = d.target[name] == want and d.phase[name] in (P.REJECTED, P.ROLLED_BACK)
                if want == d.active[name] or gave_up:
                    continue  # the agent never retries a version it rejected
                if d.phase[name] is not P.FETCHING or d.target[name] != want:
                    d.phase[name], d.target[name] = P.FETCHING, want
                elif d.behaviour == "good" or want != NEW:
                    d.active[name], d.phase[name] = want, P.COMMITTED
                elif d.behaviour in ("reject", "rollback"):
                    d.phase[name] = P.REJECTED if d.behaviour == "reject" else P.ROLLED_BACK
                    d.error = "golden outputs differ by 0.31 (tolerance 0.05)"

    def snapshot(self) -> FleetSnapshot:
        out = []
        for d in self.devices.values():
            pipes = {}
            for name, ref in d.active.items():
                t = d.target[name]
                pipes[name] = PipelineView(
                    active_model=ref.model,
                    active_version=ref.version,
                    phase=d.phase[name],
                    target_model=t.model if t else None,
                    target_version=t.version if t else None,
                    last_error=d.error,
                    metrics=self.figures(d.device_id, ref),
                )
            out.append(DeviceView(d.device_id, d.online, d.groups, d.tags, pipes))
        return FleetSnapshot(out)


def run(
    sp: RolloutSpec,
    sim: Sim,
    *,
    steps: int = 200,
    every: timedelta = timedelta(minutes=1),
    state: RolloutState | None = None,
    now: datetime = T0,
) -> tuple[RolloutState, datetime]:
    """decide → apply → tick until the rollout stops running (or ``steps`` run out)."""
    state = state or start(sp, now)
    for _ in range(steps):
        d = decide(sp, state, sim.snapshot(), now)
        sim.apply(d.actions)
        state = d.new_state
        if state.status != "running":
            break
        sim.tick()
        now += every
    return state, now


def kinds(state: RolloutState) -> list[str]:
    return [e.kind for e in state.history]


# --- target expressions ------------------------------------------------------------------------

FLEET = FleetSnapshot(
    [
        view("cam-1", groups=["lobby"], tags={"site": "berlin", "floor": "1"}),
        view("cam-2", groups=["lobby", "door"], tags={"site": "paris"}),
        view("cam-3", groups=["yard"], tags={"site": "berlin"}),
        view("gate.4", groups=[], tags={}),
        view("and", groups=["lobby"], tags={"site": "oslo"}),
    ]
)


@pytest.mark.parametrize(
    ("expr", "canonical", "matched"),
    [
        ("*", "*", "cam-1 cam-2 cam-3 gate.4 and"),
        ("all", "*", "cam-1 cam-2 cam-3 gate.4 and"),
        ("cam-2", "id:cam-2", "cam-2"),
        ("id:gate.4", "id:gate.4", "gate.4"),
        ("id:and", "id:and", "and"),
        ("group:lobby", "group:lobby", "cam-1 cam-2 and"),
        ("tag:site=berlin", "tag:site=berlin", "cam-1 cam-3"),
        ("tag:floor", "tag:floor", "cam-1"),
        ("cam-1,cam-3", "id:cam-1, id:cam-3", "cam-1 cam-3"),
        ("cam-1 or gate.4", "id:cam-1, id:gate.4", "cam-1 gate.4"),
        ("group:lobby & tag:site=berlin", "group:lobby & tag:site=berlin", "cam-1"),
        ("group:lobby and not tag:site=berlin", "group:lobby & !tag:site=berlin", "cam-2 and"),
        ("!group:lobby", "!group:lobby", "cam-3 gate.4"),
        ("NOT group:lobby AND NOT gate.4", "!group:lobby & !id:gate.4", "cam-3"),
        # precedence: ! over & over ,
        (
            "group:yard, group:lobby & tag:site=paris",
            "group:yard, group:lobby & tag:site=paris",
            "cam-2 cam-3",
        ),
        (
            "(group:yard, group:lobby) & tag:site=berlin",
            "(group:yard, group:lobby) & tag:site=berlin",
            "cam-1 cam-3",
        ),
        ("!(group:lobby, group:yard)", "!(group:lobby, group:yard)", "gate.4"),
        ("  group:door ", "group:door", "cam-2"),
    ],
)
def test_parse_target_matches(expr: str, canonical: str, matched: str) -> None:
    t = parse_target(expr)
    assert str(t) == canonical
    assert [d.device_id for d in FLEET if t.matches(d)] == matched.split()
    assert str(parse_target(str(t))) == canonical  # canonical form parses to itself


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("", "bad target '': empty"),
        ("   ", "empty"),
        (
            "grp:lobby",
            "unknown term kind 'grp:' (expected id:, group: or tag:) at token 'grp:lobby'",
        ),
        ("group:", "not a group name"),
        ("tag:=berlin", "tag key must be"),
        ("tag:site=", "tag value is empty (write tag:KEY to match any value) at token 'tag:site='"),
        ("cam-1 &", "expected a term (id, group:, tag:, * or '(') at the end"),
        ("cam-1 cam-2", "expected ',', '&', 'and', 'or' or the end at token 'cam-2' (position 6)"),
        ("(cam-1, cam-2", "expected ')' to close the '(' before at the end"),
        ("cam-1)", "at token ')' (position 5)"),
        (",cam-1", "expected a term (id, group:, tag:, * or '(') at token ',' (position 0)"),
        ("cam/1", "not a device id (letters, digits, '_', '.', '-') at token 'cam/1'"),
        ("not", "expected a term"),
        ("cam-1 & and", "at token 'and' (position 8)"),
    ],
)
def test_parse_target_errors_name_the_token(expr: str, message: str) -> None:
    with pytest.raises(ValueError, match="bad target") as e:
        parse_target(expr)
    assert message in str(e.value)


def test_spec_rejects_bad_target_stage_and_gate() -> None:
    with pytest.raises(ValueError, match="unknown term kind 'site:'"):
        spec(target="site:berlin")
    with pytest.raises(ValueError, match="stages must increase: stage 2 is 5%, after 10%"):
        spec(stages=["10%", "5%"])
    with pytest.raises(ValueError, match="unknown metric 'latency'"):
        spec(gates=["latency<20%"])


# --- stages ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "percent", "count"),
    [("5%", 5.0, None), ("12.5%", 12.5, None), (" 100 % ", 100.0, None), ("10", None, 10)],
)
def test_parse_stage(text: str, percent: float | None, count: int | None) -> None:
    s = parse_stage(text)
    assert (s.percent, s.count) == (percent, count)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0%", "above 0% and at most 100%"),
        ("101%", "above 0% and at most 100%"),
        ("0", "at least 1"),
        ("5 percent", "use a share like '5%' or a device count like '10'"),
        ("-5%", "use a share"),
    ],
)
def test_parse_stage_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="bad stage") as e:
        parse_stage(text)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("stages", "normalized"),
    [
        (["5%", "25%"], "5% 25% 100%"),  # the final 100% is added
        (["5%", "25%", "100%"], "5% 25% 100%"),
        ([], "100%"),
        (["10", "25%"], "10 25% 100%"),
        (["3", "10", "50%"], "3 10 50% 100%"),
    ],
)
def test_normalize_stages(stages: list[str], normalized: str) -> None:
    assert " ".join(str(s) for s in normalize_stages(stages)) == normalized


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (["25%", "5%"], "stages must increase: stage 2 is 5%, after 25%"),
        (["10", "10"], "stages must increase: stage 2 is 10, after 10"),
        (["100%", "50"], "stage 2 (50) comes after 100%"),
    ],
)
def test_normalize_stages_errors(stages: list[str], message: str) -> None:
    with pytest.raises(ValueError) as e:
        normalize_stages(stages)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("stages", "n", "sizes"),
    [
        (["5%", "25%"], 1000, [50, 250, 1000]),
        (["5%", "25%"], 3, [1, 1, 3]),  # at least one device
        (["7%"], 100, [7, 100]),  # exact: not ceil(7.000000000000001)
        (["1%"], 101, [2, 101]),  # ceil(1.01)
        (["10", "25%"], 20, [10, 10, 20]),  # never shrinks
        (["10"], 4, [4, 4]),
        (["5%"], 0, [0, 0]),
    ],
)
def test_stage_sizes(stages: list[str], n: int, sizes: list[int]) -> None:
    assert stage_sizes(normalize_stages(stages), n) == sizes


@given(
    pcts=st.lists(st.integers(1, 99), max_size=5, unique=True).map(sorted),
    n=st.integers(0, 5000),
)
def test_stage_sizes_monotonic_and_complete(pcts: list[int], n: int) -> None:
    sizes = stage_sizes(normalize_stages([f"{p}%" for p in pcts]), n)
    assert sizes == sorted(sizes)
    assert sizes[-1] == n
    for p, size in zip(pcts, sizes[:-1], strict=True):
        assert size == (min(n, max(1, math.ceil(p * n / 100))) if n else 0)


@settings(max_examples=60)
@given(
    devices=st.sets(st.integers(0, 10_000), min_size=1, max_size=200),
    grow=st.sets(st.integers(10_001, 20_000), max_size=100),
    first=st.integers(1, 200),
    extra=st.integers(0, 200),
)
def test_selection_is_prefix_stable(
    devices: set[int], grow: set[int], first: int, extra: int
) -> None:
    names = [f"d{i}" for i in devices]
    order = selection_order("r7", names)
    picked = select("r7", names, [], first)
    assert picked == order[: min(first, len(names))]  # a fixed fleet: a prefix of the order
    bigger = names + [f"d{i}" for i in grow]
    more = select("r7", bigger, picked, len(picked) + extra)
    assert not set(more) & set(picked)  # nobody is picked twice
    assert len(more) == min(extra, len(bigger) - len(picked))
    rest = [d for d in selection_order("r7", bigger) if d not in picked]
    assert more == rest[: len(more)]  # and the new ones follow the hash order


def test_same_id_same_canaries_other_id_other_canaries() -> None:
    fleet = FleetSnapshot(view(d) for d in ids(200))
    picks: dict[str, list[list[str]]] = {}
    for rid in ("r1", "r1", "r2"):
        d = decide(spec(id=rid, stages=["5%"]), start(spec(id=rid), T0), fleet, T0)
        picks.setdefault(rid, []).append(sorted(deploys(d.actions)))
    assert picks["r1"][0] == picks["r1"][1]
    assert len(picks["r1"][0]) == 10
    assert picks["r1"][0] != picks["r2"][0]
    assert len(set(picks["r1"][0]) & set(picks["r2"][0])) < 5  # independent draws, not shifted


def test_growing_fleet_keeps_earlier_picks() -> None:
    sp = spec(stages=["10%", "50%"], soak_s=0)
    sim = Sim(SimDevice(d) for d in ids(100))
    d1 = decide(sp, start(sp, T0), sim.snapshot(), T0)
    canaries = set(deploys(d1.actions))
    assert len(canaries) == 10
    sim.apply(d1.actions)
    sim.tick()
    sim.tick()
    # 100 more devices join, and they would sort first for some: earlier picks stay
    for d in ids(100, "new"):
        sim.devices[d] = SimDevice(d)
    d2 = decide(sp, d1.new_state, sim.snapshot(), T0 + timedelta(minutes=2))
    stage2 = set(deploys(d2.actions))
    assert canaries <= set(d2.new_state.devices)
    assert not canaries & stage2  # not sent twice
    assert len(d2.new_state.devices) == 100  # 50% of the 200 devices now targeted
    expected = [x for x in selection_order("r1", sim.devices) if x not in canaries][:90]
    assert stage2 == set(expected)


# --- gates -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "metric", "op", "threshold"),
    [
        ("failures<2%", "failures", "<", 0.02),
        ("error_rate < 1%", "error_rate", "<", 0.01),
        ("p95_latency<+20%", "p95_latency", "<", 0.20),
        ("p95_latency<=-5%", "p95_latency", "<=", -0.05),
        ("fps_drop<10%", "fps_drop", "<", 0.10),
        ("label_shift<0.2", "label_shift", "<", 0.2),
    ],
)
def test_parse_gate(text: str, metric: str, op: str, threshold: float) -> None:
    g = parse_gate(text)
    assert (g.metric, g.op, g.threshold) == (metric, op, threshold)
    assert parse_gate(g.name) == g


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("latency<20%", "unknown metric 'latency'"),
        ("failures>2%", "operator '>'; a gate is an upper bound"),
        ("failures<2", "failures takes a percentage, e.g. failures<10%"),
        ("fps_drop<+10%", "only p95_latency takes a signed change"),
        ("label_shift<20%", "label_shift takes a distance 0..1"),
        ("label_shift<1.5", "label_shift takes a distance 0..1"),
        ("error_rate<150%", "error_rate is a share, at most 100%"),
        ("failures", "use METRIC<THRESHOLD"),
    ],
)
def test_parse_gate_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="bad gate") as e:
        parse_gate(text)
    assert message in str(e.value)


def rows(prefix: str, n: int, ref: ModelRef, **kw: object) -> list[tuple[str, PipelineMetrics]]:
    return [(f"{prefix}{i}", metrics(ref, **kw)) for i in range(n)]  # type: ignore[arg-type]


GATE_CASES = [
    # failures: share of the stage's devices
    (
        "failures<2%",
        Evidence(NEW, 50),
        True,
        0.0,
        "failures 0.0% < 2% (0 of 50 stage devices failed)",
    ),
    (
        "failures<2%",
        Evidence(NEW, 50, ["cam-9 (front: rejected)"]),
        False,
        0.02,
        "failures 2.0% >= 2% (1 of 50 stage devices failed: cam-9 (front: rejected))",
    ),
    ("failures<=2%", Evidence(NEW, 50, ["cam-9"]), True, 0.02, "failures 2.0% <= 2% (1 of 50"),
    # error_rate: errors / frames on the new version, absolute
    (
        "error_rate<1%",
        Evidence(NEW, 2, canaries=rows("c", 2, NEW, frames=1000, errors=4)),
        True,
        0.004,
        "error_rate 0.4% < 1% (8 errors in 2000 frames on det@2.0.0, 2 devices)",
    ),
    (
        "error_rate<1%",
        Evidence(NEW, 2, canaries=rows("c", 2, NEW, frames=1000, errors=15)),
        False,
        0.015,
        "error_rate 1.5% > 1% (30 errors in 2000 frames on det@2.0.0, 2 devices)",
    ),
    (
        "error_rate<1%",
        Evidence(NEW, 2),
        True,
        None,
        "error_rate: no data: no frames on det@2.0.0 yet; passes",
    ),
    # p95_latency: median of canaries vs median of baseline, relative
    (
        "p95_latency<+20%",
        Evidence(
            NEW, 5, canaries=rows("c", 5, NEW, p95=13.4), baseline=rows("b", 95, OLD, p95=10.0)
        ),
        False,
        0.34,
        "p95_latency +34.0% > +20% (canaries 13.4 ms vs baseline 10.0 ms, 5 vs 95 devices)",
    ),
    (
        "p95_latency<+20%",
        Evidence(
            NEW,
            3,
            canaries=[
                ("c0", metrics(NEW, p95=11.0)),
                ("c1", metrics(NEW, p95=11.5)),
                ("c2", metrics(NEW, p95=40.0)),
            ],
            baseline=rows("b", 4, OLD, p95=10.0),
        ),
        True,
        0.15,  # the median (11.5) ignores the one slow canary
        "p95_latency +15.0% < +20% (canaries 11.5 ms vs baseline 10.0 ms, 3 vs 4 devices)",
    ),
    (
        "p95_latency<+20%",
        Evidence(
            NEW, 2, canaries=rows("c", 2, NEW, p95=12.0), baseline=rows("b", 2, OLD, p95=10.0)
        ),
        False,  # exactly +20% is not below +20%, float noise or not
        0.2,
        "p95_latency +20.0% >= +20%",
    ),
    # the last stage: no device left on the old version → the canaries' own earlier figures
    (
        "p95_latency<+20%",
        Evidence(NEW, 2, canaries=rows("c", 2, NEW, p95=15.0), before=rows("c", 2, OLD, p95=10.0)),
        False,
        0.5,
        "p95_latency +50.0% > +20% (canaries 15.0 ms vs 10.0 ms on their previous version, "
        "2 devices)",
    ),
    (
        "p95_latency<+20%",
        Evidence(NEW, 2, canaries=rows("c", 2, NEW, p95=15.0)),
        True,
        None,
        "p95_latency: no baseline (no device left on the previous version, no pre-update "
        "figures); passes",
    ),
    # fps_drop: relative drop vs baseline
    (
        "fps_drop<10%",
        Evidence(
            NEW, 2, canaries=rows("c", 2, NEW, fps=28.5), baseline=rows("b", 8, OLD, fps=30.0)
        ),
        True,
        0.05,
        "fps_drop 5.0% < 10% (canaries 28.5 fps vs baseline 30.0 fps, 2 vs 8 devices)",
    ),
    (
        "fps_drop<10%",
        Evidence(
            NEW, 2, canaries=rows("c", 2, NEW, fps=24.0), baseline=rows("b", 8, OLD, fps=30.0)
        ),
        False,
        0.2,
        "fps_drop 20.0% > 10% (canaries 24.0 fps vs baseline 30.0 fps, 2 vs 8 devices)",
    ),
    # label_shift: total variation of the top-1 distributions
    (
        "label_shift<0.2",
        Evidence(
            NEW,
            1,
            canaries=[("c0", metrics(NEW, top1={"cat": 30, "dog": 70}))],
            baseline=[
                ("b0", metrics(OLD, top1={"cat": 40, "dog": 60})),
                ("b1", metrics(OLD, top1={"cat": 40, "dog": 60})),
            ],
        ),
        True,
        0.1,
        "label_shift 0.100 < 0.2 (canaries vs baseline: 100 vs 200 labels; biggest change "
        "'cat' 40.0% → 30.0%)",
    ),
    (
        "label_shift<0.2",
        Evidence(
            NEW,
            1,
            canaries=[("c0", metrics(NEW, top1={"cat": 10, "dog": 50, "fox": 40}))],
            baseline=[("b0", metrics(OLD, top1={"cat": 50, "dog": 50}))],
        ),
        False,
        0.4,
        "label_shift 0.400 > 0.2 (canaries vs baseline: 100 vs 100 labels; biggest change "
        "'cat' 50.0% → 10.0%)",
    ),
    (
        "label_shift<0.2",
        Evidence(NEW, 1, canaries=rows("c", 1, NEW)),
        True,
        None,
        "label_shift: no data: no top-1 labels on det@2.0.0 (not a classifier?); passes",
    ),
]


@pytest.mark.parametrize(("gate", "ev", "ok", "value", "detail"), GATE_CASES)
def test_gate_numbers(gate: str, ev: Evidence, ok: bool, value: float | None, detail: str) -> None:
    r = evaluate(parse_gate(gate), ev)
    assert r.ok is ok
    assert r.name == parse_gate(gate).name
    if value is None:
        assert r.value is None
    else:
        assert r.value == pytest.approx(value)
    assert r.detail.startswith(detail), r.detail


@pytest.mark.parametrize(
    ("p", "q", "tv"),
    [
        ({"a": 1}, {"a": 5}, 0.0),
        ({"a": 1}, {"b": 1}, 1.0),
        ({"a": 3, "b": 1}, {"a": 1, "b": 1}, 0.25),
        ({"a": 1, "b": 1, "c": 2}, {"a": 2, "b": 2}, 0.5),
    ],
)
def test_total_variation(p: dict[str, int], q: dict[str, int], tv: float) -> None:
    assert total_variation(p, q) == pytest.approx(tv)


# --- decide: deploying, concurrency, offline devices, soak -------------------------------------


def test_max_concurrent_counts_online_updates_only() -> None:
    sp = spec(stages=[], max_concurrent=3)
    devs = [SimDevice(d) for d in ids(10)]
    order = selection_order("r1", [d.device_id for d in devs])
    sim = Sim(devs)
    sim.devices[order[1]].online = False  # gets its Deploy at once, holds no slot
    d = decide(sp, start(sp, T0), sim.snapshot(), T0)
    assert deploys(d.actions) == [order[0], order[1], order[2], order[3]]
    sim.apply(d.actions)
    # nothing finished: no new Deploy
    d = decide(sp, d.new_state, sim.snapshot(), T0 + timedelta(seconds=10))
    assert deploys(d.actions) == []
    sim.tick()
    sim.tick()  # the three online ones commit
    d = decide(sp, d.new_state, sim.snapshot(), T0 + timedelta(seconds=20))
    assert deploys(d.actions) == order[4:7]
    assert [r.outcome for r in (d.new_state.devices[x] for x in order[:4])] == [
        "committed",
        "updating",
        "committed",
        "committed",
    ]


def test_offline_devices_are_pending_and_do_not_block_the_stage() -> None:
    sp = spec(stages=["50%"], soak_s=300)
    sim = Sim(SimDevice(d) for d in ids(8))
    order = selection_order("r1", sim.devices)
    sim.devices[order[2]].online = False
    state, now = run(sp, sim, steps=3)
    # tick 1: fetching, tick 2: committed, decide 3: soak starts
    assert state.soak_started_at == T0 + timedelta(minutes=2)
    assert state.devices[order[2]].outcome == "updating"
    assert set(deploys(sim.sent)) == set(order[:4])  # the offline one got its Deploy too
    soak = [e.message for e in state.history if e.kind == "soak_started"]
    assert soak == [
        f"stage 1/2 (50%): every online device finished (3 committed, 0 failed of 4); "
        f"soak 300s; pending offline: {order[2]}"
    ]
    # it catches up when it comes back, and then counts as committed
    sim.devices[order[2]].online = True
    sim.tick()
    sim.tick()
    d = decide(sp, state, sim.snapshot(), now)
    assert d.new_state.devices[order[2]].outcome == "committed"


def test_stage_waits_when_all_its_devices_are_offline() -> None:
    sp = spec(stages=[], soak_s=0)
    sim = Sim(SimDevice(d, online=False) for d in ids(3))
    state, _ = run(sp, sim, steps=5)
    assert state.status == "running"
    assert state.soak_started_at is None
    assert sorted(deploys(sim.sent)) == ids(3)
    assert "soak_started" not in kinds(state)


@pytest.mark.parametrize(
    ("elapsed_s", "stage", "new_deploys"),
    [(0, 0, 0), (599, 0, 0), (600, 1, 4), (3600, 1, 4)],
)
def test_soak_timing(elapsed_s: int, stage: int, new_deploys: int) -> None:
    sp = spec(stages=["10%", "50%"], soak_s=600)
    sim = Sim(SimDevice(d) for d in ids(10))
    state, _ = run(sp, sim, steps=3)  # canary deployed, committed, soak started
    assert state.soak_started_at == T0 + timedelta(minutes=2)
    d = decide(sp, state, sim.snapshot(), state.soak_started_at + timedelta(seconds=elapsed_s))
    assert d.new_state.stage == stage
    assert len(deploys(d.actions)) == new_deploys


def test_promote_skips_the_soak() -> None:
    sp = spec(stages=["10%", "50%"], soak_s=86400)
    sim = Sim(SimDevice(d) for d in ids(10))
    state, now = run(sp, sim, steps=3)
    assert state.soak_started_at is not None
    assert decide(sp, state, sim.snapshot(), now).new_state.stage == 0
    p = promote(state, now, "looks good")
    assert p.new_state.promote_requested
    assert p.actions == (Log("promoted: looks good; soak of stage 1 skipped"),)
    d = decide(sp, p.new_state, sim.snapshot(), now + timedelta(seconds=1))
    assert d.new_state.stage == 1
    assert len(deploys(d.actions)) == 4
    assert not d.new_state.promote_requested  # only that stage's soak


def test_busy_pipelines_are_not_selected() -> None:
    sp = spec(stages=[])
    fleet = FleetSnapshot(view(d) for d in ids(5))
    d = decide(sp, start(sp, T0), fleet, T0, busy={("cam-0001", "front"), ("cam-0003", "back")})
    assert sorted(deploys(d.actions)) == ["cam-0000", "cam-0002", "cam-0003", "cam-0004"]


def test_all_pipelines_when_none_is_named() -> None:
    sp = spec(pipeline=None, stages=[])
    fleet = FleetSnapshot(
        [
            view("a", pipelines=["front", "back"]),
            view("b", pipelines=["side"], active=NEW),  # already on it: untouched
        ]
    )
    d = decide(sp, start(sp, T0), fleet, T0, busy={("a", "back")})
    assert [(a.device_id, a.pipeline) for a in d.actions if isinstance(a, Deploy)] == [
        ("a", "front")
    ]
    assert d.new_state.devices["b"].outcome == "committed"
    assert not d.new_state.devices["b"].touched


def test_target_with_no_device_fails_with_a_reason() -> None:
    sp = spec(target="group:nowhere")
    d = decide(sp, start(sp, T0), FleetSnapshot(view(x) for x in ids(4)), T0)
    assert d.new_state.status == "failed"
    assert d.actions == (
        Log(
            "rollout r1: no device to update: target 'group:nowhere' matches 0 of 4 devices, "
            "0 of them with a free pipeline 'front'"
        ),
    )


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        decide(spec(), start(spec(), T0), FleetSnapshot(), datetime(2026, 1, 1))


# --- gate failures: pause vs rollback ---------------------------------------------------------


def slow_new(_device: str, ref: ModelRef) -> PipelineMetrics:
    return metrics(ref, p95=13.4 if ref == NEW else 10.0)


@pytest.mark.parametrize("on_fail", ["pause", "rollback"])
def test_failing_gate_pauses_or_rolls_back(on_fail: str) -> None:
    sp = spec(
        stages=["10%", "50%"],
        soak_s=600,
        gates=["p95_latency<+20%", "failures<50%"],
        on_fail=on_fail,
    )
    sim = Sim((SimDevice(d) for d in ids(40)), slow_new)
    state, now = run(sp, sim, steps=30)
    canaries = selection_order("r1", sim.devices)[:4]
    assert sorted(deploys(sim.sent)) == sorted(canaries)
    failed = [e.message for e in state.history if e.kind == "gates_failed"]
    assert failed == [
        "stage 1/3 (10%) failed after the soak: p95_latency +34.0% > +20% "
        "(canaries 13.4 ms vs baseline 10.0 ms, 4 vs 36 devices)"
    ]
    assert [r.ok for r in state.last_gates] == [False, True]
    if on_fail == "pause":
        assert state.status == "paused"
        assert reverts(sim.sent) == []
        assert all(sim.devices[c].active["front"] == NEW for c in canaries)
    else:
        assert state.status == "failed"
        assert sorted(reverts(sim.sent)) == [(c, "front", "det@1.0.0") for c in sorted(canaries)]
        assert {r.outcome for r in state.devices.values()} == {"reverted"}
        assert kinds(state)[-1] == "failed"
    # nothing more happens on later calls
    later = decide(sp, state, sim.snapshot(), now + timedelta(hours=5))
    assert deploys(later.actions) == [] and reverts(later.actions) == []


def test_failures_gate_fails_before_the_soak() -> None:
    sp = spec(stages=["20%"], soak_s=3600, gates=["failures<25%"], on_fail="rollback")
    sim = Sim(SimDevice(d) for d in ids(20))
    order = selection_order("r1", sim.devices)
    sim.devices[order[0]].behaviour = "reject"
    sim.devices[order[1]].behaviour = "rollback"
    sim.devices[order[2]].behaviour = "stuck"  # never finishes: the soak never starts
    sim.devices[order[2]].online = True
    state, _ = run(sp, sim, steps=10)
    assert state.status == "failed"
    assert state.soak_started_at is None
    failed = next(e.message for e in state.history if e.kind == "gates_failed")
    assert failed.startswith(
        "stage 1/2 (20%) failed before the soak ended: failures 50.0% > 25% (2 of 4 stage "
        f"devices failed: {order[0]} (front: det@2.0.0 rejected: golden outputs differ"
    )
    # every touched canary is told to go back, including the ones that rolled back themselves
    assert sorted(reverts(sim.sent)) == sorted((c, "front", "det@1.0.0") for c in order[:4])


def test_resume_after_a_gate_pause_accepts_and_moves_on() -> None:
    sp = spec(stages=["10%"], soak_s=60, gates=["p95_latency<+20%"])
    sim = Sim((SimDevice(d) for d in ids(20)), slow_new)
    state, now = run(sp, sim, steps=20)
    assert state.status == "paused" and state.paused_by_gate
    r = resume(state, now, "latency is expected for det 2")
    assert r.actions == (
        Log("resumed: latency is expected for det 2; failing gates of stage 1 accepted"),
    )
    state, now = run(sp, sim, steps=20, state=r.new_state, now=now)
    passed = [e.message for e in state.history if e.kind == "gates_passed"]
    assert passed == [
        "stage 1/2 (10%) done: operator accepted failing gates: p95_latency +34.0% > +20% "
        "(canaries 13.4 ms vs baseline 10.0 ms, 2 vs 18 devices)"
    ]
    # stage 2 is the last: nobody is left on the old version, so the canaries' own figures
    # from before their update are the baseline, and the same regression pauses it again
    assert (state.status, state.stage) == ("paused", 1)
    assert sorted(deploys(sim.sent)) == ids(20)
    failed = [e.message for e in state.history if e.kind == "gates_failed"]
    assert failed[-1] == (
        "stage 2/2 (100%) failed after the soak: p95_latency +34.0% > +20% (canaries 13.4 ms "
        "vs 10.0 ms on their previous version, 20 devices)"
    )


# --- commands ----------------------------------------------------------------------------------


def test_abort_reverts_only_touched_devices_to_their_own_previous_version() -> None:
    sp = spec(stages=[], max_concurrent=2)
    devs = [SimDevice(d) for d in ids(6)]
    order = selection_order("r1", [d.device_id for d in devs])
    sim = Sim(devs)
    sim.devices[order[1]].active["front"] = OTHER  # was on 0.9.0
    sim.devices[order[2]].active["front"] = NEW  # already on the new version
    d = decide(sp, start(sp, T0), sim.snapshot(), T0)
    sim.apply(d.actions)
    assert deploys(d.actions) == [order[0], order[1]]  # order[2] needs nothing, cap of 2
    a = abort(sp, d.new_state, T0 + timedelta(minutes=1), "wrong model")
    assert reverts(a.actions) == sorted(
        [(order[0], "front", "det@1.0.0"), (order[1], "front", "det@0.9.0")]
    )
    assert a.new_state.status == "aborted"
    assert a.new_state.devices[order[3]].outcome == "pending"  # never sent: left alone
    assert a.new_state.devices[order[2]].outcome == "committed"
    assert a.new_state.history[-1].message == "rollout r1 aborted: wrong model; 2 reverts"
    # an aborted rollout decides nothing more
    assert decide(sp, a.new_state, sim.snapshot(), T0 + timedelta(hours=1)).actions == ()


@pytest.mark.parametrize(
    ("status", "command", "message"),
    [
        ("paused", "pause", "cannot pause a rollout that is paused"),
        ("running", "resume", "cannot resume a rollout that is running"),
        ("paused", "promote", "cannot promote a rollout that is paused"),
        ("completed", "abort", "cannot abort a rollout that is completed"),
        ("aborted", "abort", "cannot abort a rollout that is aborted"),
    ],
)
def test_commands_refuse_wrong_states(status: str, command: str, message: str) -> None:
    state = RolloutState.model_validate({"status": status})
    calls: dict[str, Callable[[], Decision]] = {
        "pause": lambda: pause(state, T0),
        "resume": lambda: resume(state, T0),
        "promote": lambda: promote(state, T0),
        "abort": lambda: abort(spec(), state, T0),
    }
    with pytest.raises(ValueError) as e:
        calls[command]()
    assert str(e.value) == message


def test_pause_stops_deploys_but_tracks_outcomes() -> None:
    sp = spec(stages=[], max_concurrent=2)
    sim = Sim(SimDevice(d) for d in ids(6))
    d = decide(sp, start(sp, T0), sim.snapshot(), T0)
    sim.apply(d.actions)
    p = pause(d.new_state, T0, "night freeze")
    sim.tick()
    sim.tick()
    d2 = decide(sp, p.new_state, sim.snapshot(), T0 + timedelta(minutes=5))
    assert deploys(d2.actions) == []
    assert d2.new_state.counts()["committed"] == 2
    r = resume(d2.new_state, T0 + timedelta(minutes=6))
    assert r.new_state.waived_stage is None  # an operator pause waives nothing
    d3 = decide(sp, r.new_state, sim.snapshot(), T0 + timedelta(minutes=6))
    assert len(deploys(d3.actions)) == 2


# --- whole rollouts on a 1,000-device fleet ----------------------------------------------------


def test_thousand_devices_to_completion() -> None:
    sp = spec(
        stages=["5%", "25%"],
        soak_s=600,
        max_concurrent=100,
        gates=["failures<2%", "error_rate<1%", "p95_latency<+20%", "fps_drop<10%"],
    )
    sim = Sim(
        (SimDevice(d) for d in ids(1000)),
        lambda _d, ref: metrics(ref, p95=10.5 if ref == NEW else 10.0, frames=1000, errors=1),
    )
    state, _ = run(sp, sim, steps=400)
    assert state.status == "completed"
    sent = deploys(sim.sent)
    assert sorted(sent) == ids(1000)  # every device exactly once
    assert reverts(sim.sent) == []
    by_stage = [sum(r.stage == k for r in state.devices.values()) for k in range(3)]
    assert by_stage == [50, 200, 750]
    order = selection_order("r1", ids(1000))
    assert {d for d, r in state.devices.items() if r.stage == 0} == set(order[:50])
    assert {d for d, r in state.devices.items() if r.stage <= 1} == set(order[:250])
    passed = [e.message for e in state.history if e.kind == "gates_passed"]
    assert len(passed) == 3
    assert (
        "p95_latency +5.0% < +20% (canaries 10.5 ms vs baseline 10.0 ms, 50 vs 950 devices)"
        in passed[0]
    )
    assert "error_rate 0.1% < 1% (50 errors in 50000 frames on det@2.0.0, 50 devices)" in passed[0]
    # last stage: baseline is the devices' own pre-update figures
    assert (
        "p95_latency +5.0% < +20% (canaries 10.5 ms vs 10.0 ms on their previous version, "
        "1000 devices)" in passed[2]
    )
    # and the whole state survives a JSON round trip
    assert RolloutState.model_validate_json(state.model_dump_json()) == state


@pytest.mark.parametrize("on_fail", ["pause", "rollback"])
def test_thousand_devices_bad_canaries_stop_at_stage_one(on_fail: str) -> None:
    sp = spec(stages=["5%", "25%"], soak_s=600, gates=["p95_latency<+20%"], on_fail=on_fail)
    sim = Sim((SimDevice(d) for d in ids(1000)), slow_new)
    state, _ = run(sp, sim, steps=100)
    canaries = selection_order("r1", ids(1000))[:50]
    assert sorted(deploys(sim.sent)) == sorted(canaries)  # nobody outside stage 1
    assert state.stage == 0
    sim.tick()
    sim.tick()
    if on_fail == "pause":
        assert state.status == "paused"
        assert reverts(sim.sent) == []
    else:
        assert state.status == "failed"
        assert sorted(d for d, _, _ in reverts(sim.sent)) == sorted(canaries)
        assert all(sim.devices[c].active["front"] == OLD for c in canaries)


def test_rerun_with_same_id_picks_the_same_canaries_on_a_thousand_devices() -> None:
    sp = spec(stages=["5%"], soak_s=600, gates=["p95_latency<+20%"])
    first = Sim((SimDevice(d) for d in ids(1000)), slow_new)
    run(sp, first, steps=50)
    second = Sim((SimDevice(d) for d in reversed(ids(1000))), slow_new)  # other snapshot order
    run(sp, second, steps=50)
    assert len(first.sent) == 50
    assert first.sent == second.sent  # same devices, same order


# --- more edges --------------------------------------------------------------------------------


def test_a_stage_that_adds_nobody_is_skipped() -> None:
    # 10 devices, then 5% of 100 = 5: the second stage covers no one new
    sp = spec(stages=["10", "5%"], soak_s=0)
    sim = Sim(SimDevice(d) for d in ids(100))
    state, _ = run(sp, sim, steps=50)
    assert state.status == "completed"
    assert [e.message for e in state.history if e.kind == "stage_skipped"] == [
        "stage 2/3 (5%) adds no device (10 of 100)"
    ]
    assert [sum(r.stage == k for r in state.devices.values()) for k in range(3)] == [10, 0, 90]


def test_a_device_fails_once_however_many_pipelines_fail() -> None:
    sp = spec(pipeline=None, stages=[], soak_s=0, gates=["failures<40%"])
    sim = Sim(
        SimDevice(
            d,
            active={"front": OLD, "back": OLD},
            phase={"front": P.COMMITTED, "back": P.COMMITTED},
            target={"front": None, "back": None},
        )
        for d in ids(3)
    )
    bad = selection_order("r1", sim.devices)[0]
    sim.devices[bad].behaviour = "reject"
    state, _ = run(sp, sim, steps=10)
    assert len(deploys(sim.sent)) == 6  # two pipelines on each of three devices
    assert state.status == "completed"
    assert state.last_gates[0].detail.startswith(
        f"failures 33.3% < 40% (1 of 3 stage devices failed: {bad} (back: det@2.0.0 rejected"
    )
    assert state.counts() == {"committed": 2, "failed": 1}


def test_start_records_the_plan() -> None:
    sp = spec(stages=[], gates=["failures<2%"], soak_s=900)
    assert [str(s) for s in sp.stages] == ["100%"]
    assert start(sp, T0).history[0].message == (
        "rollout r1: det@2.0.0 to '*' (front); stages 100%; soak 900s; gates failures<2%; "
        "on failure pause"
    )


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    pcts=st.lists(st.integers(1, 99), max_size=3, unique=True).map(sorted),
    bad=st.sets(st.integers(0, 59), max_size=6),
    offline=st.sets(st.integers(0, 59), max_size=6),
    cap=st.one_of(st.none(), st.integers(1, 8)),
)
def test_deploys_only_ever_go_to_selected_prefixes(
    n: int, pcts: list[int], bad: set[int], offline: set[int], cap: int | None
) -> None:
    sp = spec(stages=[f"{p}%" for p in pcts], soak_s=60, gates=["failures<1%"], max_concurrent=cap)
    names = ids(n)
    sim = Sim(SimDevice(d) for d in names)
    bad_names = {names[i] for i in bad if i < n}
    for d in bad_names:
        sim.devices[d].behaviour = "reject"
    for i in offline & set(range(n)):
        sim.devices[names[i]].online = False
    state, _ = run(sp, sim, steps=300)
    sent = deploys(sim.sent)
    assert len(sent) == len(set(sent))  # nobody gets the same Deploy twice
    order = selection_order("r1", names)
    reached = stage_sizes(sp.stages, n)[state.stage]
    assert set(sent) <= set(order[:reached])  # never beyond the current stage's prefix
    assert set(state.devices) == set(order[:reached])
    failed = {d for d, r in state.devices.items() if r.outcome == "failed"}
    if failed:  # any failure trips failures<1%: paused in the stage it happened in
        assert state.status == "paused"
        assert failed <= bad_names
    else:
        assert state.status in ("running", "completed")
        if state.status == "completed":
            assert set(state.devices) == set(names)


def test_selected_devices_are_never_baseline() -> None:
    # a canary that rolled back runs the old version again, but it is not baseline
    sp = spec(stages=["10%"], soak_s=60, gates=["failures<60%", "p95_latency<+50%"])
    sim = Sim((SimDevice(d) for d in ids(20)), slow_new)
    sim.devices[selection_order("r1", sim.devices)[0]].behaviour = "rollback"
    state, _ = run(sp, sim, steps=8)
    bad = selection_order("r1", sim.devices)[0]
    passed = next(e.message for e in state.history if e.kind == "gates_passed")
    assert passed == (
        f"stage 1/2 (10%) done: failures 50.0% < 60% (1 of 2 stage devices failed: {bad} "
        "(front: det@2.0.0 rolled_back: golden outputs differ by 0.31 (tolerance 0.05))); "
        "p95_latency +34.0% < +50% (canaries 13.4 ms vs baseline 10.0 ms, 1 vs 18 devices)"
    )


# --- decisions that cannot read metrics -------------------------------------------------------


def without_metrics(fleet: FleetSnapshot) -> FleetSnapshot:
    """The snapshot a controller reads when ``needs_metrics`` is False."""
    return FleetSnapshot(
        replace(v, pipelines={n: replace(p, metrics=None) for n, p in v.pipelines.items()})
        for v in fleet
    )


@pytest.mark.parametrize(
    ("scenario", "kw", "behaviour", "figures"),
    [
        ("good", {"gates": ["failures<2%", "p95_latency<+20%", "error_rate<1%"]}, "good", None),
        ("slow canaries, rollback", {"gates": ["p95_latency<+20%"], "on_fail": "rollback"},
         "good", slow_new),
        ("slow canaries, pause", {"gates": ["p95_latency<+20%"]}, "good", slow_new),
        ("rejects", {"gates": ["failures<2%"]}, "reject", None),
        ("no soak", {"soak_s": 0, "gates": ["p95_latency<+20%"]}, "good", None),
        ("promote", {"soak_s": 86400, "gates": ["p95_latency<+20%"]}, "good", None),
    ],
)  # fmt: skip
def test_decisions_without_metrics_match_whenever_needs_metrics_is_false(
    scenario: str,
    kw: dict[str, object],
    behaviour: str,
    figures: Callable[[str, ModelRef], PipelineMetrics] | None,
) -> None:
    # The controller skips the telemetry queries when needs_metrics is False: at every step
    # of whole rollouts, the decision on a metrics-free snapshot must then be the same one.
    sp = spec(**{"stages": ["10%", "50%"], "soak_s": 180, "max_concurrent": 3, **kw})
    sim = Sim((SimDevice(d, behaviour=behaviour) for d in ids(40)), figures)
    state, now = start(sp, T0), T0
    skipped = used = 0
    for _ in range(120):
        if scenario == "promote" and state.status == "running" and not state.promote_requested:
            state = promote(state, now, "go").new_state  # while the stage installs, too
        fleet = sim.snapshot()
        d = decide(sp, state, fleet, now)
        if needs_metrics(sp, state):
            used += 1
        else:
            skipped += 1
            assert decide(sp, state, without_metrics(fleet), now) == d, (scenario, state.stage)
        sim.apply(d.actions)
        state = d.new_state
        if state.status not in ("running", "paused"):
            break
        sim.tick()
        now += timedelta(minutes=1)
    assert used > 0
    # with no soak, or a promote pending, the gates run as soon as the stage settles
    assert (skipped > 0) == (scenario not in ("no soak", "promote")), skipped


def test_metrics_are_needed_where_decisions_read_them() -> None:
    # stage start records the figures of each selected device's previous version
    sp = spec(stages=["10%"], gates=["p95_latency<+20%"])
    sim = Sim(SimDevice(d) for d in ids(10))
    state = start(sp, T0)
    assert needs_metrics(sp, state)
    full = decide(sp, state, sim.snapshot(), T0)
    bare = decide(sp, state, without_metrics(sim.snapshot()), T0)
    assert full != bare  # the recorded before-figures differ
    # soaking: the gates at its end read the canaries' figures
    state, now = run(sp, Sim((SimDevice(d) for d in ids(10)), slow_new), steps=3)
    assert state.soak_started_at is not None and needs_metrics(sp, state)
    # paused and finished rollouts only track phases
    assert not needs_metrics(sp, pause(state, now, "x").new_state)
