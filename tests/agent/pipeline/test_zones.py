"""Zones and lines: entered/left/dwell/crossed once per track, counts, and on real video."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.common.errors import ConfigError
from agent.config import parse_config
from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.pipeline.analytics import FrameAnalytics, pipeline_options
from agent.pipeline.config import LineConfig, ZoneConfig
from agent.pipeline.model import RunnableModel, card_for_local_model
from agent.pipeline.postprocess import Detection, Result
from agent.pipeline.runner import Pipeline
from agent.pipeline.scene import (
    SCENE,
    SPARSE_SCENE,
    Scene,
    detections,
    ground_truth,
    write_scene_video,
)
from agent.pipeline.sinks import CallbackSink
from agent.pipeline.sources import parse_source
from agent.pipeline.tracking import Tracker, TrackParams
from agent.pipeline.zones import points_in_polygon
from agent.protocol.telemetry import InferenceEvent, pipeline_telemetry_from_status
from agent.telemetry.events import EventPolicy, split_objects

LINE = {"name": "gate", "start": [0, 200], "end": [640, 200]}  # drawn left to right: down = in
ZONE = {"name": "dock", "points": [[300, 300], [600, 300], [600, 460], [300, 460]]}


def box(cx: float, bottom: float, side: float = 40) -> tuple[float, float, float, float]:
    return (cx - side / 2, bottom - side, cx + side / 2, bottom)


def run(
    frames: Sequence[Sequence[tuple[float, float]]],
    *,
    zones: Sequence[dict[str, Any]] = (),
    lines: Sequence[dict[str, Any]] = (),
    fps: float = 10.0,
    label: str = "person",
    score: float = 0.9,
) -> list[dict[str, Any]]:
    """Object events of a sequence of frames, each a list of (cx, bottom) of 40-px objects."""
    a = FrameAnalytics(
        Tracker(TrackParams(min_hits=1)),
        [ZoneConfig.model_validate(z) for z in zones],
        [LineConfig.model_validate(ln) for ln in lines],
    )
    out = []
    for t, objs in enumerate(frames):
        dets = [Detection(box(x, y), score, 0, label) for x, y in objs]
        event: dict[str, Any] = Result("detection", detections=dets).to_dict()
        a.apply(event, Result("detection", detections=dets), (640, 480), t / fps, 1e9 + t / fps)
        out += event.get("objects", [])
    return out


def test_line_counts_each_direction_once_per_track() -> None:
    down = [[(100, 150 + 10 * t)] for t in range(12)]  # anchor 150 -> 260: crosses at 200
    ev = run(down, lines=[LINE])
    assert [(e["kind"], e["direction"], e["track_id"]) for e in ev] == [("crossed", "in", 1)]
    up = [[(100, 260 - 10 * t)] for t in range(12)]
    assert [e["direction"] for e in run(up, lines=[LINE])] == ["out"]
    # back and forth: still one crossing for the track
    wobble = down + [[(100, 260 - 10 * t)] for t in range(12)]
    assert len(run(wobble, lines=[LINE])) == 1


def test_line_ignores_jitter_within_its_margin_and_crossings_beyond_its_ends() -> None:
    jitter = [[(100, 200 + (3 if t % 2 else -3))] for t in range(30)]  # margin 4 px
    assert run(jitter, lines=[LINE]) == []
    short = {"name": "short", "start": [0, 200], "end": [200, 200]}
    past_the_end = [[(400, 150 + 10 * t)] for t in range(12)]
    assert run(past_the_end, lines=[short]) == []


def test_crossing_while_unseen_counts_when_the_track_comes_back() -> None:
    frames = [[(100, 150 + 10 * t)] for t in range(4)] + [[] for _ in range(4)]
    frames += [[(100, 150 + 10 * t)] for t in range(8, 12)]  # reappears below the line
    ev = run(frames, lines=[LINE])
    assert [(e["kind"], e["direction"], e["track_id"]) for e in ev] == [("crossed", "in", 1)]


def test_zone_enter_dwell_leave_once_each_with_times_and_best_score() -> None:
    walk_in = [[(250 + 20 * k, 400)] for k in range(11)]  # inside from x = 310, t = 0.3 s
    stay = [[(450, 400)] for _ in range(35)]
    walk_out = [[(430 - 20 * k, 400)] for k in range(10)]  # outside from x = 290, t = 5.3 s
    frames = walk_in + stay + walk_out
    ev = run(frames, zones=[{**ZONE, "dwell_s": 3.0}])
    assert [e["kind"] for e in ev] == ["entered", "dwell", "left"]
    entered, dwell, left = ev
    assert entered["first_seen"] == pytest.approx(1e9) and entered["track_id"] == 1
    assert entered["last_seen"] == pytest.approx(1e9 + 0.3)
    assert dwell["dwell_s"] == pytest.approx(3.0) and left["dwell_s"] == pytest.approx(5.0)
    assert left["last_seen"] == pytest.approx(1e9 + 5.3) and left["best_score"] == 0.9
    # and back in: nothing more for that track
    back = [[(250, 400)] for _ in range(10)] + [[(250 + 10 * k, 400)] for k in range(20)]
    assert len(run(frames + back, zones=[ZONE])) == 2


def test_zone_left_when_the_track_ends_inside() -> None:
    frames = [[(450, 400)] for _ in range(5)] + [[] for _ in range(40)]
    assert [e["kind"] for e in run(frames, zones=[ZONE])] == ["entered", "left"]


def test_regions_count_only_their_classes_and_scores() -> None:
    frames = [[(100, 150 + 10 * t)] for t in range(12)]
    assert run(frames, lines=[{**LINE, "classes": ["car"]}]) == []
    assert run(frames, lines=[{**LINE, "min_score": 0.95}]) == []
    assert len(run(frames, lines=[{**LINE, "classes": ["person"], "min_score": 0.5}])) == 1


def test_normalized_coordinates_follow_the_frame_size() -> None:
    line = {"name": "mid", "coords": "normalized", "start": [0, 0.5], "end": [1, 0.5]}
    frames = [[(100, 200 + 10 * t)] for t in range(10)]  # crosses y = 240 of a 480-px frame
    assert [e["direction"] for e in run(frames, lines=[line])] == ["in"]


def test_points_in_polygon_even_odd_and_concave() -> None:
    u_shape = np.array([[0, 0], [30, 0], [30, 30], [20, 30], [20, 10], [10, 10], [10, 30], [0, 30]],
                       dtype=np.float64)  # fmt: skip
    pts = np.array([[5, 20], [15, 20], [25, 20], [15, 5], [40, 5]], dtype=np.float64)
    assert points_in_polygon(pts, u_shape).tolist() == [True, False, True, True, False]


@pytest.mark.parametrize("seed", range(5))
def test_scripted_scene_counts_are_exact(seed: int) -> None:
    gt = ground_truth(SCENE)
    a = FrameAnalytics(
        Tracker(),
        [ZoneConfig(name="zone", points=list(SCENE.zone), dwell_s=SCENE.dwell_s)],
        [LineConfig(name="line", start=SCENE.line[0], end=SCENE.line[1])],
    )
    for t, dets in enumerate(detections(SCENE, seed)):
        event: dict[str, Any] = Result("detection", detections=dets).to_dict()
        a.apply(event, Result("detection", detections=dets), SCENE.size, t / 25, 1e9 + t / 25)
    st = a.status()
    [z] = st["zones"]
    [ln] = st["lines"]
    assert (ln["crossed_in"], ln["crossed_out"]) == (gt.crossed["in"], gt.crossed["out"])
    assert (z["entered"], z["left"], z["dwell"]) == (gt.entered, gt.left, gt.dwell)
    assert z["inside"] == gt.entered - gt.left  # the one standing in the zone


@pytest.mark.parametrize(
    ("region", "why"),
    [
        ({"name": "z", "points": [[0, 0], [10, 0]]}, "at least 3"),
        ({"name": "z", "points": [[0, 0], [10, 0], [20, 0]]}, "no area"),
        ({"name": "z", "coords": "normalized", "points": [[0, 0], [2, 0], [0, 1]]}, "0..1"),
        ({"name": "z", "points": [[0, 0], [9, 0], [0, 9]], "dwell_s": 0}, "greater than 0"),
        ({"name": "z", "points": [[0, 0], [9, 0], [0, 9]], "color": "red"}, "Extra inputs"),
        ({"name": "bad name", "points": [[0, 0], [9, 0], [0, 9]]}, "pattern"),
    ],
)
def test_zone_config_mistakes_are_named(region: dict[str, Any], why: str) -> None:
    cfg = {"device_id": "d", "pipelines": [{"name": "p", "source": 0, "model": "m.onnx",
                                            "zones": [region]}]}  # fmt: skip
    with pytest.raises(ConfigError, match=why):
        parse_config(cfg)


def test_line_config_and_region_names() -> None:
    def pipe(**extra: Any) -> dict[str, Any]:
        return {"device_id": "d", "pipelines": [{"name": "p", "source": 0, "model": "m.onnx",
                                                 **extra}]}  # fmt: skip

    with pytest.raises(ConfigError, match="same point"):
        parse_config(pipe(lines=[{"name": "l", "start": [5, 5], "end": [5, 5]}]))
    with pytest.raises(ConfigError, match="unique"):
        parse_config(pipe(lines=[LINE], zones=[{**ZONE, "name": "gate"}]))
    with pytest.raises(ConfigError, match="low_score"):
        parse_config(pipe(tracking={"low_score": 0.7, "high_score": 0.5}))


def test_object_events_always_leave_and_split_when_many() -> None:
    policy = EventPolicy("rate", 1.0)
    assert policy.allow({"detections": []}, 0.0)
    assert not policy.allow({"detections": []}, 0.1)
    assert policy.allow({"objects": [{"kind": "entered"}]}, 0.2)  # never rate-limited
    event = {"detections": [{"box": [0, 0, 1, 1]}], "objects": list(range(250))}
    parts = split_objects(event, per=100)
    assert [len(p["objects"]) for p in parts] == [100, 100, 50]
    assert "detections" in parts[0] and "detections" not in parts[1]


def test_telemetry_carries_the_counts_and_rejects_bad_ones() -> None:
    status = {
        "name": "front", "source_state": "streaming", "fps_in": 25.0, "fps_out": 25.0,
        "frames_read": 100, "frames_inferred": 90, "frames_dropped": 0, "reconnects": 0,
        "errors": 0, "frames_skipped_max_fps": 7, "frames_skipped_no_motion": 3,
        "tracks_active": 2, "tracks_started": 5,
        "zones": [{"zone": "dock", "label": "person", "entered": 3, "left": 1, "dwell": 1,
                   "inside": 2}],
        "lines": [{"line": "gate", "label": "car", "crossed_in": 4, "crossed_out": 2}],
    }  # fmt: skip
    t = pipeline_telemetry_from_status(status)
    assert t.frames_skipped == {"max_fps": 7, "no_motion": 3}
    assert t.zones[0].inside == 2 and t.lines[0].crossed_in == 4 and t.tracks_started == 5
    with pytest.raises(ValueError, match="direction"):
        InferenceEvent.model_validate({
            "device_id": "d", "pipeline": "p", "model": "m", "version": "1.0.0",
            "task": "detection", "frame_seq": 0, "frame_time": 1.0, "latency_ms": 1.0,
            "objects": [{"kind": "entered", "region": "z", "track_id": 1, "label_id": 0,
                         "label": "x", "first_seen": 1.0, "last_seen": 1.0, "best_score": 0.5,
                         "direction": "in"}],
        })  # fmt: skip


@pytest.mark.video
def test_real_detector_on_scripted_video_counts_exactly(
    tmp_path: Path, test_models: dict[str, Path]
) -> None:
    """blobdet on an FFV1 video of the sparse scene, through the real pipeline: the object
    that crosses the line behind a pillar, the one that dwells in the zone and the one that
    crosses back, each with one id, and the exact counts in events and telemetry."""
    scene: Scene = SPARSE_SCENE
    video = write_scene_video(tmp_path / "scene.mkv", scene)
    gt = ground_truth(scene)
    zone = {"name": "zone", "points": [list(p) for p in scene.zone], "dwell_s": scene.dwell_s}
    line = {"name": "line", "start": list(scene.line[0]), "end": list(scene.line[1])}
    cfg = parse_config({"device_id": "d", "pipelines": [{
        "name": "cam", "source": str(video), "model": "m.onnx", "zones": [zone], "lines": [line],
    }]}).pipelines[0]  # fmt: skip
    path = test_models["blobdet"] / "model.onnx"
    backend = OnnxRuntimeBackend(path)
    model = RunnableModel(card_for_local_model(path, backend), backend)
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def collect(e: dict[str, Any]) -> None:
        with lock:
            events.append(e)

    pipe = Pipeline("cam", parse_source(str(video)), model, [CallbackSink(collect)], pace="none",
                    **pipeline_options(cfg))  # fmt: skip
    pipe.start()
    assert pipe.wait(300)
    pipe.stop()
    assert len(events) == scene.frames
    objects = [o for e in events for o in e.get("objects", [])]
    crossed = sorted(o["direction"] for o in objects if o["kind"] == "crossed")
    assert crossed == sorted(["in"] * gt.crossed["in"] + ["out"] * gt.crossed["out"])
    kinds = [o["kind"] for o in objects if o["kind"] != "crossed"]
    assert kinds == ["entered", "dwell", "left"]
    ids = {d["track_id"] for e in events for d in e.get("detections", []) if "track_id" in d}
    assert ids == {1, 2, 3}  # one per object, none lost behind the pillar
    for e in events:  # every event fits the contract
        InferenceEvent.from_pipeline_event("d", e)
    tel = pipeline_telemetry_from_status(pipe.status(0.0))
    assert [(z.entered, z.left, z.dwell, z.inside) for z in tel.zones] == [(1, 1, 1, 0)]
    assert [(ln.crossed_in, ln.crossed_out) for ln in tel.lines] == [(2, 1)]
    assert tel.tracks_started == 3 and "track" in tel.latency_ms


def test_object_events_go_through_the_outbox_as_contract_messages(tmp_path: Path) -> None:
    """The MQTT event sink under a 1/s rate policy: every frame with object events is queued,
    split when they are many, and each payload decodes as the contract's InferenceEvent."""
    from agent.telemetry.events import MqttEventSink
    from agent.telemetry.outbox import Outbox

    frames = [[(100, 150 + 10 * t)] for t in range(12)]  # one crossing at frame 5
    a = FrameAnalytics(Tracker(TrackParams(min_hits=1)), [], [LineConfig.model_validate(LINE)])
    outbox = Outbox(tmp_path / "outbox.db")
    clock = iter(t / 10 for t in range(100))
    sink = MqttEventSink("cam-1", outbox, "edgefleet/v1/devices/cam-1/events",
                         EventPolicy("rate", 1.0), clock=lambda: next(clock))  # fmt: skip
    for t, objs in enumerate(frames):
        dets = [Detection(box(x, y), 0.9, 0, "person") for x, y in objs]
        result = Result("detection", detections=dets)
        event = {"pipeline": "front", "model": "det", "version": "1.0.0", "frame_seq": t,
                 "frame_time": 1e9 + t / 10, "latency_ms": 5.0, **result.to_dict()}  # fmt: skip
        a.apply(event, result, (640, 480), t / 10, event["frame_time"])
        sink.emit(event)
    crossing = {**event, "detections": []}
    crossing["objects"] = [
        {"kind": "crossed", "region": "gate", "track_id": k + 1, "label_id": 0,
         "label": "person", "first_seen": 1e9, "last_seen": 1e9 + 1, "best_score": 0.9,
         "direction": "in"}
        for k in range(230)
    ]  # fmt: skip
    sink.emit(crossing)
    rows = outbox.peek(0, 100)
    messages = [InferenceEvent.decode(r.payload) for r in rows]
    # frame 0 (the first token), the crossing frame (anchor past 204), frame 10 (the next
    # token, 1 s later), then 230 objects in 3 messages
    assert [m.frame_seq for m in messages] == [0, 6, 10, 11, 11, 11]
    [cross] = messages[1].objects
    assert (cross.kind, cross.direction, cross.track_id) == ("crossed", "in", 1)
    assert messages[1].detections[0].track_id == 1
    assert [len(m.objects) for m in messages[3:]] == [100, 100, 30]
    outbox.close()


@pytest.mark.video
def test_the_agent_gives_its_pipelines_rate_control_and_analytics(
    tmp_path: Path, test_models: dict[str, Path]
) -> None:
    """The daemon itself (not a hand-built Pipeline): config in, the same exact counts out."""
    from agent.service import Agent

    scene: Scene = SPARSE_SCENE
    video = write_scene_video(tmp_path / "scene.mkv", scene)
    zone = {"name": "zone", "points": [list(p) for p in scene.zone], "dwell_s": scene.dwell_s}
    line = {"name": "line", "start": list(scene.line[0]), "end": list(scene.line[1])}
    cfg = parse_config({
        "device_id": "d", "data_dir": str(tmp_path / "data"), "profile": "x86-cpu",
        "engine": {"type": "onnxruntime"},
        "pipelines": [{"name": "cam", "source": str(video), "pace": "none", "max_fps": 1000,
                       "model": str(test_models["blobdet"] / "model.onnx"),
                       "zones": [zone], "lines": [line]}],
    })  # fmt: skip
    agent = Agent(cfg)
    agent.start()
    try:
        pipe = agent.pipelines[0]
        assert pipe.analytics is not None and pipe.gate is not None
        assert pipe.wait(300)
        tel = pipeline_telemetry_from_status(pipe.status(0.0))
        assert [(z.entered, z.left, z.dwell, z.inside) for z in tel.zones] == [(1, 1, 1, 0)]
    finally:
        agent.stop()
