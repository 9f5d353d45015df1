"""Adapter: a fleet of simulated devices in one process, sized for 1,000 on two cores.

Threads: ``loops`` shared ``MqttLoop``s carry every device's MQTT traffic (instead of one
paho thread per device), one ticker produces every device's simulated frames and telemetry,
and each device keeps the real ``UpdateManager``'s own worker thread (it blocks in TUF fetches
and health windows; idle, it wakes every ``retry_s``). Connects are staggered at
``connect_rate`` per second so a cold start does not stampede the broker.
"""

from __future__ import annotations

import logging
import random
import shutil
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from agent.config import UpdateConfig
from agent.protocol.topics import DEFAULT_ROOT
from tests.harness.sim.device import SimDevice
from tests.harness.sim.engine import ProfileFn, default_profile
from tests.harness.sim.netloop import MqttLoop

log = logging.getLogger(__name__)

STOP_WORKERS = 32


def _stop_quietly(dev: SimDevice) -> None:
    try:
        dev.stop()
    except Exception:  # one device failing to stop must not leave the others running
        log.exception("device=%s did not stop cleanly", dev.device_id)


class SimFleet:
    """``n`` simulated devices named ``{prefix}-0000`` … against one broker and registry.

    Args:
        broker_url: ``mqtt://host:port``.
        trust_root: the registry's ``root.json``.
        n: number of devices.
        base_dir: parent of the devices' data dirs (default: a temp dir removed by ``stop``).
        prefix: device id prefix.
        groups_fn: device id → its groups.
        tags: tags every device announces.
        pipelines: pipeline names of every device.
        profile_fn: behaviour of (device, model version).
        update: update settings for every device.
        telemetry_interval_s: seconds between a device's telemetry messages.
        telemetry: ``"direct"`` or ``"outbox"`` (see ``SimDevice``).
        loops: MQTT loop threads (devices are spread over them).
        connect_rate: first connects per second.
        tick_s: how often frames and telemetry are produced.
        topic_root: MQTT topic root.
        seed: randomness seed (per-device generators derive from it).
    """

    def __init__(
        self,
        broker_url: str,
        trust_root: Path,
        n: int,
        *,
        base_dir: Path | None = None,
        prefix: str = "sim",
        groups_fn: Callable[[str], Sequence[str]] = lambda d: (),
        tags: Mapping[str, str] | None = None,
        pipelines: Sequence[str] = ("front",),
        profile_fn: ProfileFn = default_profile,
        update: UpdateConfig | None = None,
        telemetry_interval_s: float = 10.0,
        telemetry: Literal["direct", "outbox"] = "direct",
        loops: int = 4,
        connect_rate: float = 200.0,
        tick_s: float = 0.2,
        topic_root: str = DEFAULT_ROOT,
        seed: int = 0,
    ) -> None:
        if n < 0 or loops < 1 or connect_rate <= 0 or tick_s <= 0:
            raise ValueError("need n >= 0, loops >= 1, connect_rate > 0 and tick_s > 0")
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="edgefleet-sim-"))
        self.connect_rate = connect_rate
        self.tick_s = tick_s
        self.loops = [MqttLoop(f"mqtt-loop-{i}", rng=random.Random(seed + i)) for i in range(loops)]
        rng = random.Random(seed)
        self.devices: dict[str, SimDevice] = {}
        for i in range(n):
            dev_id = f"{prefix}-{i:04d}"
            self.devices[dev_id] = SimDevice(
                dev_id,
                broker_url,
                trust_root,
                self.base_dir / dev_id,
                groups=groups_fn(dev_id),
                tags=tags,
                pipelines=pipelines,
                profile_fn=profile_fn,
                telemetry_interval_s=telemetry_interval_s,
                telemetry=telemetry,
                update=update,
                topic_root=topic_root,
                loop=self.loops[i % loops],
                rng=random.Random(rng.getrandbits(64)),
            )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._next_connect = 0.0
        self.ticks = 0
        self.tick_overruns = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, only: Iterable[str] | None = None) -> None:
        """Start the loops, the ticker and the devices (all, or ``only`` those ids)."""
        for loop in self.loops:
            loop.start()
        self._ticker = threading.Thread(target=self._tick_forever, name="sim-ticker", daemon=True)
        self._ticker.start()
        self.start_devices(self.devices if only is None else only)

    def start_devices(self, ids: Iterable[str]) -> None:
        """Start devices; their first connects are spaced at ``connect_rate`` per second."""
        now = time.monotonic()
        self._next_connect = max(self._next_connect, now)
        for dev_id in ids:
            dev = self.devices[dev_id]
            if dev.started:
                continue
            dev.connect_delay_s = self._next_connect - time.monotonic()
            self._next_connect += 1.0 / self.connect_rate
            with self._lock:
                dev.start()

    def stop(self) -> None:
        """Stop every device, the ticker and the loops; remove the temp dir if it is ours."""
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join(10)
        # in parallel: a device in a health window or a fetch takes a while to stop
        for dev in self.devices.values():  # signal every manager first, wait below
            if dev.updates is not None:
                dev.updates.stop(timeout=0)
        with ThreadPoolExecutor(STOP_WORKERS, thread_name_prefix="sim-stop") as pool:
            list(pool.map(_stop_quietly, self.devices.values()))
        for loop in self.loops:
            loop.stop()
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> SimFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _tick_forever(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            with self._lock:
                devices = [d for d in self.devices.values() if d.started]
            for dev in devices:
                try:
                    dev.advance(now)
                    dev.tick(now)
                except Exception:  # one device's bug must not stop the fleet's clock
                    log.exception("device=%s tick failed", dev.device_id)
            self.ticks += 1
            next_at += self.tick_s
            late = time.monotonic() - next_at
            if late > 0:
                self.tick_overruns += 1
                next_at = time.monotonic()
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    # --- status ------------------------------------------------------------------------------

    def status(self) -> list[dict[str, Any]]:
        """Per device: online, idle, and per pipeline phase, active and target version."""
        return [d.status() for d in self.devices.values() if d.started]

    def summary(self, statuses: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """Counts: devices started/online, active versions, phases, chunk client totals."""
        statuses = self.status() if statuses is None else statuses
        versions: Counter[str] = Counter()
        phases: Counter[str] = Counter()
        entries: Counter[str] = Counter()
        chunks: Counter[str] = Counter()
        for s in statuses:
            for p in s["pipelines"]:
                versions[p["active"] or "-"] += 1
                phases[p["phase"]] += 1
            chunks.update(s.get("chunks", {}))
        for d in self.devices.values():
            entries.update(d.phase_entries)
        return {
            "devices": len(self.devices),
            "started": len(statuses),
            "online": sum(1 for s in statuses if s["online"]),
            "versions": dict(sorted(versions.items())),
            "phases": dict(sorted(phases.items())),
            "phase_entries": dict(sorted(entries.items())),
            "chunks": dict(chunks),
            "telemetry_sent": sum(d.telemetry_sent for d in self.devices.values()),
            "connect_attempts": sum(lp.connect_attempts for lp in self.loops),
            "connect_failures": sum(lp.connect_failures for lp in self.loops),
            "tick_overruns": self.tick_overruns,
        }

    def all_in(
        self, phase: str, version: str | None = None, ids: Iterable[str] | None = None
    ) -> bool:
        """True when every pipeline of the devices (all started, or ``ids``) is in ``phase``
        (and runs ``version`` when given) and the devices' update managers are idle."""
        devs = [self.devices[i] for i in ids] if ids is not None else self.devices.values()
        for d in devs:
            if not d.started or d.updates is None or not d.updates.idle.is_set():
                return False
            for r in d.reports():
                if r.phase.value != phase or (version is not None and r.active_version != version):
                    return False
        return True
