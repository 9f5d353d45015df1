"""Adapter: one active rollout controller — tick only while holding the lease, else wait.

Each tick first renews the lease (or takes it when free or expired; ``lease_db``); a controller
that holds it ticks the ``RolloutController`` (which confirms the lease again right before it
publishes and fences its saves), one that does not says whom it waits for, with the progress
of the active rollouts, and reads nothing else. ``close`` releases the lease, so a clean stop
hands over within one tick of the waiting controller; a holder that died hands over when its
lease expires.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone

from agent.common.errors import EdgefleetError
from cloud_sync.ingest.db import StoreUnavailable
from cloud_sync.rollout import db
from cloud_sync.rollout.controller import RolloutController, TickResult
from cloud_sync.rollout.lease import holder_label, waiting_line
from cloud_sync.rollout.lease_db import ControllerLease, LeaseLost
from cloud_sync.rollout.report import progress_line

log = logging.getLogger(__name__)

WAIT_REPEAT_S = 30.0  # repeat an unchanged "waiting …" line this often


class LeasedController:
    """A ``RolloutController`` that acts only while its ``ControllerLease`` is held."""

    def __init__(
        self,
        ctl: RolloutController,
        lease: ControllerLease,
        say: Callable[[str], None] | None = None,
    ) -> None:
        """Args:
        ctl: the controller (built with ``lease=lease``, so it confirms and fences).
        lease: this process's lease.
        say: where operator lines go (besides the log).
        """
        if ctl.lease is not lease:
            raise ValueError("the controller must be built with the same lease (lease=...)")
        self.ctl = ctl
        self.lease = lease
        self.say_fn = say
        self.acting = False
        self._shown: tuple[object, ...] = ()
        self._shown_at = float("-inf")
        self._rows: dict[str, db.RolloutRow] = {}  # parsed once per revision while waiting

    def say(self, line: str) -> None:
        log.info("%s", line)
        if self.say_fn is not None:
            self.say_fn(line)

    def tick(self, now: datetime | None = None, only: str | None = None) -> list[TickResult]:
        """Renew or take the lease, then tick; an empty list when another controller has it.

        Raises:
            StoreUnavailable: the database cannot be reached (the lease runs out meanwhile).
        """
        if not self.lease.acquire():
            self._lost("renewal refused" if self.acting else None)
            self._waiting()
            return []
        if not self.acting:
            self.acting = True
            self.say(f"took the lease as {self.lease.label} (fencing token {self.lease.token}, "
                     f"{self.lease.ttl_s:g} s, renewed every tick); acting")  # fmt: skip
        try:
            results = self.ctl.tick(now, only=only)
        except LeaseLost as e:
            self._lost(str(e))
            return []
        for r in results:
            if r.published:
                self.say(f"rollout {r.rollout_id}: published {r.published} desired states "
                         f"(fencing token {self.lease.token})")  # fmt: skip
        return results

    def _lost(self, why: str | None) -> None:
        if self.acting:
            self.acting = False
            self.say(f"lost the lease ({why}); not acting until it is ours again")

    def _waiting(self) -> None:
        lease, now = self.lease.last, self.lease.last_db_now
        at = datetime.fromtimestamp(now, timezone.utc)
        rows = db.list_rollouts(self.ctl.store, active_only=True, known=self._rows)
        self._rows = {r.id: r for r in rows}
        progress = [progress_line(r.spec, r.state, at) for r in rows]
        key = (lease.holder if lease else None, lease.fencing if lease else 0, *progress)
        mono = time.monotonic()
        if key == self._shown and mono - self._shown_at < WAIT_REPEAT_S:
            return
        self._shown, self._shown_at = key, mono
        self.say(waiting_line(lease, now) + f"; {len(rows)} active rollouts")
        for p in progress:
            self.say(f"  {p}")

    def run(self, stop: threading.Event, every_s: float) -> None:
        """Tick every ``every_s`` until ``stop``; then release the lease and disconnect."""
        try:
            while not stop.is_set():
                try:
                    self.tick()
                except StoreUnavailable as e:
                    self.say(f"rollout controller: {e}; retrying in {every_s:g}s")
                except EdgefleetError as e:  # e.g. a registry that cannot be read: keep going
                    log.error("rollout controller: %s; retrying in %gs", e, every_s)
                stop.wait(every_s)
        finally:
            self.close()

    def close(self) -> None:
        """Release the lease (a clean stop hands over at once) and disconnect."""
        try:
            if self.lease.release():
                self.say(f"released the lease ({holder_label(self.lease.holder)})")
        except StoreUnavailable as e:
            self.say(f"could not release the lease ({e}); it expires by itself")
        finally:
            self.acting = False
            self.ctl.close()


__all__ = ["WAIT_REPEAT_S", "LeasedController"]
