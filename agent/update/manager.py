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

import numpy as np

from agent.common.backoff import Backoff
from agent.common.errors import BadDataError, EdgefleetError, ModelError, TransportError
from agent.pipeline.model import RunnableModel, load_golden
from agent.pipeline.runner import Pipeline
from agent.profiles import DeviceProfile
from agent.protocol.card import ModelCard
from agent.protocol.desired import DesiredRejected, Verdict, desired_keys_from_root, verify_desired
from agent.protocol.state import (
    PipelineReport,
    PipelineTarget,
    Progress,
    ReportedState,
    SignedDesired,
    UpdatePhase,
)
from agent.protocol.wire import BadMessage
from agent.update.machine import (
    HealthWindow,
    UpdateAttempt,
    UpdateState,
    record_attempt,
    recover_after_crash,
    should_attempt,
)
from agent.update.store import ModelStore
from agent.update.tuf_client import MetadataExpired, TufClient

log = logging.getLogger(__name__)
P = UpdatePhase

REQUIRED_FILES = ("model.onnx", "card.json", "golden.npz")
OPTIONAL_FILES = ("model.int8.onnx", "labels.txt")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Rejected(BadDataError):
    """This version cannot run here; the reason is for people."""


class _Errors(dict[str, str]):
    """Last error per key, remembering which was set most recently."""

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


class UpdateManager:
    """Applies desired state to the pipelines, one update at a time."""

    def __init__(
        self,
        *,
        device_id: str,
        profile: DeviceProfile,
        pipelines: dict[str, Pipeline],
        store: ModelStore,
        tuf: TufClient,
        open_model: Callable[[Path, Callable[[str], None]], RunnableModel],
        publish_reported: Callable[[ReportedState], None],
        health: Callable[[], HealthWindow],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = utcnow,
        retry_s: float = 10.0,
        max_tries: int = 3,
        prune_engines: Callable[[], int] | None = None,
        storage_budget_mb: int | None = None,
        stop_event: threading.Event | None = None,
        trial_sleep_s: float = 0.0,
    ) -> None:
        self.device_id = device_id
        # Test-only (EDGEFLEET_TEST_TRIAL_SLEEP_S in the agent): the trial waits this long
        # first, so crash tests can kill the agent while a built model is on trial.
        self.trial_sleep_s = trial_sleep_s
        self.profile = profile
        self.pipelines = pipelines
        self.store = store
        self.tuf = tuf
        self.open_model = open_model
        self.publish_reported = publish_reported
        self.new_health = health
        self.clock = clock
        self.wall = wall
        self.state: UpdateState = store.load_state()
        # pipeline (or "*" for the whole device) → last error in words; newest wins in reports
        self.errors = _Errors()
        self.progress: dict[str, Progress] = {}
        self._inbox: queue.Queue[bytes | None] = queue.Queue()
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
                self._release(pipe.swap_model(model))
        self.report()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="update-manager", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit_desired(self, payload: bytes) -> None:
        """Called from the MQTT thread: queue and return at once."""
        self.idle.clear()
        self._inbox.put(payload)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                payload = self._inbox.get(timeout=self.retry_s)
            except queue.Empty:
                self._retry()
                continue
            if payload is None:
                break
            # Only the newest desired state matters; skip ones already superseded.
            while True:
                try:
                    newer = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if newer is None:
                    return
                payload = newer
            try:
                self.handle_desired(payload)
            except Exception as e:  # the update thread must survive anything; say what
                log.exception("update manager failed on a desired state")
                self.errors["*"] = f"internal error handling desired state: {e}"
                self.report()
            if self._inbox.empty():
                self.idle.set()

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
                slot = self.state.pipelines.get(name)
                attempt = slot.attempt if slot else None
                if attempt is not None and attempt.target == target and not attempt.terminal:
                    log.info("pipeline=%s resuming %s (%s)", name, target, attempt.phase.value)
                    self.update_pipeline(name, target, attempt.revision, resume=True)
        except Exception as e:  # the update thread must survive anything; say what
            log.exception("update manager failed while retrying")
            self.errors["*"] = f"internal error retrying an update: {e}"
            self.report()

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
        partial downloads are kept by the fetcher and verified again by TUF).
        """
        pipe = self.pipelines[name]
        slot = self.state.pipelines.get(name)
        previous = slot.attempt if slot else None
        if resume and previous is not None and previous.phase is P.WAITING:
            attempt = previous
        else:
            attempt = UpdateAttempt.start(name, target, revision=revision, now=self.wall())
        self.errors.pop(name, None)
        self._advance(attempt, P.FETCHING)
        try:
            files, card = self._fetch(name, target)
        except TransportError as e:
            delay = self._backoff.failed(self.clock())
            self.errors[name] = (
                f"{target} fetch interrupted: {e}; resuming in {delay:.0f} s, {self._keeping()}"
            )
            self._advance(attempt, P.WAITING, str(e))
            self._resume[name] = target
            return
        except OSError as e:  # disk full under DATA_DIR/tuf: nothing half-written kept
            shutil.rmtree(self._download_dir(target), ignore_errors=True)
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
        try:
            self._check_card(card)
            self._advance(attempt, P.VERIFIED)
            self.store.install_version(  # downloads: linked, not copied a second time
                target.model, target.version, files, card.model_dump(mode="json"), link=True
            )
            self._advance(attempt, P.BUILDING)
            model = self._open_version(target, lambda s: self._set_progress(name, s))
            self.progress.pop(name, None)
            self._advance(attempt, P.TRIAL)
            try:
                trial = self._trial(model)
            except BaseException:
                model.close()
                raise
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
        finally:
            shutil.rmtree(self._download_dir(target), ignore_errors=True)
        self._activate(pipe, attempt, model, trial)

    def _reject(self, attempt: UpdateAttempt, message: str) -> None:
        self.errors[attempt.pipeline] = message
        self._advance(attempt, P.REJECTED, message)
        self._collect_garbage()

    def _download_dir(self, target: PipelineTarget) -> Path:
        return self.tuf.target_dir / "incoming" / target.model / target.version

    def _fetch(self, name: str, target: PipelineTarget) -> tuple[dict[str, Path], ModelCard]:
        base = f"models/{target.model}/{target.version}"
        infos = {}
        for fname in (*REQUIRED_FILES, *OPTIONAL_FILES):
            info = self.tuf.target_info(f"{base}/{fname}")
            if info is None and fname in REQUIRED_FILES:
                raise Rejected(f"the registry has no signed target {base}/{fname}")
            if info is not None:
                infos[fname] = info
        total = sum(i.length for i in infos.values())
        done = 0
        dest = self._download_dir(target)
        dest.mkdir(parents=True, exist_ok=True)
        files: dict[str, Path] = {}
        for fname, info in infos.items():
            self.progress[name] = Progress(done=done, total=total)
            self.report()
            files[fname] = self.tuf.download(info, dest / fname)
            done += info.length
        self.progress[name] = Progress(done=done, total=total)
        signed_card = self.tuf.card_of(infos["model.onnx"])
        if signed_card is None:
            raise Rejected(f"target {base}/model.onnx carries no signed model card")
        try:
            card = ModelCard.model_validate(signed_card)
        except ValueError as e:
            raise Rejected(f"signed model card of {target} is invalid: {e}") from e
        on_disk = ModelCard.model_validate_json(files["card.json"].read_bytes())
        if on_disk != card:
            raise Rejected(f"card.json of {target} differs from the card signed in its metadata")
        if (card.name, card.version) != (target.model, target.version):
            raise Rejected(
                f"card says {card.name}@{card.version}, desired state asked for {target}"
            )
        return files, card

    def _check_card(self, card: ModelCard) -> None:
        """The card against the device profile."""
        allowed = set(self.profile.precisions)
        offered = {v.precision for v in card.variants} or {"fp32"}
        if not offered & (allowed | {"fp32"}):
            raise Rejected(
                f"model offers precisions {sorted(offered)}, device profile {self.profile.name} "
                f"runs {sorted(allowed)}"
            )

    def _collect_garbage(self) -> None:
        """Keep what can still run (committed, previous, active, in flight) and remove the
        rest: other model versions and their objects, partial downloads of versions no longer
        wanted, and engines beyond ``keep_engines``. Runs after each settled update and before
        retrying on a full disk. Never raises: a failed clean-up is logged and reported."""
        try:
            result = self.store.gc(keep=())
            wanted = self.store.referenced()
            incoming = self.tuf.target_dir / "incoming"
            if incoming.is_dir():
                for model_dir in incoming.iterdir():
                    for version_dir in model_dir.iterdir() if model_dir.is_dir() else ():
                        ref = PipelineTarget(model=model_dir.name, version=version_dir.name)
                        if ref not in wanted:
                            shutil.rmtree(version_dir, ignore_errors=True)
            engines = self.prune_engines() if self.prune_engines is not None else 0
            log.info(
                "device=%s storage: removed %d versions, %d bytes of models, %d engines",
                self.device_id, len(result.versions), result.bytes, engines,
            )  # fmt: skip
            self._check_budget()
        except Exception as e:  # never let clean-up take an update down
            log.exception("storage clean-up failed")
            self.errors["storage"] = f"storage clean-up failed: {e}"

    def _check_budget(self) -> None:
        if self.storage_budget_mb is None:
            return
        used = sum(
            f.stat().st_size
            for root in (self.store.root, self.store.root.parent / "engines")
            if root.is_dir()
            for f in root.rglob("*")
            if f.is_file()
        )
        if used > self.storage_budget_mb << 20:
            self.errors["storage"] = (
                f"models and engines use {used >> 20} MiB after clean-up, over the "
                f"[storage] max_mb budget of {self.storage_budget_mb} MiB: only what can still "
                "run is kept; raise the budget or run fewer/smaller models"
            )
        else:
            self.errors.pop("storage", None)

    def _release(self, model: RunnableModel | None) -> None:
        """Close a model no pipeline runs any more (local models can be shared)."""
        if model is not None and all(p.model is not model for p in self.pipelines.values()):
            model.close()

    def _open_version(self, ref: PipelineTarget, progress: Callable[[str], None]) -> RunnableModel:
        d = self.store.materialize(ref.model, ref.version)
        return self.open_model(d / "model.onnx", progress)

    def _set_progress(self, name: str, msg: str) -> None:
        if "%" in msg:
            try:
                pct = int(msg.rsplit(" ", 1)[-1].rstrip("%"))
            except ValueError:
                return
            self.progress[name] = Progress(done=pct, total=100)
            self.report()

    def _trial(self, model: RunnableModel) -> dict[str, Any]:
        """Golden inputs within the precision's tolerance, outputs finite, latency measured.

        Raises:
            Rejected: a mismatch or NaN/inf, in words.
        """
        if self.trial_sleep_s:
            self._stop.wait(self.trial_sleep_s)
        golden = self.store.materialize(model.card.name, model.card.version) / "golden.npz"
        ins, outs = load_golden(golden)
        prec = model.backend.info.precision
        atol = model.card.golden_atol.get(prec, 1e-1)
        times = []
        for i, (x, want) in enumerate(zip(ins, outs, strict=False)):
            t0 = time.perf_counter()
            got = model.backend.run(model.feeds(x))[0]
            times.append((time.perf_counter() - t0) * 1e3)
            if not np.all(np.isfinite(got)):
                raise Rejected(f"golden input {i}: output has NaN/inf ({prec})")
            if got.shape != want.shape:
                raise Rejected(f"golden input {i}: output shape {got.shape}, expected {want.shape}")
            err = float(np.max(np.abs(got.astype(np.float64) - want)))
            if err > atol:
                raise Rejected(
                    f"golden input {i}: max abs error {err:.3g} > {atol:g} allowed for {prec}"
                )
        return {"latency_ms": float(np.median(times)) if times else 0.0}

    def _activate(
        self, pipe: Pipeline, attempt: UpdateAttempt, model: RunnableModel, trial: dict[str, Any]
    ) -> None:
        infer = pipe.metrics.latency().get("infer", {})
        baseline = infer.get("p95") if pipe.model is not None else None
        window = self.new_health()
        lock = threading.Lock()

        def observe(m: RunnableModel, ok: bool, nan: bool, ms: float) -> None:
            if m is model:
                with lock:
                    window.observe(ok, nan, ms, now=self.clock())

        pipe.observer = observe
        old = pipe.swap_model(model)  # between two frames: the stream never stops
        self._advance(attempt, P.ACTIVE)
        try:
            while not self._stop.is_set():
                with lock:
                    verdict = window.verdict(self.clock(), baseline)
                if verdict.outcome != "pending":
                    break
                self._stop.wait(0.1)
            else:
                return  # agent stopping: the attempt stays active; recovery rolls it back
        finally:
            pipe.observer = None
        if verdict.outcome == "commit":
            self._advance(attempt, P.COMMITTED, verdict.reason)
            self._release(old)
            self._collect_garbage()
            return
        pipe.swap_model(old)
        model.close()
        message = f"{attempt.target} rolled back: {verdict.reason}; " + (
            f"back on {old.ref}" if old is not None else "no previous model"
        )
        self.errors[attempt.pipeline] = message
        self._advance(attempt, P.ROLLED_BACK, message)
        self._collect_garbage()

    # --- reporting ---------------------------------------------------------------------------

    def reported(self) -> ReportedState:
        now = self.wall()
        reports = []
        for name, pipe in self.pipelines.items():
            slot = self.state.pipelines.get(name)
            attempt = slot.attempt if slot else None
            model = pipe.model
            if attempt is not None:
                phase = attempt.phase
            elif model is not None:
                phase = P.COMMITTED
            else:
                phase = P.WAITING
            err = self.errors.newest(name, "*", "storage", "clock")
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
                    progress=self.progress.get(name),
                    last_error=err[:2000] if err else None,
                    updated_at=attempt.updated_at if attempt else now,
                )
            )
        return ReportedState(
            device_id=self.device_id,
            desired_revision=self.state.applied_revision,
            pipelines=reports,
        )

    def report(self) -> None:
        with self._lock:
            try:
                self.publish_reported(self.reported())
            except Exception as e:  # reporting must never break an update
                log.warning("device=%s could not publish reported state: %s", self.device_id, e)
