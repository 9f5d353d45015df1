"""Agent lifecycle when every source has ended (a file without ``loop``): the agent says so in
its log, reported state and status.json, and keeps serving desired states; with
``--exit-when-sources-end`` it exits 0. Real Mosquitto, registry, agent and video."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.service import Agent
from agent.supervisor import Supervisor
from tests.harness.broker import Mosquitto
from tests.harness.fleet import Fleet
from tests.harness.util import terminate, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video]
AGENT = str(Path(sys.executable).parent / "edgefleet-agent")
FRAMES = 15


def test_sources_ended_is_reported_and_the_agent_keeps_serving_updates(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="agent.supervisor")
    fleet.publish("digits", "1.0.0")
    cfg = fleet.config()
    cfg = cfg.model_copy(update={"pipelines": [
        p.model_copy(update={"loop": False, "pace": "none"}) for p in cfg.pipelines]})  # fmt: skip

    def make_agent(c: AgentConfig) -> Agent:
        fleet.agent = Agent(c)
        return fleet.agent

    sup = Supervisor(None, cfg, env={}, make_agent=make_agent, status_every_s=0.2)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(sup.run()), daemon=True)
    runner.start()
    try:
        assert wait_for(lambda: any(r.pipelines[0].source_ended for r in fleet.reported), 30)

        def status() -> Any:
            return json.loads((fleet.tmp / "data" / "status.json").read_text())

        # the status file is rewritten every 0.2 s, on its own clock: wait for the next one
        assert wait_for(lambda: status()["pipelines"][0]["source_ended"] is True, 10), status()
        assert status()["reported"]["pipelines"][0]["source_ended"] is True
        assert any("every source has ended; still serving" in r.getMessage()
                   for r in caplog.records)  # fmt: skip
        assert runner.is_alive() and not result
        # still answering desired states: the version is fetched, built, tried and activated
        # (no frame comes any more to judge its health window by, so it is not committed)
        fleet.deploy("digits@1.0.0")
        assert wait_for(lambda: fleet.agent is not None and fleet.running() == "digits@1.0.0", 60)
        assert fleet.last().phase.value == "active" and fleet.last().source_ended
    finally:
        sup._on_stop()
        runner.join(30)
        fleet.agent = None  # stopped by the supervisor
    assert result == [0]


def _config(tmp: Path, video: Path, model: Path, broker: Mosquitto) -> Path:
    conf = tmp / "agent.toml"
    conf.write_text(
        f'device_id = "cam-09"\ndata_dir = "{tmp / "data"}"\nprofile = "x86-cpu"\n'
        f'[broker]\nurl = "{broker.url}"\n'
        f'[[pipelines]]\nname = "front"\nsource = "{video}"\nmodel = "{model}"\npace = "none"\n'
        '[pipelines.events]\npolicy = "off"\n'  # no outbox write per frame: a quick run
    )
    return conf


@pytest.mark.slow  # two agent processes
def test_exit_when_sources_end_option(
    tmp_path: Path, broker: Mosquitto, test_models: dict[str, Path]
) -> None:
    from agent.pipeline.synthetic import write_synthetic_video

    video = write_synthetic_video(tmp_path / "short.avi", frames=FRAMES)
    conf = _config(tmp_path, video, test_models["blobdet"] / "model.onnx", broker)
    done = subprocess.run([AGENT, "run", "--config", str(conf), "--exit-when-sources-end"],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "every source has ended; exiting" in done.stderr
    status = json.loads((tmp_path / "data" / "status.json").read_text())
    assert status["pipelines"][0]["frames_inferred"] == FRAMES  # the whole file first
    # without the option, the same agent (it has a broker to serve) keeps running
    (tmp_path / "data" / "status.json").unlink()
    proc = subprocess.Popen([AGENT, "run", "--config", str(conf)], stderr=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        status_file = tmp_path / "data" / "status.json"

        def ended() -> bool:
            try:
                return bool(json.loads(status_file.read_text())["pipelines"][0]["source_ended"])
            except (OSError, ValueError, KeyError, IndexError):
                return False

        assert wait_for(ended, 60)
        time.sleep(1.0)  # a few supervisor rounds (0.2 s … 2 s) after the end
        assert proc.poll() is None, "the agent exited although it had a broker to serve"
    finally:
        terminate(proc, 20)
    assert proc.returncode == 0
