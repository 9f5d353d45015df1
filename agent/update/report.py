"""Pure: the reported state of the update manager — per pipeline its phase, active and target
model, build or download progress, and the newest error that concerns it."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime

from agent.models import BuildProgress
from agent.pipeline.runner import Pipeline
from agent.protocol.state import (
    ConfigReport,
    PipelineReport,
    Progress,
    ReportedState,
    UpdatePhase,
)
from agent.update.machine import UpdateState

# A step of opening a model: the engine build's progress, or words from a stand-in build
BuildStep = Callable[[BuildProgress], None]

# Errors of the whole device, reported on every pipeline (the newest error wins)
DEVICE_ERROR_KEYS = ("*", "storage", "clock")


class LastErrors(dict[str, str]):
    """Last error per key (a pipeline, or ``"*"``, ``"storage"``, ``"clock"`` for the whole
    device), remembering which was set most recently."""

    def __init__(self) -> None:
        super().__init__()
        self._order: dict[str, int] = {}
        self._n = 0

    def __setitem__(self, key: str, value: str) -> None:
        self._n += 1
        self._order[key] = self._n
        super().__setitem__(key, value)

    def newest(self, *keys: str) -> str | None:
        present = [k for k in keys if k in self]
        return self[max(present, key=lambda k: self._order.get(k, 0))] if present else None


def reported_state(
    device_id: str,
    pipelines: Mapping[str, Pipeline],
    state: UpdateState,
    errors: LastErrors,
    progress: Mapping[str, Progress],
    now: datetime,
    waiting: Mapping[str, str] | None = None,
    *,
    config: ConfigReport | None = None,
) -> ReportedState:
    """What the device reports: each pipeline's attempt (or running model), last error, what
    its update waits for (``waiting``), whether its source has ended, and the pipeline
    configuration running (``config``)."""
    reports = []
    # a copy taken at once: remote configuration may add or remove pipelines meanwhile
    for name, pipe in list(pipelines.items()):
        slot = state.pipelines.get(name)
        attempt = slot.attempt if slot else None
        model = pipe.model
        if attempt is not None:
            phase = attempt.phase
        elif model is not None:
            phase = UpdatePhase.COMMITTED
        else:
            phase = UpdatePhase.WAITING
        err = errors.newest(name, *DEVICE_ERROR_KEYS)
        reports.append(
            PipelineReport(
                name=name,
                phase=phase,
                active_model=model.card.name if model else None,
                active_version=model.card.version if model else None,
                backend=model.backend.info.name if model else None,
                precision=model.backend.info.precision if model else None,
                target_model=attempt.target.model if attempt else None,
                target_version=attempt.target.version if attempt else None,
                progress=progress.get(name),
                last_error=err[:2000] if err else None,
                updated_at=attempt.updated_at if attempt else now,
                waiting=(waiting or {}).get(name),
                source_ended=pipe.source_ended,
            )
        )
    return ReportedState(
        device_id=device_id,
        desired_revision=state.applied_revision,
        pipelines=reports,
        config=config,
    )


def build_percent(step: BuildProgress) -> int:
    """The percentage of an engine build step, for ``Progress``."""
    return round(step.fraction * 100)  # as f"{fraction:.0%}" rounds
