"""The pipeline end to end on real video: OpenCV decoding files and a live UDP stream."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import onnxruntime as ort
import pytest

from agent.common.errors import SourceError
from agent.pipeline.runner import Pipeline
from agent.pipeline.sinks import CallbackSink, JsonlSink
from agent.pipeline.sources import open_capture, parse_source
from tests.harness.pipeline import Collect, local_model, udp_pipeline
from tests.harness.util import UdpStream, wait_for

pytestmark = pytest.mark.video


@pytest.fixture(scope="module")
def digit_video(
    tmp_path_factory: pytest.TempPathFactory, test_models: dict[str, Path], model_script: ModuleType
) -> tuple[Path, list[int]]:
    z = np.load(test_models["digits"] / "test_set.npz")
    images, labels = z[z.files[0]], z[z.files[1]]
    for k in z.files:
        if z[k].ndim == 3:
            images = z[k]
        elif z[k].ndim == 1:
            labels = z[k]
    path = tmp_path_factory.mktemp("digits") / "digits.mkv"
    truth = model_script.write_digit_video(path, images, labels)
    return path, list(truth)


def test_classification_accuracy_through_pipeline_equals_direct(
    test_models: dict[str, Path], digit_video: tuple[Path, list[int]]
) -> None:
    video, truth = digit_video
    model_path = test_models["digits"] / "model.onnx"
    z = np.load(test_models["digits"] / "test_set.npz")
    images = next(z[k] for k in z.files if z[k].ndim == 3)
    labels = next(z[k] for k in z.files if z[k].ndim == 1)
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    x = (images.astype(np.float32) / 255.0)[:, None, :, :]
    direct = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)
    direct_acc = float((direct == labels).mean())

    sink = Collect()
    pipe = Pipeline(
        "digits",
        parse_source(str(video)),
        local_model(model_path),
        [CallbackSink(sink)],
        pace="none",
    )
    pipe.start()
    assert pipe.wait(120), "pipeline did not finish the file"
    pipe.stop()
    assert len(sink.events) == len(truth), "pace=none must infer every frame"
    assert [e["frame_seq"] for e in sink.events] == list(range(1, len(truth) + 1))
    predicted = [int(e["classifications"][0]["label"]) for e in sink.events]
    pipe_acc = float(np.mean(np.array(predicted) == np.array(truth)))
    assert direct_acc >= 0.9
    assert pipe_acc == direct_acc
    assert predicted == direct.tolist()


def test_detection_pipeline_finds_the_moving_square(
    test_models: dict[str, Path], tmp_path: Path, model_script: ModuleType
) -> None:
    video = tmp_path / "blob.avi"
    truth = model_script.write_blob_video(video, 20)
    sink = Collect()
    jsonl = tmp_path / "out" / "events.jsonl"
    pipe = Pipeline(
        "blob",
        parse_source(str(video)),
        local_model(test_models["blobdet"] / "model.onnx"),
        [CallbackSink(sink), JsonlSink(jsonl)],
        pace="none",
    )
    pipe.start()
    assert pipe.wait(120)
    pipe.stop()
    assert len(sink.events) == 20
    hits = 0
    for ev, boxes in zip(sink.events, truth, strict=True):
        if not ev.get("detections"):
            continue
        best = ev["detections"][0]["box"]
        cx, cy = (best[0] + best[2]) / 2, (best[1] + best[3]) / 2
        gx1, gy1, gx2, gy2 = boxes[0]
        if gx1 - 16 <= cx <= gx2 + 16 and gy1 - 16 <= cy <= gy2 + 16:
            hits += 1
    assert hits >= 18, f"square found in only {hits}/20 frames"
    lines = jsonl.read_text().splitlines()
    assert len(lines) == 20 and json.loads(lines[0])["pipeline"] == "blob"


def test_hot_swap_between_frames_loses_no_frame(
    test_models: dict[str, Path], digit_video: tuple[Path, list[int]]
) -> None:
    video, truth = digit_video
    a = local_model(test_models["digits"] / "model.onnx")
    b = local_model(test_models["digits"] / "model.onnx")
    b.card = b.card.model_copy(update={"version": "2.0.0"})
    sink = Collect()
    pipe = Pipeline("swap", parse_source(str(video)), a, [CallbackSink(sink)], pace="none")
    pipe.start()
    assert wait_for(lambda: len(sink.events) >= 20, 30)
    old = pipe.swap_model(b)
    assert old is a
    assert pipe.wait(120)
    pipe.stop()
    seqs = [e["frame_seq"] for e in sink.events]
    assert seqs == list(range(1, len(truth) + 1)), "a frame was skipped around the swap"
    versions = [e["version"] for e in sink.events]
    k = versions.index("2.0.0")
    assert k >= 20
    assert set(versions[:k]) == {a.card.version} != {"2.0.0"}
    assert set(versions[k:]) == {"2.0.0"}


def test_overloaded_live_source_drops_frames_instead_of_queueing(
    test_models: dict[str, Path], tmp_path: Path
) -> None:
    from agent.pipeline.synthetic import write_synthetic_video

    video = write_synthetic_video(tmp_path / "fast.avi", frames=150, fps=300.0)
    sink = Collect()
    pipe = Pipeline(
        "over",
        parse_source(str(video)),
        local_model(test_models["blobdet"] / "model.onnx"),
        [CallbackSink(sink)],
        pace="realtime",
    )
    pipe.start()
    assert pipe.wait(60)
    pipe.stop()
    s = pipe.metrics.snapshot(time.monotonic())
    assert s["frames_read"] == 150
    assert s["frames_dropped"] > 0
    assert s["frames_inferred"] + s["frames_dropped"] == s["frames_read"]
    assert s["frames_inferred"] == len(sink.events)


def test_udp_stream_reconnects_after_the_sender_restarts(
    test_models: dict[str, Path], udp_stream: UdpStream
) -> None:
    udp_stream.start()
    sink = Collect()
    pipe = udp_pipeline(udp_stream.url, test_models["blobdet"] / "model.onnx", sink, 2.0)
    pipe.start()
    try:
        assert wait_for(lambda: len(sink.events) >= 10, 30), pipe.reader.last_error
        udp_stream.stop()
        assert wait_for(lambda: pipe.metrics.counters["source_failures"] >= 1, 20)
        assert pipe.reader.state in ("waiting", "connecting", "streaming")
        before = len(sink.events)
        udp_stream.start()
        assert wait_for(
            lambda: pipe.metrics.counters["reconnects"] >= 1 and len(sink.events) > before + 10, 40
        ), (pipe.reader.state, pipe.reader.last_error, pipe.metrics.counters)
    finally:
        pipe.stop()


def test_missing_file_is_a_clear_error_and_retried(tmp_path: Path) -> None:
    spec = parse_source(str(tmp_path / "nope.mp4"))
    with pytest.raises(SourceError, match="does not exist"):
        open_capture(spec)
    pipe = Pipeline("missing", spec, None, [])
    pipe.reader.backoff.base_s = 0.05
    pipe.start()
    try:
        assert wait_for(lambda: pipe.metrics.counters["source_failures"] >= 2, 5)
        assert "does not exist" in pipe.status(time.monotonic())["last_error"]
    finally:
        pipe.stop()


def test_gstreamer_source_without_gstreamer_names_the_fix() -> None:
    from agent.pipeline.sources import gstreamer_support

    ok, _ = gstreamer_support()
    if ok:
        pytest.skip("this OpenCV has GStreamer")
    with pytest.raises(SourceError, match=r"without GStreamer.*JetPack"):
        open_capture(parse_source("videotestsrc ! videoconvert ! appsink"))


def test_unreachable_stream_is_reported_not_fatal() -> None:
    pipe = Pipeline(
        "dead", parse_source("udp://127.0.0.1:9?timeout=200000"), None, [], open_timeout_s=0.3
    )
    pipe.reader.backoff.base_s = 0.05
    pipe.start()
    try:
        assert wait_for(lambda: pipe.metrics.counters["source_failures"] >= 1, 15)
        assert pipe.reader.last_error
    finally:
        pipe.stop()


def test_agent_runs_several_pipelines_sharing_one_backend(
    test_models: dict[str, Path], synthetic_video: Path, tmp_path: Path
) -> None:
    from agent.config import parse_config
    from agent.service import Agent

    model = str(test_models["blobdet"] / "model.onnx")
    cfg = parse_config(
        {
            "device_id": "multi",
            "data_dir": str(tmp_path / "data"),
            "profile": "x86-cpu",
            "pipelines": [
                {"name": "left", "source": str(synthetic_video), "model": model, "loop": True},
                {"name": "right", "source": str(synthetic_video), "model": model, "loop": True},
                {
                    "name": "digits",
                    "source": str(synthetic_video),
                    "model": str(test_models["digits"] / "model.onnx"),
                    "loop": True,
                },
            ],
        }
    )
    agent = Agent(cfg)
    agent.start()
    try:
        left, right, digits = agent.pipelines
        assert left.model is right.model, "one backend per model, shared by its pipelines"
        assert digits.model is not left.model
        assert len(agent.models) == 2
        assert wait_for(
            lambda: all(p.metrics.counters["frames_inferred"] > 5 for p in agent.pipelines), 30
        )
        names = [p["name"] for p in agent.status()["pipelines"]]
        assert names == ["left", "right", "digits"]
    finally:
        agent.stop()
