"""Adapter: runs model updates for the agent's pipelines — the update state machine's driver.

Desired state arrives from the MQTT session as bytes; a worker thread (never paho's) parses and
verifies it against keys named in the TUF root ngclient trusts, then for each pipeline whose
target changed: fetch every target of the version through TUF (``fetching``), check the signed
card against the device profile (``verified``), install it in the content-addressed store and
build the engine in a child process (``building``), run the golden inputs and time them
(``trial``), swap it into the running pipeline between two frames (``active``) and watch a
health window before ``committed`` — or go back to the previous model (``rolled_back``).
Each step is persisted before it is taken (``machine.record_attempt``) and reported (retained).
A failure at any step leaves the running model running and says why.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from agent.common.backoff import Backoff
from agent.common.errors import BadDataError, EdgefleetError, ModelError, TransportError
from agent.common.interrupt import Interrupt, Interrupted, stop_builds_on
from agent.common.window import Window
from agent.models import BuildProgress
from agent.pipeline.model import RunnableModel, load_golden
from agent.pipeline.runner import Pipeline
from agent.profiles import DeviceProfile
from agent.protocol.card import ModelCard
from agent.protocol.desired import DesiredRejected, Verdict, desired_keys_from_root, verify_desired
from agent.protocol.state import (
    ConfigReport,
    ConfigTarget,
    PipelineTarget,
    Progress,
    ReportedState,
    SignedDesired,
    UpdatePhase,
)
from agent.protocol.wire import BadMessage
from agent.testhooks import NO_HOOKS, TestHooks
from agent.update.checks import check_card, check_golden
from agent.update.control import Item, UpdateControl
from agent.update.download import download_dir, fetch_version
from agent.update.health import Lock, swap_and_watch, swap_in
from agent.update.machine import (
    HealthWindow,
    UpdateAttempt,
    UpdateState,
    record_attempt,
    recover_after_crash,
    should_attempt,
)
from agent.update.report import BuildStep, LastErrors, build_percent, reported_state
from agent.update.storage import collect_garbage
from agent.update.store import ModelStore
from agent.update.tuf_client import MetadataExpired, TufClient

log = logging.getLogger(__name__)
P = UpdatePhase

# How a delivered model.onnx is opened, reporting build progress (see ``build_percent``)
OpenModel = Callable[[Path, BuildStep], RunnableModel]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UpdateManager(UpdateControl):
    """Applies desired state to the pipelines, one update at a time (superseding, the
    operator's cancel and maintenance windows: ``agent.update.control``)."""

    def __init__(
        self,
        *,
        device_id: str,
        profile: DeviceProfile,
        pipelines: dict[str, Pipeline],
        store: ModelStore,
        tuf: TufClient,
        open_model: OpenModel,
        publish_reported: Callable[[ReportedState], None],
        health: Callable[[], HealthWindow],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utcnow,
        retry_s: float = 10.0,
        max_tries: int = 3,
        prune_engines: Callable[[], int] | None = None,
        storage_budget_mb: int | None = None,
        stop_event: threading.Event | None = None,
        hooks: TestHooks = NO_HOOKS,
        apply_config: Callable[[ConfigTarget, int], None] | None = None,
        config_report: Callable[[], ConfigReport | None] | None = None,
        interrupt: Interrupt | None = None,
        windows: tuple[Window, ...] = (),
        local_time: Callable[[], datetime] | None = None,
        pipelines_lock: Lock | None = None,
    ) -> None:
        self.device_id = device_id
        # remote configuration, applied before the model loop (a pipeline it adds gets models)
        self.apply_config = apply_config
        self.config_report = config_report
        # Test-only: hooks.trial_sleep_s makes the trial wait first, so crash tests can kill
        # the agent while a built model is on trial.
        self.hooks = hooks
        self.profile = profile
        self.pipelines = pipelines
        # held by whoever restarts or replaces pipelines (agent.running): swaps take it too
        self.pipelines_lock = pipelines_lock if pipelines_lock is not None else threading.RLock()
        self.store = store
        self.tuf = tuf
        self.open_model = open_model
        self.publish_reported = publish_reported
        self.new_health = health
        self.clock = clock
        self.wall = wall
        self.state: UpdateState = store.load_state()
        # pipeline (or "*" for the whole device) → last error in words; newest wins in reports
        self.errors = LastErrors()
        self.progress: dict[str, Progress] = {}
        self._inbox: queue.Queue[Item] = queue.Queue()
        # Shared with the ChunkClient (when given), so stop() also ends a running transfer
        # instead of waiting out its request timeouts; the partial download is kept.
        self._stop = stop_event if stop_event is not None else threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.idle = threading.Event()
        self.idle.set()
        # Transport trouble is retried: the desired state whose refresh failed, and attempts
        # left in waiting/fetching/verified (by an outage, or by a restart: crash recovery).
        self.retry_s = retry_s
        self.max_tries = max_tries
        self.prune_engines = prune_engines
        self.storage_budget_mb = storage_budget_mb
        self._retry_payload: bytes | None = None
        self._resume: dict[str, PipelineTarget] = {}
        # Retries back off (capped, jittered) while the trouble lasts: a fleet whose registry
        # is down or whose metadata expired does not ask it all at once, every retry_s.
        self._backoff = Backoff(base_s=retry_s, cap_s=8 * retry_s, jitter=0.5)
        # interrupt: shared with the ChunkClient as its stop flag (set when the agent stops)
        self._init_control(interrupt, windows, local_time)

    # --- lifecycle ---------------------------------------------------------------------------

    def recover(self) -> None:
        """After a (re)start: persist the crash verdicts, then run every committed model."""
        rec = recover_after_crash(self.state, now=self.wall(), max_tries=self.max_tries)
        self.state = rec.state
        self.store.save_state(self.state)
        for action in rec.actions:
            pipe = self.pipelines.get(action.pipeline)
            if action.kind == "rejected":
                self.errors[action.pipeline] = f"{action.model} {action.reason}"
                log.warning("pipeline=%s %s: %s", action.pipeline, action.model, action.reason)
            elif action.kind == "resume" and action.model is not None:
                self._resume[action.pipeline] = action.model
                if action.reason.startswith("interrupted"):
                    self.errors[action.pipeline] = f"{action.model} {action.reason}"
                    log.warning("pipeline=%s %s: %s", action.pipeline, action.model, action.reason)
            elif action.kind == "run" and action.model is not None and pipe is not None:
                try:
                    model = self._open_version(action.model, lambda s: None)
                except EdgefleetError as e:
                    self.errors[action.pipeline] = f"committed {action.model} cannot start: {e}"
                    log.error(
                        "pipeline=%s committed=%s error=%r", action.pipeline, action.model, str(e)
                    )
                    continue
                self._release(swap_in(self.pipelines, action.pipeline, model, self.pipelines_lock))
        self.report()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="update-manager", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # --- desired state -----------------------------------------------------------------------

    def handle_desired(self, payload: bytes) -> None:
        """Verify a desired-state message and apply it (runs on the manager's thread)."""
        keep = self._keeping()
        try:
            envelope = SignedDesired.decode(payload)
        except BadMessage as e:
            self._fail_all(f"malformed desired state ignored: {e}; {keep}")
            return
        try:
            self.tuf.refresh()
            keys, threshold = desired_keys_from_root(self.tuf.trusted_root())
            verdict = verify_desired(
                envelope,
                trusted_keys=keys,
                threshold=threshold,
                device_id=self.device_id,
                last_revision=self.state.accepted_revision,
            )
        except DesiredRejected as e:
            self._fail_all(f"desired state rejected: {e}")
            return
        except TransportError as e:
            self._retry_payload = payload
            delay = self._backoff.failed(self.clock())
            what = (
                "registry metadata expired"
                if isinstance(e, MetadataExpired)
                else ("registry unreachable")
            )
            self._fail_all(
                f"waiting: {what}, desired state revision {envelope.signed.revision} not "
                f"applied yet (next try in {delay:.0f} s): {e}; {keep}"
            )
            return
        except OSError as e:  # disk full or read-only under DATA_DIR/tuf: retried like an outage
            self._retry_payload = payload
            self._fail_all(
                f"cannot store registry metadata on the device ({e}): desired state revision "
                f"{envelope.signed.revision} not applied yet (retrying every {self.retry_s:g} s);"
                f" {keep}"
            )
            return
        except BadDataError as e:
            self._fail_all(f"cannot verify desired state: {e}; {keep}")
            return
        self._backoff.succeeded()
        desired = envelope.signed
        if verdict is Verdict.SAME and self.state.applied_revision == desired.revision:
            return
        self.errors.pop("*", None)
        self.state = self.state.model_copy(update={"accepted_revision": desired.revision})
        self._save_state()
        if desired.config is not None and self.apply_config is not None:
            self.apply_config(desired.config, desired.revision)
        for name, target in desired.pipelines.items():
            if name not in self.pipelines:
                self.errors[name] = (
                    f"desired state names pipeline {name!r}, which this device does not have"
                )
                continue
            decision = should_attempt(self.state, name, target)
            if not decision:
                log.info("pipeline=%s %s", name, decision.reason)
                continue
            self.update_pipeline(name, target, desired.revision)
        self.state = self.state.model_copy(update={"applied_revision": desired.revision})
        self._save_state()
        self.report()

    def _keeping(self) -> str:
        running = [f"{n}: {p.model.ref}" for n, p in self.pipelines.items() if p.model is not None]
        return "keeping " + (", ".join(running) if running else "the current state (no model yet)")

    def _fail_all(self, message: str) -> None:
        log.error("device=%s %s", self.device_id, message)
        self.errors["*"] = message
        self.report()

    # --- one update --------------------------------------------------------------------------

    def _save_state(self) -> None:
        """Persist the state; a disk that refuses is logged and reported, not raised.

        The state on disk then lags the one in memory until the next save succeeds; after a
        crash meanwhile, recovery treats the older phase as interrupted (the safe direction).
        """
        try:
            self.store.save_state(self.state)
            if (self.errors.get("*") or "").startswith("update state not saved"):
                self.errors.pop("*", None)  # saved again: that error is over
        except OSError as e:
            message = (
                f"update state not saved to {self.store.state_path}: {e};"
                " retried at the next change"
            )
            log.error("device=%s %s", self.device_id, message)
            self.errors["*"] = message

    def _advance(self, attempt: UpdateAttempt, to: UpdatePhase, reason: str = "") -> None:
        attempt.advance(to, now=self.wall(), reason=reason)
        self.state = record_attempt(self.state, attempt)
        self._save_state()
        log.info(
            "pipeline=%s model=%s phase=%s %s", attempt.pipeline, attempt.target, to.value, reason
        )
        self.report()

    def update_pipeline(
        self, name: str, target: PipelineTarget, revision: int | None, *, resume: bool = False
    ) -> None:
        """Take ``name`` to ``target``; on failure the running model stays.

        With ``resume`` the pipeline's unfinished attempt continues from ``waiting`` (its
        partial downloads are kept by the fetcher and verified again by TUF). An unfinished
        attempt for another version is recorded as superseded first.
        """
        self._supersede_previous(name, target)
        slot = self.state.pipelines.get(name)
        previous = slot.attempt if slot else None
        if resume and previous is not None and previous.phase is P.WAITING:
            attempt = previous
        else:
            attempt = UpdateAttempt.start(name, target, revision=revision, now=self.wall())
        self.errors.pop(name, None)
        self._current = attempt
        try:
            self._advance(attempt, P.FETCHING)
            self._fetch_and_install(name, target, attempt)
        finally:
            self._current = None

    def _fetch_and_install(self, name: str, target: PipelineTarget, attempt: UpdateAttempt) -> None:
        try:
            files, card = self._fetch(name, target)
        except TransportError as e:
            if self._interrupted(attempt, target):
                return
            delay = self._backoff.failed(self.clock())
            self.errors[name] = (
                f"{target} fetch interrupted: {e}; resuming in {delay:.0f} s, {self._keeping()}"
            )
            self._advance(attempt, P.WAITING, str(e))
            self._resume[name] = target
            return
        except OSError as e:  # disk full under DATA_DIR/tuf: nothing half-written kept
            shutil.rmtree(download_dir(self.tuf, target), ignore_errors=True)
            self.errors[name] = (
                f"{target} fetch failed on the device's disk: {e}; retrying in {self.retry_s:g} s,"
                f" {self._keeping()}"
            )
            self._advance(attempt, P.WAITING, str(e))
            self._resume[name] = target
            return
        except BadDataError as e:
            self._reject(attempt, f"{target} rejected: {e}; {self._keeping()}")
            return
        if not self._interrupted(attempt, target):
            self._install(name, target, attempt, files, card)

    def _install(
        self,
        name: str,
        target: PipelineTarget,
        attempt: UpdateAttempt,
        files: dict[str, Path],
        card: ModelCard,
    ) -> None:
        """Verified → building → trial, then activation (or held for its window)."""
        keep_downloads = False  # interrupted or held: a resume does not fetch them again
        try:
            check_card(card, self.profile)
            self._advance(attempt, P.VERIFIED)
            self.store.install_version(  # downloads: linked, not copied a second time
                target.model, target.version, files, card.model_dump(mode="json"), link=True
            )
            self._advance(attempt, P.BUILDING)
            with stop_builds_on(self.interrupt):
                model = self._open_version(target, lambda s: self._set_progress(name, s))
            if self.interrupt.pending() is not None:  # came as the build ended: honour it
                model.close()
                raise Interrupted(f"{target} built, but a stop was asked for")
            self.progress.pop(name, None)
            self._advance(attempt, P.TRIAL)
            try:
                trial = self._trial(model)
            except BaseException:
                model.close()
                raise
        except Interrupted:
            self.progress.pop(name, None)
            keep_downloads = True
            if not self._interrupted(attempt, target):  # the agent stops: resumed at start
                self._advance(attempt, P.WAITING, "engine build stopped: the agent stops")
            return
        except (BadDataError, ModelError) as e:
            self.progress.pop(name, None)
            self._reject(attempt, f"{target} rejected: {e}; {self._keeping()}")
            return
        except OSError as e:  # disk full while storing or building: not half-installed
            self.progress.pop(name, None)
            if attempt.phase not in (P.VERIFIED, P.BUILDING):
                self._reject(attempt, f"{target} not installed, the device's disk refused: "
                                      f"{e}; {self._keeping()}")  # fmt: skip
                return
            # The disk, not the version: free what can go, wait and try again.
            self._collect_garbage()
            delay = self._backoff.failed(self.clock())
            self.errors[name] = (
                f"{target} waiting: the device's disk refused ({e}); retrying in {delay:.0f} s, "
                f"{self._keeping()}"
            )
            self._advance(attempt, P.WAITING, str(e))
            self._resume[name] = target
            return
        else:
            keep_downloads = self._must_hold()
        finally:
            if not keep_downloads:
                shutil.rmtree(download_dir(self.tuf, target), ignore_errors=True)
        if keep_downloads:
            self._hold(attempt, model)
            return
        self._activate(attempt, model, trial)

    def _reject(self, attempt: UpdateAttempt, message: str) -> None:
        self.errors[attempt.pipeline] = message
        self._advance(attempt, P.REJECTED, message)
        self._collect_garbage()

    def _fetch(self, name: str, target: PipelineTarget) -> tuple[dict[str, Path], ModelCard]:
        def set_progress(p: Progress) -> None:
            self.progress[name] = p

        return fetch_version(self.tuf, target, set_progress, self.report)

    def _collect_garbage(self) -> None:
        """Remove what can no longer run, check the budget (``agent.update.storage``)."""
        collect_garbage(self.store, self.tuf.target_dir / "incoming", self.prune_engines,
                        self.storage_budget_mb, self.errors, self.device_id)  # fmt: skip

    def _release(self, model: RunnableModel | None) -> None:
        """Close a model no pipeline runs any more (local models can be shared)."""
        if model is not None and all(p.model is not model for p in self.pipelines.values()):
            model.close()

    def _open_version(self, ref: PipelineTarget, progress: BuildStep) -> RunnableModel:
        d = self.store.materialize(ref.model, ref.version)
        return self.open_model(d / "model.onnx", progress)

    def _set_progress(self, name: str, step: BuildProgress) -> None:
        """An engine build's progress, in the reported state."""
        self.progress[name] = Progress(done=build_percent(step), total=100)
        self.report()

    def _trial(self, model: RunnableModel) -> dict[str, Any]:
        """Golden inputs within the precision's tolerance, outputs finite, latency measured
        (``check_golden``).

        Raises:
            Rejected: a mismatch or NaN/inf, in words.
        """
        if self.hooks.trial_sleep_s:
            self._stop.wait(self.hooks.trial_sleep_s)
        golden = self.store.materialize(model.card.name, model.card.version) / "golden.npz"
        ins, outs = load_golden(golden)
        return check_golden(model, ins, outs)

    def _activate(
        self, attempt: UpdateAttempt, model: RunnableModel, trial: dict[str, Any]
    ) -> None:
        old, verdict = swap_and_watch(
            self.pipelines, attempt.pipeline, model, self.new_health(), lock=self.pipelines_lock,
            clock=self.clock, stop=self._stop, on_active=lambda: self._advance(attempt, P.ACTIVE),
        )  # fmt: skip
        if verdict is None:
            return  # agent stopping: the attempt stays active; recovery rolls it back
        if verdict.outcome == "commit":
            self._advance(attempt, P.COMMITTED, verdict.reason)
            self._release(old)
            self._collect_garbage()
            return
        swap_in(self.pipelines, attempt.pipeline, old, self.pipelines_lock)
        model.close()
        message = f"{attempt.target} rolled back: {verdict.reason}; " + (
            f"back on {old.ref}" if old is not None else "no previous model"
        )
        self.errors[attempt.pipeline] = message
        self._advance(attempt, P.ROLLED_BACK, message)
        self._collect_garbage()

    # --- reporting ---------------------------------------------------------------------------

    def reported(self) -> ReportedState:
        return reported_state(
            self.device_id, self.pipelines, self.state, self.errors, self.progress, self.wall(),
            self.waiting_texts(),
            config=self.config_report() if self.config_report is not None else None,
        )  # fmt: skip

    def report(self) -> None:
        with self._lock:
            try:
                self.publish_reported(self.reported())
            except Exception as e:  # reporting must never break an update
                log.warning("device=%s could not publish reported state: %s", self.device_id, e)
