"""Time and the registry: signed metadata that stays fresh by itself, and warnings ahead.

The registry is run from a date in the past up to today on an injected clock (the serve
tick every 6 hours), then a device's python-tuf client refreshes against it at today's real
time: no clock patching on the device side, so its expiry checks are the reference ones.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from tuf.api.exceptions import ExpiredMetadataError

from cloud_sync.cli import metadata_keeper
from cloud_sync.registry.publish import publish
from cloud_sync.registry.repo import Repository
from tests.harness.registry import TufFileClient, run_registry_cli


def _run_serve(repo: Repository, start: datetime, end: datetime, step: timedelta) -> list[str]:
    tick = metadata_keeper(repo)
    resigned: list[str] = []
    t = start
    while t <= end:
        resigned += tick(t)
        t += step
    return resigned


@pytest.mark.parametrize("days", [100, 200])
def test_a_registry_left_alone_for_months_still_delivers(
    days: int, tmp_path: Path, test_models: dict[str, Path]
) -> None:
    now = datetime.now(timezone.utc)
    start = now - timedelta(days=days)
    repo = Repository.init(tmp_path / "repo", now=start)
    publish(repo, test_models["digits"] / "model.onnx", name="digits", version="1.0.0", now=start)
    resigned = _run_serve(repo, start, now, timedelta(hours=6))
    assert resigned.count("targets") >= days // 45  # 90-day targets: at half life
    assert resigned.count("snapshot") >= days // 4
    client = TufFileClient(Repository(repo.path), tmp_path / "device")
    updater = client.updater()
    updater.refresh()  # the reference client, at today's real time
    assert updater.get_targetinfo("models/digits/1.0.0/model.onnx") is not None


def test_without_the_keeper_the_fleet_stops_updating_a_week_after_the_last_publish(
    tmp_path: Path, test_models: dict[str, Path]
) -> None:
    """The bug this guards: only the timestamp was re-signed, snapshot expired after 7 days."""
    now = datetime.now(timezone.utc)
    start = now - timedelta(days=10)
    repo = Repository.init(tmp_path / "repo", now=start)
    publish(repo, test_models["digits"] / "model.onnx", name="digits", version="1.0.0", now=start)
    t = start
    while t <= now:
        repo.refresh_timestamp(t, min_remaining=timedelta(hours=12))  # the old serve tick
        t += timedelta(hours=6)
    with pytest.raises(ExpiredMetadataError, match="snapshot"):
        TufFileClient(Repository(repo.path), tmp_path / "device").updater().refresh()


def test_a_role_whose_key_is_not_on_the_host_is_not_resigned_and_is_warned_about(
    tmp_path: Path,
) -> None:
    now = datetime.now(timezone.utc)
    start = now - timedelta(days=80)
    repo = Repository.init(tmp_path / "repo", now=start)
    (repo.keys_dir / "targets.pem").rename(tmp_path / "targets.pem")  # kept offline
    resigned = _run_serve(repo, start, now, timedelta(hours=6))
    assert "targets" not in resigned and "snapshot" in resigned
    status = {s.role: s for s in repo.freshness(now)}
    assert status["targets"].level == "warn" and not status["targets"].online
    assert "not on this host" in status["targets"].message
    assert status["snapshot"].level == "ok" and status["timestamp"].level == "ok"


def test_root_warns_a_month_ahead_and_renew_root_extends_it(
    tmp_path: Path, test_models: dict[str, Path]
) -> None:
    now = datetime.now(timezone.utc)
    start = now - timedelta(days=340)  # root (365 d) has 25 days left
    repo = Repository.init(tmp_path / "repo", now=start)
    _run_serve(repo, start, now, timedelta(hours=12))
    root = {s.role: s for s in repo.freshness(now)}["root"]
    assert root.level == "warn" and "renew-root" in root.message

    client = TufFileClient(Repository(repo.path), tmp_path / "device")
    client.updater().refresh()  # the device holds root v1
    version = repo.renew_root(now=now)
    assert version == 2 and repo.expiries()["root"][1] > now + timedelta(days=364)
    client.updater().refresh()  # and follows the renewed root (client workflow 5.3)
    assert client.trusted_root().version == 2
    root = {s.role: s for s in repo.freshness(now)}["root"]
    assert root.level == "ok"


def test_registry_status_exit_code_says_expired(tmp_path: Path) -> None:
    start = datetime.now(timezone.utc) - timedelta(days=8)
    repo = Repository.init(tmp_path / "repo", now=start)
    assert run_registry_cli("registry", "status", "--repo", str(repo.path)) == 2  # snapshot expired
    _run_serve(repo, datetime.now(timezone.utc), datetime.now(timezone.utc), timedelta(hours=1))
    assert run_registry_cli("registry", "status", "--repo", str(repo.path)) == 0
