"""A year in minutes, shortened: ``scripts/year_sim.py`` over 400 simulated days with a few
deploys (the script's default run publishes every 30 days).

Registry, CA, a real Mosquitto and the real agent on one simulated timeline that ends now:
the keeper re-signs the online roles, the CRL timer runs daily, the operator renews root and a
short device certificate when warned, a device certificate is revoked, one version arrives on
a full disk. Every deploy must commit, nothing may expire at any simulated moment, the device
must keep about three versions, and at the end a real TLS broker admits the kept and renewed
devices and refuses the revoked one.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

from agent.update.tuf_client import MetadataExpired, TufClient
from cloud_sync.registry.repo import Repository
from scripts import year_sim


@pytest.mark.slow
@pytest.mark.broker
@pytest.mark.video
def test_a_shortened_year_keeps_delivering(tmp_path: Path) -> None:
    cfg = year_sim.YearConfig(days=400, step_h=12.0, publish_every_d=100, revoke_day=150,
                              full_disk_day=180, short_cert_days=200)  # fmt: skip
    res = year_sim.run_year(cfg, tmp_path, log=print)
    failed = [name for name, ok in res.checks.items() if not ok]
    assert failed == [], (failed, res)
    assert len(res.deploys) == 5  # days 0, 100, 200, 300, 400
    assert res.root_renewals and 335 <= res.root_renewals[0] < 365
    assert res.cert_renewals and 170 <= res.cert_renewals[0] < 200
    # between two ticks (12 h) the timestamp never had less than half its day left
    assert res.min_remaining_h["timestamp"] >= 12.0
    assert res.crl_rewrites >= 20  # every ~15 days over 400


class _FileFetcher(FetcherInterface):
    """The registry's files straight from its directory (what the chunk server serves)."""

    def __init__(self, repo_dir: Path) -> None:
        self.repo_dir = repo_dir

    def _fetch(self, url: str) -> Iterator[bytes]:
        rel = url.removeprefix("mqtt://registry/")
        path = self.repo_dir / rel
        if not path.is_file():
            raise DownloadHTTPError(f"{rel} not found", 404)
        yield path.read_bytes()


def test_the_device_judges_metadata_expiry_by_its_wall_clock(tmp_path: Path) -> None:
    """The seam the simulation relies on: ``TufClient(clock=…)`` is the time ngclient judges
    expiry by. A registry signed 366 days ago and left alone: at that time a device refreshes
    fine; at real time its root (365 days) and everything else has expired."""
    now = datetime.now(timezone.utc)
    then = now - timedelta(days=366)
    repo_dir = tmp_path / "repo"
    Repository.init(repo_dir, now=then)
    root = repo_dir / "root.json"

    at_then = TufClient(tmp_path / "dev-then", root, _FileFetcher(repo_dir), clock=lambda: then)
    at_then.refresh()  # no error: judged at the signing time
    assert at_then.target_info("models/none/1.0.0/model.onnx") is None

    at_now = TufClient(tmp_path / "dev-now", root, _FileFetcher(repo_dir), clock=lambda: now)
    with pytest.raises(MetadataExpired, match=r"(?i)expired"):
        at_now.refresh()
    default = TufClient(tmp_path / "dev-default", root, _FileFetcher(repo_dir))
    with pytest.raises(MetadataExpired):
        default.refresh()  # no clock given: the system clock, as on a device
