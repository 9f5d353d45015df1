"""Small helpers of the tests, benchmarks and fault suites: polling, ports, child processes,
a full disk, a live UDP stream."""

from __future__ import annotations

import errno
import random
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def script_workdir(given: Path | None, prefix: str) -> Path:
    """A fault suite's work folder: ``given`` (``--workdir``, made if missing) or a new temp
    folder named ``prefix…``."""
    workdir = given or Path(tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    return workdir


def wait_for(cond: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``cond()`` until true or timeout; returns the last value's truth."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return bool(cond())


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A loopback port that was free a moment ago (from the kernel's ephemeral range)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stable_port() -> int:
    """A free loopback port below the kernel's ephemeral range.

    For a listener that listens again on the same port after an outage: a port from the
    ephemeral range (what ``bind(0)`` returns) can meanwhile become the local port of some
    outgoing connection, and the restart then fails with "Address already in use".
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, max(10_001, low))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free loopback port in 10000..{low}")


def terminate(proc: subprocess.Popen[Any] | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; reaps the process."""
    if proc is None:
        return
    proc.terminate()
    reap(proc, timeout)


def reap(proc: subprocess.Popen[Any], timeout: float) -> None:
    """Wait ``timeout`` for the process to end (asked to already), then SIGKILL it; reaps it."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def require_binary(name: str) -> str:
    """The path of ``name``, or a failed test naming its install."""
    path = shutil.which(name)
    if path is None:
        import pytest

        pytest.fail(f"{name} is not installed; scripts/test installs it (apt-get install {name})")
    return path


def fill(path: Path) -> Path:
    """Write zeros into ``path/filler`` until the file system says ENOSPC."""
    filler = path / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (65536, 512, 1):  # then the last partial blocks too
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
    return filler


class UdpStream:
    """An ffmpeg process streaming a file as MPEG-TS to a UDP port on loopback."""

    def __init__(self, video: Path, port: int) -> None:
        self.video = video
        self.port = port
        self.url = f"udp://127.0.0.1:{port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        ffmpeg = require_binary("ffmpeg")
        self.proc = subprocess.Popen(
            [
                ffmpeg,
                "-hide_banner",
                "-loglevel",
                "error",
                "-re",
                "-stream_loop",
                "-1",
                "-i",
                str(self.video),
                "-c:v",
                "mpeg2video",
                "-q:v",
                "5",
                "-g",
                "10",
                "-f",
                "mpegts",
                f"{self.url}?pkt_size=1316",
            ],
            stdin=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        terminate(self.proc)
        self.proc = None


def promtool(text: bytes) -> str:
    """``promtool check metrics`` on exposition text: its complaints ('' when clean)."""
    exe = shutil.which("promtool")
    if exe is None:  # fail, never skip: CI must run this
        pytest.fail("promtool not installed; scripts/test installs it (apt-get install prometheus)")
    r = subprocess.run([exe, "check", "metrics"], input=text, capture_output=True, timeout=60)
    out = (r.stdout + r.stderr).decode()
    return out if r.returncode != 0 or out.strip() else ""
