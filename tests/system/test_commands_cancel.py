"""``edgefleet device cmd ID cancel-update`` through a real Mosquitto to a real agent process.

Runs once ``UpdateManager.cancel_current`` exists (the update-control branch of issue 15);
skipped before that merge. What cancelling does to the update itself is that branch's tests'
business; here: the command reaches it, and its answer reaches the operator.
"""

from __future__ import annotations

import pytest

from agent.protocol.command import ResultStatus
from agent.update.manager import UpdateManager
from cloud_sync.commands import send_command
from tests.harness.agent_process import AgentProcess
from tests.harness.fleet import Fleet
from tests.harness.util import wait_for

pytestmark = [
    pytest.mark.broker,
    pytest.mark.video,
    pytest.mark.skipif(
        not hasattr(UpdateManager, "cancel_current"),
        reason="UpdateManager.cancel_current comes with the update-control branch",
    ),
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
