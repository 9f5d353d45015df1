"""Remote configuration on a real agent: signed desired states through a real Mosquitto, the
registry's desired-state key, the digits model on a looping video (ONNX Runtime, OpenCV)."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any
from urllib.error import HTTPError
from urllib.request import Request, urlopen

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import pytest

from agent.common.errors import EdgefleetError
from agent.config import AgentConfig, parse_config
from agent.protocol.desired import sign_desired
from agent.protocol.state import ConfigTarget, DesiredState, DeviceState, config_hash
from agent.protocol.topics import Topics
from agent.service import Agent, read_status
from tests.harness.fleet import DEVICE, Fleet
from tests.harness.util import free_port, wait_for


def pipelines(fleet: Fleet, **changes: dict[str, Any]) -> list[dict[str, Any]]:
    """Pipelines ``a`` and ``b`` looping the digit video on the local digits model, with
    tracking; ``changes`` per name are merged into its table."""
    model = str(fleet.models["digits"] / "model.onnx")
    base = {"source": str(fleet.video), "model": model, "loop": True, "tracking": {}}
    return [{"name": n, **base, **changes.get(n, {})} for n in ("a", "b")]


def agent_config(fleet: Fleet, **extra: Any) -> AgentConfig:
    return parse_config({
        "device_id": DEVICE, "data_dir": str(fleet.tmp / "data"), "profile": "x86-cpu",
        "pipelines": pipelines(fleet), "broker": {"url": fleet.broker.url},
        "trust": {"root": str(fleet.repo_dir / "root.json")},
        "update": {"health_window_s": 3, "health_min_frames": 3, "max_latency_ratio": 100},
        **extra,
    })  # fmt: skip


def start(fleet: Fleet, cfg: AgentConfig | None = None) -> Agent:
    agent = Agent(cfg or agent_config(fleet))
    fleet.agent = agent
    agent.start()
    assert wait_for(lambda: agent.session.connected.is_set(), 10)
    return agent


def send(fleet: Fleet, revision: int, document: Any) -> ConfigTarget:
    """Sign and publish a desired state carrying ``document`` (a list: its pipelines)."""
    text = document if isinstance(document, str) else json.dumps({"pipelines": document})
    target = ConfigTarget(hash=config_hash(text), document=text)
    state = DesiredState(device_id=DEVICE, revision=revision,
                         issued_at=datetime.now(timezone.utc), config=target)  # fmt: skip
    fleet.inject_desired(sign_desired(state, [fleet.repo.desired_signer()]))
    return target


def settled(agent: Agent, target: ConfigTarget, *status: str, timeout: float = 30) -> Any:
    def done() -> bool:
        r = agent.remote.report()
        return r.target_hash == target.hash and r.status is not None and (
            r.status.value in status) and agent.updates.idle.is_set()  # fmt: skip

    assert wait_for(done, timeout), agent.remote.report()
    return agent.remote.report()


def inferring(agent: Agent, name: str, more: int = 5) -> bool:
    pipe = agent.running.by_name[name]
    before = pipe.metrics.counters["frames_inferred"]
    return wait_for(lambda: pipe.metrics.counters["frames_inferred"] >= before + more, 15)


def test_threshold_in_place_then_source_restarts_only_its_pipeline(fleet: Fleet) -> None:
    agent = start(fleet)
    a, b = agent.pipelines
    t1 = send(fleet, 1, pipelines(fleet, a={"tracking": {"high_score": 0.8}}))
    rep = settled(agent, t1, "applied")
    assert rep.hash == t1.hash and rep.revision == 1
    assert agent.running.by_name["a"] is a and agent.running.by_name["b"] is b  # no restart
    assert a.analytics is not None and a.analytics.tracker.params.high_score == 0.8
    assert inferring(agent, "a") and a.metrics.counters["reconnects"] == 0
    assert wait_for(lambda: any(r.config and r.config.hash == t1.hash for r in fleet.reported), 10)
    assert agent.status()["config"]["hash"] == t1.hash

    other = fleet.tmp / "other.mkv"
    shutil.copy(fleet.video, other)
    t2 = send(fleet, 2, pipelines(fleet, a={"tracking": {"high_score": 0.8}},
                                  b={"source": str(other)}))  # fmt: skip
    settled(agent, t2, "applied")
    new_b = agent.running.by_name["b"]
    assert new_b is not b and new_b.source.target == str(other)
    assert new_b.model is b.model  # the model it ran, not reopened
    assert agent.running.by_name["a"] is a  # untouched
    assert agent.pipelines == [a, new_b] and inferring(agent, "b")
    assert agent.updates.reported().config.hash == t2.hash
    assert "restart b (source)" in (agent.remote.report().reason or "")


def test_invalid_configurations_are_rejected_and_nothing_changes(fleet: Fleet) -> None:
    agent = start(fleet)
    a, b = agent.pipelines
    dup = pipelines(fleet)
    dup[1]["name"] = "a"
    rep = settled(agent, send(fleet, 1, dup), "rejected")
    assert "unique; repeated: ['a']" in rep.reason and rep.hash is None
    bad = pipelines(fleet, b={"max_fps": -1})
    rep = settled(agent, send(fleet, 2, bad), "rejected")
    assert "pipelines.1.max_fps" in rep.reason and "previous one kept" in rep.reason
    rep = settled(agent, send(fleet, 3, '{"pipelines": [], "data_dir": "/tmp"}'), "rejected")
    assert "data_dir" in rep.reason
    assert agent.pipelines == [a, b] and inferring(agent, "a") and inferring(agent, "b")
    assert not (fleet.tmp / "data" / "config" / "remote.json").exists()


def test_a_source_that_does_not_open_is_rolled_back(fleet: Fleet) -> None:
    agent = start(fleet)
    a, _ = agent.pipelines
    missing = fleet.tmp / "gone.mkv"
    t = send(fleet, 1, pipelines(fleet, b={"source": str(missing)}))
    rep = settled(agent, t, "rolled_back")
    assert f"pipeline b: source {missing} did not deliver a frame in 3 s" in rep.reason
    assert "does not exist" in rep.reason and rep.hash is None
    b = agent.running.by_name["b"]
    assert b.source.target == str(fleet.video) and inferring(agent, "b")  # previous restored
    assert agent.running.by_name["a"] is a
    assert not (fleet.tmp / "data" / "config" / "remote.json").exists()


def test_sealed_value_without_a_device_key_is_rejected(fleet: Fleet) -> None:
    agent = start(fleet)
    doc = pipelines(fleet, b={"source": "sealed:v1:QUJDREVG"})
    rep = settled(agent, send(fleet, 1, doc), "rejected")
    assert "sealed values ([1].source)" in rep.reason and "no [broker] key_file" in rep.reason


def test_applied_configuration_survives_a_restart_and_replays_do_not_go_back(
    fleet: Fleet,
) -> None:
    agent = start(fleet)
    t1 = send(fleet, 1, pipelines(fleet, b={"max_fps": 5}))
    settled(agent, t1, "applied")
    t2 = send(fleet, 2, pipelines(fleet)[:1])  # b removed
    settled(agent, t2, "applied")
    assert [p.name for p in agent.pipelines] == ["a"]
    stored = json.loads((fleet.tmp / "data" / "config" / "remote.json").read_text())
    assert stored["hash"] == t2.hash and stored["revision"] == 2
    fleet.stop_agent()

    agent = start(fleet)  # the local file still names a and b
    assert [p.name for p in agent.pipelines] == ["a"]
    assert agent.remote.report().hash == t2.hash and inferring(agent, "a")
    # an older desired state replayed (signed, genuine, but revision 1 < 2): refused
    old = send(fleet, 1, pipelines(fleet, b={"max_fps": 5}))
    assert old.hash == t1.hash
    assert wait_for(lambda: "revision" in (agent.updates.errors.get("*") or ""), 15)
    assert agent.remote.report().hash == t2.hash and [p.name for p in agent.pipelines] == ["a"]


def test_corrupt_stored_configuration_falls_back_to_the_local_file(fleet: Fleet) -> None:
    stored = fleet.tmp / "data" / "config" / "remote.json"
    stored.parent.mkdir(parents=True)
    stored.write_text('{"hash": "00", "document": "{}", "revision": 1}')
    agent = start(fleet)
    assert [p.name for p in agent.pipelines] == ["a", "b"]
    rep = agent.updates.reported().config
    assert rep is not None and rep.status.value == "rejected" and "corrupt" in rep.reason
    assert "local config file" in rep.reason


def test_restart_pipeline_keeps_its_model_and_refuses_unknown_names(fleet: Fleet) -> None:
    agent = start(fleet)
    a, b = agent.pipelines
    agent.restart_pipeline("b")
    new_b = agent.running.by_name["b"]
    assert new_b is not b and new_b.model is b.model and agent.running.by_name["a"] is a
    assert agent.pipelines == [a, new_b] and inferring(agent, "b")
    assert b.finished.is_set()  # the old one stopped
    with pytest.raises(EdgefleetError, match="no pipeline named 'nope'"):
        agent.restart_pipeline("nope")


# --- pipelines added and removed reach the local API, /metrics, status and the birth ---------


def http(url: str, body: bytes | None = None, ctype: str = "image/png") -> tuple[int, Any]:
    """Status and body (JSON decoded when it is JSON) of a GET, or a POST of ``body``."""
    req = Request(url, data=body, headers={"Content-Type": ctype} if body else {})
    try:
        with urlopen(req, timeout=10) as r:
            status, raw, kind = r.status, r.read(), r.headers.get("Content-Type", "")
    except HTTPError as e:
        status, raw, kind = e.code, e.read(), e.headers.get("Content-Type", "")
        e.close()
    return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()


def metric_pipelines(base: str) -> set[str]:
    """Pipelines the Prometheus endpoint has a model line for."""
    _, text = http(f"{base}/metrics")
    return set(re.findall(r'^edgefleet_pipeline_model_info\{[^}]*pipeline="([^"]+)"', text, re.M))


@contextmanager
def births(fleet: Fleet) -> Iterator[list[DeviceState]]:
    """The device's retained birth states as a dashboard subscribed meanwhile gets them."""
    got: list[DeviceState] = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="birth-watch")
    c.on_message = lambda _c, _u, m: got.append(DeviceState.decode(bytes(m.payload)))
    c.on_connect = lambda cl, *a: cl.subscribe(Topics().device(DEVICE, "state"), qos=1)
    c.connect(fleet.broker.host, fleet.broker.port)
    c.loop_start()
    try:
        yield got
    finally:
        c.loop_stop()
        c.disconnect()


def test_pipelines_added_and_removed_show_in_the_api_metrics_status_at_once(
    fleet: Fleet,
) -> None:
    api, prom = free_port(), free_port()
    cfg = agent_config(fleet, api={"port": api}, telemetry={"prometheus_port": prom})
    agent = start(fleet, cfg)
    a, b = agent.pipelines
    base, metrics = f"http://127.0.0.1:{api}", f"http://127.0.0.1:{prom}"
    image = cv2.imencode(".png", np.zeros((28, 28), np.uint8))[1].tobytes()
    assert http(f"{base}/v1/pipelines/c/latest")[0] == 404
    assert http(f"{base}/v1/models/c/infer", image)[0] == 404
    with births(fleet) as seen:
        assert wait_for(lambda: any(s.pipelines == ["a", "b"] for s in seen), 10)
        three = [*pipelines(fleet), {**pipelines(fleet)[0], "name": "c"}]
        settled(agent, send(fleet, 1, three), "applied")
        # the API serves c at once: listed, its latest result, an inference on its model
        _, listed = http(f"{base}/v1/pipelines")
        assert [p["name"] for p in listed["pipelines"]] == ["a", "b", "c"]
        _, models = http(f"{base}/v1/models")
        assert [m["pipeline"] for m in models["models"]] == ["a", "b", "c"]
        assert wait_for(lambda: http(f"{base}/v1/pipelines/c/latest")[0] == 200, 15)
        status, latest = http(f"{base}/v1/pipelines/c/latest")
        assert latest["pipeline"] == "c" and latest["result"]["model"] == "digits"
        status, answer = http(f"{base}/v1/models/c/infer", image)
        assert status == 200 and answer["pipeline"] == "c", answer
        assert metric_pipelines(metrics) == {"a", "b", "c"}
        assert [p["name"] for p in read_status(agent.cfg.data_dir)["pipelines"]] == ["a", "b", "c"]
        assert [p.name for p in agent.updates.reported().pipelines] == ["a", "b", "c"]
        assert wait_for(lambda: any(s.pipelines == ["a", "b", "c"] for s in seen), 10)
        assert agent.telemetry.build().pipelines[-1].name == "c"

        settled(agent, send(fleet, 2, pipelines(fleet)[1:]), "applied")  # a and c removed
        _, listed = http(f"{base}/v1/pipelines")
        assert [p["name"] for p in listed["pipelines"]] == ["b"]
        status, body = http(f"{base}/v1/pipelines/c/latest")
        assert status == 404 and "pipelines ['b']" in body["error"]
        assert http(f"{base}/v1/models/a/infer", image)[0] == 404
        assert http(f"{base}/v1/pipelines/b/latest")[0] == 200  # b untouched, still served
        _, models = http(f"{base}/v1/models")
        assert [m["pipeline"] for m in models["models"]] == ["b"]
        assert metric_pipelines(metrics) == {"b"}
        assert [p["name"] for p in read_status(agent.cfg.data_dir)["pipelines"]] == ["b"]
        assert [p.name for p in agent.updates.reported().pipelines] == ["b"]
        assert [p.name for p in agent.telemetry.build().pipelines] == ["b"]
        assert wait_for(lambda: seen[-1].pipelines == ["b"], 10)
        assert agent.pipelines == [b] and a.finished.is_set()
