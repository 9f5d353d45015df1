"""Adapter: model delivery wired for one device — chunk client → MQTT fetcher → TUF client →
model store and update manager, over the device's MQTT session.

The agent (``agent.service.Agent``) and the fleet simulator's devices wire delivery the same
way; what differs is passed in: how a delivered model is opened, where the reported state
goes, the wall clock and the storage policy.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.common.interrupt import Interrupt
from agent.common.window import parse_windows
from agent.config import StorageConfig, UpdateConfig
from agent.pipeline.runner import Pipeline
from agent.profiles import DeviceProfile
from agent.protocol.state import ConfigReport, ConfigTarget, ReportedState
from agent.testhooks import NO_HOOKS, TestHooks
from agent.update.health import Lock
from agent.update.machine import HealthWindow
from agent.update.manager import OpenModel, UpdateManager, utcnow
from agent.update.store import ModelStore
from agent.update.transfer.client import ChunkClient
from agent.update.transfer.tuf_fetcher import MqttFetcher
from agent.update.tuf_client import TufClient

if TYPE_CHECKING:
    from agent.sync.session import DeviceSession


@dataclass
class Delivery:
    """One device's delivery parts. ``updates`` is neither recovered nor started yet
    (``recover()``, then ``start()``); ``chunks`` polls its interrupt, so stopping the
    manager, a newer desired state or an operator's cancel ends a running transfer (the
    partial download is kept)."""

    chunks: ChunkClient
    tuf: TufClient
    updates: UpdateManager


def wire_delivery(
    session: DeviceSession,
    *,
    device_id: str,
    topic_root: str,
    data_dir: Path,
    trust_root: Path,
    update: UpdateConfig,
    profile: DeviceProfile,
    pipelines: dict[str, Pipeline],
    open_model: OpenModel,
    publish_reported: Callable[[ReportedState], None],
    wall: Callable[[], datetime] | None = None,
    storage: StorageConfig | None = None,
    hooks: TestHooks = NO_HOOKS,
    apply_config: Callable[[ConfigTarget, int], None] | None = None,
    config_report: Callable[[], ConfigReport | None] | None = None,
    pipelines_lock: Lock | None = None,
) -> Delivery:
    """The chunk client on ``session``'s MQTT client (resubscribed on each connect), its
    fetcher under a TUF client on ``data_dir``, the model store and the update manager.

    Args:
        session: the device's MQTT session (its client and ``on_connected`` hooks are used).
        device_id: the device's id.
        topic_root: the MQTT topic root (``[broker] topic_root``).
        data_dir: the device's data dir (``tuf/``, ``models/``, ``engines/`` under it).
        trust_root: the provisioned TUF ``root.json``.
        update: chunking, retries and the health window (``[update]``).
        profile: the device profile the model cards are checked against.
        pipelines: pipeline name → pipeline the manager swaps models into.
        open_model: opens a delivered ``model.onnx`` (build progress to its callback).
        publish_reported: where the reported state goes.
        wall: the wall clock for metadata expiry and update records (default: the system's).
        storage: engines kept and the storage budget (``[storage]``); none: neither.
        hooks: test-only hooks for the update manager.
        apply_config: applies a desired state's pipeline configuration (remote config).
        config_report: the configuration part of the reported state.
        pipelines_lock: held by whoever restarts ``pipelines``; model swaps take it too.
    """
    stop_updates = threading.Event()
    # the transfer's stop flag: the agent stopping, a newer desired state, an operator's cancel
    interrupt = Interrupt(stop_updates)
    chunks = ChunkClient(
        session.client,
        device_id,
        root=topic_root,
        chunk_size=update.chunk_kb * 1024,
        window=update.window,
        request_timeout_s=update.request_timeout_s,
        stop_event=interrupt,
    )
    session.on_connected.append(chunks.resubscribe)
    fetcher = MqttFetcher(chunks, resume_dir=data_dir / "tuf" / "partial")
    tuf = TufClient(data_dir, trust_root, fetcher, clock=wall)
    updates = UpdateManager(
        device_id=device_id,
        profile=profile,
        pipelines=pipelines,
        store=ModelStore(data_dir),
        tuf=tuf,
        open_model=open_model,
        publish_reported=publish_reported,
        retry_s=update.retry_s,
        max_tries=update.max_tries,
        wall=wall or utcnow,
        prune_engines=_engine_pruner(data_dir / "engines", storage.keep_engines)
        if storage is not None
        else None,
        storage_budget_mb=storage.max_mb if storage is not None else None,
        stop_event=stop_updates,
        interrupt=interrupt,
        windows=parse_windows(update.maintenance_window) if update.maintenance_window else (),
        hooks=hooks,
        apply_config=apply_config,
        config_report=config_report,
        health=lambda: health_window(update),
        pipelines_lock=pipelines_lock,
    )
    return Delivery(chunks, tuf, updates)


def health_window(update: UpdateConfig) -> HealthWindow:
    """A new health window from ``[update]``."""
    return HealthWindow(
        duration_s=update.health_window_s,
        min_frames=update.health_min_frames,
        max_error_rate=update.max_error_rate,
        max_latency_ratio=update.max_latency_ratio,
    )


def _engine_pruner(engines_dir: Path, keep: int) -> Callable[[], int]:
    """Prunes the engine cache to the ``keep`` most recently used entries (and temporaries
    older than an hour); returns how many entries went."""

    def prune_engines() -> int:
        from agent.engine.cache import EngineCache

        removed = EngineCache(engines_dir).prune(keep=keep, temp_max_age_s=3600.0)
        return len(removed)

    return prune_engines
