"""Shared fixtures: the project's test models, videos made with OpenCV/ffmpeg, live streams."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from cloud_sync.localbroker import MosquittoBroker, mosquitto_path

ROOT = Path(__file__).resolve().parent.parent
MODEL_SCRIPT = ROOT / "scripts" / "make_test_models.py"


def load_module_from_path(name: str, path: Path) -> ModuleType:
    """Import a file as module ``name`` (scripts/ and test helpers are not packages)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot import {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_model_script() -> ModuleType:
    return load_module_from_path("make_test_models", MODEL_SCRIPT)


@pytest.fixture(scope="session")
def model_script() -> ModuleType:
    return load_model_script()


def build_test_models() -> dict[str, Path]:
    """Models built by scripts/make_test_models.py, cached in .models/<hash of their code>
    (the ``test_models`` fixture; the fault-suite scripts call it too)."""
    h = hashlib.sha256(MODEL_SCRIPT.read_bytes())
    for f in sorted((ROOT / "cloud_sync" / "samples").glob("*.py")):
        h.update(f.read_bytes())
    out = ROOT / ".models" / h.hexdigest()[:16]
    done = out / ".complete"
    if not done.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        # one builder at a time: pytest-xdist workers (and scripts) may ask at once
        with open(out.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                if out.exists():
                    shutil.rmtree(out)
                built = load_model_script().build_all(out)
                done.write_text("\n".join(f"{k}={v}" for k, v in built.items()))
    return {
        line.split("=", 1)[0]: Path(line.split("=", 1)[1]) for line in done.read_text().splitlines()
    }


@pytest.fixture(scope="session")
def test_models() -> dict[str, Path]:
    return build_test_models()


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; reaps the process."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; scripts/test installs it (apt-get install {name})")
    return path


@pytest.fixture(scope="session")
def synthetic_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agent.pipeline.synthetic import write_synthetic_video

    return write_synthetic_video(tmp_path_factory.mktemp("video") / "synthetic.avi", frames=90)


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


@pytest.fixture
def udp_stream(synthetic_video: Path) -> Iterator[UdpStream]:
    stream = UdpStream(synthetic_video, free_port(socket.SOCK_DGRAM))
    yield stream
    stream.stop()


def wait_for(cond: object, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll ``cond()`` until true or timeout; returns the last value's truth."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():  # type: ignore[operator]
            return True
        time.sleep(interval)
    return bool(cond())  # type: ignore[operator]


class Mosquitto(MosquittoBroker):
    """A real Mosquitto broker on a free loopback port; ``stop``/``start`` simulate outages."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        super().__init__(workdir, port)
        if os.geteuid() == 0:
            # as root Mosquitto drops to the 'mosquitto' user, which cannot write persistence
            # files or read keys in pytest's root-only temp dirs
            self.conf.write_text(self.conf.read_text() + "user root\n")

    def start(self) -> None:
        if mosquitto_path() is None:
            pytest.fail(
                "mosquitto is not installed; scripts/test installs it (apt-get install mosquitto)"
            )
        super().start()


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A fresh Mosquitto per test (start-up takes ~20 ms)."""
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


# The PostgreSQL server fixture lives in its own module (it needs free_port above); importing
# it here makes it available to every test module.
from tests._postgres import db_url, postgres, store  # noqa: E402, F401
