"""kill -9 of a real agent process in the middle of an update, then a restart.

The agent is `edgefleet-agent run` in a subprocess; the registry, broker and video are real.
After each kill the restarted agent must run the last committed model, report the
interrupted version as failed, and not try it again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.protocol.state import ReportedState
from tests.conftest import Mosquitto, wait_for
from tests.test_delivery import DEVICE, Fleet, digit_loop  # noqa: F401 - fixture

pytestmark = [pytest.mark.broker, pytest.mark.video, pytest.mark.slow]
BIN = Path(sys.executable).parent


class AgentProcess:
    def __init__(
        self, fleet: Fleet, health_window_s: float, *, max_tries: int = 3, retry_s: float = 10
    ) -> None:
        self.fleet = fleet
        self.data = fleet.tmp / "data"
        self.config = fleet.tmp / "agent.toml"
        self.config.write_text(
            f'device_id = "{DEVICE}"\n'
            f'data_dir = "{self.data}"\n'
            'profile = "x86-cpu"\n'
            "[[pipelines]]\n"
            'name = "front"\n'
            f'source = "{fleet.video}"\n'
            'model = "digits"\n'
            "loop = true\n"
            "[broker]\n"
            f'url = "{fleet.broker.url}"\n'
            "[trust]\n"
            f'root = "{fleet.repo_dir / "root.json"}"\n'
            "[update]\n"
            f"health_window_s = {health_window_s}\n"
            "health_min_frames = 5\n"
            # no test here is about latency: a loaded machine's jitter must not roll back
            "max_latency_ratio = 20.0\n"
            f"max_tries = {max_tries}\n"
            f"retry_s = {retry_s}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, **env: str) -> None:
        with open(self.fleet.tmp / "agent.log", "ab") as log:  # kept for failure analysis
            self.proc = subprocess.Popen(
                [str(BIN / "edgefleet-agent"), "run", "--config", str(self.config)],
                env={**os.environ, "XDG_CACHE_HOME": str(self.fleet.tmp / "cache"), **env},
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def status(self) -> dict[str, Any]:
        try:
            return json.loads((self.data / "status.json").read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return {}

    def running(self) -> str | None:
        pipes = self.status().get("pipelines") or [{}]
        return pipes[0].get("model")


def latest(fleet: Fleet) -> ReportedState | None:
    return fleet.reported[-1] if fleet.reported else None


def phase_of(fleet: Fleet, version: str) -> str | None:
    r = latest(fleet)
    if r is None or r.pipelines[0].target_version != version:
        return None
    return r.pipelines[0].phase.value


@pytest.fixture
def proc_fleet(
    tmp_path: Path,
    broker: Mosquitto,
    digit_loop: Path,  # noqa: F811
    test_models: dict[str, Path],
) -> Iterator[Fleet]:
    f = Fleet(tmp_path, broker, digit_loop, test_models)
    f.server.start()
    yield f
    f.close()


@pytest.mark.parametrize(
    ("kill_in", "health_window_s", "extra_env"),
    [
        ("building", 0.5, {"EDGEFLEET_TEST_BUILD_SLEEP_S": "60"}),
        ("trial", 0.5, {"EDGEFLEET_TEST_TRIAL_SLEEP_S": "60"}),
        ("active", 120.0, {}),
    ],
)
def test_kill_during_update_restarts_on_committed_model_then_tries_again(
    proc_fleet: Fleet,
    kill_in: str,
    health_window_s: float,
    extra_env: dict[str, str],
) -> None:
    """A power cut mid-update is not the model's fault: the agent comes back on the committed
    model, starts the version again (try 2 of 3) and commits it."""
    f = proc_fleet
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


def test_a_version_whose_every_try_is_cut_short_is_rejected(proc_fleet: Fleet) -> None:
    """Two tries (max_tries = 2), both killed while building: rejected, not retried, the
    committed model keeps running."""
    f = proc_fleet
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
    proc_fleet: Fleet, tmp_path: Path
) -> None:
    """A download is resumable: the restarted agent goes on from its partial file (kept in
    DATA_DIR/tuf/partial) instead of fetching the artifact again, then commits."""
    from cloud_sync.registry.publish import publish
    from tests.test_delivery import _big_model

    f = proc_fleet
    f.publish("digits", "1.0.0")
    big = _big_model(f.models["digits"], tmp_path / "big", 16)
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
