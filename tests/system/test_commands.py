"""Signed commands end to end: ``edgefleet device cmd`` and raw payloads through a real
Mosquitto to a real ``edgefleet-agent run`` process on a looping video and a real ONNX model.

What runs: restart a pipeline (its frame counter starts again), snapshot (a JPEG fetched with
the chunk protocol), check, the last hour of logs (gzip, bounded, with a line the agent
logged), restart the agent (exit code 75, which the systemd unit restarts). What is refused,
answered on ``cmd/result``, logged, and survived: unsigned, signed by an untrusted key, for
another device, expired, replayed (also after a restart), unknown, malformed args.
"""

from __future__ import annotations

import gzip
import queue
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from securesystemslib.signer import CryptoSigner

from agent.protocol.command import (
    Command,
    CommandResult,
    ResultStatus,
    SignedCommand,
    new_command,
    sign_command,
)
from agent.protocol.topics import Topics
from agent.systemd import RESTART_EXIT_CODE
from cloud_sync.cli import main as edgefleet
from cloud_sync.commands import send_command
from tests.harness.agent_process import AgentProcess
from tests.harness.fleet import Fleet
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video]


def frames(agent: AgentProcess) -> int:
    pipes = agent.status().get("pipelines") or [{}]
    return int(pipes[0].get("frames_inferred", 0))


@pytest.fixture
def agent(fleet: Fleet, test_models: dict[str, Path]) -> Iterator[AgentProcess]:
    """The agent process running the digits model from a local file (no delivery needed)."""
    a = AgentProcess(fleet, health_window_s=0.5)
    a.write_config(str(fleet.video), pipeline="loop = true\n",
                   model=str(test_models["digits"] / "model.onnx"))  # fmt: skip
    a.start()
    assert wait_for(lambda: frames(a) > 5, 60), a.status()
    yield a
    a.stop()


class Wire:
    """Publishes raw ``cmd`` payloads and collects what comes back on ``cmd/result``."""

    def __init__(self, fleet: Fleet) -> None:
        self.topics = Topics()
        self.device = fleet.device
        self.results: queue.Queue[CommandResult] = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="cmd-wire")
        self.client.on_message = lambda c, u, m: self.results.put(CommandResult.decode(m.payload))
        self.client.connect(fleet.broker.host, fleet.broker.port)
        self.client.subscribe(self.topics.device(fleet.device, "cmd/result"), qos=1)
        self.client.loop_start()

    def send(self, payload: bytes) -> None:
        info = self.client.publish(self.topics.device(self.device, "cmd"), payload, qos=1)
        info.wait_for_publish(5)

    def final(self, timeout: float = 20.0) -> CommandResult:
        while True:
            r = self.results.get(timeout=timeout)
            if r.final:
                return r

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def signed(fleet: Fleet, name: str, args: dict[str, Any] | None = None,
           device: str | None = None, **change: Any) -> SignedCommand:  # fmt: skip
    c: Command = new_command(device or fleet.device, name, args, now=datetime.now(timezone.utc))
    if change:
        c = c.model_copy(update=change)
    return sign_command(c, [fleet.repo.desired_signer()])


def test_operator_commands_run_on_a_real_agent(
    fleet: Fleet, agent: AgentProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = fleet
    common = ["--repo", str(f.repo_dir), "--broker", f.broker.url, "--timeout", "30"]

    # check: the device's own `edgefleet-agent check`, printed, exit 0
    assert edgefleet(["device", "cmd", f.device, "check", *common]) == 0
    out = capsys.readouterr().out
    assert "succeeded" in out and "pipeline front" in out and "profile x86-cpu" in out

    # snapshot: the next inferred frame as a JPEG, fetched over the chunk protocol
    jpg = tmp_path / "front.jpg"
    res = send_command(f.repo_dir, f.broker.url, f.device, "snapshot", {"pipeline": "front"},
                       fetch_to=jpg)  # fmt: skip
    assert res.status is ResultStatus.SUCCEEDED, res
    image = cv2.imdecode(np.frombuffer(jpg.read_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert image is not None and image.shape[1] == res.data["width"]

    # restart_pipeline: a new Pipeline, so its frame counter starts again
    assert wait_for(lambda: frames(agent) > 60, 60), agent.status()
    before = frames(agent)
    assert edgefleet(["device", "cmd", f.device, "restart-pipeline", "front", *common]) == 0
    assert wait_for(lambda: 0 < frames(agent) < before, 30), (before, agent.status())
    # a pipeline the device does not run: failed, with the names it does run, exit 1
    assert edgefleet(["device", "cmd", f.device, "restart-pipeline", "nope", *common]) == 1
    assert "no pipeline 'nope'" in capsys.readouterr().err

    # logs: the last hour, gzip'd, bounded, holding the restart the agent just logged
    logs = tmp_path / "logs.gz"
    assert edgefleet(["device", "cmd", f.device, "logs", "--since", "1h", "-o", str(logs),
                      *common]) == 0  # fmt: skip
    text = gzip.decompress(logs.read_bytes()).decode()
    assert "pipeline=front restarted" in text
    assert "name=restart_pipeline args={'pipeline': 'front'} accepted" in text
    small = send_command(f.repo_dir, f.broker.url, f.device, "upload_logs",
                         {"since": "2000-01-01T00:00:00Z", "max_bytes": 2048},
                         fetch_to=tmp_path / "small.gz")  # fmt: skip
    tail = gzip.decompress((tmp_path / "small.gz").read_bytes())
    assert 0 < len(tail) <= 2048 and small.data["bytes"] == len(tail)
    # the newest lines are kept: the earliest line of the whole log is not among them
    assert text.splitlines()[0].encode() not in tail

    # restart_agent: succeeded is sent first, then the process exits with 75 for systemd
    assert edgefleet(["device", "cmd", f.device, "restart-agent", *common]) == 0
    assert agent.proc is not None and agent.proc.wait(30) == RESTART_EXIT_CODE


def test_bad_commands_are_refused_reported_logged_and_survived(
    fleet: Fleet, agent: AgentProcess
) -> None:
    f = fleet
    wire = Wire(f)
    now = datetime.now(timezone.utc)
    stranger = CryptoSigner.generate_ed25519()
    good = signed(f, "check")
    forged = sign_command(good.signed.model_copy(update={"nonce": "ab" * 16}), [stranger])
    cases: list[tuple[str, bytes, str]] = [
        ("unsigned", SignedCommand(signed=good.signed).encode(), "unsigned"),
        ("bad signature", forged.encode(), "signature"),
        ("other device", signed(f, "check", device="cam-99").encode(), "device"),
        (
            "expired",
            signed(
                f,
                "check",
                issued_at=now - timedelta(minutes=10),
                expires_at=now - timedelta(minutes=5),
            ).encode(),
            "expired",
        ),
        ("unknown", signed(f, "format_disk").encode(), "unknown"),
        ("malformed args", signed(f, "restart_pipeline", {"pipeline": "../x"}).encode(), "args"),
        ("not json", b"{not json", "malformed"),
    ]
    try:
        for label, payload, why in cases:
            wire.send(payload)
            r = wire.final()
            assert r.status is ResultStatus.REFUSED and r.reason.startswith(f"{why}:"), (label, r)
        wire.send(good.encode())
        assert wire.final().status is ResultStatus.SUCCEEDED
        wire.send(good.encode())  # the same payload again
        r = wire.final()
        assert r.status is ResultStatus.REFUSED and r.reason.startswith("replay:"), r
        assert agent.proc is not None and agent.proc.poll() is None  # still running
        log = (agent.data / "logs" / "agent.log").read_text()
        for _label, _payload, why in cases:
            assert f"refused ({why})" in log, why

        # a restart forgets nothing: the replay memory is on disk
        restart = signed(f, "restart_agent")
        wire.send(restart.encode())
        assert wire.final().status is ResultStatus.SUCCEEDED
        assert agent.proc.wait(30) == RESTART_EXIT_CODE
        restarted = time.time()
        agent.start()
        # the new process's status (not the old one's file) says it is connected, so it has
        # subscribed to cmd: a clean session would lose a command sent before that
        assert wait_for(lambda: agent.status().get("time", 0) > restarted
                        and agent.status()["broker"]["connected"], 60), agent.status()  # fmt: skip
        for replayed in (good, restart):
            wire.send(replayed.encode())
            r = wire.final(30)
            assert r.status is ResultStatus.REFUSED and r.reason.startswith("replay:"), r
        assert agent.proc.poll() is None
    finally:
        wire.close()


def test_an_offline_device_times_out_with_its_name(
    fleet: Fleet, capsys: pytest.CaptureFixture[str]
) -> None:
    """No agent answers: the operator learns which device and what to check, exit code 2."""
    argv = ["device", "cmd", "cam-77", "check", "--repo", str(fleet.repo_dir),
            "--broker", fleet.broker.url, "--timeout", "1"]  # fmt: skip
    assert edgefleet(argv) == 2
    err = capsys.readouterr().err
    assert "device cam-77 did not answer check within 1 s" in err
