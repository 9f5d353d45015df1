"""``edgefleet device cmd ID cancel-update`` through a real Mosquitto to a real agent process.

What cancelling does to the update itself is tested in tests/agent/update/test_update_control.py
(a slow download cancelled from the CLI among them); here: the command reaches the update
manager of an agent process, and its answer reaches the operator.
"""

from __future__ import annotations

import pytest

from agent.protocol.command import ResultStatus
from cloud_sync.commands import send_command
from tests.harness.agent_process import AgentProcess
from tests.harness.fleet import Fleet
from tests.harness.util import wait_for

pytestmark = [
    pytest.mark.broker,
    pytest.mark.video,
]


def test_cancel_update_reaches_the_update_manager(fleet: Fleet) -> None:
    f = fleet
    f.publish("digits", "1.0.0")
    agent = AgentProcess(f, health_window_s=0.5)
    agent.start(EDGEFLEET_TEST_BUILD_SLEEP_S="60")  # the build hangs: an update in progress
    try:
        assert wait_for(lambda: agent.status().get("broker", {}).get("connected"), 60)
        idle = send_command(f.repo_dir, f.broker.url, f.device, "cancel_update", {})
        assert idle.status is ResultStatus.SUCCEEDED and idle.data["cancelled"] is None, idle
        f.deploy("digits@1.0.0")
        assert wait_for(lambda: bool(f.reported) and f.reported[-1].pipelines[0].phase.value
                        == "building", 60), f.reported[-1:]  # fmt: skip
        res = send_command(f.repo_dir, f.broker.url, f.device, "cancel_update",
                           {"reason": "operator test"})  # fmt: skip
        assert res.status is ResultStatus.SUCCEEDED and res.data["cancelled"], res
        assert agent.proc is not None and agent.proc.poll() is None
    finally:
        agent.stop()
