"""Pure: parse one line of NVIDIA ``tegrastats`` output into a typed ``TegraSample``.

Covers the layouts of Jetson Nano / TX1 / TX2 (JetPack 4: ``POM_5V_IN 2552/2552``,
``CPU [22%@518,off]``), Xavier NX / AGX Xavier (JetPack 5: ``VDD_IN 4817mW/4817mW``,
``GR3D_FREQ 0%@[114]``) and Orin (JetPack 5/6: ``VDD_GPU_SOC``, ``GR3D_FREQ 0%@[0,0]``,
lowercase ``tj@47.5C``, a ``MM-DD-YYYY HH:MM:SS`` timestamp prefix). Field meanings follow
NVIDIA's "tegrastats Utility" table in the Jetson Linux Developer Guide. Unknown tokens (engines
such as ``NVENC``, ``VIC``, ``APE``, ``MTS``) are ignored so a new BSP does not break parsing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["CpuCore", "TegraSample", "parse_tegrastats"]

# Numbers are ASCII and bounded: \d would accept other scripts' digits, and Python caps int()
# of very long digit strings, which would surface as an unhelpful error.
_INT = r"[0-9]{1,9}"
_NUM = r"-?[0-9]{1,9}(?:\.[0-9]{1,9})?"
_UNIT = r"(kB|MB|GB)"
_UNIT_TO_MB = {"kB": 1 / 1024, "MB": 1.0, "GB": 1024.0}

_TIMESTAMP_RE = re.compile(r"^\s*([0-9]{2}-[0-9]{2}-[0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2})\s")
_RAM_RE = re.compile(rf"(?<![A-Za-z_])RAM ({_INT})/({_INT}){_UNIT}")
_SWAP_RE = re.compile(rf"\bSWAP ({_INT})/({_INT}){_UNIT}(?: ?\(cached ({_INT}){_UNIT}\))?")
# Newer BSPs: "CPU [22%@518,67%@518,off,off]"; TX1-era: "cpu [17%,13%,29%,5%]@408".
_CPU_RE = re.compile(rf"\b(?:CPU|cpu) \[([^\]]{{0,2000}})\](?:@({_INT}))?")
_CORE_RE = re.compile(rf"^({_INT})%(?:@({_INT}))?$")
# "EMC_FREQ 7%", "EMC_FREQ 0%@2133"; TX1-era "EMC 1%@408".
_EMC_RE = re.compile(rf"\bEMC(?:_FREQ)? ({_INT})%(?:@({_INT}))?")
# "GR3D_FREQ 33%", "GR3D_FREQ 0%@76", "GR3D_FREQ 0%@[114]", "GR3D_FREQ 0%@[0,0]"; TX1 "GR3D 3%@76".
_GR3D_RE = re.compile(rf"\bGR3D(?:_FREQ)? ({_INT})%(?:@\[?((?:{_INT},?){{1,16}})\]?)?")
# "CPU@45C", "tj@47.5C", "BCPU@-45C"; the name must start the token.
_TEMP_RE = re.compile(rf"(?<![\w@.%-])([A-Za-z][A-Za-z0-9_]{{0,40}})@({_NUM})C(?=\s|$)")
# "POM_5V_IN 2552/2552" (JetPack 4, mW implied) or "VDD_IN 4817mW/4817mW" (JetPack 5+).
_RAIL_RE = re.compile(
    rf"(?<![\w/])([A-Z][A-Z0-9_]{{0,40}}) ({_INT})(?:mW)?/({_INT})(?:mW)?(?=\s|$)"
)
_NOT_RAILS = frozenset({"RAM", "SWAP", "IRAM"})
# tegrastats prints -256C for a sensor that is powered off (e.g. "CV0@-256C", "GPU@-256C" on an
# idle AGX Orin), which is a sentinel, not a reading.
_SENSOR_OFF_C = -256.0


@dataclass(frozen=True)
class CpuCore:
    """One CPU core as tegrastats shows it; ``online`` is False for ``off``."""

    online: bool
    load_pct: float | None = None
    freq_mhz: int | None = None


@dataclass(frozen=True)
class TegraSample:
    """One parsed tegrastats line. Absent fields are ``None`` or empty."""

    ram_used_mb: float
    ram_total_mb: float
    timestamp: datetime | None = None
    swap_used_mb: float | None = None
    swap_total_mb: float | None = None
    swap_cached_mb: float | None = None
    cpus: tuple[CpuCore, ...] = ()
    emc_load_pct: float | None = None
    emc_freq_mhz: int | None = None
    gr3d_load_pct: float | None = None
    gr3d_freq_mhz: int | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    power_mw: dict[str, int] = field(default_factory=dict)
    power_avg_mw: dict[str, int] = field(default_factory=dict)


def _mb(value: str, unit: str) -> float:
    return int(value) * _UNIT_TO_MB[unit]


def _parse_timestamp(line: str) -> datetime | None:
    m = _TIMESTAMP_RE.match(line)
    if m is None:
        return None
    try:
        return datetime.strptime(m.group(1), "%m-%d-%Y %H:%M:%S")
    except ValueError:
        return None  # digits in the right shape but not a date: treat as an unknown token


def _parse_cpus(line: str) -> tuple[CpuCore, ...]:
    m = _CPU_RE.search(line)
    if m is None:
        return ()
    shared_freq = int(m.group(2)) if m.group(2) else None
    cores: list[CpuCore] = []
    for raw in m.group(1).split(","):
        token = raw.strip()
        if token == "off":
            cores.append(CpuCore(online=False))
            continue
        cm = _CORE_RE.match(token)
        if cm is None:
            continue  # unknown per-core token: skip it, keep the rest
        freq = int(cm.group(2)) if cm.group(2) else shared_freq
        cores.append(CpuCore(online=True, load_pct=float(cm.group(1)), freq_mhz=freq))
    return tuple(cores)


def _parse_gr3d(line: str) -> tuple[float | None, int | None]:
    m = _GR3D_RE.search(line)
    if m is None:
        return None, None
    freqs = [int(f) for f in (m.group(2) or "").split(",") if f]
    # Orin lists one frequency per GPC ("@[0,0]"); report the fastest.
    return float(m.group(1)), (max(freqs) if freqs else None)


def parse_tegrastats(line: str) -> TegraSample:
    """Parse one line of ``tegrastats`` output.

    Args:
        line: one line as printed by ``tegrastats`` (trailing newline allowed).

    Returns:
        The parsed sample. Fields the line does not carry are ``None`` or empty.

    Raises:
        ValueError: the line has no ``RAM used/totalMB`` field, which every tegrastats version
            prints first, so it is not tegrastats output at all.
    """
    ram = _RAM_RE.search(line)
    if ram is None:
        shown = line if len(line) <= 80 else line[:77] + "..."
        raise ValueError(
            f"not a tegrastats line: expected a 'RAM <used>/<total>MB' field, got {shown!r}; "
            "the line is skipped"
        )
    swap = _SWAP_RE.search(line)
    emc = _EMC_RE.search(line)
    gr3d_load, gr3d_freq = _parse_gr3d(line)

    temperatures: dict[str, float] = {}
    for name, value in _TEMP_RE.findall(line):
        celsius = float(value)
        if celsius > _SENSOR_OFF_C:
            temperatures[name] = celsius

    power: dict[str, int] = {}
    power_avg: dict[str, int] = {}
    for name, current, average in _RAIL_RE.findall(line):
        if name in _NOT_RAILS:
            continue
        power[name] = int(current)
        power_avg[name] = int(average)

    return TegraSample(
        timestamp=_parse_timestamp(line),
        ram_used_mb=_mb(ram.group(1), ram.group(3)),
        ram_total_mb=_mb(ram.group(2), ram.group(3)),
        swap_used_mb=_mb(swap.group(1), swap.group(3)) if swap else None,
        swap_total_mb=_mb(swap.group(2), swap.group(3)) if swap else None,
        swap_cached_mb=(
            _mb(swap.group(4), swap.group(5)) if swap and swap.group(4) is not None else None
        ),
        cpus=_parse_cpus(line),
        emc_load_pct=float(emc.group(1)) if emc else None,
        emc_freq_mhz=int(emc.group(2)) if emc and emc.group(2) else None,
        gr3d_load_pct=gr3d_load,
        gr3d_freq_mhz=gr3d_freq,
        temperatures_c=temperatures,
        power_mw=power,
        power_avg_mw=power_avg,
    )
