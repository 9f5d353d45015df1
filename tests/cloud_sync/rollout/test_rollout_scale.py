"""The rollout benchmark (``scripts/bench_rollout.py``) on 30 devices, correctness only.

Runs the same ``run_bench`` as the 1,000-device benchmark: Mosquitto, two chunk-server replicas
in one shared-subscription group, the ingest worker, the controller and the fleet in a child
process. Asserts what the benchmark must show — the good rollout completes with every device
on the new version, the bad one stops at the canaries and nobody else is ever sent it, both
replicas served — and never a timing (the machine is shared).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

import scripts.bench_rollout

pytestmark = [pytest.mark.broker, pytest.mark.slow]
N = 30


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return scripts.bench_rollout


@pytest.fixture(scope="module")
def result(bench: ModuleType) -> dict[str, Any]:
    cfg = bench.BenchConfig(
        devices=N, model_mb=0.25, soak_s=3.0, telemetry_s=1.0, tick_s=0.5, timeout_s=90,
        quiet=True,
    )  # fmt: skip
    res: dict[str, Any] = bench.run_bench(cfg)
    return res


def test_good_rollout_completes_with_nobody_left_behind(result: dict[str, Any]) -> None:
    good = result["good"]
    assert good["status"] == "completed", good["history"]
    assert good["counts"] == {"committed": N}
    assert good["fleet_versions"] == {"sim@1.1.0": N}
    assert result["checks"]["good: nobody left behind (all run 1.1.0)"]
    assert good["desired_per_device"]["devices_without"] == 0


def test_bad_rollout_stops_at_canaries_and_goes_nowhere_else(result: dict[str, Any]) -> None:
    bad = result["bad"]
    assert bad["status"] == "failed", bad["history"]
    assert bad["stage"] == 0
    assert bad["failing_gates"], bad["gates"]
    assert 0 < bad["canaries"] < N
    assert bad["devices_sent_1.2.0"] <= bad["canaries"]
    assert bad["outside_canaries_sent_1.2.0"] == []
    assert result["checks"]["bad: every device back on / still on 1.1.0"]
    assert result["desired_bad_messages"] == 0


def test_both_replicas_served(result: dict[str, Any]) -> None:
    replicas = result["replicas"]
    assert set(replicas) == {"registry-a", "registry-b"}
    for name, stats in replicas.items():
        assert stats.get("answered", 0) > 0, (name, stats)
        assert stats.get("errors") == 0, (name, stats)


def test_every_correctness_check_passed(result: dict[str, Any]) -> None:
    failed = [k for k, ok in result["checks"].items() if not ok and "120 s" not in k]
    assert failed == []
