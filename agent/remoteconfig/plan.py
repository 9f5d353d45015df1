"""Pure: a remote pipeline configuration — parse, validate, find its secrets, diff.

A ``ConfigTarget.document`` is JSON text ``{"pipelines": [...]}``. It is validated as the
local file's ``[[pipelines]]`` would be: the whole ``AgentConfig`` is rebuilt from the local
one with only ``pipelines`` replaced, so every cross-check of the file (unique names,
``max_fps`` against ``[service] stall_s``, clips against the source…) applies, and nothing
else of the local file (data dir, trust root, broker, API, engine, service) can come from
the cloud.

``diff_pipelines(old, new)`` says per pipeline what applying the new configuration takes:

* ``unchanged``: the running ``Pipeline`` is left alone (frames continue).
* ``in_place``: only settings the runner reads between frames changed (``IN_PLACE_FIELDS``:
  events and snapshots policy, ``max_fps``, motion gating, tracking thresholds, zones and
  lines); applied to the running pipeline, the source stays open.
* ``restart``: anything else (source, model, task, input size, loop, pace, sink, clips…):
  only that pipeline is stopped and started again with the new configuration.
* ``add`` / ``remove``: a pipeline the new configuration adds or drops.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

from agent.common.errors import BadDataError, ConfigError
from agent.config import AgentConfig, parse_config
from agent.pipeline.config import PipelineConfig
from agent.protocol.sealed import is_sealed, redact

__all__ = [
    "IN_PLACE_FIELDS",
    "Change",
    "ConfigInvalid",
    "ConfigPlan",
    "PipelineChange",
    "diff_pipelines",
    "mask_secrets",
    "parse_document",
    "sealed_paths",
    "validate_pipelines",
]

# Settings the runner takes between two frames without reopening the source: the event and
# snapshot sinks' policy, the frame gate (max_fps, motion) and the analytics (tracker
# thresholds, zones and lines). Everything else of a [[pipelines]] table needs a restart.
IN_PLACE_FIELDS = frozenset(
    {"events", "snapshots", "max_fps", "motion", "tracking", "zones", "lines"}
)


class ConfigInvalid(BadDataError):
    """A remote configuration that cannot run (not JSON, wrong shape, does not validate, a
    sealed value that does not open). Nothing was changed."""


class Change(str, Enum):
    UNCHANGED = "unchanged"
    IN_PLACE = "in_place"
    RESTART = "restart"
    ADD = "add"
    REMOVE = "remove"


@dataclass(frozen=True)
class PipelineChange:
    """What one pipeline needs; ``fields`` are the top-level settings that differ."""

    name: str
    change: Change
    old: PipelineConfig | None
    new: PipelineConfig | None
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConfigPlan:
    """Per pipeline (the new order first, then those removed) what applying takes."""

    changes: tuple[PipelineChange, ...]

    def of(self, *kinds: Change) -> list[PipelineChange]:
        return [c for c in self.changes if c.change in kinds]

    @property
    def empty(self) -> bool:
        return not self.of(Change.IN_PLACE, Change.RESTART, Change.ADD, Change.REMOVE)

    def summary(self) -> str:
        """e.g. ``restart cam1 (source); in place cam2 (tracking); add cam3``."""
        words = {Change.IN_PLACE: "in place", Change.RESTART: "restart", Change.ADD: "add",
                 Change.REMOVE: "remove"}  # fmt: skip
        parts = []
        for c in self.changes:
            if c.change is Change.UNCHANGED:
                continue
            why = f" ({', '.join(c.fields)})" if c.fields else ""
            parts.append(f"{words[c.change]} {c.name}{why}")
        return "; ".join(parts) or "no change"


def parse_document(document: str) -> list[Any]:
    """The ``pipelines`` list of a configuration document (not yet validated).

    Raises:
        ConfigInvalid: not JSON, or not an object holding only a ``pipelines`` list.
    """
    try:
        doc = json.loads(document)
    except ValueError as e:
        raise ConfigInvalid(f"configuration is not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("pipelines"), list):
        raise ConfigInvalid('configuration must be a JSON object {"pipelines": [...]}')
    other = sorted(set(doc) - {"pipelines"})
    if other:
        raise ConfigInvalid(
            f"configuration may hold only 'pipelines'; {other} stay in the device's local file"
        )
    pipelines: list[Any] = doc["pipelines"]
    return pipelines


def validate_pipelines(local: AgentConfig, pipelines: list[Any]) -> AgentConfig:
    """The local configuration with its pipelines replaced, validated as a whole.

    Raises:
        ConfigInvalid: the tables do not validate (the message names the field).
    """
    data = local.model_dump(exclude={"pipelines"})
    try:
        return parse_config({**data, "pipelines": pipelines}, path="remote configuration")
    except ConfigError as e:
        raise ConfigInvalid(str(e)) from e


def sealed_paths(obj: Any, path: str = "") -> list[str]:
    """Where ``obj`` (a JSON-like tree) holds sealed strings, e.g. ``[0].source``."""
    if is_sealed(obj):
        return [path or "<root>"]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in sealed_paths(v, f"{path}.{k}")]
    if isinstance(obj, list):
        return [p for i, v in enumerate(obj) for p in sealed_paths(v, f"{path}[{i}]")]
    return []


def mask_secrets(text: str, secrets: Sequence[str]) -> str:
    """``text`` with every secret replaced by ``***`` and then ``redact``-ed (URL passwords,
    sealed tokens): safe for logs and the reported state."""
    for s in sorted(secrets, key=len, reverse=True):
        if s:
            text = text.replace(s, "***")
    return redact(text)


def _differing(old: PipelineConfig, new: PipelineConfig) -> tuple[str, ...]:
    a, b = old.model_dump(), new.model_dump()
    return tuple(k for k in b if a.get(k) != b.get(k))


def diff_pipelines(old: Sequence[PipelineConfig], new: Sequence[PipelineConfig]) -> ConfigPlan:
    """What taking the running pipelines ``old`` to ``new`` takes, per pipeline name."""
    before = {p.name: p for p in old}
    changes: list[PipelineChange] = []
    for p in new:
        prev = before.get(p.name)
        if prev is None:
            changes.append(PipelineChange(p.name, Change.ADD, None, p))
            continue
        fields = _differing(prev, p)
        if not fields:
            kind = Change.UNCHANGED
        elif set(fields) <= IN_PLACE_FIELDS:
            kind = Change.IN_PLACE
        else:
            kind = Change.RESTART
        changes.append(PipelineChange(p.name, kind, prev, p, fields))
    names = {p.name for p in new}
    changes += [PipelineChange(p.name, Change.REMOVE, p, None) for p in old if p.name not in names]
    return ConfigPlan(tuple(changes))
