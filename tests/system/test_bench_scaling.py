"""The scaling benchmarks on small inputs: the load-split runs (ingest worker processes in one
``$share`` group, registry replica processes) and the per-device budget's counting, against
real Mosquitto. No timing assertions: counts and splits only."""

from __future__ import annotations

import json

import pytest

from scripts import bench_budget, bench_scaling

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_ingest_workers_in_one_group_split_and_store_everything_once(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert bench_scaling.main(["ingest", "--workers", "2", "--messages", "400", "--senders",
                               "10", "--db", "sqlite", "--preload"]) == 0  # fmt: skip
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert run["all_stored"] and run["rows"] == 400 and run["dead_letters"] == 0
    assert run["stored_by_workers"] == 400  # a message given to both would count twice here
    assert len(run["per_worker"]["each"]) == 2 and min(run["per_worker"]["each"]) > 0


def test_registry_replicas_share_the_downloads(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_scaling.main(["registry", "--replicas", "2", "--devices", "6",
                               "--model-mb", "0.5"]) == 0  # fmt: skip
    run = json.loads(capsys.readouterr().out)["runs"][0]
    assert run["downloads_ok"] == 6, run["errors"]
    assert len(run["requests"]["each"]) == 2 and min(run["requests"]["each"]) > 0
    assert sum(run["devices_served"]["each"]) >= 6


@pytest.mark.parametrize(
    ("topic", "kind"),
    [("edgefleet/v1/devices/cam-1/telemetry", "telemetry"),
     ("edgefleet/v1/devices/cam-1/fetch/req/registry-a", "fetch/req"),
     ("edgefleet/v1/devices/cam-1/fetch/resp", "fetch/resp"),
     ("edgefleet/v1/other", "other")],
)  # fmt: skip
def test_topic_kind(topic: str, kind: str) -> None:
    assert bench_budget.topic_kind(topic) == kind


def test_mqtt_bytes_counts_header_topic_packet_id_and_puback() -> None:
    # 1 fixed header + 1 length byte + 2 + len("a/b") + 2 packet id + 10 payload + 4 PUBACK
    assert bench_budget.mqtt_bytes("a/b", 10) == 1 + 1 + 2 + 3 + 2 + 10 + 4
    assert bench_budget.mqtt_bytes("a/b", 200, qos=0) == 1 + 2 + 2 + 3 + 200  # 2-byte length
