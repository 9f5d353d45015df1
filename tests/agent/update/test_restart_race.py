"""A model update racing pipeline restarts from another thread (issue 15 leftover).

Real parts: a Mosquitto broker, the registry's chunk server, TUF over MQTT, ONNX Runtime and
OpenCV decoding the looping digit video. While one thread restarts pipeline ``front`` over
and over (as the ``restart_pipeline`` command does), the update manager delivers versions
alternately. Every update must commit and keep running: the restarted pipeline takes the model
current when it is rebuilt, and the health window follows the pipeline through restarts.
Before the fix a restart rebuilt the pipeline with the model it read before the swap (the
update was lost) or the health window kept watching the stopped pipeline and never decided.
"""

from __future__ import annotations

import threading

import pytest

from tests.harness.fleet import Fleet
from tests.harness.util import wait_for

pytestmark = [pytest.mark.broker, pytest.mark.video]

UPDATES = 6  # alternating versions, each one racing the restarts


def test_model_updates_racing_pipeline_restarts_are_kept(fleet: Fleet) -> None:
    fleet.publish("digits", "1.0.0")
    fleet.publish("digits", "1.1.0")
    # 5 frames in 1 s: more than one short-lived pipeline delivers between two restarts
    agent = fleet.start_agent(health_window_s=1.0, health_min_frames=5)
    fleet.commit("digits@1.0.0")
    stop = threading.Event()
    restarts: list[int] = []
    failures: list[BaseException] = []

    def restart_forever() -> None:
        try:
            while not stop.is_set():
                agent.restart_pipeline("front")
                restarts.append(1)
                fresh = agent.running.by_name["front"].metrics.counters
                # a frame or two on the new pipeline, then restart it again
                wait_for(lambda c=fresh: c["frames_inferred"] >= 2 or stop.is_set(), 10)
        except BaseException as e:  # reported by the test thread
            failures.append(e)

    hammer = threading.Thread(target=restart_forever, name="restarts", daemon=True)
    hammer.start()
    try:
        for i in range(UPDATES):
            version = ("1.1.0", "1.0.0")[i % 2]
            before = len(restarts)
            rep = fleet.commit(f"digits@{version}", timeout=60)
            assert rep.active_version == version, rep
            assert fleet.running() == f"digits@{version}", f"update {i + 1}: {version} lost"
            assert len(restarts) > before, "no restart raced this update"
            assert not failures, failures
    finally:
        stop.set()
        hammer.join(30)
    assert not failures, failures
    # after the race the pipeline still runs the last committed version and infers with it
    pipe = agent.running.by_name["front"]
    model = pipe.model
    assert model is not None and model.ref == "digits@1.0.0"
    n = pipe.metrics.counters["frames_inferred"]
    assert wait_for(lambda: pipe.metrics.counters["frames_inferred"] >= n + 5, 20)
    assert not pipe.last_error
