"""Configuration rollouts and reported configurations in the ingest database, on a real SQLite
file and a real PostgreSQL server (same tests, both): the rollout row, the ``device_config``
table (schema 8) the ingest fills from ``ReportedState.config``, the snapshot the controller
reads and the fleet view ``fleet status`` prints."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from cloud_sync.ingest.commands import config_summary
from cloud_sync.ingest.store import Store
from cloud_sync.rollout import RolloutSpec, db, start
from cloud_sync.rollout.configdoc import build
from cloud_sync.rollout.snapshot import SnapshotReader

T0 = datetime(2026, 11, 23, 12, 0, 0, tzinfo=timezone.utc)
H1, H2 = "a" * 64, "b" * 64
CONFIG = '[[pipelines]]\nname = "front"\nsource = "rtsp://10.0.0.5/s"\nmodel = "det"\n'


def reported(device_id: str, config: dict[str, Any] | None) -> dict[str, Any]:
    front = {"name": "front", "phase": "committed", "active_model": "det",
             "active_version": "1.0.0", "updated_at": T0.isoformat()}  # fmt: skip
    msg: dict[str, Any] = {"device_id": device_id, "pipelines": [front]}
    if config is not None:
        msg["config"] = {"updated_at": T0.isoformat(), **config}
    return msg


def test_a_configuration_rollout_is_stored_and_read_back(store: Store) -> None:
    spec = RolloutSpec(id="c1", config=build(CONFIG, {}, source="p.toml"), target="*")
    db.create(store, spec, start(spec, T0), T0)
    row = db.get(store, "c1")
    assert row.spec == spec and row.spec.config is not None
    assert row.spec.config.template == spec.config.template  # type: ignore[union-attr]
    assert [r.id for r in db.list_rollouts(store, active_only=True)] == ["c1"]


def test_reported_configuration_reaches_the_snapshot_and_the_fleet_view(store: Store) -> None:
    for d in ("cam-1", "cam-2", "cam-3"):
        store.upsert_state({"device_id": d, "online": True, "pipelines": ["front"]}, now=T0)
    store.upsert_reported_batch([
        reported("cam-1", {"hash": H1, "revision": 3, "target_hash": H1, "status": "applied"}),
        reported("cam-2", {"hash": None, "revision": 4, "target_hash": H2,
                           "status": "rolled_back", "reason": "health window failed"}),
        reported("cam-3", None),
    ])  # fmt: skip
    views = {v.device_id: v for v in SnapshotReader(store).read(T0, T0, metrics=False)}
    assert views["cam-1"].config is not None and views["cam-1"].config.hash == H1
    c2 = views["cam-2"].config
    assert c2 is not None and c2.hash is None and c2.target_hash == H2
    assert c2.status == "rolled_back" and c2.reason == "health window failed"
    assert views["cam-3"].config is None
    fleet = {d["device_id"]: d for d in store.fleet()}
    assert config_summary(fleet["cam-1"]["config"]) == f"{H1[:12]} applied"
    assert config_summary(fleet["cam-2"]["config"]) == (
        f"local file; last {H2[:12]} rolled_back: health window failed"
    )
    assert fleet["cam-3"]["config"] is None and config_summary(None) == ""

    # each report replaces the last: a newer one wins, one without config clears it
    store.upsert_reported(reported("cam-2", {"hash": H2, "target_hash": H2, "status": "applied"}))
    store.upsert_reported(reported("cam-1", None))
    views = {v.device_id: v for v in SnapshotReader(store).read(T0, T0, metrics=False)}
    assert views["cam-2"].config is not None and views["cam-2"].config.status == "applied"
    assert views["cam-1"].config is None
