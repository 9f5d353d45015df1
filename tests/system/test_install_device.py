"""scripts/install-device.sh into a staging root: install, idempotent re-run, uninstall, purge."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-device.sh"


def run(*args: str, root: Path, path: str = "/usr/bin:/bin:/usr/sbin:/sbin") -> str:
    r = subprocess.run(["bash", str(SCRIPT), "--root", str(root), "--no-user", "--no-systemctl",
                        *args], capture_output=True, text=True, timeout=900, check=False,
                       env={"PATH": path, "PYTHON": sys.base_prefix + "/bin/python3"})  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return r.stdout


def test_bad_option_is_a_usage_error(tmp_path: Path) -> None:
    r = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True,
                       timeout=60, check=False)  # fmt: skip
    assert r.returncode == 2 and "unknown option --frobnicate" in r.stderr


@pytest.mark.slow
def test_install_rerun_uninstall_purge(tmp_path: Path) -> None:
    root = tmp_path / "root"
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "device.key").write_text("-----BEGIN PRIVATE KEY-----\n")
    (bundle / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n")
    # every `install` the script runs is logged: the key must be created private, not
    # chmod-ed afterwards (it would be world-readable in between)
    shims, log = tmp_path / "shims", tmp_path / "install.log"
    shims.mkdir()
    (shims / "install").write_text(f'#!/bin/sh\necho "$*" >> {log}\nexec /usr/bin/install "$@"\n')
    (shims / "install").chmod(0o755)
    out = run("--bundle", str(bundle), root=root, path=f"{shims}:/usr/bin:/bin:/usr/sbin:/sbin")
    key_installs = [ln for ln in log.read_text().splitlines() if ln.endswith("/device.key")]
    assert key_installs and all(ln.startswith("-m 0640 ") for ln in key_installs), key_installs
    assert "writing a config skeleton" in out
    venv = root / "opt/edgefleet/venv"
    agent = venv / "bin/edgefleet-agent"
    assert agent.is_file()
    unit = root / "etc/systemd/system/edgefleet-agent.service"
    assert "Type=notify" in unit.read_text()
    conf = root / "etc/edgefleet/agent.toml"
    assert (root / "etc/edgefleet/device.key").stat().st_mode & 0o777 == 0o640
    assert (root / "var/lib/edgefleet").stat().st_mode & 0o777 == 0o750
    # the installed agent validates the skeleton it was given
    r = subprocess.run([str(agent), "check", "--config", str(conf)], capture_output=True,
                       text=True, timeout=120, check=False)  # fmt: skip
    assert "pipeline" in r.stdout + r.stderr, r.stdout + r.stderr
    # re-run: the operator's edits survive, nothing breaks
    conf.write_text(conf.read_text().replace('name = "front"', 'name = "gate"'))
    out = run(root=root)
    assert "keeping the existing" in out and 'name = "gate"' in conf.read_text()
    # uninstall keeps config and data, purge removes them
    run("--uninstall", root=root)
    assert not venv.exists() and not unit.exists()
    assert conf.exists() and (root / "var/lib/edgefleet").exists()
    run("--uninstall", "--purge", root=root)
    assert not conf.exists() and not (root / "var/lib/edgefleet").exists()
