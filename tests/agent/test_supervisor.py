"""`edgefleet-agent run` under a systemd-like supervisor: sd_notify on a real datagram socket,
watchdog pings that stop when inference hangs, SIGHUP reloads, clean SIGTERM, journald lines."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from tests.harness.util import terminate

pytestmark = [pytest.mark.video, pytest.mark.slow]
AGENT = str(Path(sys.executable).parent / "edgefleet-agent")


class Systemd:
    """The manager's end of $NOTIFY_SOCKET: collects what the service sends, with times."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.got: list[tuple[float, str]] = []

    def pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with contextlib.suppress(TimeoutError):
                self.got.append((time.monotonic(), self.sock.recv(4096).decode()))

    def wait_for(self, text: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(text in m for _, m in self.got):
                return True
            self.pump(0.2)
        return False

    def since(self, t: float, text: str) -> int:
        return sum(1 for at, m in self.got if at >= t and text in m)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[Systemd]:
    s = Systemd(tmp_path / "notify.sock")
    yield s
    s.close()


def _config(tmp: Path, video: Path, model: Path, name: str = "front", stall_s: float = 30) -> str:
    return (f'device_id = "svc-01"\ndata_dir = "{tmp / "data"}"\nprofile = "x86-cpu"\n'
            f"[service]\nstall_s = {stall_s}\n"
            f'[[pipelines]]\nname = "{name}"\nsource = "{video}"\nmodel = "{model}"\n'
            "loop = true\n")  # fmt: skip


def _start(tmp: Path, systemd: Systemd, conf: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(tmp / "stderr.log", "wb") as err:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            [AGENT, "run", "--config", str(conf)],
            env={**os.environ, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "1000000",
                 "WATCHDOG_PID": "", **env},
            stdout=subprocess.DEVNULL, stderr=err,
        )  # fmt: skip


def test_ready_watchdog_reload_and_stop(
    tmp_path: Path, systemd: Systemd, synthetic_video: Path, test_models: dict[str, Path]
) -> None:
    model = test_models["blobdet"] / "model.onnx"
    conf = tmp_path / "agent.toml"
    conf.write_text(_config(tmp_path, synthetic_video, model))
    proc = _start(tmp_path, systemd, conf, JOURNAL_STREAM="8:1234")
    try:
        assert systemd.wait_for("READY=1", 60), systemd.got
        t = time.monotonic()
        systemd.pump(3)
        assert systemd.since(t, "WATCHDOG=1") >= 4  # every 0.5 s while frames flow

        conf.write_text("device_id = [not toml")  # a broken edit, then SIGHUP
        proc.send_signal(signal.SIGHUP)
        assert systemd.wait_for("STATUS=reload failed", 10), systemd.got
        t = time.monotonic()
        systemd.pump(2)
        assert proc.poll() is None and systemd.since(t, "WATCHDOG=1") >= 2  # still running

        conf.write_text(_config(tmp_path, synthetic_video, model, name="rear"))
        proc.send_signal(signal.SIGHUP)
        assert systemd.wait_for("RELOADING=1", 10), systemd.got
        assert systemd.wait_for("STATUS=reloaded", 60), systemd.got
        status = tmp_path / "data" / "status.json"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            names = [p["name"] for p in json.loads(status.read_text())["pipelines"]]
            if names == ["rear"]:
                break
            time.sleep(0.2)
        assert names == ["rear"]

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        systemd.pump(0.5)
        assert any("STOPPING=1" in m for _, m in systemd.got)
    finally:
        terminate(proc)
    log = (tmp_path / "stderr.log").read_text()
    lines = [ln for ln in log.splitlines() if ln]
    assert lines and all(ln[:3] in ("<3>", "<4>", "<6>", "<7>") for ln in lines), lines[:5]
    assert any(ln.startswith("<3>") and "config not reloaded" in ln for ln in lines)


def _hanging_model(path: Path) -> Path:
    """A model whose inference never ends: a Loop of 10^15 additions (no GPU needed to hang)."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]),
         helper.make_node("Add", ["x_in", "one"], ["x_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
    )  # fmt: skip
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "images"], ["out"], body=body)],
        "hang",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 3, 32, 32])],
        [helper.make_tensor("trips", TensorProto.INT64, [], [10**15]),
         helper.make_tensor("cond", TensorProto.BOOL, [], [True])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    assert np.zeros(1).size == 1
    return path


def test_a_hung_inference_stops_the_watchdog(
    tmp_path: Path, systemd: Systemd, synthetic_video: Path
) -> None:
    model = _hanging_model(tmp_path / "hang" / "hang.onnx")
    conf = tmp_path / "agent.toml"
    conf.write_text(_config(tmp_path, synthetic_video, model, stall_s=2)
                    .replace('model = "', 'task = "raw"\nmodel = "'))  # fmt: skip
    proc = _start(tmp_path, systemd, conf)
    try:
        assert systemd.wait_for("READY=1", 60), systemd.got
        assert systemd.wait_for("no frame inferred", 15), systemd.got
        t = time.monotonic()
        systemd.pump(3)
        assert proc.poll() is None  # alive but hung: only the watchdog can tell
        assert systemd.since(t, "WATCHDOG=1") == 0, systemd.got[-5:]
    finally:
        proc.kill()  # what systemd does after WatchdogSec without a ping
        proc.wait(10)


def test_a_status_file_that_cannot_be_written_does_not_end_the_agent(
    tmp_path: Path,
    synthetic_video: Path,
    test_models: dict[str, Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from agent.config import parse_config
    from agent.supervisor import Supervisor

    cfg = parse_config({
        "device_id": "svc-02", "data_dir": str(tmp_path / "data"), "profile": "x86-cpu",
        "pipelines": [{"name": "front", "source": str(synthetic_video), "loop": True,
                       "model": str(test_models["blobdet"] / "model.onnx")}],
    })  # fmt: skip
    (tmp_path / "data" / "status.json").mkdir(parents=True)  # writes to it fail (EISDIR)
    sup = Supervisor(None, cfg, env={})
    assert sup.run(duration_s=3) == 0
    errors = [r.getMessage() for r in caplog.records if "status.json not written" in r.getMessage()]
    assert len(errors) == 1  # logged once, not on every loop
