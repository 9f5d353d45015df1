"""Adapter: update control for ``UpdateManager`` — its thread's loop, superseding, the
operator's cancel, and maintenance windows.

- **Supersede**: ``submit_desired`` (the MQTT thread) only queues the message and, when it
  names a newer revision with another target than the update running now, sets the
  ``Interrupt`` the transfer and the engine build poll. The manager's thread pauses the
  running attempt (``waiting``, downloads kept) and verifies the newer state: accepted, the
  paused attempt is recorded ``rejected`` as superseded (``retryable``: not on the never-retry
  list; its partial and verified downloads stay for a later return) and the new one starts;
  refused (a forged or replayed message), the paused attempt resumes where it stopped.
- **Cancel** (``cancel_current``, any thread): the same interrupt, or for an attempt that
  waits (for the registry, or for its window) a note on the manager's queue; the attempt is
  recorded ``rejected``, "cancelled by operator: …", retryable, the running model stays.
- **Maintenance windows** (``[update] window``): download, verify, build and trial any time;
  a model that passed its trial outside the window waits (``waiting``, built, the reported
  ``waiting`` says until when) and is tried again and activated when the window opens.
"""

from __future__ import annotations

import logging
import queue
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from agent.common.interrupt import Interrupt
from agent.common.window import Window, inside, until_open, wait_text
from agent.pipeline.model import RunnableModel
from agent.protocol.state import PipelineTarget, SignedDesired, UpdatePhase
from agent.protocol.wire import BadMessage
from agent.update.download import download_dir
from agent.update.machine import UpdateAttempt

if TYPE_CHECKING:
    from agent.common.backoff import Backoff
    from agent.pipeline.runner import Pipeline
    from agent.update.machine import UpdateState
    from agent.update.report import LastErrors
    from agent.update.tuf_client import TufClient

log = logging.getLogger(__name__)
P = UpdatePhase

# Phases an operator's cancel stops (trial and active end by themselves within seconds, in
# a commit or a rollback)
CANCELLABLE = frozenset({P.WAITING, P.FETCHING, P.VERIFIED, P.BUILDING})
PAUSED_TEXT = "paused: a newer desired state arrived, checking it (downloads kept)"


@dataclass
class _Cancel:
    """An operator's cancel on the manager's queue: the attempts it names, and when done."""

    reason: str
    targets: dict[str, PipelineTarget]
    done: threading.Event


@dataclass
class Held:
    """A built model that passed its trial and waits for its maintenance window."""

    attempt: UpdateAttempt
    model: RunnableModel


Item = bytes | _Cancel | None


class UpdateControl:
    """The control half of ``UpdateManager`` (a mixin: it works on the manager's state)."""

    if TYPE_CHECKING:  # what it uses of the manager
        device_id: str
        state: UpdateState
        errors: LastErrors
        pipelines: dict[str, Pipeline]
        tuf: TufClient
        idle: threading.Event
        retry_s: float
        clock: Callable[[], float]
        wall: Callable[[], datetime]
        _stop: threading.Event
        _inbox: queue.Queue[Item]
        _retry_payload: bytes | None
        _resume: dict[str, PipelineTarget]
        _backoff: Backoff

        def report(self) -> None: ...
        def handle_desired(self, payload: bytes) -> None: ...
        def update_pipeline(
            self, name: str, target: PipelineTarget, revision: int | None, *, resume: bool = ...
        ) -> None: ...
        def _advance(self, attempt: UpdateAttempt, to: UpdatePhase, reason: str = ...) -> None: ...
        def _keeping(self) -> str: ...
        def _trial(self, model: RunnableModel) -> dict[str, Any]: ...
        def _reject(self, attempt: UpdateAttempt, message: str) -> None: ...
        def _activate(
            self, attempt: UpdateAttempt, model: RunnableModel, trial: dict[str, Any]
        ) -> None: ...

    def _init_control(
        self,
        interrupt: Interrupt | None,
        windows: tuple[Window, ...],
        local_time: Callable[[], datetime] | None,
    ) -> None:
        self.interrupt = interrupt if interrupt is not None else Interrupt(self._stop)
        self.windows = windows
        # device local time, naive (the window arithmetic is on the clock face)
        self.local_time = local_time or (lambda: self.wall().astimezone().replace(tzinfo=None))
        self.cancel_wait_s = 10.0
        # paused for a newer state to be checked: the target, and the phase it was in
        self._paused: dict[str, tuple[PipelineTarget, UpdatePhase]] = {}
        self._held: dict[str, Held] = {}
        self._current: UpdateAttempt | None = None  # the attempt update_pipeline runs
        self._control_lock = threading.Lock()

    # --- the manager's thread ------------------------------------------------------------

    def submit_desired(self, payload: bytes) -> None:
        """Called from the MQTT thread: queue and return at once (interrupting the running
        update when this names a newer revision with another target; the manager checks it)."""
        self.idle.clear()
        self._inbox.put(payload)
        current = self._current
        if current is None:
            return
        try:
            signed = SignedDesired.decode(payload).signed  # parsing only; verified later
        except BadMessage:
            return
        accepted = self.state.accepted_revision or 0
        target = signed.pipelines.get(current.pipeline)
        if signed.revision > accepted and target is not None and target != current.target:
            log.info(
                "device=%s desired revision %d names %s: pausing %s to check it",
                self.device_id, signed.revision, target, current.target,
            )  # fmt: skip
            self.interrupt.request("newer")

    def _run(self) -> None:
        while not self._stop.is_set():
            timeout = min(self.retry_s, 1.0) if self._held else self.retry_s
            try:
                item: Any = self._inbox.get(timeout=timeout)
            except queue.Empty:
                self._retry()
                self._guarded(self._activate_due, "activating a held model")
                continue
            items = [item]
            while True:  # only the newest desired state matters; a cancel is kept
                try:
                    items.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            if any(i is None for i in items):
                return
            for cancel in [i for i in items if isinstance(i, _Cancel)]:
                self._guarded(partial(self._apply_cancel, cancel), "cancelling")
            payloads = [i for i in items if isinstance(i, bytes)]
            if payloads:
                req = self.interrupt.pending()
                if req is not None and req.kind == "newer":
                    self.interrupt.take()  # this is the newer state: checked now
                self._guarded(partial(self.handle_desired, payloads[-1]), "a desired state")
            if not self._inbox.empty():
                continue  # a newer state (or a cancel) came meanwhile: it goes first
            self._guarded(self._resume_paused, "resuming a paused update")
            self._guarded(self._activate_due, "activating a held model")
            if self._inbox.empty():
                self.idle.set()

    def _guarded(self, fn: Callable[[], None], what: str) -> None:
        try:
            fn()
        except Exception as e:  # the update thread must survive anything; say what
            log.exception("update manager failed on %s", what)
            self.errors["*"] = f"internal error handling {what}: {e}"
            self.report()

    def _retry(self) -> None:
        """Retry what transport trouble interrupted (runs on the manager's thread), when the
        backoff says it is time."""
        if (self._retry_payload is None and not self._resume) or not self._backoff.ready(
            self.clock()
        ):
            return
        try:
            if self._retry_payload is not None:
                payload, self._retry_payload = self._retry_payload, None
                self.handle_desired(payload)
            for name, target in list(self._resume.items()):
                del self._resume[name]
                attempt = self._open_attempt(name)
                if attempt is not None and attempt.target == target:
                    log.info("pipeline=%s resuming %s (%s)", name, target, attempt.phase.value)
                    self.update_pipeline(name, target, attempt.revision, resume=True)
        except Exception as e:  # the update thread must survive anything; say what
            log.exception("update manager failed while retrying")
            self.errors["*"] = f"internal error retrying an update: {e}"
            self.report()

    def _open_attempt(self, name: str) -> UpdateAttempt | None:
        slot = self.state.pipelines.get(name)
        attempt = slot.attempt if slot else None
        return attempt if attempt is not None and not attempt.terminal else None

    def _resume_paused(self) -> None:
        """Paused attempts that no accepted newer state superseded continue where they were."""
        for name, (target, _) in list(self._paused.items()):
            del self._paused[name]
            attempt = self._open_attempt(name)
            if attempt is not None and attempt.target == target and attempt.phase is P.WAITING:
                log.info("pipeline=%s %s resumes: no newer desired state replaced it", name, target)
                self.update_pipeline(name, target, attempt.revision, resume=True)

    # --- superseding and cancelling --------------------------------------------------------

    def _supersede_previous(self, name: str, target: PipelineTarget) -> None:
        """Record the pipeline's unfinished attempt for another version as superseded."""
        previous = self._open_attempt(name)
        if previous is None or previous.target == target:
            return
        was = self._paused.get(name, (target, previous.phase))[1]
        self._forget(name)
        previous.retryable = True
        built = (
            " (built, waiting for its window)" if previous.reason.startswith("activation") else ""
        )
        message = (
            f"{previous.target} superseded by {target} during {was.value}{built}; "
            "what was downloaded is kept for a later return"
        )
        self.errors[name] = message
        self._advance(previous, P.REJECTED, message)

    def _forget(self, name: str) -> None:
        """Drop what waits for the pipeline's attempt (retries, pause, a held model)."""
        self._resume.pop(name, None)
        self._paused.pop(name, None)
        held = self._held.pop(name, None)
        if held is not None:
            held.model.close()

    def cancel_current(self, reason: str) -> str | None:
        """Stop the update in progress (download, engine build, or a built model waiting for
        its window); thread-safe. The attempt is recorded rejected, "cancelled by operator",
        but stays retryable: a later desired state of that version resumes from what was
        downloaded. The running model keeps running.

        Returns:
            What was cancelled, in words; ``None`` when nothing was in progress (an attempt
            on trial or active ends by itself in a commit or a rollback).
        """
        with self._control_lock:
            targets = {}
            parts = []
            for name, slot in self.state.pipelines.items():
                a = slot.attempt
                if a is not None and a.phase in CANCELLABLE:
                    targets[name] = a.target
                    what = "built, waiting for its window" if name in self._held else a.phase.value
                    parts.append(f"{a.target} on pipeline {name} ({what})")
            if not targets:
                return None
            cancel = _Cancel(reason, targets, threading.Event())
            if self._current is not None and self._current.pipeline in targets:
                self.interrupt.request("cancel", reason)
            self._inbox.put(cancel)
        cancel.done.wait(self.cancel_wait_s)
        return "cancelled " + "; ".join(parts)

    def _apply_cancel(self, cancel: _Cancel) -> None:
        try:
            req = self.interrupt.pending()
            if req is not None and req.kind == "cancel":
                self.interrupt.take()  # its attempt already ended (or never started)
            for name, target in cancel.targets.items():
                attempt = self._open_attempt(name)
                if attempt is not None and attempt.target == target:
                    self._cancelled(attempt, cancel.reason)
        finally:
            cancel.done.set()

    def _cancelled(self, attempt: UpdateAttempt, reason: str) -> None:
        name = attempt.pipeline
        self._forget(name)
        attempt.retryable = True
        message = (
            f"{attempt.target} cancelled by operator: {reason or 'no reason given'} (during "
            f"{attempt.phase.value}; downloads kept for a later return); {self._keeping()}"
        )
        self.errors[name] = message
        self._advance(attempt, P.REJECTED, message)

    def _interrupted(self, attempt: UpdateAttempt, target: PipelineTarget) -> bool:
        """Handle a pending interrupt of ``attempt``; False when there is none (the agent
        stopping is not taken here)."""
        if self._stop.is_set() or self.interrupt.pending() is None:
            return False
        req = self.interrupt.take()
        if req is None:
            return False
        if req.kind == "cancel":
            self._cancelled(attempt, req.reason)
        else:
            was = attempt.phase
            self._advance(attempt, P.WAITING, PAUSED_TEXT)
            self._paused[attempt.pipeline] = (target, was)
        return True

    # --- maintenance windows ---------------------------------------------------------------

    def _must_hold(self) -> bool:
        return bool(self.windows) and not inside(self.windows, self.local_time())

    def _hold(self, attempt: UpdateAttempt, model: RunnableModel) -> None:
        """Keep a checked model built until the window opens (the downloads stay, so a
        restart meanwhile rebuilds from the engine cache without fetching again)."""
        self._held[attempt.pipeline] = Held(attempt, model)
        self._advance(attempt, P.WAITING, wait_text(self.windows, self.local_time()))

    def _activate_due(self) -> None:
        if not self._held or self._must_hold():
            return
        for name, held in list(self._held.items()):
            del self._held[name]
            attempt, model = held.attempt, held.model
            log.info("pipeline=%s maintenance window open: activating %s", name, attempt.target)
            self._advance(attempt, P.TRIAL, "maintenance window open")
            try:
                trial = self._trial(model)
            except Exception as e:
                model.close()
                self._reject(attempt, f"{attempt.target} rejected: {e}; {self._keeping()}")
                continue
            finally:
                shutil.rmtree(download_dir(self.tuf, attempt.target), ignore_errors=True)
            self._activate(attempt, model, trial)

    def waiting_texts(self) -> dict[str, str]:
        """What each pipeline's update waits for, in words (the reported ``waiting``)."""
        out = {name: PAUSED_TEXT for name in list(self._paused)}  # any thread: copies
        held = list(self._held)
        if held:
            now = self.local_time()
            text = wait_text(self.windows, now) if until_open(self.windows, now) else None
            for name in held:
                out[name] = text or "activation due: maintenance window open"
        return out
