"""Pure: staged rollouts of a model version or a pipeline configuration across the fleet (no
I/O, ``now`` passed in).

* ``target``: ``parse_target("group:lobby & !tag:site=berlin")`` → ``Target.matches(device)``.
* ``stages``: ``parse_stage("5%")``, deterministic, prefix-stable choice of devices.
* ``gates``: ``parse_gate("p95_latency<+20%")``, ``evaluate`` → ``GateResult`` with numbers.
* ``fleet``: ``FleetSnapshot`` of ``DeviceView``s, what the decision looks at.
* ``state``: ``RolloutSpec``, ``RolloutState`` and the actions ``Deploy``, ``Revert``,
  ``SetConfig``, ``Log``.
* ``configdoc``: the ``[[pipelines]]`` a configuration rollout carries (``RolloutConfig``);
  ``plan_config``: what its decisions do differently.
* ``plan``: ``decide(spec, state, fleet, now, busy)`` → ``Decision(actions, new_state)``.
* ``commands``: ``start``, ``pause``, ``resume``, ``promote``, ``abort``.
"""

from __future__ import annotations

from cloud_sync.rollout.commands import abort, pause, promote, resume, start
from cloud_sync.rollout.fleet import (
    DeviceView,
    FleetSnapshot,
    ModelRef,
    PipelineMetrics,
    PipelineView,
)
from cloud_sync.rollout.gates import Evidence, Gate, GateResult, evaluate, parse_gate
from cloud_sync.rollout.plan import decide, needs_metrics
from cloud_sync.rollout.stages import Stage, normalize_stages, parse_stage, selection_order
from cloud_sync.rollout.state import (
    Action,
    Decision,
    Deploy,
    DeviceRecord,
    Log,
    PipelineRecord,
    Revert,
    RolloutEvent,
    RolloutSpec,
    RolloutState,
    SetConfig,
)
from cloud_sync.rollout.target import Target, parse_target

__all__ = [
    "Action",
    "Decision",
    "Deploy",
    "DeviceRecord",
    "DeviceView",
    "Evidence",
    "FleetSnapshot",
    "Gate",
    "GateResult",
    "Log",
    "ModelRef",
    "PipelineMetrics",
    "PipelineRecord",
    "PipelineView",
    "Revert",
    "RolloutEvent",
    "RolloutSpec",
    "RolloutState",
    "SetConfig",
    "Stage",
    "Target",
    "abort",
    "decide",
    "evaluate",
    "needs_metrics",
    "normalize_stages",
    "parse_gate",
    "parse_stage",
    "parse_target",
    "pause",
    "promote",
    "resume",
    "selection_order",
    "start",
]
