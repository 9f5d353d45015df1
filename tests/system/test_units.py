"""The systemd units: valid syntax and sandboxing scored by systemd itself."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = sorted((Path(__file__).resolve().parents[2] / "systemd").glob("*.service"))
ANALYZE = shutil.which("systemd-analyze")
needs_systemd = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def test_the_three_units_exist() -> None:
    names = {u.name for u in UNITS}
    assert names == {"edgefleet-agent.service", "edgefleet-ingest.service",
                     "edgefleet-registry.service", "edgefleet-crl.service"}  # fmt: skip
    timer = UNITS[0].parent / "edgefleet-crl.timer"
    assert "OnCalendar=daily" in timer.read_text() and "Persistent=true" in timer.read_text()


@needs_systemd
@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_syntax(unit: Path, tmp_path: Path) -> None:
    r = subprocess.run([str(ANALYZE), "verify", str(unit)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60, check=False)  # fmt: skip
    # the only complaint allowed here is the binary, which this machine has not installed
    problems = [ln for ln in (r.stderr + r.stdout).splitlines()
                if ln.strip() and "is not executable" not in ln]  # fmt: skip
    assert problems == []


@needs_systemd
@pytest.mark.parametrize(
    "unit,limit",
    [("edgefleet-agent.service", 2.5), ("edgefleet-ingest.service", 2.0),
     ("edgefleet-registry.service", 2.0), ("edgefleet-crl.service", 2.5)],
)  # fmt: skip
def test_exposure_score(unit: str, limit: float, tmp_path: Path) -> None:
    path = next(u for u in UNITS if u.name == unit)
    cmd = [str(ANALYZE), "security", "--offline=yes", str(path)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m is not None, r.stdout[-500:] + r.stderr[-500:]
    assert float(m.group(1)) <= limit


def test_agent_unit_keeps_cameras_and_gpu_reachable() -> None:
    text = next(u for u in UNITS if u.name == "edgefleet-agent.service").read_text()
    assert "Type=notify" in text and "WatchdogSec=" in text
    for needed in ("DeviceAllow=char-video4linux rw", "DeviceAllow=/dev/nvidiactl rw",
                   "DeviceAllow=/dev/nvmap rw", "SupplementaryGroups=video render",
                   "ReadWritePaths=/var/lib/edgefleet"):  # fmt: skip
        assert needed in text
    assert "PrivateDevices=yes" not in text  # it would hide the cameras and the GPU


def test_agent_unit_bounds_descriptors_below_select_limit() -> None:
    """The API's connection cap plus cameras and MQTT fit; paho's select() needs fds < 1024."""
    text = next(u for u in UNITS if u.name == "edgefleet-agent.service").read_text()
    m = re.search(r"^LimitNOFILE=(\d+)$", text, re.M)
    assert m is not None and int(m.group(1)) <= 1024
