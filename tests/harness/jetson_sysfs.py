"""Fake ``/proc`` and Jetson ``/sys`` trees under a folder, for the device-stats reader.

A fake tree is used only because a Jetson's sysfs cannot exist on this x86 build machine; the
layouts copy the real paths cited in agent/telemetry/device.py (the real /proc of this machine
is exercised by the device-stats tests' smoke test).
"""

from __future__ import annotations

from pathlib import Path

PROC_STAT = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\nintr 1\n"
MEMINFO = "MemTotal:        4051236 kB\nMemFree:          100000 kB\nMemAvailable:    2025618 kB\n"


def write_file(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def fake_proc(root: Path) -> None:
    write_file(root, "proc/stat", PROC_STAT)
    write_file(root, "proc/loadavg", "1.50 1.00 0.50 2/300 1234\n")
    write_file(root, "proc/meminfo", MEMINFO)


def _zones(root: Path, zones: list[tuple[str, str]]) -> None:
    for i, (name, temp) in enumerate(zones):
        write_file(root, f"sys/class/thermal/thermal_zone{i}/type", name + "\n")
        write_file(root, f"sys/class/thermal/thermal_zone{i}/temp", temp + "\n")


def nano_tree(root: Path) -> None:
    # JetPack 4 / L4T 32: gpu.0/load and the IIO ina3221x driver at 6-0040.
    fake_proc(root)
    _zones(root, [("AO-therm", "40500"), ("CPU-therm", "37000"), ("GPU-therm", "36500")])
    write_file(root, "sys/devices/gpu.0/load", "420\n")
    iio = "sys/bus/i2c/drivers/ina3221x/6-0040/iio:device0"
    for n, (name, mw) in enumerate([("POM_5V_IN", 2552), ("POM_5V_GPU", 0), ("POM_5V_CPU", 320)]):
        write_file(root, f"{iio}/rail_name_{n}", name + "\n")
        write_file(root, f"{iio}/in_power{n}_input", f"{mw}\n")


def _hwmon(root: Path, base: str, channels: list[tuple[int, str, int | None, int]]) -> None:
    for ch, label, ma, mv in channels:
        write_file(root, f"{base}/in{ch}_label", label + "\n")
        write_file(root, f"{base}/in{ch}_input", f"{mv}\n")
        if ma is not None:
            write_file(root, f"{base}/curr{ch}_input", f"{ma}\n")


def xavier_nx_tree(root: Path) -> None:
    # JetPack 5: platform/gpu.0/load and hwmon ina3221 at 7-0040 (alumet README example),
    # channel 7 "sum of shunt voltages" has no current file.
    fake_proc(root)
    _zones(root, [("CPU-therm", "46500"), ("GPU-therm", "45500")])
    write_file(root, "sys/devices/platform/gpu.0/load", "0\n")
    _hwmon(
        root,
        "sys/bus/i2c/drivers/ina3221/7-0040/hwmon/hwmon6",
        [
            (1, "VDD_IN", 544, 5080),
            (2, "VDD_CPU_GPU_CV", 128, 5080),
            (3, "VDD_SOC", 128, 5080),
            (7, "sum of shunt voltages", None, 40),
        ],
    )


def orin_tree(root: Path) -> None:
    # JetPack 6 AGX Orin: bus@0/17000000.gpu/load, hwmon found via /sys/class/hwmon by name,
    # an "NC" channel, a GPU zone that is off (-256 C) and a zone whose temp cannot be read.
    fake_proc(root)
    _zones(root, [("cpu-thermal", "52562"), ("gpu-thermal", "-256000"), ("tj-thermal", "52562")])
    (root / "sys/class/thermal/thermal_zone3").mkdir(parents=True)
    write_file(root, "sys/class/thermal/thermal_zone3/type", "cv0-thermal\n")  # no temp file
    write_file(root, "sys/devices/platform/bus@0/17000000.gpu/load", "999\n")
    write_file(root, "sys/class/hwmon/hwmon0/name", "some_other_chip\n")
    _hwmon(root, "sys/class/hwmon/hwmon0", [(1, "NOT_INA", 1, 1)])
    write_file(root, "sys/class/hwmon/hwmon1/name", "ina3221\n")
    _hwmon(
        root,
        "sys/class/hwmon/hwmon1",
        [(1, "VDD_GPU_SOC", 180, 19864), (2, "VDD_CPU_CV", 20, 19864), (3, "NC", 0, 0)],
    )
