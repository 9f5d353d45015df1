"""Adapter: applies a signed remote configuration to the running pipelines, watches it, keeps
or rolls it back, persists it and says how it went (``ConfigReport``).

Runs on the update manager's thread (``UpdateManager(apply_config=...)``), before the desired
state's model versions, so a pipeline the configuration adds exists when its model arrives.

1. Validate (``plan``): JSON, sealed values opened with the device's enrolled key
   (``[broker] key_file``), the whole ``AgentConfig`` with only its pipelines replaced.
   Invalid → ``rejected``, nothing changed.
2. Apply the diff: unchanged pipelines untouched, in-place changes between frames, restarts
   of only the pipelines that need one (on the model each was running, unless the config
   names another local ``.onnx``), additions and removals.
3. Health window (``[update] health_window_s``): every restarted or added pipeline must read
   ``health_min_frames`` frames (at least one) and, when it has a model, infer with an error
   rate within ``max_error_rate``. It passes as soon as all do; when the window ends first,
   the previous configuration is restored the same way and the attempt is ``rolled_back``.
4. Keep: ``DATA_DIR/config/remote.json`` (``store``), sealed as received; ``applied``.

Every reason is stripped of opened secrets and ``redact``-ed before it is logged or reported.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.common.errors import EdgefleetError
from agent.config import AgentConfig
from agent.pipeline.config import PipelineConfig
from agent.pipeline.model import RunnableModel
from agent.protocol.sealed import SealedError, unseal_tree
from agent.protocol.state import ConfigReport, ConfigStatus, ConfigTarget
from agent.remoteconfig.plan import (
    Change,
    ConfigInvalid,
    ConfigPlan,
    diff_pipelines,
    mask_secrets,
    parse_document,
    sealed_paths,
    validate_pipelines,
)
from agent.remoteconfig.store import ConfigFile
from agent.running import RunningPipelines

log = logging.getLogger(__name__)
S = ConfigStatus


@dataclass(frozen=True)
class ConfigHealth:
    """The health window of a configuration (from ``[update]``)."""

    window_s: float
    min_frames: int
    max_error_rate: float


@dataclass(frozen=True)
class Validated:
    cfg: AgentConfig
    secrets: list[str]  # opened sealed values: masked in every message


class RemoteConfig:
    """The device side of remote configuration, for one agent."""

    def __init__(
        self,
        running: RunningPipelines,
        local: AgentConfig,
        *,
        open_model: Callable[[PipelineConfig], RunnableModel | None],
        shared: Callable[[RunnableModel], bool],
        health: ConfigHealth,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
        stop: threading.Event | None = None,
    ) -> None:
        self.running = running
        self.local = local
        self.open_model = open_model  # a local .onnx a config names (Agent's cache)
        self.shared = shared  # a model the agent holds for others (never closed here)
        self.health = health
        self.clock = clock
        self.wall = wall
        self.stop = stop or threading.Event()
        self.file = ConfigFile(local.data_dir)
        self.key_file: Path | None = local.broker.key_file if local.broker else None
        self.publish: Callable[[], None] = lambda: None  # the update manager's report()
        self.running_hash: str | None = None
        self.revision: int | None = None
        self.target_hash: str | None = None
        self.status: ConfigStatus | None = None
        self.reason: str | None = None
        self.updated_at = wall()
        self._key: Any = None

    # --- reporting ----------------------------------------------------------------------------

    def report(self) -> ConfigReport:
        return ConfigReport(
            hash=self.running_hash, revision=self.revision, target_hash=self.target_hash,
            status=self.status, reason=self.reason, updated_at=self.updated_at,
        )  # fmt: skip

    def _set(self, status: ConfigStatus, reason: str | None = None) -> None:
        self.status, self.reason, self.updated_at = status, reason, self.wall()
        line = "device=%s config=%s revision=%s status=%s %s"
        args = (self.local.device_id, (self.target_hash or "")[:12], self.revision,
                status.value, reason or "")  # fmt: skip
        if status in (S.REJECTED, S.ROLLED_BACK):
            log.error(line, *args)
        else:
            log.info(line, *args)
        self.publish()

    # --- validation ---------------------------------------------------------------------------

    def _private_key(self, paths: list[str]) -> Any:
        if self._key is not None:
            return self._key
        if self.key_file is None:
            raise ConfigInvalid(
                f"configuration holds sealed values ({', '.join(paths)}) and this device has "
                "no [broker] key_file (its enrolled key) to open them"
            )
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            key = serialization.load_pem_private_key(self.key_file.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigInvalid(f"cannot read the device key {self.key_file}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigInvalid(f"device key {self.key_file} is not an EC (P-256) key")
        self._key = key
        return key

    def validate(self, target: ConfigTarget) -> Validated:
        """Parse, open sealed values, validate against the local file.

        Raises:
            ConfigInvalid: with the reason (secrets masked).
        """
        raw = parse_document(target.document)
        paths = sealed_paths(raw)
        opened, secrets = raw, list[str]()  # secrets: opened plaintexts, masked in messages
        if paths:
            key = self._private_key(paths)
            try:
                opened = unseal_tree(raw, key, device_id=self.local.device_id, opened=secrets)
            except SealedError as e:
                raise ConfigInvalid(f"sealed value does not open on this device: {e}") from e
        try:
            return Validated(validate_pipelines(self.local, opened), secrets)
        except ConfigInvalid as e:
            raise ConfigInvalid(mask_secrets(str(e), secrets)) from e

    # --- start-up -----------------------------------------------------------------------------

    def startup_pipelines(self) -> list[PipelineConfig]:
        """The stored remote configuration's pipelines, else the local file's."""
        dev = self.local.device_id
        try:
            stored = self.file.load()
            if stored is None:
                log.info("device=%s pipelines from the local config file", dev)
                return list(self.local.pipelines)
            valid = self.validate(stored.target)
        except ConfigInvalid as e:
            self.target_hash = None
            self.status, self.updated_at = S.REJECTED, self.wall()
            self.reason = mask_secrets(f"{e}; running the local config file's pipelines", [])
            log.error("device=%s %s", dev, self.reason)
            return list(self.local.pipelines)
        self.running_hash = self.target_hash = stored.target.hash
        self.revision, self.status = stored.revision, S.APPLIED
        log.info(
            "device=%s pipelines from the remote configuration %s (revision %d) in %s, not "
            "the local file's", dev, stored.target.hash[:12], stored.revision, self.file.path,
        )  # fmt: skip
        return list(valid.cfg.pipelines)

    # --- applying -----------------------------------------------------------------------------

    def apply(self, target: ConfigTarget, revision: int) -> None:
        """Apply ``target`` (carried by desired ``revision``); never raises."""
        try:
            self._apply(target, revision)
        except Exception as e:  # the update manager's thread must survive anything
            log.exception("remote configuration failed")
            self._set(S.REJECTED, f"internal error applying the configuration: {e!r}")

    def _apply(self, target: ConfigTarget, revision: int) -> None:
        if target.hash == self.running_hash:
            return  # running already
        if target.hash == self.target_hash and self.status in (S.REJECTED, S.ROLLED_BACK):
            log.info("device=%s config=%s %s before; not tried again (change it to retry)",
                     self.local.device_id, target.hash[:12], self.status.value)  # fmt: skip
            return
        self.target_hash, self.revision = target.hash, revision
        try:
            valid = self.validate(target)
        except ConfigInvalid as e:
            self._set(S.REJECTED, f"configuration rejected: {e}; previous one kept")
            return
        with self.running.lock:
            old = [self.running.configs[p.name] for p in self.running.items]
            plan = diff_pipelines(old, valid.cfg.pipelines)
            models = {p.name: p.model for p in self.running.items}
            self._set(S.APPLYING, plan.summary())
            failure = self._execute(plan, models, valid.secrets)
            if failure is None:
                failure = self._watch(plan, valid.secrets)
            if failure is None or self.stop.is_set():
                if failure is None:
                    self._commit(target, revision, plan, models)
                return  # stopping: the stored configuration stays the previous one
            self._undo(plan, models)
        self._set(S.ROLLED_BACK, f"configuration rolled back: {failure}; previous one restored")

    def _model_for(self, old: PipelineConfig | None, new: PipelineConfig,
                   current: RunnableModel | None) -> RunnableModel | None:  # fmt: skip
        local = Path(new.model).suffix == ".onnx"
        same = old is not None and (old.model, old.task, old.input_size) == (
            new.model, new.task, new.input_size)  # fmt: skip
        if local and not same:
            return self.open_model(new)
        return current

    def _execute(
        self, plan: ConfigPlan, models: dict[str, RunnableModel | None], secrets: list[str]
    ) -> str | None:
        """Carry out ``plan``; on an error undo what was done and return the reason."""
        done: list[Any] = []
        try:
            for c in plan.changes:
                if c.change is Change.IN_PLACE and c.new is not None:
                    self.running.change_in_place(c.name, c.new)
                elif c.change is Change.RESTART and c.new is not None:
                    model = self._model_for(c.old, c.new, models.get(c.name))
                    self.running.restart(c.name, c.new, model)
                elif c.change is Change.ADD and c.new is not None:
                    self.running.add(c.new, self._model_for(None, c.new, None)).start()
                elif c.change is Change.REMOVE:
                    self.running.remove(c.name)
                else:
                    continue
                done.append(c)
        except EdgefleetError as e:
            self._undo(ConfigPlan(tuple(done)), models)
            return mask_secrets(f"pipeline {c.name}: {e}", secrets)
        return None

    def _undo(self, plan: ConfigPlan, models: dict[str, RunnableModel | None]) -> None:
        """Back to the configuration before ``plan``, each pipeline on its previous model."""
        opened = [p.model for p in self.running.items]
        for c in reversed(plan.changes):
            if c.change is Change.IN_PLACE and c.old is not None:
                self.running.change_in_place(c.name, c.old)
            elif c.change is Change.RESTART and c.old is not None:
                self.running.restart(c.name, c.old, models.get(c.name))
            elif c.change is Change.ADD:
                self.running.remove(c.name)
            elif c.change is Change.REMOVE and c.old is not None:
                self.running.add(c.old, models.get(c.name)).start()
        self._close_unused(opened)

    def _close_unused(self, candidates: list[RunnableModel | None]) -> None:
        running = {id(p.model) for p in self.running.items}
        unique = {id(m): m for m in candidates if m is not None}  # models do not hash
        for m in unique.values():
            if id(m) not in running and not self.shared(m):
                m.close()

    def _commit(self, target: ConfigTarget, revision: int, plan: ConfigPlan,
                models: dict[str, RunnableModel | None]) -> None:  # fmt: skip
        self._close_unused(list(models.values()))
        self.running_hash = target.hash
        try:
            self.file.save(target, revision, self.wall())
        except OSError as e:
            self._set(S.APPLIED, f"running, but not saved to {self.file.path} ({e}): the "
                                 "previous configuration returns at the next start")  # fmt: skip
            return
        self._set(S.APPLIED, plan.summary())

    # --- health -------------------------------------------------------------------------------

    def _watch(self, plan: ConfigPlan, secrets: list[str]) -> str | None:
        """None when every restarted or added pipeline is healthy, else why not."""
        names = [c.name for c in plan.of(Change.RESTART, Change.ADD)]
        deadline = self.clock() + self.health.window_s
        while True:
            problems = [p for p in (self._problem(n) for n in names) if p]
            if not problems:
                return None
            if self.clock() >= deadline or self.stop.is_set():
                return mask_secrets(problems[0], secrets)
            self.stop.wait(0.05)

    def _problem(self, name: str) -> str | None:
        pipe = self.running.by_name.get(name)
        if pipe is None:
            return f"pipeline {name} is gone"
        c = pipe.metrics.snapshot(self.clock(), "remote-config")
        need, window = max(1, self.health.min_frames), self.health.window_s
        why = pipe.reader.last_error
        if c["frames_read"] < need:
            got = "did not deliver a frame" if not c["frames_read"] else (
                f"delivered {c['frames_read']} of {need} frames")  # fmt: skip
            return (f"pipeline {name}: source {pipe.source.display} {got} in {window:g} s"
                    + (f" ({why})" if why else ""))  # fmt: skip
        if pipe.model is None:
            return None  # a registry model it waits for: the source is what can be checked
        inferred, errors = c["frames_inferred"], c["errors"]
        if not inferred:
            return f"pipeline {name}: no frame inferred in {window:g} s"
        if errors / (inferred + errors) > self.health.max_error_rate:
            return (f"pipeline {name}: {errors} errors in {inferred + errors} frames "
                    f"({pipe.last_error})")  # fmt: skip
        return None
