"""Issue 15's operations, end to end, from the operator's CLI against real agents.

Ten (and three) real ``Agent``s (``tests.harness.operations``: update manager, remote
configuration, ONNX Runtime on the digits model, OpenCV reading a low-rate video) on a real
Mosquitto, enrolled with the fleet CA; the real ingest worker into SQLite; the rollout driven
by ``edgefleet rollout start --config …`` as the operator's own process, in the foreground
(it ticks the controller until the rollout completes or a gate pauses it).

1. A camera's threshold changes on ten devices through a staged rollout (two canaries, then
   the rest): every agent runs the new configuration, in place (no pipeline restarted).
2. A camera password rotates: the camera (an HTTP camera with Basic auth on loopback,
   ``tests.harness.camera``) changes its password, the devices' stream fails, a rollout with
   the new one sealed per device brings the frames back; the password is never in plaintext
   off the device. A token sealed for another device is rejected with a reason that holds
   no secret.
3. A configuration that cannot run (its source does not exist) rolls back on the canaries,
   the rollout pauses and no other device gets it.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from agent.protocol.sealed import is_sealed
from agent.protocol.state import config_hash
from cloud_sync.rollout import db
from cloud_sync.rollout.configdoc import parse_pipelines
from cloud_sync.rollout.stages import selection_order
from tests.harness.broker import Mosquitto
from tests.harness.camera import AuthCamera, encode_ts
from tests.harness.models import build_test_models
from tests.harness.operations import OpsFleet, pipeline_table, slow_digit_video
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video, pytest.mark.slow]

N = 10


def toml_pipeline(table: dict[str, Any], tracking: str = "") -> str:
    """A ``[[pipelines]]`` table as the operator writes it."""
    return (
        "[[pipelines]]\n"
        f'name = "{table["name"]}"\n'
        f'source = "{table["source"]}"\n'
        f'model = "{table["model"]}"\n'
        f"loop = {str(table['loop']).lower()}\n"
        f"[pipelines.tracking]\n{tracking}"
    )


@pytest.fixture(scope="module")
def models() -> dict[str, Path]:
    return build_test_models()


@pytest.fixture(scope="module")
def ten(tmp_path_factory: pytest.TempPathFactory, models: dict[str, Path]) -> Iterator[OpsFleet]:
    """Ten agents looping a 5 fps digit video, shared by scenarios 1 and 3."""
    tmp = tmp_path_factory.mktemp("ten")
    (tmp / "mosquitto").mkdir()
    broker = Mosquitto(tmp / "mosquitto")
    broker.start()
    video = slow_digit_video(models, tmp / "digits.mkv")
    table = pipeline_table(str(video), models["digits"] / "model.onnx")
    fleet = OpsFleet(tmp, broker, N, table)
    yield fleet
    fleet.close()
    broker.stop()


def inferring(agent: Any, more: int = 3, timeout: float = 15) -> bool:
    pipe = agent.running.by_name["front"]
    before = pipe.metrics.counters["frames_inferred"]
    return wait_for(lambda: pipe.metrics.counters["frames_inferred"] >= before + more, timeout)


def test_a_threshold_change_reaches_ten_devices_canaries_first_without_a_restart(
    ten: OpsFleet,
) -> None:
    table = ten.pipeline
    pipes = {d: a.running.by_name["front"] for d, a in ten.agents.items()}
    toml = ten.tmp / "threshold.toml"
    toml.write_text(toml_pipeline(table, "high_score = 0.8\nnew_track_score = 0.85\n"))

    r = ten.cli("rollout", "start", "--config", str(toml), "--target", "group:lobby",
                "--stage", "2", "--soak", "1s", "--gate", "failures<10%", "--every", "0.5",
                "--id", "thr")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    sent = db.get(ten.store, "thr").spec.config
    assert sent is not None
    h = sent.hash
    assert h == config_hash(json.dumps({"pipelines": parse_pipelines(toml.read_text())},
                                       separators=(",", ":")))  # fmt: skip
    assert f"configuration threshold.toml checked: {h[:12]}" in r.stdout
    assert "completed" in r.stdout

    row = db.get(ten.store, "thr")
    assert row.state.status == "completed" and row.state.counts()["committed"] == N
    canaries = selection_order("thr", ten.ids)[:2]
    recs = row.state.devices
    later = [d for d in ten.ids if d not in canaries]
    assert [d for d in ten.ids if recs[d].stage == 0] == sorted(canaries)
    applied_at = {d: a.remote.report().updated_at for d, a in ten.agents.items()}
    assert max(applied_at[d] for d in canaries) < min(applied_at[d] for d in later)

    for d, agent in ten.agents.items():
        rep = agent.remote.report()
        assert rep.hash == h and rep.status is not None and rep.status.value == "applied", d
        pipe = agent.running.by_name["front"]
        assert pipe is pipes[d], f"{d}: pipeline restarted for a threshold change"
        assert pipe.metrics.counters["reconnects"] == 0
        assert pipe.analytics is not None
        assert pipe.analytics.tracker.params.high_score == 0.8
        assert agent.running.configs["front"].tracking.high_score == 0.8  # type: ignore[union-attr]
        assert inferring(agent)
        agent.write_status()  # what the supervisor writes every 2 s
        status = json.loads((ten.data_dir(d) / "status.json").read_text())
        assert status["config"]["hash"] == h
        stored = json.loads((ten.data_dir(d) / "config" / "remote.json").read_text())
        assert stored["hash"] == h
    views = ten.views()
    assert all(views[d].config.hash == h and views[d].config.status == "applied" for d in ten.ids)

    st = ten.cli("rollout", "status", "thr", "--db", ten.db, conn=False)
    assert f"rollout thr config {h[:12]} completed" in st.stdout, st.stdout + st.stderr


def test_a_source_the_canaries_cannot_open_rolls_back_and_halts_the_rollout(
    ten: OpsFleet,
) -> None:
    table = ten.pipeline
    before = {d: a.remote.report().hash for d, a in ten.agents.items()}
    missing = ten.tmp / "no-such-camera.mkv"
    toml = ten.tmp / "bad-source.toml"
    toml.write_text(toml_pipeline({**table, "source": str(missing)}))

    r = ten.cli("rollout", "start", "--config", str(toml), "--target", "group:lobby",
                "--stage", "2", "--soak", "1s", "--gate", "failures<10%", "--every", "0.5",
                "--id", "bad")  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr  # paused by the gate, not completed
    assert "rollout bad paused" in r.stdout
    assert "abort bad` stops it (configuration rollouts do not revert)" in r.stdout
    assert "reverts" not in r.stdout  # a configuration rollout has nothing to revert
    row = db.get(ten.store, "bad")
    assert row.state.status == "paused" and row.state.paused_by_gate
    sent = row.spec.config
    assert sent is not None
    canaries = selection_order("bad", ten.ids)[:2]
    assert sorted(row.state.devices) == sorted(canaries)  # nobody else was selected
    detail = row.state.last_gates[0].detail
    # the gate judges as soon as one canary failed (50 %) or after both did (100 %)
    assert re.search(r"failures (50|100)\.0% > 10%", detail) and "rolled_back" in detail

    def rolled_back(agent: Any) -> bool:  # the second canary may still be in its window
        rep = agent.remote.report()
        return rep.target_hash == sent.hash and rep.status.value == "rolled_back"

    for d in canaries:
        assert wait_for(lambda a=ten.agents[d]: rolled_back(a), 15), ten.agents[d].remote.report()
    for d, agent in ten.agents.items():
        rep = agent.remote.report()
        assert rep.hash == before[d], d  # the previous configuration runs everywhere
        pipe = agent.running.by_name["front"]
        assert pipe.source.target == table["source"] and inferring(agent), d
        if d in canaries:
            assert f"source {missing} did not deliver a frame" in (rep.reason or "")
        else:  # never sent: still on what it ran before (the threshold, or the local file)
            assert rep.target_hash != sent.hash
            assert rep.status is None or rep.status.value == "applied"

    def desired_to(ids: list[str]) -> list[bytes]:
        return [p for t, p in ten.spy.payloads() if t.rsplit("/", 2)[-2:] in
                ([d, "desired"] for d in ids)]  # fmt: skip

    assert all(any(str(missing).encode() in p for p in desired_to([d])) for d in canaries)
    others = [d for d in ten.ids if d not in canaries]
    assert not any(str(missing).encode() in p for p in desired_to(others))
    st = ten.cli("rollout", "status", "bad", "--db", ten.db, conn=False)
    assert f"last {sent.hash[:12]} rolled_back" in st.stdout, st.stdout + st.stderr


OLD_PW, NEW_PW = "0ld-Cam-pa55", "n3w-Rtsp-pa55-7q"  # URL-safe: substituted into the URL as is


def forms(pw: str) -> list[bytes]:
    """How a password could leak: as is, URL-quoted, in a Basic auth header."""
    return [pw.encode(), quote(pw, safe="").encode(),
            base64.b64encode(f"viewer:{pw}".encode())]  # fmt: skip


def fleet_page(fleet: OpsFleet) -> dict[str, bytes]:
    """What the fleet page (``edgefleet ingest --http``) serves: the page and its JSON."""
    from urllib.request import urlopen

    from cloud_sync.ingest.web import serve_web

    web = serve_web(fleet.store, 0)
    try:
        base = f"http://127.0.0.1:{web.server_port}"
        paths = ["/", "/api/fleet", *(f"/api/devices/{d}/telemetry" for d in fleet.ids)]
        pages = {}
        for path in paths:
            with urlopen(base + path, timeout=10) as resp:
                pages[f"fleet page {path}"] = resp.read()
    finally:
        web.stop()
    assert b"cam-01" in pages["fleet page /api/fleet"] and b"rejected" in pages[
        "fleet page /api/fleet"]  # fmt: skip
    return pages


@pytest.fixture
def cams(tmp_path: Path, broker: Mosquitto, models: dict[str, Path]) -> Iterator[Any]:
    """Three agents reading the password-protected camera (its old password in their local
    file, as installed), the camera, and the fleet."""
    video = slow_digit_video(models, tmp_path / "digits.mkv")
    camera = AuthCamera(encode_ts(video, tmp_path / "cam.ts", 5), 4.0, "viewer", OLD_PW)
    camera.start()
    table = pipeline_table(camera.url(OLD_PW), models["digits"] / "model.onnx")
    fleet = OpsFleet(tmp_path, broker, 3, table)
    yield camera, fleet, table
    fleet.close()
    camera.close()


def test_a_camera_password_rotates_and_never_leaves_the_device_in_plaintext(
    cams: Any, capfd: pytest.CaptureFixture[str]
) -> None:
    camera, fleet, table = cams
    assert all(inferring(a) for a in fleet.agents.values())
    camera.set_password(NEW_PW)  # the camera cuts the streams and refuses the old password
    assert wait_for(lambda: camera.refused >= 3, 20), camera.refused
    pw_file = fleet.tmp / "cam_pw"
    pw_file.write_text(NEW_PW + "\n")
    toml = fleet.tmp / "rotate.toml"
    url = table["source"].replace(OLD_PW, "${secret:cam_pw}")
    toml.write_text(toml_pipeline({**table, "source": url}))

    r = fleet.cli("rollout", "start", "--config", str(toml), "--secret", f"cam_pw=@{pw_file}",
                  "--ca", str(fleet.ca_dir), "--target", "group:lobby", "--stage", "1",
                  "--soak", "0", "--gate", "failures<10%", "--every", "0.5",
                  "--id", "rotate")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "secrets ['cam_pw'] sealed for 3 devices" in r.stdout
    row = db.get(fleet.store, "rotate")
    assert row.state.status == "completed" and row.state.counts()["committed"] == 3
    assert camera.served(1) >= 3  # each device opened the camera with the new password
    for d, agent in fleet.agents.items():
        pipe = agent.running.by_name["front"]
        assert pipe.source.target == camera.url(NEW_PW)  # in memory, on the device only
        assert inferring(agent), f"{d}: frames do not flow with the new password"
        rep = agent.remote.report()
        assert rep.status is not None and rep.status.value == "applied"
        assert rep.hash == row.spec.config.hash_for(d)  # type: ignore[union-attr]
        agent.write_status()  # as the supervisor writes it
        stored = json.loads((fleet.data_dir(d) / "config" / "remote.json").read_text())
        assert is_sealed(json.loads(stored["document"])["pipelines"][0]["source"])
        desired = [p for t, p in fleet.spy.payloads() if t.endswith(f"/{d}/desired")]
        assert b"sealed:v1:" in desired[-1]  # what travelled: sealed for this device

    # a restart (its local file still holds the old password) runs the stored configuration
    fleet.agents["cam-02"].stop()
    agent = fleet.start("cam-02", table)
    assert agent.running.by_name["front"].source.target == camera.url(NEW_PW)
    assert inferring(agent), "cam-02 does not stream after a restart"
    assert agent.remote.report().hash == row.spec.config.hash_for("cam-02")  # type: ignore[union-attr]
    agent.write_status()

    # a token sealed for cam-00 (`edgefleet secret seal`) sent to cam-01
    token = fleet.cli("secret", "seal", "--ca", str(fleet.ca_dir), "--device", "cam-00",
                      conn=False, stdin=camera.url(NEW_PW) + "\n")  # fmt: skip
    assert token.returncode == 0 and is_sealed(token.stdout.strip()), token.stderr
    wrong = fleet.tmp / "wrong.toml"
    wrong.write_text(toml_pipeline({**table, "source": token.stdout.strip()}))
    before = fleet.agents["cam-01"].running.by_name["front"]
    w = fleet.cli("rollout", "start", "--config", str(wrong), "--target", "cam-01",
                  "--soak", "0", "--gate", "failures<10%", "--every", "0.5",
                  "--id", "wrong")  # fmt: skip
    assert w.returncode == 1 and "rollout wrong paused" in w.stdout, w.stdout + w.stderr
    rep = fleet.agents["cam-01"].remote.report()
    assert rep.status is not None and rep.status.value == "rejected"
    assert "sealed value does not open on this device" in (rep.reason or ""), rep.reason
    assert token.stdout.strip() not in (rep.reason or "")
    assert fleet.agents["cam-01"].running.by_name["front"] is before  # nothing changed
    assert wait_for(lambda: fleet.views()["cam-01"].config.status == "rejected", 10)
    st = fleet.cli("rollout", "status", "wrong", "--db", fleet.db, conn=False)
    assert "does not open on this device" in st.stdout, st.stdout + st.stderr

    fs = fleet.cli("fleet", "status", "--db", fleet.db, conn=False)  # the fleet page's data
    assert fs.returncode == 0 and "cam-01" in fs.stdout, fs.stdout + fs.stderr
    assert "rejected" in fs.stdout

    # nowhere off the device, nowhere at rest in plaintext
    captured = capfd.readouterr()
    places: dict[str, bytes] = {
        "CLI output": "".join(x.stdout + x.stderr for x in (r, w, st, fs)).encode(),
        "secret seal's stderr": token.stderr.encode(),
        "agents' log": fleet.log.text().encode(),
        "agents' stdout/stderr (FFmpeg, OpenCV)": (captured.out + captured.err).encode(),
    }
    places |= fleet_page(fleet)
    places |= {f"MQTT #{i} {t}": p for i, (t, p) in enumerate(fleet.spy.payloads())}
    places |= {str(f): f.read_bytes() for f in fleet.files_at_rest()}
    for d in fleet.ids:
        for name in ("status.json", "config/remote.json"):
            places[f"{d} {name}"] = (fleet.data_dir(d) / name).read_bytes()
    with fleet.store.engine.connect() as conn:  # what the database holds, read through SQL
        rows = [conn.execute(sa.text(f"SELECT * FROM {t}")).all()
                for t in sa.inspect(conn).get_table_names()]  # fmt: skip
    places["database rows"] = json.dumps(rows, default=str).encode()
    assert len([k for k in places if k.startswith("MQTT")]) > 20  # the spy saw the traffic
    leaks = [(where, f) for where, data in places.items() for pw in (OLD_PW, NEW_PW)
             for f in forms(pw) if f in data]  # fmt: skip
    assert leaks == []
