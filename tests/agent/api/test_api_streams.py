"""The local API's stream routes against a running Agent: a real blob detector (ONNX Runtime)
with tracking, zones and a line on a looping FFV1 video of the scripted sparse scene, a real
HTTP client (httpx) reading the Server-Sent Events."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import parse_config
from agent.pipeline.scene import SPARSE_SCENE, write_scene_video
from agent.protocol.telemetry import InferenceEvent
from agent.service import Agent
from tests.harness.util import wait_for

TOKEN = "stream-token-for-tests-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}
MAX_STREAMS = 3
MAX_CONNECTIONS = 6

pytestmark = pytest.mark.video


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scene_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_scene_video(tmp_path_factory.mktemp("scene") / "scene.mkv", SPARSE_SCENE)


def _cam(video: Path, blobdet: Path) -> dict[str, Any]:
    """The tracked pipeline: every frame inferred (``pace = "none"``), so the tracker sees the
    scene as scripted however loaded the machine is, looping forever."""
    scene = SPARSE_SCENE
    zone = {"name": "zone", "points": [list(p) for p in scene.zone], "dwell_s": scene.dwell_s}
    line = {"name": "line", "start": list(scene.line[0]), "end": list(scene.line[1])}
    return {"name": "cam", "source": str(video), "model": str(blobdet), "loop": True,
            "pace": "none", "zones": [zone], "lines": [line]}  # fmt: skip


def _agent(data_dir: Path, pipelines: list[dict[str, Any]], **api: Any) -> Agent:
    cfg = parse_config({
        "device_id": "stream-test", "data_dir": str(data_dir), "profile": "x86-cpu",
        "engine": {"type": "onnxruntime"}, "pipelines": pipelines,
        "api": {"port": 0, "token": TOKEN, **api},
    })  # fmt: skip
    agent = Agent(cfg)
    agent.start()
    return agent


@pytest.fixture(scope="module")
def agent(
    test_models: dict[str, Path], scene_video: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Agent]:
    cam = _cam(scene_video, test_models["blobdet"] / "model.onnx")
    a = _agent(tmp_path_factory.mktemp("data"), [cam], max_streams=MAX_STREAMS,
               max_connections=MAX_CONNECTIONS)  # fmt: skip
    yield a
    a.stop()


@pytest.fixture
def client(agent: Agent) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=agent.api.url, timeout=30, headers=AUTH) as c:
        yield c


def sse(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Events of an SSE body: {"event", "id"?, "data"} per blank-line-terminated block;
    comments (``: ...``) are yielded as {"comment": text}."""
    block: dict[str, str] = {}
    for line in lines:
        if line == "":
            if block:
                yield block
            block = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            field, _, value = line.partition(":")
            block[field] = value[1:] if value.startswith(" ") else value


def iou(a: list[float], b: list[float]) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(w, 0.0) * max(h, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def same_object_same_id(prev: dict[str, Any], cur: dict[str, Any]) -> int:
    """Asserts that a detection overlapping a tracked one of the previous frame keeps its
    track id; returns how many such pairs there were. (A new track has no id for its first
    frame or two: the tracker confirms it first.)"""
    pairs = 0
    for d in cur.get("detections", []):
        for p in prev.get("detections", []):
            if "track_id" in p and iou(d["box"], p["box"]) > 0.3:
                assert d.get("track_id") == p["track_id"], (prev, cur)
                pairs += 1
    return pairs


# --- list and latest --------------------------------------------------------------------------


def test_pipelines_list_their_source_model_fps_and_state(client: httpx.Client) -> None:
    assert wait_for(lambda: client.get("/v1/pipelines").json()["pipelines"][0]["fps"] > 0, 20)
    [p] = client.get("/v1/pipelines").json()["pipelines"]
    assert (p["name"], p["source"].endswith("scene.mkv"), p["state"]) == ("cam", True, "streaming")
    assert (p["model"], p["version"], p["task"], p["ready"]) == ("blobdet", "1.0.0",
                                                                 "detection", True)  # fmt: skip
    assert p["tracking"] is True and p["results"] > 0
    assert p["fps"] > 0  # results per second over the recent ones


def test_latest_carries_stable_track_ids_and_counts(client: httpx.Client) -> None:
    def latest() -> dict[str, Any]:
        r = client.get("/v1/pipelines/cam/latest")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    pairs = 0
    deadline = time.monotonic() + 30
    prev = latest()
    while pairs < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
        cur = latest()
        assert cur["seq"] >= prev["seq"] and cur["age_s"] >= 0
        if cur["seq"] > prev["seq"]:
            pairs += same_object_same_id(prev["result"], cur["result"])
        prev = cur
    assert pairs >= 10, "the same square seen in successive results, with one track id"
    res = prev["result"]
    assert res["pipeline"] == "cam" and res["frame_seq"] >= 0 and res["frame_time"] > 1e9
    for d in res.get("detections", []):
        assert set(d) >= {"box", "score", "label", "label_id"} and len(d["box"]) == 4
    [zone] = prev["zones"] or [{"zone": "zone", "entered": 0}]  # counted per class once seen
    assert zone["zone"] == "zone"
    assert isinstance(prev["lines"], list) and prev["tracks_started"] >= 1
    InferenceEvent.from_pipeline_event("stream-test", res)  # fits the wire contract too


# --- the live stream --------------------------------------------------------------------------


def test_stream_yields_every_result_with_track_ids_and_object_events(
    client: httpx.Client,
) -> None:
    """Results in order, none lost for a client that keeps up, stable ids from frame to frame,
    and the line crossing of a looped scene with the track id its detections carried."""
    results: list[dict[str, Any]] = []
    seqs: list[int] = []
    crossing: dict[str, Any] | None = None
    with client.stream("GET", "/v1/pipelines/cam/results", timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for ev in sse(r.iter_lines()):
            if "comment" in ev:
                continue
            assert ev["event"] == "result", ev  # a client that keeps up loses nothing
            seqs.append(int(ev["id"]))
            results.append(json.loads(ev["data"]))
            crossed = [o for o in results[-1].get("objects", []) if o["kind"] == "crossed"]
            if crossed and crossing is None:
                crossing = crossed[0]
            if crossing is not None and len(results) >= 60:
                break
            assert len(results) < 600, "a looped 5.4 s scene crosses its line within 24 s"
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    pairs = sum(same_object_same_id(a, b) for a, b in itertools.pairwise(results))
    assert pairs >= 30
    assert crossing is not None
    tracked = {d["track_id"] for e in results for d in e.get("detections", []) if "track_id" in d}
    assert crossing["track_id"] in tracked and crossing["direction"] in ("in", "out")
    assert crossing["first_seen"] <= crossing["last_seen"] and 0 < crossing["best_score"] <= 1
    frames = [e["frame_seq"] for e in results]
    assert frames == sorted(frames)
    for e in results:
        InferenceEvent.from_pipeline_event("stream-test", e)


def test_streams_are_capped_and_hold_guarded_connections(agent: Agent) -> None:
    """max_streams streams at once (then 429); each holds one of the guard's connections, so
    with them open only max_connections - max_streams more connections get in."""
    url = agent.api.url
    hub = agent.api.app.state.streams
    clients = [httpx.Client(base_url=url, headers=AUTH, timeout=10) for _ in range(MAX_STREAMS)]
    streams = [c.stream("GET", "/v1/pipelines/cam/results") for c in clients]
    socks: list[socket.socket] = []
    try:
        for s in streams:
            assert s.__enter__().status_code == 200
        assert wait_for(lambda: hub.open_streams == MAX_STREAMS)
        with httpx.Client(base_url=url, headers=AUTH, timeout=10) as c:
            r = c.get("/v1/pipelines/cam/results")
            assert r.status_code == 429 and "max_streams" in r.json()["error"]
            assert c.get("/v1/pipelines").status_code == 200  # requests still get through
            # open now: the streams and c's keep-alive connection; fill up to the cap
            for _ in range(MAX_CONNECTIONS - MAX_STREAMS - 1):
                socks.append(socket.create_connection((agent.api.addr, agent.api.port)))
            refused_before = agent.api.guard_stats.refused
            extra = socket.create_connection((agent.api.addr, agent.api.port))
            extra.settimeout(5)
            assert extra.recv(1024).startswith(b"HTTP/1.1 503")
            extra.close()
            assert agent.api.guard_stats.refused == refused_before + 1
    finally:
        for sock in socks:
            sock.close()
        for s in streams:
            s.__exit__(None, None, None)
        for c in clients:
            c.close()
    assert wait_for(lambda: hub.open_streams == 0), "streams released when clients go away"


def test_unknown_pipeline_is_404_and_auth_is_enforced(agent: Agent) -> None:
    with httpx.Client(base_url=agent.api.url, timeout=10) as anon:
        for path in ("/v1/pipelines", "/v1/pipelines/cam/latest", "/v1/pipelines/cam/results"):
            r = anon.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
            r = anon.get(path, headers={"authorization": "Bearer wrong-token-0123456789"})
            assert r.status_code == 401, path
        for path in ("/v1/pipelines/nope/latest", "/v1/pipelines/nope/results",
                     "/v1/pipelines/blobdet/latest"):  # a model name is not a pipeline  # fmt: skip
            r = anon.get(path, headers=AUTH)
            assert r.status_code == 404 and "no pipeline named" in r.json()["error"], path
    assert agent.api.app.state.streams.open_streams == 0


# --- a slow client and shutdown: agents of their own ------------------------------------------


def test_slow_client_loses_its_oldest_results_counted_never_the_pipeline(
    test_models: dict[str, Path], synthetic_video: Path, tmp_path: Path
) -> None:
    """A client that stops reading: its queue stays at stream_queue, the pipeline keeps its
    pace, and when the client reads again every gap in the result numbers is announced by a
    ``dropped`` event of exactly that size. (The digit classifier on a looping video as fast
    as it goes: hundreds of results a second, so the client falls behind at once.)"""
    queue = 4
    digits = {"name": "cam", "source": str(synthetic_video), "loop": True, "pace": "none",
              "model": str(test_models["digits"] / "model.onnx")}  # fmt: skip
    agent = _agent(tmp_path, [digits], stream_queue=queue)
    hub = agent.api.app.state.streams
    pipe = agent.pipelines[0]
    # a 4 KiB receive buffer: the server's writes back up within a few hundred results
    tiny = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    try:
        with (
            httpx.Client(base_url=agent.api.url, headers=AUTH, transport=tiny, timeout=60) as c,
            c.stream("GET", "/v1/pipelines/cam/results") as r,
        ):
            assert r.status_code == 200
            [sub] = hub.subscriptions()
            inferred0 = pipe.metrics.snapshot(0.0, "test")["frames_inferred"]
            most_queued = 0
            sent_before_first_drop: int | None = None

            def stalled() -> bool:
                nonlocal most_queued, sent_before_first_drop
                most_queued = max(most_queued, sub.queued)
                if sub.dropped and sent_before_first_drop is None:
                    sent_before_first_drop = sub.delivered
                return sub.dropped >= 200

            assert wait_for(stalled, 120, interval=0.01), (sub.dropped, sub.delivered)
            assert most_queued <= queue  # bounded, however far behind the client is
            inferred = pipe.metrics.snapshot(0.0, "test")["frames_inferred"] - inferred0
            assert inferred >= sub.dropped  # the pipeline went on at its own pace
            announced = 0
            gaps = 0
            sizes: list[int] = []
            prev: int | None = None
            pending = 0
            for ev in sse(r.iter_lines()):
                if ev.get("event") == "dropped":
                    d = json.loads(ev["data"])
                    pending += d["dropped"]
                    announced += d["dropped"]
                    assert d["total"] == announced
                elif ev.get("event") == "result":
                    sizes.append(len(ev["data"]) + len(ev["id"]) + 25)
                    seq = int(ev["id"])
                    if prev is not None:
                        assert seq - prev - 1 == pending, (prev, seq, pending)
                        gaps += seq - prev - 1
                    prev, pending = seq, 0
                    if announced >= 200:
                        break
            assert gaps == announced >= 200
            # what the connection held before the stream blocked: the guard's send-buffer
            # bound, not the kernel's auto-tuned megabytes (12,000 results, 3.6 MB, without it)
            assert sent_before_first_drop is not None
            held = sent_before_first_drop * sum(sizes) / len(sizes)
            assert held < 512 << 10, (sent_before_first_drop, held)
            assert announced <= sub.dropped
        assert wait_for(lambda: hub.open_streams == 0)
    finally:
        agent.stop()


def test_shutdown_ends_streams_with_an_end_event(
    test_models: dict[str, Path], scene_video: Path, tmp_path: Path
) -> None:
    """Stopping the agent ends each stream with an ``end`` event and a complete HTTP response
    (not a connection cut mid-body after uvicorn's grace period)."""
    agent = _agent(tmp_path, [_cam(scene_video, test_models["blobdet"] / "model.onnx")])
    got: list[dict[str, str]] = []
    failure: list[BaseException] = []
    first = threading.Event()

    def read() -> None:
        try:
            with (
                httpx.Client(base_url=agent.api.url, headers=AUTH, timeout=30) as c,
                c.stream("GET", "/v1/pipelines/cam/results") as r,
            ):
                for ev in sse(r.iter_lines()):
                    got.append(ev)
                    if ev.get("event") == "result":
                        first.set()
        except BaseException as e:  # reported by the assertion below
            failure.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert first.wait(20)
    finally:
        agent.stop()
    reader.join(30)
    assert not reader.is_alive() and failure == []
    ends = [e for e in got if e.get("event") == "end"]
    assert len(ends) == 1 and got[-1] is ends[0]
    assert "stopping" in json.loads(ends[0]["data"])["reason"]
