"""Tests for agent.telemetry.tegrastats (pure parser) and agent.telemetry.device (adapter)."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.telemetry.device import (
    CpuTimes,
    TegrastatsReader,
    cpu_percent,
    ina3221_power_mw,
    parse_gpu_load,
    parse_loadavg,
    parse_meminfo,
    parse_millidegrees,
    parse_proc_stat,
    read_device_stats,
)
from agent.telemetry.tegrastats import CpuCore, TegraSample, parse_tegrastats
from tests.harness.jetson_sysfs import (
    MEMINFO,
    PROC_STAT,
    fake_proc,
    nano_tree,
    orin_tree,
    write_file,
    xavier_nx_tree,
)

STATS_KEYS = {
    "cpu_percent",
    "load1",
    "mem_used_mb",
    "mem_total_mb",
    "disk_used_pct",
    "temperatures_c",
    "gpu_load_pct",
    "emc_load_pct",
    "power_mw",
}

# ------------------------------------------------------------------- real tegrastats lines
# Each line is verbatim public output found with the project's search tool. Where the index
# named the repository, it is given; otherwise the hit came from the index's exact-string search,
# which returns an excerpt id but not the repository, and the id is given.

# Jetson Nano, JetPack 4: rbonghi/jetson_stats tests/tegrastats @085bbf4 ("Other example Jetson
# Nano" line of the tegrastats emulator).
NANO = (
    "RAM 1180/3965MB (lfb 1x2MB) SWAP 149/1024MB (cached 7MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [30%@1036,33%@1036,28%@1036,26%@1036] EMC_FREQ 10%@1600 GR3D_FREQ 0%@76 NVENC 716 "
    "NVDEC 716 APE 25 PLL@57C CPU@60.5C PMIC@100C GPU@59C AO@65C thermal@59.75C "
    "POM_5V_IN 4520/4680 POM_5V_GPU 0/0 POM_5V_CPU 1078/1205"
)
# Jetson Nano with two cores "off": docstring of a public "JetsonNanoCollector" (code search,
# repository not named); the docstring wraps the line over four lines, joined here with spaces.
NANO_OFF = (
    "RAM 1409/3964MB (lfb 28x4MB) SWAP 0/1982MB (cached 0MB) IRAM 0/252kB(lfb 252kB) "
    "CPU [22%@518,67%@518,off,off] EMC_FREQ 0%@1600 GR3D_FREQ 0%@76 APE 25 "
    "PLL@28.5C CPU@32C PMIC@50C GPU@30.5C AO@39.5C thermal@31.25C "
    "POM_5V_IN 2003/2003 POM_5V_GPU 0/0 POM_5V_CPU 320/320"
)
# Jetson TX2 layout (BCPU/MCPU, negative temperatures, VDD_* rails without "mW"):
# rbonghi/jetson_stats tests/tegrastats @085bbf4, the emulator's main line with GR3D fixed at 42.
TX2 = (
    "RAM 4722/7844MB (lfb 1x512kB) CPU [55%@2035,14%@2034,27%@2034,55%@2035,47%@2035,45%@2035] "
    "SWAP 149/1024MB (cached 7MB) EMC_FREQ 2%@1866 GR3D_FREQ 42%@1300 APE 150 MTS fg 0% bg 0% "
    "BCPU@-45C MCPU@-45C GPU@-51C PLL@45C AO@47.5C Tboard@37C Tdiode@46.75C PMIC@100C "
    "thermal@46.4C VDD_IN 14025/14416 VDD_CPU 2209/2538 VDD_GPU 6854/6903 VDD_SOC 1371/1370 "
    "VDD_WIFI 19/19 NVENC 716 NVDEC 716 VDD_DDR 2702/2702"
)
# Jetson TX1, L4T 28.1 (old "cpu [..]@freq", "EMC", "GR3D" tokens): hordiales/jetson-tx1-dev
# SCRIPTS.md.
TX1 = (
    "RAM 3607/3983MB (lfb 47x4MB) SWAP 873/8192MB (cached 281MB) cpu [17%,11%,65%,0%]@1734 "
    "EMC 1%@1600 APE 25 GR3D 39%@76"
)
# Xavier NX, JetPack 5.1.2: Go test TestParseTegraStatsXavierNXJetPack512 (find_string id
# 30937617475).
XAVIER_NX = (
    "07-09-2024 13:31:31 RAM 3168/6851MB (lfb 2x4MB) SWAP 161/3426MB (cached 0MB) "
    "CPU [23%@1397,17%@1192,16%@1190,13%@1190,23%@1190,10%@1190] EMC_FREQ 2%@204 "
    "GR3D_FREQ 0%@[114] VIC_FREQ 115 APE 150 AUX@45C CPU@46.5C thermal@45.6C AO@45C GPU@45.5C "
    "PMIC@50C VDD_IN 2763mW/2846mW VDD_CPU_GPU_CV 650mW/670mW VDD_SOC 650mW/711mW"
)
# Xavier with two cores off: docstring of a public "JetsonXavierCollector" (code search,
# repository not named); wrapped over three lines there, joined here with spaces.
XAVIER_OFF = (
    "RAM 2690/6854MB (lfb 6x1MB) SWAP 479/3427MB (cached 3MB) "
    "CPU [3%@1904,7%@1906,1%@1905,0%@1907,off,off] EMC_FREQ 0%@1600 GR3D_FREQ 0%@[510] "
    "VIC_FREQ 601 APE 150 AUX@39C CPU@39.5C AO@37.5C GPU@37.5C PMIC@50C "
    "VDD_IN 5079mW/5079mW VDD_CPU_GPU_CV 696mW/696mW VDD_SOC 1104mW/1104mW"
)
# AGX Orin, JetPack 5 (sensors off print -256C; two "NC" rails): find_string id 13663309883.
AGX_ORIN = (
    "04-11-2025 10:36:27 RAM 4321/62801MB (lfb 1759x4MB) SWAP 19/31400MB (cached 0MB) "
    "CPU [0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729,0%@729] "
    "EMC_FREQ 0%@2133 GR3D_FREQ 0%@[0,0] VIC_FREQ 729 APE 174 CV0@-256C CPU@44.562C Tboard@32C "
    "SOC2@40.093C Tdiode@33C SOC0@41.093C CV1@-256C GPU@-256C tj@44.343C SOC1@41.25C CV2@-256C "
    "VDD_GPU_SOC 2340mW/2340mW VDD_CPU_CV 390mW/390mW VIN_SYS_5V0 4025mW/4025mW NC 0mW/0mW "
    "VDDQ_VDD2_1V8AO 301mW/301mW NC 0mW/0mW"
)
# AGX Orin, JetPack 6 (kernel 5.15.148), encoder busy: Go test case "5.15.148" (find_string id
# 55382240908).
AGX_ORIN_JP6 = (
    "05-09-2026 18:42:06 RAM 18207/62841MB (lfb 466x4MB) SWAP 86/31420MB (cached 0MB) "
    "CPU [14%@2188,5%@2112,8%@2035,14%@2201,46%@1267,47%@1267,2%@1267,10%@1267,4%@1036,"
    "5%@1036,6%@1036,10%@1036] EMC_FREQ 3%@2133 GR3D_FREQ 0%@[0,0] NVENC 79%@166 NVDEC off "
    "NVJPG off NVJPG1 off VIC 36%@115 OFA off NVDLA0 off NVDLA1 off PVA0_FREQ off APE 174 "
    "cpu@52.562C soc2@48.437C soc0@49.093C tj@52.562C soc1@49.656C VDD_GPU_SOC 2412mW/2412mW "
    "VDD_CPU_CV 1607mW/1607mW VIN_SYS_5V0 4707mW/4707mW"
)
# Orin Nano, JetPack 6 with jetson_clocks (no EMC_FREQ, trailing space as printed): a public
# quick-start Markdown page (find_string id 66484949688).
ORIN_NANO = (
    "04-27-2026 15:00:54 RAM 779/7620MB (lfb 2x4MB) SWAP 0/3810MB (cached 0MB) "
    "CPU [0%@1344,0%@1344,0%@1344,0%@1344,0%@1344,0%@1344] GR3D_FREQ 0% cpu@50.125C "
    "soc2@49.125C soc0@49.25C gpu@50.562C tj@50.562C soc1@50.437C VDD_IN 6626mW/6625mW "
    "VDD_CPU_GPU_CV 1228mW/1230mW VDD_SOC 2380mW/2380mW "
)

# (line, ram_used, ram_total, swap_used, swap_total, n_cores, n_off, emc, gr3d, gr3d_mhz,
#  temperatures, power (current mW), timestamp)
CASES = [
    pytest.param(
        NANO, 1180, 3965, 149, 1024, 4, 0, 10.0, 0.0, 76,
        {"PLL": 57.0, "CPU": 60.5, "PMIC": 100.0, "GPU": 59.0, "AO": 65.0, "thermal": 59.75},
        {"POM_5V_IN": 4520, "POM_5V_GPU": 0, "POM_5V_CPU": 1078},
        None, id="nano-jp4",
    ),
    pytest.param(
        NANO_OFF, 1409, 3964, 0, 1982, 4, 2, 0.0, 0.0, 76,
        {"PLL": 28.5, "CPU": 32.0, "PMIC": 50.0, "GPU": 30.5, "AO": 39.5, "thermal": 31.25},
        {"POM_5V_IN": 2003, "POM_5V_GPU": 0, "POM_5V_CPU": 320},
        None, id="nano-cores-off",
    ),
    pytest.param(
        TX2, 4722, 7844, 149, 1024, 6, 0, 2.0, 42.0, 1300,
        {"BCPU": -45.0, "MCPU": -45.0, "GPU": -51.0, "PLL": 45.0, "AO": 47.5, "Tboard": 37.0,
         "Tdiode": 46.75, "PMIC": 100.0, "thermal": 46.4},
        {"VDD_IN": 14025, "VDD_CPU": 2209, "VDD_GPU": 6854, "VDD_SOC": 1371, "VDD_WIFI": 19,
         "VDD_DDR": 2702},
        None, id="tx2",
    ),
    pytest.param(
        TX1, 3607, 3983, 873, 8192, 4, 0, 1.0, 39.0, 76, {}, {}, None, id="tx1-l4t28",
    ),
    pytest.param(
        XAVIER_NX, 3168, 6851, 161, 3426, 6, 0, 2.0, 0.0, 114,
        {"AUX": 45.0, "CPU": 46.5, "thermal": 45.6, "AO": 45.0, "GPU": 45.5, "PMIC": 50.0},
        {"VDD_IN": 2763, "VDD_CPU_GPU_CV": 650, "VDD_SOC": 650},
        datetime(2024, 7, 9, 13, 31, 31), id="xavier-nx-jp5",
    ),
    pytest.param(
        XAVIER_OFF, 2690, 6854, 479, 3427, 6, 2, 0.0, 0.0, 510,
        {"AUX": 39.0, "CPU": 39.5, "AO": 37.5, "GPU": 37.5, "PMIC": 50.0},
        {"VDD_IN": 5079, "VDD_CPU_GPU_CV": 696, "VDD_SOC": 1104},
        None, id="xavier-cores-off",
    ),
    pytest.param(
        AGX_ORIN, 4321, 62801, 19, 31400, 12, 0, 0.0, 0.0, 0,
        {"CPU": 44.562, "Tboard": 32.0, "SOC2": 40.093, "Tdiode": 33.0, "SOC0": 41.093,
         "tj": 44.343, "SOC1": 41.25},
        {"VDD_GPU_SOC": 2340, "VDD_CPU_CV": 390, "VIN_SYS_5V0": 4025, "NC": 0,
         "VDDQ_VDD2_1V8AO": 301},
        datetime(2025, 4, 11, 10, 36, 27), id="agx-orin-jp5",
    ),
    pytest.param(
        AGX_ORIN_JP6, 18207, 62841, 86, 31420, 12, 0, 3.0, 0.0, 0,
        {"cpu": 52.562, "soc2": 48.437, "soc0": 49.093, "tj": 52.562, "soc1": 49.656},
        {"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 1607, "VIN_SYS_5V0": 4707},
        datetime(2026, 5, 9, 18, 42, 6), id="agx-orin-jp6",
    ),
    pytest.param(
        ORIN_NANO, 779, 7620, 0, 3810, 6, 0, None, 0.0, None,
        {"cpu": 50.125, "soc2": 49.125, "soc0": 49.25, "gpu": 50.562, "tj": 50.562,
         "soc1": 50.437},
        {"VDD_IN": 6626, "VDD_CPU_GPU_CV": 1228, "VDD_SOC": 2380},
        datetime(2026, 4, 27, 15, 0, 54), id="orin-nano-jp6",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    "line,ram_used,ram_total,swap_used,swap_total,n_cores,n_off,emc,gr3d,gr3d_mhz,temps,power,ts",
    CASES,
)
def test_parse_real_tegrastats_lines(
    line: str,
    ram_used: int,
    ram_total: int,
    swap_used: int,
    swap_total: int,
    n_cores: int,
    n_off: int,
    emc: float | None,
    gr3d: float,
    gr3d_mhz: int | None,
    temps: dict[str, float],
    power: dict[str, int],
    ts: datetime | None,
) -> None:
    s = parse_tegrastats(line)
    assert (s.ram_used_mb, s.ram_total_mb) == (ram_used, ram_total)
    assert (s.swap_used_mb, s.swap_total_mb) == (swap_used, swap_total)
    assert len(s.cpus) == n_cores
    assert sum(1 for c in s.cpus if not c.online) == n_off
    assert all(c.load_pct is None and c.freq_mhz is None for c in s.cpus if not c.online)
    assert s.emc_load_pct == emc
    assert (s.gr3d_load_pct, s.gr3d_freq_mhz) == (gr3d, gr3d_mhz)
    assert s.temperatures_c == temps
    assert s.power_mw == power
    assert s.timestamp == ts


def test_parse_details_per_core_and_averages() -> None:
    nano = parse_tegrastats(NANO_OFF)
    assert nano.cpus == (
        CpuCore(online=True, load_pct=22.0, freq_mhz=518),
        CpuCore(online=True, load_pct=67.0, freq_mhz=518),
        CpuCore(online=False),
        CpuCore(online=False),
    )
    assert nano.swap_cached_mb == 0
    tx1 = parse_tegrastats(TX1)  # shared "@1734" applies to every core
    assert [c.freq_mhz for c in tx1.cpus] == [1734] * 4
    assert tx1.swap_cached_mb == 281
    nx = parse_tegrastats(XAVIER_NX)
    assert nx.power_avg_mw == {"VDD_IN": 2846, "VDD_CPU_GPU_CV": 670, "VDD_SOC": 711}
    assert nx.emc_freq_mhz == 204
    assert parse_tegrastats(TX2).ram_used_mb == 4722  # RAM in "(lfb 1x512kB)" form
    assert parse_tegrastats(NANO + "\n").power_mw["POM_5V_IN"] == 4520


@pytest.mark.parametrize(
    "line",
    [
        "",
        "hello world",
        "tegrastats: command not found",
        "SWAP 0/1982MB (cached 0MB) CPU [22%@518]",  # no RAM field
        "RAM lots/ofMB",
    ],
)
def test_not_tegrastats_raises_value_error(line: str) -> None:
    with pytest.raises(ValueError, match="not a tegrastats line"):
        parse_tegrastats(line)


def test_unknown_tokens_are_ignored() -> None:
    s = parse_tegrastats("RAM 10/20MB FOO_BAR 12%@3 CPU [x,off,5%@9,??] WEIRD@C GR3D_FREQ 7%")
    assert s.cpus == (CpuCore(online=False), CpuCore(online=True, load_pct=5.0, freq_mhz=9))
    assert s.gr3d_load_pct == 7.0
    assert s.temperatures_c == {}
    assert s.power_mw == {}


_TOKENS = st.sampled_from(
    [
        "RAM", "SWAP", "CPU", "[", "]", "@", "%", "/", "mW", "MB", "kB", "C", "off", ",", " ",
        "GR3D_FREQ", "EMC_FREQ", "VDD_IN", "tj", "-256", "0", "12", "99999999999", "1.5", "(",
        ")", "cached", "lfb", "\n", "01-02-2024 10:11:12", "13-45-2024 99:99:99", "٣",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=300), st.lists(_TOKENS, max_size=60).map("".join)))
def test_random_input_gives_sample_or_value_error(line: str) -> None:
    try:
        s = parse_tegrastats(line)
    except ValueError:
        return
    assert isinstance(s, TegraSample)
    assert s.ram_used_mb >= 0 and s.ram_total_mb >= 0


@settings(max_examples=100, deadline=None)
@given(st.sampled_from([NANO, TX2, XAVIER_NX, AGX_ORIN, ORIN_NANO]), st.text(max_size=40))
def test_real_line_with_junk_appended_still_parses(line: str, junk: str) -> None:
    try:
        s = parse_tegrastats(line + " " + junk)
    except ValueError:  # pragma: no cover - a real line always has RAM
        pytest.fail("a real line with junk appended must still parse")
    assert s.ram_total_mb == parse_tegrastats(line).ram_total_mb


# ------------------------------------------------------------------- device.py pure helpers

PROC_STAT_LATER = "cpu  160 0 70 900 70 0 0 0 0 0\ncpu0 80 0 35 450 35 0 0 0 0 0\n"


def test_proc_stat_and_cpu_percent() -> None:
    a = parse_proc_stat(PROC_STAT, now=1.0)
    assert a == CpuTimes(total=1000, idle=850, at=1.0)
    b = parse_proc_stat(PROC_STAT_LATER, now=2.0)
    # delta total 200, delta idle (idle+iowait) 120 -> 40 % busy
    assert cpu_percent(a, b) == pytest.approx(40.0)
    assert cpu_percent(None, a) == pytest.approx(15.0)  # since boot
    assert cpu_percent(b, b) == 0.0
    with pytest.raises(ValueError, match="no aggregate 'cpu' line"):
        parse_proc_stat("intr 1\n")


def test_meminfo_loadavg_thermal_gpu_power_helpers() -> None:
    used, total = parse_meminfo(MEMINFO)
    assert total == pytest.approx(4051236 / 1024)
    assert used == pytest.approx((4051236 - 2025618) / 1024)
    with pytest.raises(ValueError, match="MemAvailable"):
        parse_meminfo("MemTotal: 10 kB\n")
    assert parse_loadavg("0.26 0.41 0.52 1/87 5290\n") == 0.26
    assert parse_millidegrees("45500\n") == 45.5
    assert parse_millidegrees("-256000") is None  # sensor off
    assert parse_millidegrees("garbage") is None
    assert parse_gpu_load("537\n") == 53.7
    assert parse_gpu_load("") is None
    assert ina3221_power_mw("5080\n", "1000\n") == 5080
    assert ina3221_power_mw("x", "1") is None


# ------------------------------------------------------------------- fake sysfs trees
# Fake /proc and /sys trees (tests.harness.jetson_sysfs) only because a Jetson's sysfs cannot
# exist on this x86 build machine; test_real_proc_smoke below reads this machine's real /proc.


@pytest.mark.parametrize(
    "build,temps,gpu,power",
    [
        pytest.param(
            nano_tree,
            {"AO-therm": 40.5, "CPU-therm": 37.0, "GPU-therm": 36.5},
            42.0,
            {"POM_5V_IN": 2552, "POM_5V_GPU": 0, "POM_5V_CPU": 320},
            id="nano",
        ),
        pytest.param(
            xavier_nx_tree,
            {"CPU-therm": 46.5, "GPU-therm": 45.5},
            0.0,
            {"VDD_IN": 2764, "VDD_CPU_GPU_CV": 650, "VDD_SOC": 650},
            id="xavier-nx",
        ),
        pytest.param(
            orin_tree,
            {"cpu-thermal": 52.562, "tj-thermal": 52.562},
            99.9,
            {"VDD_GPU_SOC": 3576, "VDD_CPU_CV": 397},
            id="agx-orin",
        ),
    ],
)
def test_fake_jetson_sysfs(
    tmp_path: Path,
    build: Callable[[Path], None],
    temps: dict[str, float],
    gpu: float,
    power: dict[str, int],
) -> None:
    build(tmp_path)
    stats, times = read_device_stats(tmp_path, prev_cpu=None, now=10.0, data_dir=tmp_path)
    assert set(stats) == STATS_KEYS
    assert stats["temperatures_c"] == temps
    assert stats["gpu_load_pct"] == pytest.approx(gpu)
    assert stats["power_mw"] == power
    assert stats["emc_load_pct"] is None
    assert stats["load1"] == 1.5
    assert stats["mem_total_mb"] == pytest.approx(4051236 / 1024)
    assert stats["cpu_percent"] == pytest.approx(15.0)
    assert 0.0 <= stats["disk_used_pct"] <= 100.0
    assert times == CpuTimes(total=1000, idle=850, at=10.0)

    write_file(tmp_path, "proc/stat", PROC_STAT_LATER)
    stats2, _ = read_device_stats(tmp_path, prev_cpu=times, now=11.0, data_dir=tmp_path)
    assert stats2["cpu_percent"] == pytest.approx(40.0)


def test_empty_root_gives_nones_not_exceptions(tmp_path: Path) -> None:
    stats, times = read_device_stats(tmp_path, prev_cpu=None, now=0.0, data_dir=tmp_path / "no")
    assert set(stats) == STATS_KEYS
    assert {k: v for k, v in stats.items() if v not in (None, {})} == {}
    assert times == CpuTimes(total=0, idle=0, at=0.0)


def test_garbage_files_give_nones(tmp_path: Path) -> None:
    write_file(tmp_path, "proc/stat", "nonsense\n")
    write_file(tmp_path, "proc/loadavg", "\n")
    write_file(tmp_path, "proc/meminfo", "MemTotal: lots\n")
    write_file(tmp_path, "sys/devices/gpu.0/load", "n/a\n")
    stats, _ = read_device_stats(tmp_path, prev_cpu=None, now=0.0)
    assert stats["cpu_percent"] is None
    assert stats["load1"] is None
    assert stats["mem_used_mb"] is None
    assert stats["gpu_load_pct"] is None


def test_tegrastats_sample_fills_emc_and_fallbacks(tmp_path: Path) -> None:
    fake_proc(tmp_path)
    sample = parse_tegrastats(AGX_ORIN_JP6)
    stats, _ = read_device_stats(tmp_path, prev_cpu=None, now=0.0, tegra=sample)
    assert stats["emc_load_pct"] == 3.0
    assert stats["gpu_load_pct"] == 0.0
    assert stats["power_mw"] == {"VDD_GPU_SOC": 2412, "VDD_CPU_CV": 1607, "VIN_SYS_5V0": 4707}


def test_real_proc_smoke() -> None:
    stats, first = read_device_stats(prev_cpu=None, now=1.0)
    stats, second = read_device_stats(prev_cpu=first, now=2.0)
    assert set(stats) == STATS_KEYS
    assert 0.0 <= stats["cpu_percent"] <= 100.0
    assert stats["mem_total_mb"] > 0
    assert 0 <= stats["mem_used_mb"] <= stats["mem_total_mb"]
    assert stats["load1"] >= 0
    assert 0.0 <= stats["disk_used_pct"] <= 100.0
    assert second.total >= first.total > 0
    assert all(isinstance(v, float) for v in stats["temperatures_c"].values())


# ------------------------------------------------------------------- TegrastatsReader


def test_tegrastats_reader_unavailable_here_says_why() -> None:
    reader = TegrastatsReader(1000)
    assert not reader.available()
    assert reader.why_unavailable is not None
    assert "tegrastats" in reader.why_unavailable and "Jetson" in reader.why_unavailable
    with pytest.raises(RuntimeError, match="not found"):
        reader.start()
    reader.stop()  # stopping a never-started reader is harmless
    assert reader.latest() is None


def test_tegrastats_reader_bad_interval() -> None:
    with pytest.raises(ValueError, match="interval_ms"):
        TegrastatsReader(0)


def test_tegrastats_reader_runs_a_process_and_stops(tmp_path: Path) -> None:
    # A stand-in executable that prints a real Orin line, then junk, forever (like tegrastats).
    script = tmp_path / "tegrastats"
    script.write_text(
        f"#!/bin/sh\nwhile true; do echo '{ORIN_NANO.strip()}'; echo 'garbage'; sleep 0.05; done\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    reader = TegrastatsReader(100, binary=str(script))
    assert reader.available(), reader.why_unavailable
    reader.start()
    try:
        got = threading.Event()
        for _ in range(200):
            if reader.latest() is not None:
                got.set()
                break
            got.wait(0.05)
        sample = reader.latest()
        assert sample is not None
        assert sample.power_mw["VDD_IN"] == 6626
        assert reader.running()
    finally:
        reader.stop()
    assert not reader.running()
    reader.stop()  # second stop is harmless
    assert os.path.exists(script)
