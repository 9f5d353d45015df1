"""Adapter with a pure core: device statistics from /proc and Jetson sysfs, and a tegrastats reader.

The pure helpers (``parse_proc_stat``, ``cpu_percent``, ``parse_loadavg``, ``parse_meminfo``,
``parse_millidegrees``, ``parse_gpu_load``, ``ina3221_power_mw``) take file contents as strings.
``read_device_stats`` is the thin IO edge: it reads files under a ``root`` (``/`` in production,
a fake tree in tests) and never raises for a missing or unreadable file; that field is omitted
or ``None`` instead. ``TegrastatsReader`` runs the ``tegrastats`` binary in a thread.

Jetson sysfs paths used (each seen in public code, found with the project's search tool):

* GPU load, per-mille: ``/sys/devices/gpu.0/load`` (Nano, Xavier; jetson_stats issue #360
  lists it for Nano and AGX Xavier), ``/sys/devices/platform/gpu.0/load`` (Xavier NX and AGX
  Orin, same issue), ``/sys/devices/platform/bus@0/17000000.gpu/load`` (Orin on JetPack 6) and
  ``/sys/devices/platform/17000000.gpu/load`` (Orin, several public monitors).
* Power, JetPack 5/6 hwmon: ``/sys/bus/i2c/drivers/ina3221/<bus>-0040/hwmon/hwmon*/`` with
  ``in<N>_label``, ``in<N>_input`` (mV) and ``curr<N>_input`` (mA) (alumet-dev/alumet
  ``plugins/nvidia-jetson/README.md``: Xavier NX at ``ina3221/7-0040/hwmon/hwmon6``; AGX Orin
  ``1-0040``). The same device also appears as ``/sys/class/hwmon/hwmon*`` with ``name`` =
  ``ina3221``.
* Power, JetPack 4 (L4T 32) IIO: ``/sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0/`` with
  ``rail_name_<N>`` and ``in_power<N>_input`` (mW) (Nano; Pablouc/jetson-gpu-benchmarking
  ``Monitoring/gpu_power.sh`` reads ``in_current1_input`` / ``in_voltage1_input`` there).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from agent.telemetry.tegrastats import TegraSample, parse_tegrastats

__all__ = [
    "CpuTimes",
    "TegrastatsReader",
    "cpu_percent",
    "ina3221_power_mw",
    "parse_gpu_load",
    "parse_loadavg",
    "parse_meminfo",
    "parse_millidegrees",
    "parse_proc_stat",
    "read_device_stats",
]

log = logging.getLogger(__name__)

# Candidate GPU load files, first existing wins (see module docstring for sources).
GPU_LOAD_PATHS = (
    "sys/devices/gpu.0/load",
    "sys/devices/platform/gpu.0/load",
    "sys/devices/platform/bus@0/17000000.gpu/load",
    "sys/devices/platform/17000000.gpu/load",
)
# Thermal zones that are powered off read as -256 °C on Jetson (tegrastats shows "GPU@-256C").
_SENSOR_OFF_C = -256.0


@dataclass(frozen=True)
class CpuTimes:
    """Aggregate CPU jiffies from the ``cpu`` line of /proc/stat, taken at ``at`` (seconds)."""

    total: int
    idle: int
    at: float = 0.0


# ----------------------------------------------------------------------------- pure helpers


def parse_proc_stat(text: str, *, now: float = 0.0) -> CpuTimes:
    """Parse the aggregate ``cpu`` line of /proc/stat.

    Raises:
        ValueError: there is no ``cpu`` line with numeric fields.
    """
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == "cpu":
            try:
                values = [int(v) for v in parts[1:]]
            except ValueError as e:
                raise ValueError(f"/proc/stat cpu line has a non-number: {line!r}") from e
            if len(values) < 4:
                raise ValueError(f"/proc/stat cpu line has {len(values)} fields, expected >= 4")
            # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
            # already counted in user/nice (proc(5)), so only the first 8 make the total.
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return CpuTimes(total=sum(values[:8]), idle=idle, at=now)
    raise ValueError("/proc/stat has no aggregate 'cpu' line")


def cpu_percent(prev: CpuTimes | None, cur: CpuTimes) -> float:
    """Busy share of CPU time between two samples, 0..100.

    With no previous sample (the first call) this is the average since boot.
    """
    if prev is None:
        total, idle = cur.total, cur.idle
    else:
        total, idle = cur.total - prev.total, cur.idle - prev.idle
    if total <= 0:
        return 0.0  # no jiffies passed (or counters reset): nothing measured as busy
    return max(0.0, min(100.0, 100.0 * (total - idle) / total))


def parse_loadavg(text: str) -> float:
    """First field of /proc/loadavg. Raises ValueError if it is not a number."""
    fields = text.split()
    if not fields:
        raise ValueError("/proc/loadavg is empty")
    return float(fields[0])


def parse_meminfo(text: str) -> tuple[float, float]:
    """(used_mb, total_mb) from /proc/meminfo, used = MemTotal - MemAvailable.

    Raises:
        ValueError: MemTotal or MemAvailable is missing or not a number.
    """
    kb: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kb[key.strip()] = int(parts[0])
    missing = [k for k in ("MemTotal", "MemAvailable") if k not in kb]
    if missing:
        raise ValueError(f"/proc/meminfo lacks {', '.join(missing)}")
    return (kb["MemTotal"] - kb["MemAvailable"]) / 1024, kb["MemTotal"] / 1024


def parse_millidegrees(text: str) -> float | None:
    """A thermal zone ``temp`` file (millidegrees C) in °C; None if off or not a number."""
    try:
        celsius = int(text.strip()) / 1000
    except ValueError:
        return None
    return None if celsius <= _SENSOR_OFF_C else celsius


def parse_gpu_load(text: str) -> float | None:
    """A Jetson ``gpu.0/load`` file (per-mille) in percent; None if not a number."""
    try:
        permille = int(text.strip())
    except ValueError:
        return None
    return max(0.0, min(100.0, permille / 10))


def ina3221_power_mw(millivolts: str, milliamps: str) -> int | None:
    """Power of one INA3221 hwmon channel in mW from ``in<N>_input`` and ``curr<N>_input``."""
    try:
        return round(int(millivolts.strip()) * int(milliamps.strip()) / 1000)
    except ValueError:
        return None


# ----------------------------------------------------------------------------- IO edge


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        # Missing file, or a Jetson sensor that is off (Orin's GPU zone fails with EINVAL).
        return None


def _temperatures(root: Path) -> dict[str, float]:
    temps: dict[str, float] = {}
    for zone in sorted((root / "sys/class/thermal").glob("thermal_zone*")):
        name, raw = _read(zone / "type"), _read(zone / "temp")
        if name is None or raw is None:
            continue
        celsius = parse_millidegrees(raw)
        if celsius is not None and name.strip():
            temps[name.strip()] = celsius
    return temps


def _gpu_load(root: Path) -> float | None:
    for rel in GPU_LOAD_PATHS:
        raw = _read(root / rel)
        if raw is not None:
            return parse_gpu_load(raw)
    return None


def _hwmon_dirs(root: Path) -> list[Path]:
    dirs = list((root / "sys/bus/i2c/drivers/ina3221").glob("*/hwmon/hwmon*"))
    for d in (root / "sys/class/hwmon").glob("hwmon*"):
        if (_read(d / "name") or "").strip() == "ina3221":
            dirs.append(d)
    return sorted(dirs)


def _power(root: Path) -> dict[str, int]:
    power: dict[str, int] = {}
    # JetPack 5/6: hwmon ina3221, one channel per in<N>_label with mV and mA inputs.
    for d in _hwmon_dirs(root):
        for label_file in sorted(d.glob("in*_label")):
            channel = label_file.name[2 : -len("_label")]
            label = (_read(label_file) or "").strip()
            mv, ma = _read(d / f"in{channel}_input"), _read(d / f"curr{channel}_input")
            if not label or label == "NC" or mv is None or ma is None:
                continue  # "sum of shunt voltages" has no curr file; NC is not connected
            mw = ina3221_power_mw(mv, ma)
            if mw is not None:
                power[label] = mw
    # JetPack 4 (L4T 32): IIO ina3221x with rail_name_<N> and in_power<N>_input in mW.
    for dev in sorted((root / "sys/bus/i2c/drivers").glob("ina3221x/*/iio:device*")):
        for name_file in sorted(dev.glob("rail_name_*")):
            channel = name_file.name[len("rail_name_") :]
            label = (_read(name_file) or "").strip()
            raw = _read(dev / f"in_power{channel}_input")
            if label and raw is not None and raw.strip().isdigit():
                power[label] = int(raw.strip())
    return power


def _cpu(root: Path, prev: CpuTimes | None, now: float) -> tuple[float | None, CpuTimes]:
    cur = CpuTimes(total=0, idle=0, at=now)
    cpu: float | None = None
    stat = _read(root / "proc/stat")
    if stat is not None:
        try:
            cur = parse_proc_stat(stat, now=now)
            cpu = cpu_percent(prev, cur)
        except ValueError as e:
            log.warning("event=device_stats_unreadable file=/proc/stat error=%s", e)
    return cpu, cur


def _load1(root: Path) -> float | None:
    loadavg = _read(root / "proc/loadavg")
    if loadavg is not None:
        try:
            return parse_loadavg(loadavg)
        except ValueError as e:
            log.warning("event=device_stats_unreadable file=/proc/loadavg error=%s", e)
    return None


def _memory(root: Path) -> tuple[float | None, float | None]:
    meminfo = _read(root / "proc/meminfo")
    if meminfo is not None:
        try:
            return parse_meminfo(meminfo)
        except ValueError as e:
            log.warning("event=device_stats_unreadable file=/proc/meminfo error=%s", e)
    return None, None


def _disk_used_pct(path: Path) -> float | None:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return 100.0 * usage.used / usage.total if usage.total else None


def read_device_stats(
    root: Path = Path("/"),
    *,
    prev_cpu: CpuTimes | None,
    now: float,
    data_dir: Path | None = None,
    tegra: TegraSample | None = None,
) -> tuple[dict[str, Any], CpuTimes]:
    """Read one device-stats sample.

    Args:
        root: filesystem root holding ``proc/`` and ``sys/`` (``/`` on a device).
        prev_cpu: the ``CpuTimes`` this function returned last time, or None on the first call
            (then ``cpu_percent`` is the average since boot).
        now: current time in seconds, stored in the returned ``CpuTimes.at``.
        data_dir: directory whose filesystem ``disk_used_pct`` describes; default ``root``.
        tegra: latest tegrastats sample, used for ``emc_load_pct`` (not in sysfs without
            debugfs) and as a fallback for GPU load and power rails.

    Returns:
        ``(stats, cpu_times)``. ``stats`` has exactly the keys cpu_percent, load1, mem_used_mb,
        mem_total_mb, disk_used_pct, temperatures_c, gpu_load_pct, emc_load_pct, power_mw;
        a value that cannot be read is None (dicts are empty). Pass ``cpu_times`` back as
        ``prev_cpu`` next time.

    Raises:
        Nothing for missing or malformed files.
    """
    cpu, cur_cpu = _cpu(root, prev_cpu, now)
    load1 = _load1(root)
    mem_used, mem_total = _memory(root)
    disk = _disk_used_pct(data_dir if data_dir is not None else root)
    gpu = _gpu_load(root)
    power = _power(root)
    if tegra is not None:
        if gpu is None:
            gpu = tegra.gr3d_load_pct
        if not power:
            power = dict(tegra.power_mw)

    stats: dict[str, Any] = {
        "cpu_percent": cpu,
        "load1": load1,
        "mem_used_mb": mem_used,
        "mem_total_mb": mem_total,
        "disk_used_pct": disk,
        "temperatures_c": _temperatures(root),
        "gpu_load_pct": gpu,
        "emc_load_pct": tegra.emc_load_pct if tegra is not None else None,
        "power_mw": power,
    }
    return stats, cur_cpu


# ----------------------------------------------------------------------------- tegrastats


class TegrastatsReader:
    """Adapter: runs ``tegrastats --interval N`` and keeps the latest parsed sample.

    ``available()`` says whether the binary exists; ``why_unavailable`` says why not.
    ``start()`` launches the process and a reader thread; ``stop()`` terminates both.
    """

    def __init__(self, interval_ms: int = 1000, *, binary: str = "tegrastats") -> None:
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be > 0, got {interval_ms}")
        self.interval_ms = interval_ms
        self.binary = binary
        self.why_unavailable: str | None = None
        self.parse_errors = 0
        self._path = shutil.which(binary) if os.sep not in binary else binary
        if self._path is None or not os.access(self._path, os.X_OK):
            self.why_unavailable = (
                f"{binary!r} not found on PATH or not executable; "
                "tegrastats exists only on NVIDIA Jetson (JetPack), so tegrastats telemetry is off"
            )
            self._path = None
        self._lock = threading.Lock()
        self._latest: TegraSample | None = None
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None

    def available(self) -> bool:
        """True if the tegrastats binary exists and is executable."""
        return self._path is not None

    def running(self) -> bool:
        """True while the tegrastats process started by ``start()`` is alive."""
        proc = self._proc
        return proc is not None and proc.poll() is None

    def latest(self) -> TegraSample | None:
        """The most recent parsed sample, or None before the first line."""
        with self._lock:
            return self._latest

    def start(self) -> None:
        """Start tegrastats and the reader thread.

        Raises:
            RuntimeError: the binary is unavailable (message says why) or already started.
        """
        if self._path is None:
            raise RuntimeError(f"cannot start tegrastats: {self.why_unavailable}")
        if self._proc is not None:
            raise RuntimeError("tegrastats reader already started")
        self._proc = subprocess.Popen(
            [self._path, "--interval", str(self.interval_ms)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        stdout = self._proc.stdout
        if stdout is None:  # cannot happen with stdout=PIPE; keeps the type checker honest
            self.stop()
            raise RuntimeError("tegrastats started without a stdout pipe")
        self._thread = threading.Thread(
            target=self._pump, args=(stdout,), name="tegrastats", daemon=True
        )
        self._thread.start()

    def _pump(self, stream: IO[str]) -> None:
        for line in stream:
            try:
                sample = parse_tegrastats(line)
            except ValueError as e:
                self.parse_errors += 1
                log.debug("event=tegrastats_line_skipped error=%s", e)
                continue
            with self._lock:
                self._latest = sample

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate tegrastats and join the reader thread; safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
            if proc.stdout is not None:
                proc.stdout.close()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=timeout)
