"""kill -9 of a real agent process in the middle of an update, then a restart.

The agent is `edgefleet-agent run` in a subprocess; the registry, broker and video are real.
After each kill the restarted agent must run the last committed model, report the
interrupted version as failed, and not try it again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.protocol.state import ReportedState
from tests.harness.agent_process import AgentProcess
from tests.harness.fleet import Fleet
from tests.harness.models import big_model
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video, pytest.mark.slow]


def latest(fleet: Fleet) -> ReportedState | None:
    return fleet.reported[-1] if fleet.reported else None


def phase_of(fleet: Fleet, version: str) -> str | None:
    r = latest(fleet)
    if r is None or r.pipelines[0].target_version != version:
        return None
    return r.pipelines[0].phase.value


@pytest.mark.parametrize(
    ("kill_in", "health_window_s", "extra_env"),
    [
        ("building", 0.5, {"EDGEFLEET_TEST_BUILD_SLEEP_S": "60"}),
        ("trial", 0.5, {"EDGEFLEET_TEST_TRIAL_SLEEP_S": "60"}),
        ("active", 120.0, {}),
    ],
)
def test_kill_during_update_restarts_on_committed_model_then_tries_again(
    fleet: Fleet,
    kill_in: str,
    health_window_s: float,
    extra_env: dict[str, str],
) -> None:
    """A power cut mid-update is not the model's fault: the agent comes back on the committed
    model, starts the version again (try 2 of 3) and commits it."""
    f = fleet
    f.publish("digits", "1.0.0")
    f.publish("digits", "1.1.0")
    agent = AgentProcess(f, health_window_s=0.5)
    agent.start()
    try:
        f.deploy("digits@1.0.0")
        assert wait_for(lambda: phase_of(f, "1.0.0") == "committed", 60), latest(f)
        agent.stop()
        # Second life: this one is killed in the middle of installing 1.1.0.
        agent = AgentProcess(f, health_window_s=health_window_s)
        agent.start(**extra_env)
        assert wait_for(lambda: agent.running() == "digits@1.0.0", 60)
        f.deploy("digits@1.1.0")
        assert wait_for(lambda: phase_of(f, "1.1.0") == kill_in, 60), latest(f)
        agent.kill9()
        # Third life: no sleep hook, short health window.
        agent = AgentProcess(f, health_window_s=0.5, retry_s=1)
        agent.start()
        assert wait_for(lambda: phase_of(f, "1.1.0") == "committed", 90), latest(f)
        assert wait_for(lambda: agent.running() == "digits@1.1.0", 30), agent.status()
        why = f"interrupted by agent restart during {kill_in}; starting try 2 of 3"
        assert any(why in (r.pipelines[0].last_error or "") for r in f.reported), [
            r.pipelines[0].last_error for r in f.reported
        ]
        store_state = json.loads((agent.data / "models" / "state.json").read_text())
        front = store_state["pipelines"]["front"]
        assert front["committed"] == {"model": "digits", "version": "1.1.0"}
        assert front["attempt"]["tries"] == 2 and front["rejected"] == []
        assert not list((agent.data / "models").rglob("*.tmp")), "temp files left behind"
    finally:
        agent.stop()


def test_a_version_whose_every_try_is_cut_short_is_rejected(fleet: Fleet) -> None:
    """Two tries (max_tries = 2), both killed while building: rejected, not retried, the
    committed model keeps running."""
    f = fleet
    f.publish("digits", "1.0.0")
    f.publish("digits", "1.1.0")
    agent = AgentProcess(f, health_window_s=0.5, max_tries=2, retry_s=1)
    agent.start()

    def attempt() -> tuple[str, int] | None:
        try:
            a = json.loads((agent.data / "models" / "state.json").read_text())["pipelines"][
                "front"
            ]["attempt"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return (a["target"]["version"], a["tries"]) if a and a["phase"] == "building" else None

    def building_try(n: int) -> Callable[[], bool]:
        return lambda: attempt() == ("1.1.0", n)

    def runs(life: AgentProcess, ref: str) -> Callable[[], bool]:
        return lambda: life.running() == ref

    try:
        f.deploy("digits@1.0.0")
        assert wait_for(lambda: phase_of(f, "1.0.0") == "committed", 60), latest(f)
        agent.stop()
        for n in (1, 2):
            agent = AgentProcess(f, health_window_s=0.5, max_tries=2, retry_s=1)
            agent.start(EDGEFLEET_TEST_BUILD_SLEEP_S="60")
            if n == 1:
                assert wait_for(runs(agent, "digits@1.0.0"), 60)
                f.deploy("digits@1.1.0")
            assert wait_for(building_try(n), 60), latest(f)
            agent.kill9()
        agent = AgentProcess(f, health_window_s=0.5, max_tries=2, retry_s=1)
        agent.start()
        assert wait_for(lambda: phase_of(f, "1.1.0") == "rejected", 60), latest(f)
        rep = latest(f)
        assert rep is not None and "2 of 2 tries cut short" in (rep.pipelines[0].last_error or "")
        assert wait_for(lambda: agent.running() == "digits@1.0.0", 30)
        assert not wait_for(lambda: agent.running() == "digits@1.1.0", 5)
    finally:
        agent.stop()


def test_kill_during_fetching_resumes_the_download_after_restart(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A download is resumable: the restarted agent goes on from its partial file (kept in
    DATA_DIR/tuf/partial) instead of fetching the artifact again, then commits."""
    from cloud_sync.registry.publish import publish

    f = fleet
    f.publish("digits", "1.0.0")
    big = big_model(f.models["digits"], tmp_path / "big", 16)
    publish(f.repo, big, name="digits", version="2.0.0")
    artifact = sum(t.length for p, t in f.repo.targets().items() if "/2.0.0/" in p)
    agent = AgentProcess(f, health_window_s=0.5)
    agent.start()
    try:
        f.deploy("digits@1.0.0")
        assert wait_for(lambda: phase_of(f, "1.0.0") == "committed", 60), latest(f)
        sent0 = f.server.stats().bytes_sent
        f.deploy("digits@2.0.0")
        assert wait_for(lambda: f.server.stats().bytes_sent - sent0 > 6 << 20, 60)
        assert phase_of(f, "2.0.0") == "fetching", latest(f)
        agent.kill9()
        sent_before_kill = f.server.stats().bytes_sent - sent0
        agent = AgentProcess(f, health_window_s=0.5)
        agent.start()
        assert wait_for(lambda: phase_of(f, "2.0.0") == "committed", 90), latest(f)
        assert wait_for(lambda: agent.running() == "digits@2.0.0", 30), agent.status()
        total = f.server.stats().bytes_sent - sent0
        # from scratch it would be sent_before_kill + artifact; resumed, only what was in
        # flight at the kill comes twice
        assert total < artifact + sent_before_kill - (2 << 20), (total, artifact, sent_before_kill)
    finally:
        agent.stop()
