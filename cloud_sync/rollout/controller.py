"""Adapter: the rollout controller — database + broker around the pure ``decide``.

Each ``tick(now)``, for every running or paused rollout (oldest first): read its row, build
the ``FleetSnapshot`` over the soak window (or the last ``lookback_s`` before a soak; without
telemetry while a stage installs, when ``plan.needs_metrics`` says the decision cannot use
it), work out which ``(device, pipeline)`` pairs other active rollouts hold, ``decide``, publish the
``Deploy``/``Revert`` actions as signed desired states over one MQTT connection, log the
``Log`` lines, and only then save the new state (``rev``-checked).

Crash safety: the state is saved after the publish, so a crash in between makes the next tick
decide the same actions again and publish them again. That is harmless: the agent skips a
target it has committed, is installing, or has rejected (``update.machine.should_attempt``),
so a new revision with the same targets starts nothing. A transport error leaves the state
unsaved and the next tick retries; a ``ConcurrentUpdate`` (an operator command in between)
drops this decision and the next tick decides from the fresh row.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from agent.common.errors import BadDataError, EdgefleetError, TransportError
from agent.protocol.state import ConfigTarget, PipelineTarget
from agent.protocol.topics import DEFAULT_ROOT
from cloud_sync.deploy import DesiredPublisher
from cloud_sync.ingest.db import StoreUnavailable
from cloud_sync.ingest.store import Store
from cloud_sync.registry.keys import RegistryError
from cloud_sync.registry.repo import Repository
from cloud_sync.rollout import db
from cloud_sync.rollout.commands import abort, pause, promote, resume
from cloud_sync.rollout.lease_db import ControllerLease, LeaseLost
from cloud_sync.rollout.plan import decide, needs_metrics
from cloud_sync.rollout.snapshot import SnapshotReader
from cloud_sync.rollout.state import (
    Action,
    Decision,
    Deploy,
    Log,
    Revert,
    RolloutSpec,
    RolloutState,
    SetConfig,
)

log = logging.getLogger(__name__)

Changes = dict[str, dict[str, PipelineTarget]]


@dataclass(frozen=True)
class TickResult:
    """What one tick did to one rollout.

    Attributes:
        rollout_id: the rollout.
        row: the row after the tick (unchanged when nothing was saved).
        published: desired states sent (one per device).
        saved: whether a new state was stored.
        error: why the tick stopped early (transport, concurrent update), else None.
    """

    rollout_id: str
    row: db.RolloutRow
    published: int = 0
    saved: bool = False
    error: str | None = None


def busy_pairs(rows: Iterable[db.RolloutRow], exclude: str) -> frozenset[tuple[str, str]]:
    """Pure: the ``(device, pipeline)`` pairs active rollouts other than ``exclude`` hold."""
    return frozenset(
        (device_id, name)
        for row in rows
        if row.id != exclude and row.state.status in ("running", "paused")
        for device_id, rec in row.state.devices.items()
        for name in rec.pipelines
    )


def changes_of(actions: Iterable[Action]) -> Changes:
    """Pure: ``Deploy``/``Revert`` actions grouped per device (one desired state each)."""
    out: Changes = {}
    for a in actions:
        if isinstance(a, (Deploy, Revert)):
            target = PipelineTarget(model=a.model, version=a.version)
            out.setdefault(a.device_id, {})[a.pipeline] = target
    return out


def configs_of(spec: RolloutSpec, actions: Iterable[Action]) -> dict[str, ConfigTarget]:
    """Pure: the configuration each ``SetConfig`` sends (the spec holds the documents)."""
    if spec.config is None:
        return {}
    return {
        a.device_id: spec.config.target_for(a.device_id)
        for a in actions
        if isinstance(a, SetConfig)
    }


class RolloutController:
    """Drives the rollouts recorded in the ingest database."""

    def __init__(
        self,
        store: Store,
        repo_dir: Path,
        broker_url: str,
        *,
        topic_root: str = DEFAULT_ROOT,
        lookback_s: float = 300.0,
        on_log: Callable[[str], None] | None = None,
        lease: ControllerLease | None = None,
    ) -> None:
        """Args:
        store: the ingest store (devices, reported state, telemetry, rollouts).
        repo_dir: the registry (desired-state key, targets, desired records).
        broker_url: ``mqtt://host:port``.
        topic_root: the topic root devices use.
        lookback_s: the metrics window before a soak has started.
        on_log: also called with each ``Log`` line (e.g. the CLI prints them).
        lease: when given, publish only after ``lease.confirm()`` and save fenced by it
            (``leader.py`` runs ticks only while it is held).
        """
        self.store = store
        self.repo_dir = Path(repo_dir)
        self.broker_url = broker_url
        self.topic_root = topic_root
        self.lookback_s = lookback_s
        self.on_log = on_log
        self.lease = lease
        self.reader = SnapshotReader(store)
        self._publisher: DesiredPublisher | None = None
        self._rows: dict[str, db.RolloutRow] = {}  # by id: parsed once per revision

    # --- broker --------------------------------------------------------------------------

    def _connected(self) -> DesiredPublisher:
        if self._publisher is None:
            pub = DesiredPublisher(self.repo_dir, self.broker_url, topic_root=self.topic_root)
            pub.connect()
            self._publisher = pub
        return self._publisher

    def close(self) -> None:
        """Disconnect from the broker (the store is the caller's)."""
        pub, self._publisher = self._publisher, None
        if pub is not None:
            pub.close()

    def publish(
        self, changes: Changes, now: datetime, configs: Mapping[str, ConfigTarget] | None = None
    ) -> int:
        """Send the desired states (model targets, configurations); returns how many.

        Raises:
            TransportError: the broker is unreachable or did not acknowledge (disconnects, so
                the next call connects afresh).
            RegistryError: a target is not in the registry.
        """
        if not changes and not configs:
            return 0
        try:
            return len(self._connected().publish(changes, now=now, configs=configs))
        except TransportError:
            self.close()
            raise

    # --- one rollout ---------------------------------------------------------------------

    def _window(self, state: RolloutState, now: datetime) -> datetime:
        if state.soak_started_at is not None and state.soak_started_at <= now:
            return state.soak_started_at
        return now - timedelta(seconds=self.lookback_s)

    def _emit(self, actions: Iterable[Action]) -> None:
        for a in actions:
            if isinstance(a, Log):
                log.info("%s", a.message)
                if self.on_log is not None:
                    self.on_log(a.message)

    def _publishable(self, actions: tuple[Action, ...]) -> Changes:
        """Changes to send; Reverts to a version the registry does not hold are left out
        (the device could not fetch it) and logged."""
        known = Repository(self.repo_dir).targets()
        keep: list[Action] = []
        for a in actions:
            if isinstance(a, Revert) and f"models/{a.model}/{a.version}/model.onnx" not in known:
                msg = (
                    f"{a.device_id}/{a.pipeline}: cannot revert to {a.model}@{a.version}, not "
                    "in the registry; left on the new version"
                )
                log.warning("%s", msg)
                if self.on_log is not None:
                    self.on_log(msg)
                continue
            keep.append(a)
        return changes_of(keep)

    def apply(self, row: db.RolloutRow, decision: Decision, now: datetime) -> TickResult:
        """Publish the decision's desired states, then save its state (rev-checked).

        Raises:
            TransportError: publishing failed; nothing saved.
            ConcurrentUpdate: the row changed since it was read; nothing saved.
            LeaseLost: this controller's lease is gone; nothing published or saved.
        """
        if decision.new_state == row.state and not decision.actions:
            return TickResult(row.id, row)
        changes = self._publishable(decision.actions)
        configs = configs_of(row.spec, decision.actions)
        if changes or configs:
            rev, _status = db.head(self.store, row.id)  # narrow the race with operator commands
            if rev != row.rev:
                raise db.ConcurrentUpdate(row.id, row.rev, rev)
            if self.lease is not None:
                self.lease.confirm()  # LeaseLost: another controller may act now; send nothing
        published = self.publish(changes, now, configs)
        fence = None if self.lease is None else self.lease.fence
        saved = db.save(self.store, row, decision.new_state, now, fence=fence)
        self._emit(decision.actions)
        return TickResult(row.id, saved, published=published, saved=True)

    def step(
        self, row: db.RolloutRow, others: Iterable[db.RolloutRow], now: datetime
    ) -> TickResult:
        """One decision for ``row``; errors that a later tick may fix are returned, not raised."""
        try:
            fleet = self.reader.read(
                self._window(row.state, now), now, metrics=needs_metrics(row.spec, row.state)
            )
            decision = decide(row.spec, row.state, fleet, now, busy_pairs(others, row.id))
            try:
                return self.apply(row, decision, now)
            except RegistryError as e:
                # the version left the registry: pause rather than retry forever
                paused = pause(row.state, now, why=f"cannot publish: {e}")
                return self.apply(row, paused, now)
        except LeaseLost:
            raise  # not this rollout's trouble: the whole controller stops acting
        except (TransportError, db.ConcurrentUpdate) as e:
            log.warning("rollout %s: %s; retrying next tick", row.id, e)
            return TickResult(row.id, row, error=str(e))

    def tick(self, now: datetime | None = None, only: str | None = None) -> list[TickResult]:
        """Move every active rollout (or only ``only``) on; oldest rollouts choose first.

        Raises:
            StoreUnavailable: the database cannot be read.
            LeaseLost: the controller's lease is gone (the rest of the tick is not done).
        """
        now = now or datetime.now(timezone.utc)
        rows = db.list_rollouts(self.store, active_only=True, known=self._rows)
        rows.sort(key=lambda r: r.created_at)
        current: dict[str, db.RolloutRow] = {r.id: r for r in rows}
        results = []
        for r in rows:
            if only is not None and r.id != only:
                continue
            res = self.step(r, current.values(), now)
            current[r.id] = res.row
            results.append(res)
        self._rows = current  # the next tick parses only rows changed by someone else
        return results

    def run(self, stop: threading.Event, every_s: float = 5.0) -> None:
        """Tick every ``every_s`` seconds until ``stop`` is set; database and broker trouble
        is logged and retried on the next tick. Takes no lease: ``edgefleet rollout
        controller`` runs ``leader.LeasedController.run`` (one active controller)."""
        while not stop.is_set():
            try:
                self.tick()
            except StoreUnavailable as e:
                log.warning("rollout controller: %s; retrying in %gs", e, every_s)
            except EdgefleetError as e:  # e.g. a registry that cannot be read: keep going
                log.error("rollout controller: %s; retrying in %gs", e, every_s)
            stop.wait(every_s)
        self.close()

    # --- operator commands ---------------------------------------------------------------

    def command(
        self, rollout_id: str, name: str, now: datetime | None = None, why: str = "operator"
    ) -> db.RolloutRow:
        """Apply ``pause``/``resume``/``promote``/``abort`` (abort publishes its Reverts).

        Raises:
            RolloutNotFound: unknown id.
            BadDataError: the command is not allowed in the rollout's status.
            TransportError: abort could not publish (nothing saved; run it again).
            ConcurrentUpdate: the rollout changed meanwhile (run it again).
        """
        now = now or datetime.now(timezone.utc)
        row = db.get(self.store, rollout_id)
        try:
            decision = COMMANDS[name](row, now, why)
        except ValueError as e:
            raise BadDataError(f"rollout {rollout_id}: {e}") from e
        res = self.apply(row, decision, now)
        return res.row


COMMANDS: Mapping[str, Callable[[db.RolloutRow, datetime, str], Decision]] = {
    "pause": lambda r, now, why: pause(r.state, now, why),
    "resume": lambda r, now, why: resume(r.state, now, why),
    "promote": lambda r, now, why: promote(r.state, now, why),
    "abort": lambda r, now, why: abort(r.spec, r.state, now, why),
}


__all__ = [
    "COMMANDS",
    "RolloutController",
    "TickResult",
    "busy_pairs",
    "changes_of",
    "configs_of",
]
