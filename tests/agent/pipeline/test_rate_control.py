"""Inference rate control: max_fps, motion gating with a maximum skip, frames skipped and why."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.common.errors import ConfigError
from agent.config import parse_config
from agent.engine.onnxrt import OnnxRuntimeBackend
from agent.pipeline.analytics import pipeline_options
from agent.pipeline.gating import FrameGate, MotionGate, RateGate, gate_from_config
from agent.pipeline.model import RunnableModel, card_for_local_model
from agent.pipeline.runner import Pipeline
from agent.pipeline.scene import Scene, ScriptedObject, write_scene_video
from agent.pipeline.sinks import CallbackSink
from agent.pipeline.sources import parse_source
from agent.protocol.telemetry import pipeline_telemetry_from_status


def frame(value: int = 20, size: tuple[int, int] = (640, 480)) -> np.ndarray:
    return np.full((size[1], size[0], 3), value, np.uint8)


@pytest.mark.parametrize(("source_fps", "max_fps"), [(30, 10), (30, 15), (25, 12.5), (30, 29)])
def test_max_fps_holds_the_rate_despite_jittery_frame_times(
    source_fps: float, max_fps: float
) -> None:
    gate = RateGate(max_fps)
    rng = np.random.default_rng(0)
    n = int(source_fps * 20)
    times = np.arange(n) / source_fps + rng.normal(0, 0.002, n)  # 2 ms of capture jitter
    taken = 0
    for t in times:
        if gate.due(float(t)):
            gate.taken(float(t))
            taken += 1
    assert taken / 20 == pytest.approx(max_fps, rel=0.03)


def test_max_fps_above_the_source_rate_skips_nothing() -> None:
    gate = FrameGate(RateGate(60))
    assert [gate.check(frame(), t / 25) for t in range(50)] == [None] * 50


def test_max_fps_after_a_gap_does_not_burst() -> None:
    gate = RateGate(5)
    gate.taken(0.0)
    assert gate.due(10.0)  # after a long gap (stalled source), at once
    gate.taken(10.0)
    assert not gate.due(10.04) and not gate.due(10.1)


def test_motion_gate_skips_still_frames_and_infers_on_change() -> None:
    gate = FrameGate(motion=MotionGate(max_skip_s=100))
    rng = np.random.default_rng(0)
    still = frame()
    assert gate.check(still, 0.0) is None  # the first frame is always inferred
    for i in range(1, 20):  # sensor noise of a few grey levels is no motion
        noisy = np.clip(still + rng.normal(0, 3, still.shape), 0, 255).astype(np.uint8)
        assert gate.check(noisy, i / 25) == "no_motion"
    moved = still.copy()
    moved[200:240, 300:340] = 255  # a 40-px object appears: 0.5 % of the frame
    assert gate.check(moved, 1.0) is None
    assert gate.check(moved, 1.04) == "no_motion"  # compared with the last inferred frame


def test_slow_change_adds_up_against_the_last_inferred_frame() -> None:
    gate = FrameGate(motion=MotionGate(max_skip_s=100))
    img = frame()
    gate.check(img, 0.0)
    results = []
    for i in range(1, 40):  # an object creeping in by 2 px a frame
        img = frame()
        img[200:240, 0 : 2 * i] = 255
        results.append(gate.check(img, i / 25))
    assert results[0] == "no_motion" and None in results


def test_motion_gate_infers_at_least_every_max_skip_s() -> None:
    gate = FrameGate(motion=MotionGate(max_skip_s=1.0))
    inferred = [t / 25 for t in range(250) if gate.check(frame(), t / 25) is None]
    assert inferred == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0])


def test_gate_from_config_and_its_bounds() -> None:
    def cfg(**p: Any) -> Any:
        return parse_config({"device_id": "d", "pipelines": [
            {"name": "p", "source": 0, "model": "m.onnx", **p}]}).pipelines[0]  # fmt: skip

    assert gate_from_config(cfg()) is None
    g = gate_from_config(cfg(max_fps=5, motion={"min_changed": 0.01, "max_skip_s": 3}))
    assert g is not None and g.rate is not None and g.motion is not None
    assert g.rate.period == pytest.approx(0.2) and g.motion.min_changed == 0.01
    with pytest.raises(ConfigError, match="max_fps"):
        cfg(max_fps=0)
    with pytest.raises(ConfigError, match="stall_s"):  # the watchdog would restart it
        cfg(motion={"max_skip_s": 60})
    with pytest.raises(ConfigError, match="Extra inputs"):
        cfg(motion={"threshold": 3})


@pytest.mark.video
def test_pipeline_skips_idle_frames_infers_moving_ones_and_reports_why(
    tmp_path: Path, test_models: dict[str, Path]
) -> None:
    """A real video (MJPEG, with sensor noise): 2 s still, an object crossing for 2 s, still
    again, read frame by frame (pace none). With motion gating, the moving frames are
    inferred and the still ones skipped (but for the first, and any max_skip_s apart);
    telemetry says why, and every frame read is accounted for."""
    obj = ScriptedObject(1, ((50, 60, 240), (100, 580, 240)), side=60)
    scene = Scene((obj,), frames=150, fps=25.0)
    video = write_scene_video(tmp_path / "idle.avi", scene, codec="MJPG", noise=2.0)
    cfg = parse_config({"device_id": "d", "pipelines": [{
        "name": "cam", "source": str(video), "model": "m.onnx", "motion": {"max_skip_s": 5},
    }]}).pipelines[0]  # fmt: skip
    path = test_models["blobdet"] / "model.onnx"
    backend = OnnxRuntimeBackend(path)
    model = RunnableModel(card_for_local_model(path, backend), backend)
    seqs: list[int] = []
    pipe = Pipeline("cam", parse_source(str(video)), model,
                    [CallbackSink(lambda e: seqs.append(e["frame_seq"]))], pace="none",
                    **pipeline_options(cfg))  # fmt: skip
    pipe.start()
    assert pipe.wait(120)
    pipe.stop()
    st = pipe.status(0.0)
    moving = [s for s in seqs if 52 <= s <= 101]  # frame_seq counts from 1
    still = [s for s in seqs if s < 50 or s > 102]
    assert len(moving) >= 48, f"moving frames inferred: {len(moving)}/50"
    assert 1 <= len(still) <= 4, f"still frames inferred: {still}"
    assert st["frames_skipped_no_motion"] == scene.frames - len(seqs)
    assert st["frames_inferred"] == len(seqs) and st["frames_skipped_max_fps"] == 0
    accounted = st["frames_inferred"] + st["frames_dropped"] + st["frames_skipped_no_motion"]
    assert accounted == st["frames_read"] == scene.frames
    tel = pipeline_telemetry_from_status(st)
    assert tel.frames_skipped == {"max_fps": 0, "no_motion": st["frames_skipped_no_motion"]}
