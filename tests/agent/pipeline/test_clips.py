"""Event clips: the segment timeline and clip plan, the ffmpeg recorder (restarts, no orphan),
clips cut by stream copy around a real detector's object events, the budget, and the config
that refuses sources with no compressed stream."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from agent.common.backoff import Backoff
from agent.common.errors import ConfigError
from agent.config import parse_config
from agent.pipeline.clips import DECODE_LEAD_S, ClipLibrary, ClipNotFound, ClipRecorder, concat_copy
from agent.pipeline.recorder import SegmentRecorder, pid_alive
from agent.pipeline.segments import (
    ClipPlan,
    Segment,
    Timeline,
    choose_evictions,
    parse_clip_id,
    parse_segment_line,
)
from agent.pipeline.sources import parse_source
from agent.protocol.telemetry import InferenceEvent
from tests.harness.util import ROOT, wait_for

GOP = 12  # frames: 0.48 s at 25 fps


def make_h264(path: Path, seconds: float, *, size: str = "320x240", fps: int = 25) -> Path:
    """An H.264 file from ffmpeg's test pattern, one keyframe every GOP frames."""
    subprocess.run(
        ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
         f"testsrc=size={size}:rate={fps}", "-t", f"{seconds}", "-c:v", "libx264",
         "-preset", "ultrafast", "-g", str(GOP), "-keyint_min", str(GOP), "-bf", "0",
         "-pix_fmt", "yuv420p",
         str(path)],
        check=True,
    )  # fmt: skip
    return path


def probe(path: Path) -> dict[str, Any]:
    """ffprobe's codec, frame count and first/last packet times of a clip."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries",
         "stream=codec_name:format=format_name,duration:packet=pts_time", "-of", "json",
         str(path)],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    doc = json.loads(out)
    pts = sorted(float(p["pts_time"]) for p in doc["packets"])
    return {
        "codec": doc["streams"][0]["codec_name"],
        "format": doc["format"]["format_name"],
        "duration": float(doc["format"]["duration"]),
        "first": pts[0],
        "last": pts[-1],
        "frames": len(pts),
    }


@pytest.fixture(scope="module")
def loop_video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_h264(tmp_path_factory.mktemp("clipvideo") / "loop.mp4", 4)


# --- pure parts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "clip_id, ok",
    [
        ("gate.1764793537123", True),
        ("cam_2-x.1764793537", True),
        ("gate", False),
        ("gate.123", False),  # too few digits for ms since the epoch
        ("../gate.1764793537123", False),
        ("gate.1764793537123/../../etc", False),
        ("gate/x.1764793537123", False),
        ("gate.1764793537123.mp4", False),
        (".1764793537123", False),
        ("gate.1764793537123\n", False),
        ("", False),
    ],
)
def test_clip_ids_are_pipeline_dot_milliseconds_and_nothing_else(clip_id: str, ok: bool) -> None:
    if ok:
        assert parse_clip_id(clip_id)[0] == clip_id.split(".")[0]
    else:
        with pytest.raises(ValueError, match=r"PIPELINE\.MILLISECONDS"):
            parse_clip_id(clip_id)


@pytest.mark.parametrize(
    "line, ok",
    [
        ("seg-1-000003.ts,3.000000,4.000000", True),
        ("seg-1-000003.ts,3.0", False),
        ("../x.ts,1,2", False),
        ("seg-1-000003.ts,4,3", False),
        ("seg-1-000003.ts,nan,3", False),
        ("seg-1-000003.ts,a,b", False),
    ],
)
def test_segment_list_lines(line: str, ok: bool) -> None:
    assert (parse_segment_line(line, 1) is not None) == ok


def test_timeline_maps_stream_to_wall_by_the_earliest_sighting() -> None:
    tl = Timeline()
    tl.add(Segment("seg-1-000000.ts", 1, 0.0, 1.0), seen=101.3)  # seen late (poll, mux)
    tl.add(Segment("seg-1-000001.ts", 1, 1.0, 2.0), seen=102.05)  # seen almost at once
    assert tl.wall(tl.segments[0]) == pytest.approx((100.05, 101.05))
    tl.add(Segment("seg-2-000000.ts", 2, 0.0, 1.0), seen=200.0)  # a new ffmpeg: own clock
    assert tl.wall(tl.segments[2]) == pytest.approx((199.0, 200.0))
    assert tl.end() == pytest.approx(200.0)
    assert [s.name for s in tl.prune(150.0)] == ["seg-1-000000.ts", "seg-1-000001.ts"]


def test_clip_plan_merges_events_up_to_max_s_and_cuts_when_post_roll_is_on_disk() -> None:
    t0 = 1_700_000_000.0
    plan = ClipPlan("gate", pre_s=2, post_s=3, max_s=10, grace_s=5)
    a = plan.mark(t0, ["crossed"])
    assert plan.mark(t0 + 4, ["entered"]) == a  # 4 + 2 + 3 <= 10: the same clip
    b = plan.mark(t0 + 6)  # would make an 11 s clip: a new one
    assert a == "gate.1700000000000" and b == "gate.1700000006000"
    assert plan.due(on_disk_until=t0 + 6.9, now=t0 + 7.0) == []  # a's post roll ends at +7
    [(clip, whole)] = plan.due(on_disk_until=t0 + 7.0, now=t0 + 7.1)
    assert clip.clip_id == a and whole and clip.kinds == ["crossed", "entered"]
    assert clip.window(2, 3) == (t0 - 2, t0 + 7)
    # the source stalls: b is cut with what there is once its grace has passed
    assert plan.due(on_disk_until=t0 + 7.0, now=t0 + 13.9) == []
    [(clip, whole)] = plan.due(on_disk_until=t0 + 7.0, now=t0 + 14.0)
    assert clip.clip_id == b and not whole
    # an event before the open clip starts a new one, whose id still differs
    p = ClipPlan("g", 0.5, 0.5, 1, 1)
    assert p.mark(1.7e9) == "g.1700000000000"
    assert p.mark(1.7e9 - 1) == "g.1700000000001"


def test_evictions_take_the_oldest_until_the_rest_fits() -> None:
    clips = [("g.1700000000300", 40), ("g.1700000000100", 50), ("g.1700000000200", 30)]
    assert choose_evictions(clips, 120) == []
    assert choose_evictions(clips, 80) == ["g.1700000000100"]
    assert choose_evictions(clips, 40) == ["g.1700000000100", "g.1700000000200"]
    assert len(choose_evictions(clips, 39)) == 3  # the newest alone is over: none kept


# --- config ------------------------------------------------------------------------------------

ZONE = {"name": "dock", "points": [[0, 0], [100, 0], [100, 100]]}


def _cfg(**pipe: Any) -> Any:
    base = {"name": "cam", "model": "m.onnx", "zones": [ZONE], "clips": {}}
    return parse_config({"device_id": "d", "pipelines": [{**base, **pipe}]})


@pytest.mark.parametrize("source", [0, "0", "/dev/video0", "v4l2src ! videoconvert ! appsink"])
def test_clips_on_a_source_without_compressed_stream_are_refused_with_snapshots_offered(
    source: Any,
) -> None:
    with pytest.raises(ConfigError, match=r"(?s)compressed stream.*snapshots") as e:
        _cfg(source=source)
    assert "cam" in str(e.value)


def test_clips_config_accepts_files_and_streams_and_names_other_mistakes() -> None:
    for src in ("/videos/door.mp4", "rtsp://user:pw@cam/stream", "http://cam/video.mp4"):
        assert _cfg(source=src).pipelines[0].clips.pre_s == 5.0
    assert _cfg(source="x.mp4", clips=None).pipelines[0].clips is None  # off by default
    with pytest.raises(ConfigError, match="pace = 'realtime'"):
        _cfg(source="x.mp4", pace="none")
    with pytest.raises(ConfigError, match="add zones or lines"):
        _cfg(source="x.mp4", zones=[])
    with pytest.raises(ConfigError, match="exceeds max_s"):
        _cfg(source="x.mp4", clips={"pre_s": 30, "post_s": 40, "max_s": 60})
    with pytest.raises(ConfigError, match=r"clips\.pre.: Extra inputs"):
        _cfg(source="x.mp4", clips={"pre": 3})


def test_inference_event_carries_a_clip_id_only_when_set() -> None:
    event = {"pipeline": "gate", "model": "det", "version": "1.0.0", "task": "detection",
             "frame_seq": 1, "frame_time": 1e9, "latency_ms": 1.0}  # fmt: skip
    plain = InferenceEvent.from_pipeline_event("d", event)
    assert b'"clip"' not in plain.encode()  # byte-compatible with 1.1 receivers
    with_clip = InferenceEvent.from_pipeline_event("d", {**event, "clip": "gate.1000000000000"})
    assert InferenceEvent.decode(with_clip.encode()).clip == "gate.1000000000000"
    with pytest.raises(ValidationError):
        InferenceEvent.from_pipeline_event("d", {**event, "clip": "../../etc/passwd"})


# --- the recorder and cutter on real H.264 -----------------------------------------------------


@pytest.mark.video
def test_concat_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="ffmpeg concat exited"):
        concat_copy([tmp_path / "missing.ts"], tmp_path / "g.1700000000000.mp4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.video
def test_recorder_restarts_a_dead_ffmpeg_and_leaves_no_process(
    tmp_path: Path, loop_video: Path
) -> None:
    rec = SegmentRecorder(parse_source(str(loop_video)), tmp_path / "seg", segment_s=0.5,
                          loop=True, backoff=Backoff(base_s=0.1, cap_s=0.5))  # fmt: skip
    rec.start()
    try:
        assert wait_for(lambda: len(rec.timeline.segments) >= 2, timeout=20)
        first = rec.proc
        assert first is not None
        os.kill(first.pid, signal.SIGKILL)  # ffmpeg dies mid-run
        assert wait_for(lambda: rec.gen >= 2 and rec.state == "recording", timeout=20)
        n = len(rec.timeline.segments)
        assert wait_for(lambda: any(s.gen == 2 for s in rec.timeline.segments[n - 1 :]), timeout=20)
        assert rec.restarts >= 1 and "ffmpeg exited" in rec.last_error
        assert rec.proc is not first
        second = rec.proc
    finally:
        rec.stop()
    assert second is not None and not pid_alive(second.pid)  # stopped with its pipeline
    assert rec.state == "stopped"


@pytest.mark.video
def test_ffmpeg_dies_with_an_agent_killed_by_sigkill(tmp_path: Path, loop_video: Path) -> None:
    """PR_SET_PDEATHSIG: an agent that gets SIGKILL (no clean-up runs) leaves no recorder."""
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from agent.pipeline.recorder import SegmentRecorder
        from agent.pipeline.sources import parse_source
        rec = SegmentRecorder(parse_source({str(loop_video)!r}), Path({str(tmp_path / "s")!r}),
                              segment_s=0.5, loop=True)
        rec.start()
        while rec.proc is None:
            time.sleep(0.05)
        print(rec.proc.pid, flush=True)
        time.sleep(60)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
    try:
        assert agent.stdout is not None
        pid = int(agent.stdout.readline())
        assert pid_alive(pid)
        agent.kill()
        agent.wait(10)
        assert wait_for(lambda: not pid_alive(pid) or _zombie(pid), timeout=10)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(10)
        if agent.stdout is not None:
            agent.stdout.close()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except OSError:
        return False


@pytest.mark.video
def test_budget_evicts_the_oldest_clips(tmp_path: Path, loop_video: Path) -> None:
    rec = ClipRecorder("cam", parse_source(str(loop_video)), tmp_path / "clips" / "cam",
                       pre_s=0.5, post_s=0.5, max_s=1.0, max_mb=1, segment_s=0.5,
                       loop=True)  # fmt: skip
    rec.start()
    try:
        assert wait_for(lambda: rec.recorder.on_disk_until() is not None, timeout=20)
        ids: list[str] = []

        def one_more() -> None:
            ids.append(rec.mark(time.time()))
            assert wait_for(lambda: rec.cut + rec.failed >= len(ids), timeout=30)
            time.sleep(0.3)  # the next event falls outside this clip

        for _ in range(3):
            one_more()
        sizes = {m["id"]: m["bytes"] for m in rec.library.clips()}
        assert list(sizes) == ids and rec.evicted == 0  # all fit in 1 MiB
        rec.max_bytes = sizes[ids[1]] + sizes[ids[2]]  # the newest ones fit: the oldest go
        one_more()
        listed = rec.library.clips()
        kept = [m["id"] for m in listed]
        assert kept and kept == ids[-len(kept) :] and len(kept) < 4  # the oldest went first
        assert rec.evicted == 4 - len(kept) and sum(m["bytes"] for m in listed) <= rec.max_bytes
        assert not (tmp_path / "clips" / "cam" / f"{ids[0]}.json").exists()  # sidecar too
        with pytest.raises(ClipNotFound):
            rec.library.path(ids[0])
    finally:
        rec.stop()


@pytest.mark.video
@pytest.mark.slow
def test_real_detector_events_carry_clip_ids_and_clips_cover_the_roll(
    tmp_path: Path, test_models: dict[str, Path]
) -> None:
    """blobdet on an H.264 video of the scripted scene, through the real pipeline: every frame
    with object events names a clip; each clip is an H.264 MP4 (never re-encoded: the same
    packets) covering [first event - pre_s, last event + post_s], at most one GOP beyond."""
    from agent.engine.onnxrt import OnnxRuntimeBackend
    from agent.pipeline.analytics import pipeline_options
    from agent.pipeline.model import RunnableModel, card_for_local_model
    from agent.pipeline.runner import Pipeline
    from agent.pipeline.scene import SPARSE_SCENE, write_scene_video
    from agent.pipeline.sinks import CallbackSink

    scene = SPARSE_SCENE  # H.264 without B-frames, as IP cameras stream it
    raw = write_scene_video(tmp_path / "scene.mkv", scene)
    video = tmp_path / "scene.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(raw), "-c:v",
                    "libx264", "-g", str(GOP), "-bf", "0", "-crf", "16", "-pix_fmt", "yuv420p",
                    str(video)],
                   check=True)  # fmt: skip
    zone = {"name": "zone", "points": [list(p) for p in scene.zone], "dwell_s": scene.dwell_s}
    line = {"name": "line", "start": list(scene.line[0]), "end": list(scene.line[1])}
    pre, post = 1.0, 1.0
    cfg = parse_config({"device_id": "d", "data_dir": str(tmp_path / "data"), "pipelines": [{
        "name": "cam", "source": str(video), "model": "m.onnx", "zones": [zone], "lines": [line],
        # segment_s below the GOP: every segment is one GOP, so a clip overshoots by less
        "clips": {"pre_s": pre, "post_s": post, "max_s": 2.5, "segment_s": 0.4},
    }]}).pipelines[0]  # fmt: skip
    path = test_models["blobdet"] / "model.onnx"
    backend = OnnxRuntimeBackend(path)
    model = RunnableModel(card_for_local_model(path, backend), backend)
    c = cfg.clips
    clips = ClipRecorder("cam", parse_source(str(video)), tmp_path / "clips" / "cam",
                         pre_s=c.pre_s, post_s=c.post_s, max_s=c.max_s,
                         segment_s=c.segment_s)  # fmt: skip
    events: list[dict[str, Any]] = []
    lock = threading.Lock()

    def collect(e: dict[str, Any]) -> None:
        with lock:
            events.append(e)

    pipe = Pipeline("cam", parse_source(str(video)), model, [CallbackSink(collect)],
                    clips=clips, **pipeline_options(cfg))  # fmt: skip
    pipe.start()
    assert pipe.wait(60)
    pipe.stop()
    model.close()
    marked = [e for e in events if e.get("objects")]
    # realtime pace drops frames on a busy machine, so not every object event is seen
    assert marked
    assert all(e.get("clip") for e in marked)
    assert not any("clip" in e for e in events if not e.get("objects"))
    for e in marked:
        InferenceEvent.from_pipeline_event("d", e)  # the clip id fits the contract
    lib = ClipLibrary(tmp_path / "clips")
    by_id = {m["id"]: m for m in lib.clips()}
    assert set(by_id) == {e["clip"] for e in marked}
    assert clips.failed == 0
    fps, gop_s = scene.fps, GOP / scene.fps
    for cid, meta in by_id.items():
        p = probe(lib.path(cid))
        assert p["codec"] == "h264" and "mp4" in p["format"]
        span = meta["end"] - meta["start"]
        # the file's last segment (3 frames after its last keyframe) comes out of ffmpeg's
        # segment muxer unreadable (ffmpeg 5.1, even run alone); a live stream has no end
        at_end = meta["stream_end"] >= scene.frames / fps - 1e-6
        assert span - gop_s * at_end - 1.5 / fps <= p["frames"] / fps <= span + 1.5 / fps
        # in the file's own time: the frames of the clip's events (frame_seq counts from 1)
        seqs = [e["frame_seq"] for e in marked if e["clip"] == cid]
        want_start = max(0.0, (min(seqs) - 1) / fps - pre)
        want_end = min(scene.frames / fps, (max(seqs) - 1) / fps + post)
        assert meta["stream_start"] <= want_start + 1e-6
        assert meta["stream_start"] >= want_start - gop_s - DECODE_LEAD_S - 1e-6
        assert meta["stream_end"] >= want_end - 2 / fps - 1e-6
        assert meta["stream_end"] <= want_end + gop_s + 2 / fps + 1e-6
    assert list((tmp_path / "clips" / "cam").glob(".*")) == []  # no temp file left


@pytest.mark.video
@pytest.mark.slow
def test_the_agent_records_clips_and_serves_them_on_its_api(
    tmp_path: Path, test_models: dict[str, Path]
) -> None:
    """The daemon itself: [pipelines.clips] in the config, a clip id in an event, the clip on
    GET /v1/clips/{id}, and no recorder left after stop."""
    import httpx

    from agent.pipeline.scene import SPARSE_SCENE, write_scene_video
    from agent.pipeline.sinks import CallbackSink
    from agent.service import Agent

    scene = SPARSE_SCENE
    raw = write_scene_video(tmp_path / "scene.mkv", scene)
    video = tmp_path / "scene.mp4"
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-i", str(raw), "-c:v",
                    "libx264", "-g", str(GOP), "-bf", "0", "-pix_fmt", "yuv420p", str(video)],
                   check=True)  # fmt: skip
    line = {"name": "line", "start": list(scene.line[0]), "end": list(scene.line[1])}
    cfg = parse_config({
        "device_id": "d", "data_dir": str(tmp_path / "data"), "profile": "x86-cpu",
        "engine": {"type": "onnxruntime"}, "api": {"port": 0},
        "pipelines": [{"name": "cam", "source": str(video), "loop": True,
                       "model": str(test_models["blobdet"] / "model.onnx"), "lines": [line],
                       "clips": {"pre_s": 0.5, "post_s": 0.5, "segment_s": 0.4}}],
    })  # fmt: skip
    agent = Agent(cfg)
    clip_ids: list[str] = []
    agent.start()
    try:
        pipe = agent.pipelines[0]
        assert pipe.clips is not None
        pipe.sinks.append(CallbackSink(lambda e: e.get("clip") and clip_ids.append(e["clip"])))
        assert wait_for(lambda: clip_ids, timeout=60)
        with httpx.Client(base_url=agent.api.url, timeout=30) as c:
            assert wait_for(
                lambda: clip_ids[0] in [m["id"] for m in c.get("/v1/clips").json()["clips"]],
                timeout=30,
            )
            r = c.get(f"/v1/clips/{clip_ids[0]}")
        assert r.status_code == 200 and r.content[4:8] == b"ftyp"  # an MP4
        ffmpeg_proc = pipe.clips.recorder.proc
    finally:
        agent.stop()
    assert ffmpeg_proc is not None and not pid_alive(ffmpeg_proc.pid)
