"""Adapter: the agent's periodic telemetry — one ``Telemetry`` message every interval.

Each tick takes a snapshot of every pipeline (``Pipeline.status``), of the device (``/proc``,
Jetson sysfs) and of the outbox, validates it as the contract's ``Telemetry`` message and puts
it in the outbox; the outbox sender publishes it when the broker is reachable. The work per
tick is a few file reads and one small JSON encode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from pydantic import ValidationError

from agent.common.errors import EdgefleetError
from agent.pipeline.runner import Pipeline
from agent.protocol.telemetry import (
    DeviceStats,
    OutboxStats,
    Telemetry,
    pipeline_telemetry_from_status,
)
from agent.telemetry.device import CpuTimes, read_device_stats
from agent.telemetry.outbox import Outbox

log = logging.getLogger(__name__)


OUTBOX_OFF = {"depth": 0, "bytes": 0, "dropped": 0}


class TelemetrySnapshot:
    """Builds ``Telemetry`` messages (pipelines, device, outbox) as one reader sees them.

    Each reader (the MQTT reporter, the Prometheus endpoint) has its own snapshot object: fps
    windows and CPU use are measured between that reader's own reads.
    """

    def __init__(
        self,
        device_id: str,
        pipelines: Sequence[Pipeline],
        outbox: Outbox | None,
        *,
        interval_s: float,
        data_dir: Path,
        reader: str = "telemetry",
        sysroot: Path = Path("/"),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.device_id = device_id
        # the agent's live list (remote configuration adds and removes pipelines), read at
        # each snapshot: telemetry and the Prometheus endpoint carry the running set
        self.pipelines = pipelines
        self.outbox = outbox
        self.interval_s = interval_s
        self.data_dir = data_dir
        self.reader = reader
        self.sysroot = sysroot
        self.clock = clock
        self.wall = wall
        self._cpu: CpuTimes | None = None
        self._lock = threading.Lock()

    def build(self) -> Telemetry:
        """One snapshot as a validated message (thread-safe).

        Raises:
            ValidationError: a value out of the contract's bounds (a bug, reported not sent).
        """
        with self._lock:
            now = self.clock()
            return Telemetry(
                device_id=self.device_id,
                ts=self.wall(),
                interval_s=self.interval_s,
                pipelines=[
                    pipeline_telemetry_from_status(p.status(now, reader=self.reader))
                    for p in list(self.pipelines)
                ],
                device=self.device_stats(now),
                outbox=OutboxStats(**(self.outbox.stats() if self.outbox else OUTBOX_OFF)),
            )

    def device_stats(self, now: float) -> DeviceStats:
        """The device part of a snapshot (called under the lock)."""
        stats, self._cpu = read_device_stats(
            self.sysroot, prev_cpu=self._cpu, now=now, data_dir=self.data_dir
        )
        return DeviceStats(**stats)


class TelemetryReporter:
    """Builds and queues one telemetry message per ``interval_s``."""

    def __init__(
        self,
        device_id: str,
        pipelines: Sequence[Pipeline],
        outbox: Outbox,
        topic: str,
        *,
        interval_s: float,
        data_dir: Path,
        sysroot: Path = Path("/"),
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.device_id = device_id
        self.outbox = outbox
        self.topic = topic
        self.interval_s = interval_s
        self.clock = clock
        self.snapshot = TelemetrySnapshot(
            device_id, pipelines, outbox, interval_s=interval_s, data_dir=data_dir,
            sysroot=sysroot, clock=clock, wall=wall,
        )  # fmt: skip
        self.sent = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def build(self) -> Telemetry:
        """One snapshot as a validated message (see ``TelemetrySnapshot.build``)."""
        return self.snapshot.build()

    def tick(self) -> None:
        """Queue one message; a failure is logged and counted, never raised."""
        try:
            self.outbox.put(self.topic, self.build().encode(), qos=1)
            self.sent += 1
            self.last_error = ""
        except (ValidationError, EdgefleetError, OSError) as e:
            self.last_error = f"telemetry not queued: {e}"
            log.error("device=%s %s", self.device_id, self.last_error)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="telemetry", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        next_at = self.clock()
        while not self._stop.is_set():
            self.tick()
            next_at += self.interval_s
            self._stop.wait(max(0.0, next_at - self.clock()))
