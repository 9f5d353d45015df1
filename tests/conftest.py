"""Shared fixtures: the project's test models, videos made with OpenCV/ffmpeg, live streams,
a broker, a delivery fleet, PostgreSQL. The code behind them is in ``tests/harness``."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from scripts import make_test_models
from tests.harness.broker import Mosquitto
from tests.harness.fleet import Fleet
from tests.harness.models import build_test_models, write_digit_loop
from tests.harness.util import UdpStream, free_port


@pytest.fixture(scope="session")
def model_script() -> ModuleType:
    return make_test_models


@pytest.fixture(scope="session")
def test_models() -> dict[str, Path]:
    return build_test_models()


@pytest.fixture(scope="session")
def synthetic_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agent.pipeline.synthetic import write_synthetic_video

    return write_synthetic_video(tmp_path_factory.mktemp("video") / "synthetic.avi", frames=90)


@pytest.fixture
def udp_stream(synthetic_video: Path) -> Iterator[UdpStream]:
    stream = UdpStream(synthetic_video, free_port(socket.SOCK_DGRAM))
    yield stream
    stream.stop()


@pytest.fixture
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A fresh Mosquitto per test (start-up takes ~20 ms)."""
    b = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def digit_loop(tmp_path_factory: pytest.TempPathFactory, test_models: dict[str, Path]) -> Path:
    return write_digit_loop(test_models, tmp_path_factory.mktemp("loop") / "digits.mkv")


@pytest.fixture
def fleet(
    tmp_path: Path, broker: Mosquitto, digit_loop: Path, test_models: dict[str, Path]
) -> Iterator[Fleet]:
    """A registry and its chunk server on the broker, the digit video, no agent yet."""
    f = Fleet(tmp_path, broker, digit_loop, test_models)
    f.start_server()
    yield f
    f.close()


# The PostgreSQL server fixtures live with the server's harness; importing them here makes
# them available to every test module.
from tests.harness.postgres import db_url, postgres, store  # noqa: E402, F401
