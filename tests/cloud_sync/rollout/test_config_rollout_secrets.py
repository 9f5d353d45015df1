"""A configuration rollout that rotates a camera password (``${secret:cam_pw}``): sealed per
device with its enrolled key, opened only with that device's private key, and never in
plaintext in the database, the registry's records, the broker's messages or the output.

Needs ``cloud_sync.sealing`` (``seal_for_device``), which comes with the secrets work: until
that is merged this module fails to import, on purpose (a skipped test would pass unnoticed).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.protocol.sealed import SealedError, is_sealed, unseal
from cloud_sync.cli import main
from cloud_sync.ingest.store import open_store
from cloud_sync.ingest.worker import IngestWorker
from cloud_sync.pki import FleetCA
from cloud_sync.rollout import db
from cloud_sync.rollout.controller import RolloutController
from cloud_sync.sealing import seal_for_device  # noqa: F401 - the dependency this file tests
from tests.harness.broker import Mosquitto
from tests.harness.config_fleet import ConfigDevices
from tests.harness.rollout import make_registry
from tests.harness.util import wait_for

pytestmark = pytest.mark.broker  # every wait is bounded (wait_for)

PASSWORD = "n3w-Rtsp-pa55"
URL = "rtsp://viewer:${secret:cam_pw}@10.0.0.5/stream1"
CONFIG = f"""
[[pipelines]]
name = "front"
source = "{URL}"
model = "det"

[pipelines.tracking]
high_score = 0.7
"""
ENROLLED = ["cam-00", "cam-01", "cam-02", "cam-03"]  # cam-04 has no enrolled key


@pytest.fixture
def env(tmp_path: Path, broker: Mosquitto) -> Iterator[dict[str, Any]]:
    repo = tmp_path / "registry"
    make_registry(repo)
    ca = FleetCA.init(tmp_path / "ca")
    keys = {}
    for d in ENROLLED:
        creds = ca.issue("device", d, tmp_path / "bundles" / d)
        key = serialization.load_pem_private_key(creds.key.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        keys[d] = key
    url = f"sqlite:///{tmp_path / 'fleet.db'}"
    store = open_store(url)
    worker = IngestWorker(broker.url, store, flush_s=0.05)
    worker.start()
    fleet = ConfigDevices(broker, repo, 5)
    assert wait_for(lambda: store.counts().get("devices", 0) == 5, 15)
    ctl = RolloutController(store, repo, broker.url)
    (tmp_path / "pipelines.toml").write_text(CONFIG)
    yield {"tmp": tmp_path, "repo": repo, "db": url, "store": store, "fleet": fleet, "ctl": ctl,
           "broker": broker, "keys": keys, "ca": tmp_path / "ca"}  # fmt: skip
    ctl.close()
    fleet.close()
    worker.stop()
    store.close()


def test_rotating_a_camera_password_never_shows_it_off_the_device(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, fleet, ctl = env["store"], env["fleet"], env["ctl"]
    monkeypatch.setenv("CAM_PW", PASSWORD)
    rc = main(["rollout", "start", "--config", str(env["tmp"] / "pipelines.toml"),
               "--secret", "cam_pw=env:CAM_PW", "--ca", str(env["ca"]),
               "--target", "group:lobby", "--stage", "2", "--soak", "0", "--id", "pw1",
               "--detach", "--db", env["db"], "--repo", str(env["repo"]),
               "--broker", env["broker"].url])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "cam-04: left out, cannot seal for it" in out.out
    assert "secrets ['cam_pw'] sealed for 4 devices" in out.out

    t0 = datetime.now(timezone.utc)
    for k in range(6):
        ctl.tick(t0 + timedelta(seconds=10 * k))
        if db.get(store, "pw1").state.status != "running":
            break
        wait_for(lambda: False, 0.5)  # let the devices answer and the ingest store it
    row = db.get(store, "pw1")
    assert row.state.status == "completed", [e.message for e in row.state.history]
    assert sorted(row.state.devices) == ENROLLED and row.state.counts()["committed"] == 4

    for d in ENROLLED:
        cfg = fleet.got(d)[-1].config
        assert cfg is not None and PASSWORD not in cfg.document
        source = json.loads(cfg.document)["pipelines"][0]["source"]
        assert is_sealed(source)
        assert unseal(source, env["keys"][d], device_id=d) == URL.replace(
            "${secret:cam_pw}", PASSWORD
        )
        other = ENROLLED[(ENROLLED.index(d) + 1) % len(ENROLLED)]
        with pytest.raises(SealedError):  # another device's key does not open it
            unseal(source, env["keys"][other], device_id=other)
    assert fleet.got("cam-04") == []

    with store.engine.connect() as conn:  # nowhere at rest in plaintext
        rows = conn.execute(sa.text("SELECT spec, state FROM rollouts")).all()
    assert PASSWORD not in json.dumps([list(r) for r in rows], default=str)
    for record in (env["repo"] / "desired").glob("*.json"):
        assert PASSWORD not in record.read_text()
    assert main(["rollout", "status", "pw1", "--db", env["db"]]) == 0
    assert main(["fleet", "status", "--db", env["db"]]) == 0
    shown = capsys.readouterr()
    assert PASSWORD not in shown.out + shown.err
    assert fleet.errors == []


def test_a_secret_from_a_file_with_no_enrolled_device_is_refused(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    pw = env["tmp"] / "cam_pw"
    pw.write_text(PASSWORD + "\n")
    rc = main(["rollout", "start", "--config", str(env["tmp"] / "pipelines.toml"),
               "--secret", f"cam_pw=@{pw}", "--ca", str(env["ca"]), "--target", "cam-04",
               "--detach", "--db", env["db"], "--repo", str(env["repo"]),
               "--broker", env["broker"].url])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 2 and "none with an enrolled key" in out.err
    assert PASSWORD not in out.out + out.err
    assert db.list_rollouts(env["store"]) == []
