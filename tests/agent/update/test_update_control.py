"""Update control end to end: a newer desired state supersedes a slow download, a forged one
does not, the operator's cancel stops a download or an engine build, maintenance windows hold a
built model until they open.

Real parts: Mosquitto, the registry's chunk server (its per-device byte rate makes the slow
link: 256 KiB/s, the smallest it allows), TUF over MQTT, the agent with ONNX Runtime on a
looping video; engine builds in their child process (stretched by ``TestHooks``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from agent.protocol.desired import sign_desired
from agent.protocol.fetch import MAX_CHUNK
from agent.protocol.state import DesiredState, PipelineTarget
from agent.testhooks import NO_HOOKS, TestHooks
from cloud_sync.registry.admission import ServeLimits
from cloud_sync.registry.keys import generate_signer
from cloud_sync.registry.publish import publish
from cloud_sync.registry.serve import ChunkServer
from tests.harness.fleet import DEVICE, Fleet
from tests.harness.models import big_model
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video, pytest.mark.slow]

SLOW = ServeLimits(device_byte_rate=MAX_CHUNK, device_byte_burst=MAX_CHUNK)


def use_server(fleet: Fleet, limits: ServeLimits | None) -> ChunkServer:
    """Replace the fleet's chunk server by one with ``limits`` (None: the default, fast)."""
    fleet.server.stop()
    n = len(fleet.servers) + 1
    fleet.server = ChunkServer(fleet.repo_dir, fleet.broker.url, client_id=f"registry-{n}",
                               limits=limits)  # fmt: skip
    fleet.servers.append(fleet.server)
    fleet.server.start()
    return fleet.server


def v2_bytes(fleet: Fleet) -> int:
    return sum(t.length for p, t in fleet.repo.targets().items() if "/2.0.0/" in p)


def partial_bytes(fleet: Fleet) -> int:
    partial = fleet.tmp / "data" / "tuf" / "partial"
    return sum(p.stat().st_size for p in partial.glob("*.part")) if partial.is_dir() else 0


def slow_v2_downloading(fleet: Fleet, tmp: Path, **update: object) -> object:
    """v1 committed, an 8 MiB v2 published and downloading over the slow link (≥ 1 MiB in)."""
    fleet.publish("digits", "1.0.0")
    publish(fleet.repo, big_model(fleet.models["digits"], tmp / "big", 8), name="digits",
            version="2.0.0")  # fmt: skip
    use_server(fleet, SLOW)
    agent = fleet.start_agent(**update)
    fleet.commit("digits@1.0.0")
    sent0 = fleet.server.stats().bytes_sent
    fleet.deploy("digits@2.0.0")
    assert wait_for(lambda: fleet.server.stats().bytes_sent - sent0 > 1 << 20, 60)
    assert fleet.last().phase.value == "fetching"
    return agent


def reported_v2(fleet: Fleet) -> list[tuple[str, str | None]]:
    return [(p.phase.value, p.last_error) for r in fleet.reported for p in r.pipelines
            if p.target_version == "2.0.0"]  # fmt: skip


def test_newer_desired_state_supersedes_a_slow_download(fleet: Fleet, tmp_path: Path) -> None:
    agent = slow_v2_downloading(fleet, tmp_path)
    fleet.publish("digits", "3.0.0")
    fleet.deploy("digits@3.0.0")
    # v3 commits without waiting for v2's 8 MiB at 256 KiB/s (half a minute)
    fleet.wait_phase("committed", version="3.0.0", timeout=25)
    assert fleet.running() == "digits@3.0.0"
    # v2 never got past its download
    assert {ph for ph, _ in reported_v2(fleet)} <= {"fetching", "waiting", "rejected"}
    superseded = [e for ph, e in reported_v2(fleet) if ph == "rejected"]
    assert superseded and "superseded by digits@3.0.0 during fetching" in (superseded[-1] or "")
    slot = agent.updates.state.pipelines["front"]
    assert "digits@2.0.0" not in slot.rejected  # not on the never-retry list
    kept = partial_bytes(fleet)
    # the server had sent > 1 MiB; what arrived in order is kept (chunks in flight or out of
    # order at the interruption are not), so ask for a quarter of that: 0 means not kept
    assert kept >= 1 << 18, "the partial v2 download was not kept"
    # a return to v2 resumes from the partial file (over a fast link, to keep the test short)
    use_server(fleet, None)
    fleet.commit("digits@2.0.0")
    assert fleet.server.stats().bytes_sent < v2_bytes(fleet) - kept + (1 << 20)


def test_a_forged_newer_desired_state_does_not_cancel_the_download(
    fleet: Fleet, tmp_path: Path
) -> None:
    agent = slow_v2_downloading(fleet, tmp_path)
    forged = sign_desired(
        DesiredState(device_id=DEVICE, revision=99, issued_at=datetime.now(timezone.utc),
                     pipelines={"front": PipelineTarget(model="digits", version="1.0.0")}),
        [generate_signer()],
    )  # fmt: skip
    fleet.inject_desired(forged)
    assert wait_for(lambda: "desired state rejected" in (fleet.last().last_error or ""), 20)
    # the paused download resumed: still v2, still fetching, not rejected
    assert wait_for(lambda: fleet.last().phase.value == "fetching", 10), fleet.last()
    assert fleet.last().target_version == "2.0.0"
    assert all(ph != "rejected" for ph, _ in reported_v2(fleet))
    sent = fleet.server.stats().bytes_sent
    assert wait_for(lambda: fleet.server.stats().bytes_sent > sent + (256 << 10), 20)
    use_server(fleet, None)
    fleet.wait_phase("committed", version="2.0.0", timeout=60)
    assert agent.updates.state.accepted_revision < 99


def test_cancel_a_slow_download_keeps_the_model_and_the_partial(
    fleet: Fleet, tmp_path: Path
) -> None:
    agent = slow_v2_downloading(fleet, tmp_path)
    frames = fleet.pipe.metrics.counters["frames_inferred"]
    what = agent.updates.cancel_current("bad build, stop it")
    assert what == "cancelled digits@2.0.0 on pipeline front (fetching)"
    rep = fleet.last()
    assert rep.phase.value == "rejected" and rep.target_version == "2.0.0"
    assert "cancelled by operator: bad build, stop it" in rep.last_error
    assert fleet.running() == "digits@1.0.0"
    assert wait_for(lambda: fleet.pipe.metrics.counters["frames_inferred"] > frames + 5, 10)
    assert agent.updates.cancel_current("again") is None  # nothing in progress any more
    sent = fleet.server.stats().bytes_sent
    kept = partial_bytes(fleet)
    assert kept > 256 << 10
    assert wait_for(lambda: agent.updates.idle.is_set(), 5)
    assert fleet.server.stats().bytes_sent - sent < 4 * MAX_CHUNK  # the download stopped
    # a later desired state of the same version resumes from the kept partial
    use_server(fleet, None)
    fleet.commit("digits@2.0.0")
    assert fleet.server.stats().bytes_sent < v2_bytes(fleet) - kept + (1 << 20)


def test_the_operator_cancels_a_slow_download_from_the_cli(
    fleet: Fleet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # issue 15's "done when": `edgefleet device cmd ID cancel-update`, a signed command through
    # the broker to the agent's command worker, while v2 crawls over the slow link
    from cloud_sync.cli import main

    slow_v2_downloading(fleet, tmp_path)
    capsys.readouterr()
    rc = main(["device", "cmd", DEVICE, "cancel-update", "--reason", "too slow",
               "--repo", str(fleet.repo_dir), "--broker", fleet.broker.url])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "cancelled digits@2.0.0 on pipeline front (fetching)" in out
    rep = fleet.wait_phase("rejected", version="2.0.0", timeout=15)
    assert "cancelled by operator: too slow" in (rep.last_error or "")
    assert fleet.running() == "digits@1.0.0"
    assert partial_bytes(fleet) > 0  # what arrived is kept for a later return


def test_cancel_a_slow_engine_build(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    fleet.publish("digits", "1.1.0")
    agent = fleet.start_agent()
    fleet.commit("digits@1.0.0")
    agent.hooks = TestHooks(build_sleep_s=60)  # read at each build
    fleet.deploy("digits@1.1.0")
    assert wait_for(lambda: fleet.last().phase.value == "building", 30), fleet.last()
    what = agent.updates.cancel_current("wrong version")
    assert what == "cancelled digits@1.1.0 on pipeline front (building)"
    rep = fleet.wait_phase("rejected", version="1.1.0", timeout=15)  # not after the 60 s sleep
    assert "cancelled by operator: wrong version" in rep.last_error
    assert fleet.running() == "digits@1.0.0"
    engines = fleet.tmp / "data" / "engines"
    assert not list(engines.glob(".build-*"))  # the killed build left nothing behind
    agent.hooks = NO_HOOKS
    fleet.commit("digits@1.1.0")  # retryable: a new desired state of it installs it
    assert fleet.running() == "digits@1.1.0"


def test_activation_waits_for_the_maintenance_window(fleet: Fleet) -> None:
    for v in ("1.0.0", "1.1.0", "1.2.0"):
        fleet.publish("digits", v)
    agent = fleet.start_agent(maintenance_window="02:00-03:00")
    local = [datetime(2026, 5, 4, 2, 30)]  # device local time, injected
    agent.updates.local_time = lambda: local[0]
    fleet.commit("digits@1.0.0")  # inside the window: at once
    local[0] = datetime(2026, 5, 4, 11, 47, 30)
    fleet.deploy("digits@1.1.0")
    rep = fleet.wait_phase("waiting", version="1.1.0", timeout=30)
    assert rep.waiting == (
        "activation waits for maintenance window 02:00-03:00 (device local time), "
        "next opens in 14 h 13 min"
    )
    assert fleet.running() == "digits@1.0.0"
    # superseding still works while waiting: 1.2.0 replaces the built 1.1.0, and waits too
    fleet.deploy("digits@1.2.0")
    rep = fleet.wait_phase("waiting", version="1.2.0", timeout=30)
    assert rep.waiting and rep.waiting.startswith("activation waits for maintenance window")
    assert any(ph == "rejected" and "superseded by digits@1.2.0" in (e or "")
               for r in fleet.reported for p in r.pipelines if p.target_version == "1.1.0"
               for ph, e in [(p.phase.value, p.last_error)])  # fmt: skip
    assert fleet.running() == "digits@1.0.0"
    local[0] = datetime(2026, 5, 5, 2, 0, 5)  # the window opens
    rep = fleet.wait_phase("committed", version="1.2.0", timeout=30)
    assert fleet.running() == "digits@1.2.0" and rep.waiting is None
    assert any(r.pipelines[0].waiting for r in fleet.reported)  # the dashboard saw it


def test_cancel_a_model_waiting_for_its_window(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    agent = fleet.start_agent(maintenance_window="22:00-02:00")
    agent.updates.local_time = lambda: datetime(2026, 5, 4, 12, 0)
    fleet.deploy("digits@1.0.0")
    fleet.wait_phase("waiting", version="1.0.0", timeout=30)
    assert agent.updates.cancel_current("not tonight") == (
        "cancelled digits@1.0.0 on pipeline front (built, waiting for its window)"
    )
    rep = fleet.wait_phase("rejected", version="1.0.0", timeout=10)
    assert "cancelled by operator: not tonight" in rep.last_error and rep.waiting is None
    assert fleet.running() is None
