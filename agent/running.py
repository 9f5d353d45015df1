"""Adapter: the agent's running pipelines — built from their config, restarted one at a time,
changed in place between frames.

One ``RunningPipelines`` owns the list and the name → pipeline dict every part of the agent
shares (telemetry, status, the update manager, the local API), and each pipeline's config.
A restart stops the old ``Pipeline`` (its source is released first: a camera opens once),
starts a new one on the model the old one ran and moves the sinks other parts attached (the
local API's feed) over to it. In-place changes replace what the runner reads once per frame
(``gate``, ``analytics``, the ``sinks`` list) or, for tracker thresholds, update the tracker
under its lock: tracks already running keep their thresholds, new ones take the new.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.common.errors import EdgefleetError
from agent.pipeline.analytics import pipeline_options
from agent.pipeline.config import PipelineConfig
from agent.pipeline.gating import gate_from_config
from agent.pipeline.model import RunnableModel
from agent.pipeline.runner import Pipeline
from agent.pipeline.sinks import JsonlSink, Sink
from agent.pipeline.sources import parse_source

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CloudSinks:
    """Where a pipeline's events and snapshots go once the agent has a broker session."""

    device_id: str
    outbox: Any  # agent.telemetry.outbox.Outbox
    events_topic: str
    snapshots_topic: str


class RunningPipelines:
    """The pipelines of one agent, by name, with the config each runs."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.items: list[Pipeline] = []  # shared: telemetry, status, API read it live
        self.by_name: dict[str, Pipeline] = {}  # shared with the update manager
        self.configs: dict[str, PipelineConfig] = {}
        self.cloud: CloudSinks | None = None
        self.lock = threading.RLock()  # one change of the set at a time
        self.on_change: list[Callable[[], None]] = []
        self._own: dict[str, list[Sink]] = {}  # sinks built from a pipeline's config

    # --- building ---------------------------------------------------------------------------

    def _clips_for(self, p: PipelineConfig) -> Any:
        if p.clips is None:
            return None
        from agent.pipeline.clips import ClipRecorder

        c = p.clips
        return ClipRecorder(
            p.name, parse_source(p.source), self.data_dir / "clips" / p.name,
            pre_s=c.pre_s, post_s=c.post_s, max_s=c.max_s, max_mb=c.max_mb,
            segment_s=c.segment_s, loop=p.loop,
        )  # fmt: skip

    def cloud_sinks(self, p: PipelineConfig) -> list[Sink]:
        """The event and snapshot sinks of ``p`` (none before the broker session exists)."""
        cloud = self.cloud
        if cloud is None:
            return []
        from agent.telemetry.events import EventPolicy, MqttEventSink

        sinks: list[Sink] = []
        if p.events.policy != "off":
            policy = EventPolicy(p.events.policy, p.events.max_per_s)
            sinks.append(MqttEventSink(cloud.device_id, cloud.outbox, cloud.events_topic, policy))
        if p.snapshots is not None:
            from agent.telemetry.snapshots import SnapshotSink

            s = p.snapshots
            sinks.append(SnapshotSink(
                cloud.device_id, cloud.outbox, cloud.snapshots_topic,
                every_s=s.every_s, jpeg_quality=s.jpeg_quality, max_width=s.max_width,
            ))  # fmt: skip
        return sinks

    def build(self, p: PipelineConfig, model: RunnableModel | None) -> Pipeline:
        """A new (not started) pipeline for ``p`` on ``model``, with its config's sinks."""
        own: list[Sink] = []
        if p.sink.jsonl is not None:
            own.append(JsonlSink(p.sink.jsonl, max_bytes=p.sink.jsonl_max_mb << 20))
        own += self.cloud_sinks(p)
        pipe = Pipeline(
            p.name, parse_source(p.source), model, own,
            loop=p.loop, pace=p.pace, open_timeout_s=p.open_timeout_s,
            **pipeline_options(p),  # rate control, tracking, zones and lines
            clips=self._clips_for(p),
        )  # fmt: skip
        self._own[p.name] = list(own)
        return pipe

    def add(self, p: PipelineConfig, model: RunnableModel | None) -> Pipeline:
        """Build and register a pipeline (the caller starts it)."""
        with self.lock:
            if p.name in self.by_name:
                raise EdgefleetError(f"pipeline {p.name!r} exists already")
            pipe = self.build(p, model)
            self.items.append(pipe)
            self.by_name[p.name] = pipe
            self.configs[p.name] = p
        self._changed()
        return pipe

    def attach_cloud(self, cloud: CloudSinks) -> None:
        """The broker session exists: give every pipeline its event and snapshot sinks."""
        with self.lock:
            self.cloud = cloud
            for pipe in self.items:
                extra = self.cloud_sinks(self.configs[pipe.name])
                self._own[pipe.name] += extra
                pipe.sinks = [*pipe.sinks, *extra]

    def _changed(self) -> None:
        for fn in self.on_change:
            try:
                fn()
            except Exception:  # a listener must not break a restart
                log.exception("pipeline set listener failed")

    # --- changing ---------------------------------------------------------------------------

    def get(self, name: str) -> Pipeline:
        """Raises: EdgefleetError: no pipeline of that name."""
        pipe = self.by_name.get(name)
        if pipe is None:
            raise EdgefleetError(
                f"no pipeline named {name!r}; this device runs {sorted(self.by_name)}"
            )
        return pipe

    def restart(
        self, name: str, p: PipelineConfig, model: RunnableModel | None
    ) -> RunnableModel | None:
        """Stop pipeline ``name`` and start ``p`` in its place on ``model``; returns the model
        the old one ran (the caller decides whether it is still used).

        Raises:
            EdgefleetError: no pipeline of that name.
        """
        with self.lock:
            old = self.get(name)
            own = self._own.get(name, [])
            foreign = [s for s in old.sinks if all(s is not o for o in own)]
            old.sinks = list(own)  # closed with the old pipeline; the foreign ones move
            old.stop()
            new = self.build(p, model)
            new.sinks = [*new.sinks, *foreign]
            new.observer = old.observer  # a health window watching this pipeline follows it
            self.items[self.items.index(old)] = new
            self.by_name[name] = new
            self.configs[name] = p
            new.start()
            log.info("pipeline=%s restarted source=%s model=%s", name, new.source.display,
                     model.ref if model else None)  # fmt: skip
        self._changed()
        return old.model

    def remove(self, name: str) -> Pipeline:
        with self.lock:
            old = self.get(name)
            old.stop()
            self.items.remove(old)
            del self.by_name[name]
            del self.configs[name]
            self._own.pop(name, None)
        self._changed()
        log.info("pipeline=%s removed", name)
        return old

    def change_in_place(self, name: str, p: PipelineConfig) -> None:
        """Apply settings of ``IN_PLACE_FIELDS`` to the running pipeline between frames."""
        with self.lock:
            pipe = self.get(name)
            old = self.configs[name]
            if (old.max_fps, old.motion) != (p.max_fps, p.motion):
                pipe.gate = gate_from_config(p)
            if (old.tracking, old.zones, old.lines) != (p.tracking, p.zones, p.lines):
                self._analytics_in_place(pipe, old, p)
            if (old.events, old.snapshots) != (p.events, p.snapshots):
                own = self._own.get(name, [])
                fresh = self.cloud_sinks(p)
                keep = [s for s in own if isinstance(s, JsonlSink)]
                others = [s for s in pipe.sinks if all(s is not o for o in own)]
                self._own[name] = [*keep, *fresh]
                pipe.sinks = [*keep, *fresh, *others]  # the runner reads the list per frame
            self.configs[name] = p
        log.info("pipeline=%s changed in place", name)

    @staticmethod
    def _analytics_in_place(pipe: Pipeline, old: PipelineConfig, p: PipelineConfig) -> None:
        analytics = pipe.analytics
        if analytics is None or p.tracking is None:
            # tracking switched on or off: new analytics from the next frame
            pipe.analytics = pipeline_options(p)["analytics"]
            return
        regions = (old.zones, old.lines) != (p.zones, p.lines)
        analytics.retune(p.tracking, p.zones if regions else None, p.lines)
