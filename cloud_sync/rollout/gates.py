"""Pure: rollout gates (``failures<2%``, ``p95_latency<+20%``…) and their evaluation.

A gate is ``METRIC OP THRESHOLD`` with OP ``<`` or ``<=``; the stage passes when the measured
value satisfies it. Metrics:

=============  ====================================================================  ===========
metric         value                                                                 threshold
=============  ====================================================================  ===========
failures       share of the stage's devices whose update ended rejected/rolled_back  ``2%``
error_rate     inference errors / frames on the new version (canaries, soak window)  ``1%``
p95_latency    relative change of the canaries' median p95 vs the baseline's median  ``+20%``
fps_drop       relative drop of the canaries' median fps vs the baseline's median    ``10%``
label_shift    total-variation distance of the top-1 label distributions, 0..1       ``0.2``
=============  ====================================================================  ===========

The *baseline* of the relative gates (``p95_latency``, ``fps_drop``, ``label_shift``) is the
targeted devices still on the previous version. When there is none (the last stage), the
canaries' own numbers on the previous version, recorded before their update, are used; when
those are missing too the gate passes with the note "no baseline". A gate without any data
from the canaries passes with the note "no data" — ``failures`` and the stage's wait for its
devices are what stop a version that never runs.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cloud_sync.rollout.fleet import ModelRef, PipelineMetrics

Metric = Literal["failures", "error_rate", "p95_latency", "fps_drop", "label_shift"]
METRICS: tuple[Metric, ...] = ("failures", "error_rate", "p95_latency", "fps_drop", "label_shift")
_GATE = re.compile(r"^\s*([a-z0-9_]+)\s*(<=|<|>=|>|==|=)\s*(\S.*?)\s*$")
_SIGNED_PCT = re.compile(r"^([+-]?)(\d+(?:\.\d+)?)%$")
_NUMBER = re.compile(r"^(\d+(?:\.\d+)?)$")
_EPS = 1e-9  # 12.0/10.0 - 1 is 0.19999999999999996: compare at this resolution


class Gate(BaseModel):
    """One gate: ``metric op threshold`` (threshold as a fraction: ``2%`` → 0.02)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    metric: Metric = Field(description="What is measured")
    op: Literal["<", "<="] = Field(description="The value must be below (or at most) threshold")
    threshold: float = Field(ge=-1, le=1e6, description="Bound; shares as fractions (2% → 0.02)")
    threshold_text: str = Field(max_length=32, description="The bound as typed, e.g. '+20%'")

    @property
    def name(self) -> str:
        """The gate as the operator writes it, e.g. ``p95_latency<+20%``."""
        return f"{self.metric}{self.op}{self.threshold_text}"

    def __str__(self) -> str:
        return self.name


def parse_gate(text: str) -> Gate:
    """``failures<2%``, ``error_rate<1%``, ``p95_latency<+20%``, ``fps_drop<10%``,
    ``label_shift<0.2`` (``<=`` works too).

    Raises:
        ValueError: unknown metric, other operator, or a threshold of the wrong form; the
            message names the bad part.
    """
    m = _GATE.match(text)
    if m is None:
        raise ValueError(f"bad gate {text!r}: use METRIC<THRESHOLD, e.g. 'failures<2%'")
    metric, op, raw = m.groups()
    if metric not in METRICS:
        known = ", ".join(METRICS)
        raise ValueError(f"bad gate {text!r}: unknown metric {metric!r} (one of {known})")
    if op not in ("<", "<="):
        raise ValueError(f"bad gate {text!r}: operator {op!r}; a gate is an upper bound, < or <=")
    if metric == "label_shift":
        n = _NUMBER.match(raw)
        if n is None or float(n.group(1)) > 1:
            raise ValueError(f"bad gate {text!r}: label_shift takes a distance 0..1, e.g. 0.2")
        return Gate(metric=metric, op=op, threshold=float(n.group(1)), threshold_text=raw)
    p = _SIGNED_PCT.match(raw)
    if p is None:
        raise ValueError(f"bad gate {text!r}: {metric} takes a percentage, e.g. {metric}<10%")
    sign, digits = p.groups()
    if sign and metric != "p95_latency":
        raise ValueError(f"bad gate {text!r}: only p95_latency takes a signed change like +20%")
    value = float(digits) / 100 * (-1 if sign == "-" else 1)
    if metric in ("failures", "error_rate", "fps_drop") and value > 1:
        raise ValueError(f"bad gate {text!r}: {metric} is a share, at most 100%")
    return Gate(metric=metric, op=op, threshold=value, threshold_text=raw)


@dataclass(frozen=True)
class GateResult:
    """The outcome of one gate.

    Attributes:
        name: the gate, e.g. ``p95_latency<+20%``.
        ok: whether it passed.
        value: what was measured (a fraction for shares and changes), None without data.
        threshold: the gate's bound (a fraction).
        detail: one line with the numbers behind it.
    """

    name: str
    ok: bool
    value: float | None
    threshold: float
    detail: str


@dataclass(frozen=True)
class Evidence:
    """What the gates of one stage are judged on.

    Attributes:
        new: the version being rolled out (a configuration's name for a config rollout).
        stage_devices: devices selected at this stage (the ``failures`` denominator).
        failed: ``device/pipeline: why`` for each of them whose update failed.
        canaries: (device, metrics) of selected pipelines, metrics on the new version.
        baseline: (device, metrics) of targeted, unselected pipelines on a previous version.
        before: (device, metrics) of the canaries on their previous version, pre-update.
    """

    new: ModelRef | str
    stage_devices: int
    failed: Sequence[str] = ()
    canaries: Sequence[tuple[str, PipelineMetrics]] = ()
    baseline: Sequence[tuple[str, PipelineMetrics]] = ()
    before: Sequence[tuple[str, PipelineMetrics]] = field(default_factory=tuple)


def _holds(gate: Gate, value: float) -> bool:
    v = round(value, 9)
    return v < gate.threshold - _EPS if gate.op == "<" else v <= gate.threshold + _EPS


def _cmp(gate: Gate, ok: bool, value: float) -> str:
    if ok:
        return gate.op
    return ">" if round(value, 9) > gate.threshold + _EPS else ">="


def _pct(v: float, signed: bool = False) -> str:
    return f"{v * 100:+.1f}%" if signed else f"{v * 100:.1f}%"


def _devices(rows: Sequence[tuple[str, PipelineMetrics]]) -> int:
    return len({d for d, _ in rows})


def _result(gate: Gate, value: float, shown: str, why: str) -> GateResult:
    ok = _holds(gate, value)
    detail = f"{gate.metric} {shown} {_cmp(gate, ok, value)} {gate.threshold_text} ({why})"
    return GateResult(gate.name, ok, value, gate.threshold, detail)


def _no_data(gate: Gate, why: str) -> GateResult:
    return GateResult(gate.name, True, None, gate.threshold, f"{gate.metric}: {why}; passes")


def _failures(gate: Gate, ev: Evidence) -> GateResult:
    if ev.stage_devices == 0:
        return _no_data(gate, "no devices in this stage")
    k = len(ev.failed)
    why = f"{k} of {ev.stage_devices} stage devices failed"
    if ev.failed:
        shown = "; ".join(ev.failed[:5]) + ("; …" if k > 5 else "")
        why += f": {shown}"
    return _result(gate, k / ev.stage_devices, _pct(k / ev.stage_devices), why)


def _error_rate(gate: Gate, ev: Evidence) -> GateResult:
    frames = sum(m.frames for _, m in ev.canaries)
    errors = sum(m.errors for _, m in ev.canaries)
    if frames == 0:
        return _no_data(gate, f"no data: no frames on {ev.new} yet")
    why = f"{errors} errors in {frames} frames on {ev.new}, {_devices(ev.canaries)} devices"
    return _result(gate, errors / frames, _pct(errors / frames), why)


def _relative(
    gate: Gate,
    ev: Evidence,
    pick: Callable[[PipelineMetrics], float | None],
    unit: str,
    change: Callable[[float, float], float],
    signed: bool,
) -> GateResult:
    """A gate on ``change(canary median, baseline median)`` of one metric."""
    canary = [(d, v) for d, m in ev.canaries if (v := pick(m)) is not None]
    if not canary:
        return _no_data(gate, f"no data: no {unit} figures on {ev.new} yet")
    c = statistics.median(v for _, v in canary)
    base = [(d, v) for d, m in ev.baseline if (v := pick(m)) is not None]
    own = [(d, v) for d, m in ev.before if (v := pick(m)) is not None]
    nc = len({d for d, _ in canary})
    if base and (b := statistics.median(v for _, v in base)) > 0:
        nb = len({d for d, _ in base})
        why = f"canaries {c:.1f} {unit} vs baseline {b:.1f} {unit}, {nc} vs {nb} devices"
    elif own and (b := statistics.median(v for _, v in own)) > 0:
        why = f"canaries {c:.1f} {unit} vs {b:.1f} {unit} on their previous version, {nc} devices"
    else:
        return _no_data(
            gate, "no baseline (no device left on the previous version, no pre-update figures)"
        )
    value = change(c, b)
    return _result(gate, value, _pct(value, signed), why)


def _label_counts(rows: Sequence[tuple[str, PipelineMetrics]]) -> Counter[str]:
    total: Counter[str] = Counter()
    for _, m in rows:
        total.update({k: v for k, v in m.top1.items() if v > 0})
    return total


def total_variation(p: Mapping[str, int], q: Mapping[str, int]) -> float:
    """½·Σ|p−q| of two label-count tables normalized to distributions (0 identical, 1 disjoint).

    Raises:
        ValueError: a table sums to zero.
    """
    sp, sq = sum(p.values()), sum(q.values())
    if sp <= 0 or sq <= 0:
        raise ValueError("total variation of an empty distribution")
    return 0.5 * sum(abs(p.get(k, 0) / sp - q.get(k, 0) / sq) for k in set(p) | set(q))


def _label_shift(gate: Gate, ev: Evidence) -> GateResult:
    c = _label_counts(ev.canaries)
    if not c:
        return _no_data(gate, f"no data: no top-1 labels on {ev.new} (not a classifier?)")
    base, what = _label_counts(ev.baseline), "baseline"
    if not base:
        base, what = _label_counts(ev.before), "their previous version"
    if not base:
        return _no_data(gate, "no baseline (no labels from the previous version)")
    tv = total_variation(c, base)
    sc, sb = sum(c.values()), sum(base.values())
    top = max(sorted(set(c) | set(base)), key=lambda k: abs(c[k] / sc - base[k] / sb))
    why = (
        f"canaries vs {what}: {sc} vs {sb} labels; biggest change {top!r} "
        f"{_pct(base[top] / sb)} → {_pct(c[top] / sc)}"
    )
    return _result(gate, tv, f"{tv:.3f}", why)


def evaluate(gate: Gate, ev: Evidence) -> GateResult:
    """Measure ``gate`` on ``ev`` (see the module docstring for each metric)."""
    if gate.metric == "failures":
        return _failures(gate, ev)
    if gate.metric == "error_rate":
        return _error_rate(gate, ev)
    if gate.metric == "p95_latency":
        return _relative(gate, ev, lambda m: m.p95_ms, "ms", lambda c, b: c / b - 1, True)
    if gate.metric == "fps_drop":
        return _relative(gate, ev, lambda m: m.fps, "fps", lambda c, b: 1 - c / b, False)
    return _label_shift(gate, ev)


def evaluate_all(gates: Sequence[Gate], ev: Evidence) -> list[GateResult]:
    """Every gate on the same evidence, in order."""
    return [evaluate(g, ev) for g in gates]


__all__ = [
    "METRICS",
    "Evidence",
    "Gate",
    "GateResult",
    "Metric",
    "evaluate",
    "evaluate_all",
    "parse_gate",
    "total_variation",
]
