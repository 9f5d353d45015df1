"""Pure: the parts of ``plan.decide`` that differ for a configuration rollout.

A configuration rollout updates one thing per device — its pipeline configuration — kept as
the single entry ``CONFIG_KEY`` of the device's record, so selection, stages, the concurrency
cap, settling, soaks, gates and pause/resume are the model rollout's own. What differs:

* **scope**: a device is eligible when its agent speaks contract 1.3 or later (an older one
  would refuse a desired state carrying ``config`` and never answer, holding the stage up),
  the rollout can send it its document (with secrets: they were sealed for it at start) and
  no other configuration rollout holds it;
* **tracking**: committed when the device reports ``config.hash`` equal to the hash of the
  document sent to it with status ``applied``; failed when it reports that hash as the target
  of an attempt ``rejected`` or ``rolled_back`` (the reason is kept for ``rollout status``);
* **evidence**: the canaries' figures are those of every pipeline of a device that applied
  the configuration (the window starts at the soak, after it applied); the baseline is the
  targeted devices not selected.
* **no revert**: a device keeps its last good configuration by itself (``rejected`` never
  applies, ``rolled_back`` restores the previous one); abort stops sending.
"""

from __future__ import annotations

from collections.abc import Iterable
from collections.abc import Set as AbstractSet

from agent.protocol.state import ConfigStatus, contract_at_least
from cloud_sync.rollout.configdoc import CONFIG_KEY, RolloutConfig, short_hash
from cloud_sync.rollout.fleet import DeviceView, FleetSnapshot, PipelineMetrics
from cloud_sync.rollout.gates import Evidence
from cloud_sync.rollout.state import DeviceRecord, PipelineRecord
from cloud_sync.rollout.target import Target

_FAILED = frozenset({ConfigStatus.REJECTED.value, ConfigStatus.ROLLED_BACK.value})
CONFIG_CONTRACT = (1, 3)  # the first contract with desired 'config'


def speaks_config(contract: str | None) -> bool:
    """Whether an agent of ``contract`` takes a desired ``config`` (unknown: assumed so)."""
    return contract is None or contract_at_least(contract, CONFIG_CONTRACT)


def scope(config: RolloutConfig, view: DeviceView, busy: AbstractSet[tuple[str, str]]) -> list[str]:
    """``[CONFIG_KEY]`` when the rollout can update ``view``'s configuration, else ``[]``."""
    if not speaks_config(view.contract) or not config.covers(view.device_id):
        return []
    if (view.device_id, CONFIG_KEY) in busy:
        return []
    return [CONFIG_KEY]


def applied(config: RolloutConfig, view: DeviceView | None) -> bool:
    """Whether ``view`` runs, healthy, the document this rollout sends it."""
    c = view.config if view is not None else None
    sent = config.hash_for(view.device_id) if view is not None else None
    return c is not None and c.hash == sent and c.status == ConfigStatus.APPLIED.value


def record(config: RolloutConfig, view: DeviceView) -> PipelineRecord:
    """The record of a newly selected device (already running it: committed, never sent)."""
    if applied(config, view):
        return PipelineRecord(outcome="committed")
    return PipelineRecord()


def _track(
    config: RolloutConfig, p: PipelineRecord, view: DeviceView
) -> tuple[PipelineRecord, str]:
    """An updating device's record from its report, and a failure line ('' when none)."""
    if p.outcome != "updating":
        return p, ""
    if applied(config, view):
        return p.model_copy(update={"outcome": "committed"}), ""
    c = view.config
    sent = config.hash_for(view.device_id)
    if c is not None and c.target_hash == sent and c.status in _FAILED:
        why = f"config {short_hash(sent)} {c.status}: {c.reason or 'no reason given'}"
        return p.model_copy(update={"outcome": "failed", "error": why[:600]}), why
    return p, ""


def refresh(
    config: RolloutConfig, devices: dict[str, DeviceRecord], fleet: FleetSnapshot
) -> tuple[dict[str, DeviceRecord], list[str]]:
    """The records after reading each updating device's report, and one line per failure."""
    out = dict(devices)
    lines: list[str] = []
    for device_id, rec in devices.items():
        view = fleet.get(device_id)
        p = rec.pipelines.get(CONFIG_KEY)
        if view is None or p is None:
            continue
        new, why = _track(config, p, view)
        if why:
            lines.append(f"{device_id}: {why}")
        if new != p:
            out[device_id] = rec.model_copy(update={"pipelines": {CONFIG_KEY: new}})
    return out, lines


def evidence(
    config: RolloutConfig,
    name: str,
    stage_records: list[DeviceRecord],
    devices: dict[str, DeviceRecord],
    fleet: FleetSnapshot,
    target: Target,
    busy: AbstractSet[tuple[str, str]],
) -> Evidence:
    """What the gates judge a configuration rollout's stage on (see the module docstring)."""
    failed = [
        f"{r.device_id} ({p.error})"
        for r in stage_records
        for p in r.pipelines.values()
        if p.outcome == "failed"
    ]
    canaries: list[tuple[str, PipelineMetrics]] = []
    for rec in devices.values():
        view = fleet.get(rec.device_id)
        if view is not None and rec.outcome == "committed":
            canaries.extend(_figures([view]))
    baseline = _figures(
        v
        for v in fleet
        if v.device_id not in devices and target.matches(v) and scope(config, v, busy)
    )
    return Evidence(name, len(stage_records), failed, canaries, baseline, ())


def _figures(views: Iterable[DeviceView]) -> list[tuple[str, PipelineMetrics]]:
    return [(v.device_id, p.metrics) for v in views for p in v.pipelines.values() if p.metrics]


__all__ = ["applied", "evidence", "record", "refresh", "scope", "speaks_config"]
