"""Adapter: ``edgefleet demo`` — the whole fleet loop on one machine, no services needed.

Starts an MQTT broker (Mosquitto when installed, else amqtt in-process), a registry in the work
dir with its chunk server, an ingest worker into SQLite, and an agent on a generated video;
builds the sample detector, publishes it (signed; INT8 when it passes the accuracy gate),
deploys it, follows the update to ``committed``, then shows the live detections, and the fleet
status and the count of a line across the video (tracked squares crossing it, counted on the
device, read back from the ingest database) until Ctrl-C or ``--duration``.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2

from agent.common.errors import EdgefleetError
from agent.config import parse_config
from agent.pipeline.sinks import CallbackSink
from agent.pipeline.synthetic import write_synthetic_video
from agent.service import Agent
from cloud_sync.localbroker import LocalBroker, local_broker

DEVICE = "demo-01"
MODEL = "blobdet"
VERSION = "1.0.0"
UPDATE_TIMEOUT_S = 300.0
# A vertical line through the middle of the frame, drawn top to bottom: the square of the
# synthetic video circles once every 10 s and crosses it twice, leftward at the top ('in', the
# line's right-hand side as drawn) and rightward at the bottom ('out').
LINE = {"name": "middle", "coords": "normalized", "start": [0.5, 0.0], "end": [0.5, 1.0],
        "classes": ["blob"]}  # fmt: skip


@contextlib.contextmanager
def _workdir(path: str | None) -> Iterator[Path]:
    if path is not None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        yield p
    else:
        with tempfile.TemporaryDirectory(prefix="edgefleet-demo-") as tmp:
            yield Path(tmp)


def _step(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def _calibration_frames(video: Path, out: Path, every: int = 10) -> Path:
    """Every ``every``-th frame of ``video`` as JPEG: calibration frames like the deployment's."""
    out.mkdir(parents=True, exist_ok=True)
    cap = cv2.VideoCapture(str(video))
    try:
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            if i % every == 0:
                cv2.imwrite(str(out / f"{i:05d}.jpg"), frame)
            i += 1
    finally:
        cap.release()
    return out


def _publish(wd: Path, video: Path) -> Path:
    """Init the registry, build and publish the sample model; returns the registry dir."""
    from cloud_sync.registry.keys import RegistryError
    from cloud_sync.registry.publish import publish
    from cloud_sync.registry.repo import Repository
    from cloud_sync.samples import build_model

    repo_dir = wd / "registry"
    repo = Repository(repo_dir) if (repo_dir / "root.json").exists() else None
    if repo is None:
        repo = Repository.init(repo_dir)
        _step(f"registry initialised in {repo_dir} (TUF root, targets, snapshot, timestamp keys)")
    published = {f"models/{MODEL}/{v}/model.onnx" for v in [VERSION]} & set(repo.targets())
    if published:
        _step(f"{MODEL}@{VERSION} already published in {repo_dir}")
        return repo_dir
    _step(f"building the sample model '{MODEL}' (YOLO-style detector, 640x640)")
    model_dir = build_model(MODEL, wd / "models")
    calib = _calibration_frames(video, wd / "calibration")
    _step(f"publishing {MODEL}@{VERSION}: validate, INT8 quantize + accuracy gate, golden, sign")
    try:
        res = publish(repo, model_dir / "model.onnx", name=MODEL, version=VERSION,
                      quantize="int8", calibration_dir=calib)  # fmt: skip
    except RegistryError as e:
        if e.reason != "accuracy":
            raise
        print(f"    {e}", flush=True)
        _step("the INT8 variant was refused: publishing the FP32 model only")
        res = publish(repo, model_dir / "model.onnx", name=MODEL, version=VERSION)
    for path, size in res.files.items():
        print(f"    signed {path} ({size / 1e6:.2f} MB)", flush=True)
    return repo_dir


def _agent_config(wd: Path, broker: LocalBroker, repo_dir: Path, video: Path) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "data_dir": str(wd / "data"),
        "profile": "auto",
        "tags": {"site": "demo", "group": "canary"},
        "pipelines": [
            {
                "name": "front",
                "source": str(video),
                "model": MODEL,
                "loop": True,
                "sink": {"jsonl": str(wd / "data" / "front.jsonl")},
                "events": {"policy": "rate", "max_per_s": 2},
                "lines": [LINE],  # tracking comes on with it
                **({"clips": CLIPS} if video.suffix == ".mp4" else {}),
            }
        ],
        "broker": {"url": broker.url},
        "trust": {"root": str(repo_dir / "root.json")},
        "telemetry": {"interval_s": 2},
        "update": {"health_window_s": 3, "health_min_frames": 10},
    }


def _follow_update(agent: Agent, stop: threading.Event) -> bool:
    """Print each phase of the deployment; True once committed.

    Raises:
        EdgefleetError: the agent has no update manager (its config lacks [broker]/[trust]).
    """
    updates = agent.updates
    if updates is None:
        raise EdgefleetError("the demo agent has no update manager: [broker] and [trust] needed")
    seen = None
    deadline = time.monotonic() + UPDATE_TIMEOUT_S
    while not stop.is_set() and time.monotonic() < deadline:
        p = updates.reported().pipelines[0]
        now = (p.phase.value, p.target_version, p.active_version)
        if VERSION in (p.target_version, p.active_version):
            if now != seen:
                extra = f" ({p.backend}, {p.precision})" if p.phase.value == "committed" else ""
                print(f"    phase {p.phase.value}{extra}", flush=True)
                seen = now
            if p.phase.value == "committed":
                return True
            if p.phase.value in ("rejected", "rolled_back"):
                print(f"    update failed: {p.last_error}", flush=True)
                return False
        stop.wait(0.05)
    return False


def _wait_offline(store: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(d["device_id"] == DEVICE and d.get("online") is False for d in store.fleet()):
            return
        time.sleep(0.05)


def _detection_text(ev: dict[str, Any]) -> str:
    det = ev.get("detections") or []
    if not det:
        return "nothing"
    box = ", ".join(f"{v:.0f}" for v in det[0]["box"])
    return f"{det[0]['label']} {det[0]['score']:.2f} at ({box})"


def _fleet_line(store: Any) -> str:
    """The demo device's row of ``edgefleet fleet status``, from the ingest database."""
    rows = store.fleet()
    if not rows:
        return "fleet: (no device in the ingest database yet)"
    d = rows[0]
    p = (d.get("pipelines") or [{}])[0]
    fps = f"{p['fps']:.1f}" if isinstance(p.get("fps"), (int, float)) else "-"
    p95 = f"{p['p95_ms']:.1f}" if isinstance(p.get("p95_ms"), (int, float)) else "-"
    return (
        f"fleet: {d['device_id']} {'online' if d.get('online') else 'OFFLINE'} | "
        f"{p.get('name')}: {p.get('model')}@{p.get('version')} {p.get('phase') or '-'} | "
        f"fps {fps} p95 {p95} ms errors {p.get('errors', '-')}"
    )


CLIPS = {"pre_s": 2.0, "post_s": 2.0, "max_s": 10.0, "max_mb": 64}


def _h264_copy(video: Path) -> Path | None:
    """The camera video as H.264 in MP4 (one keyframe a second, no B-frames, as IP cameras
    stream), made once by ffmpeg; None without ffmpeg or its H.264 encoder."""
    exe = shutil.which("ffmpeg")
    if exe is None:
        return None
    out = video.with_suffix(".mp4")
    cmd = [exe, "-nostdin", "-y", "-loglevel", "error", "-i", str(video), "-c:v", "libx264",
           "-preset", "veryfast", "-g", "30", "-bf", "0", "-pix_fmt", "yuv420p",
           str(out)]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return None
    return out


def _fetch_first_clip(agent: Agent) -> str | None:
    """Once the device has cut a clip, fetch it the way the cloud does (``edgefleet clip get``:
    chunk requests over MQTT to the device) and say so; its id, None while there is none, ""
    when the fetch failed."""
    from cloud_sync.clips import fetch_clip

    clips = agent.clip_library()
    done = clips.clips() if clips is not None else []
    if not done or agent.cfg.broker is None:
        return None
    clip_id = str(done[0]["id"])
    dest = agent.cfg.data_dir.parent / "fetched" / f"{clip_id}.mp4"
    try:
        size = fetch_clip(agent.cfg.broker.url, DEVICE, clip_id, dest)
    except (EdgefleetError, OSError, ValueError) as e:
        print(f"  clip {clip_id}: fetching it over MQTT failed: {e}", flush=True)
        return ""  # tried once: no retries every second
    print(
        f"  clip {clip_id}: {size / 1e3:.0f} kB cut on the device around a line crossing, "
        f"fetched over MQTT (`edgefleet clip get {DEVICE} {clip_id}`) to {dest}",
        flush=True,
    )
    return clip_id


def _counts_line(store: Any) -> str:
    """The demo line's counts as ``edgefleet fleet counts`` shows them, from the ingest database."""
    rows = [r for r in store.latest_counts(DEVICE) if r["kind"] == "line"]
    if not rows:
        return "fleet counts: (no line counts in the ingest database yet)"
    return "fleet counts: " + "; ".join(
        f"line {r['region']} {r['label']}: in {r['crossed_in']} out {r['crossed_out']}"
        for r in rows
    )


def run_demo(
    *, duration_s: float | None = None, workdir: str | None = None, broker: str = "auto"
) -> int:
    """Run the demo; returns the exit code."""
    from cloud_sync.deploy import deploy
    from cloud_sync.ingest.store import open_store
    from cloud_sync.ingest.worker import IngestWorker
    from cloud_sync.registry.serve import ChunkServer

    logging.getLogger("amqtt").setLevel(logging.CRITICAL)  # it logs every client disconnect
    stop = threading.Event()
    old = signal.signal(signal.SIGINT, lambda *a: stop.set())
    try:
        with _workdir(workdir) as wd, contextlib.ExitStack() as stack:
            b = stack.enter_context(local_broker(broker))
            _step(f"MQTT broker: {b.kind} on {b.url}")
            share = None if not b.shared_subscriptions else "demo"
            _step("writing a 640x480 test video with a moving square (the camera)")
            video = write_synthetic_video(wd / "camera.avi", frames=300, fps=30.0)
            h264 = _h264_copy(video)
            if h264 is None:
                _step("no ffmpeg here: the demo runs without event clips (they need H.264)")
            else:
                _step("the camera as H.264 too: event clips are cut from it without re-encoding")
                video = h264
            repo_dir = _publish(wd, video)
            server = ChunkServer(repo_dir, b.url, client_id="registry-demo", share_group=share,
                                 workers=2)  # fmt: skip
            server.start()
            stack.callback(server.stop)
            _step("registry serving metadata and model chunks over MQTT")
            store = open_store(f"sqlite:///{wd / 'fleet.db'}")
            stack.callback(store.close)
            worker = IngestWorker(b.url, store, share_group=share)
            worker.start()
            stack.callback(worker.stop)
            # runs after agent.stop: the ingest sees the device's last (offline) state
            stack.callback(_wait_offline, store)
            _step(f"ingest worker storing state, telemetry and events in {wd / 'fleet.db'}")
            agent = Agent(parse_config(_agent_config(wd, b, repo_dir, video)))
            _step(f"agent {DEVICE}: profile {agent.profile_name} ({agent.profile_reason})")
            agent.start()
            stack.callback(agent.stop)
            if not agent.session.connected.wait(15):
                _step("the agent could not connect to the broker")
                return 1
            _step(f"deploying {MODEL}@{VERSION} to {DEVICE} (signed desired state)")
            deploy(repo_dir, b.url, DEVICE, f"{MODEL}@{VERSION}", pipeline="front")
            if not _follow_update(agent, stop):
                return 0 if stop.is_set() else 1
            return _live(agent, store, stop, duration_s, wd if workdir else None)
    finally:
        signal.signal(signal.SIGINT, old)


def _live(
    agent: Agent, store: Any, stop: threading.Event, duration_s: float | None, kept: Path | None
) -> int:
    last: dict[str, Any] = {}
    lock = threading.Lock()

    def on_event(e: dict[str, Any]) -> None:
        with lock:
            last.clear()
            last.update(e)

    for p in agent.pipelines:
        p.sinks.append(CallbackSink(on_event))
    _step(
        "live: detections each second; fleet status and line counts from the ingest database"
        + (f" for {duration_s:.0f} s" if duration_s else " (Ctrl-C stops)")
    )
    t_end = None if duration_s is None else time.monotonic() + duration_s
    clip: str | None = None
    while not stop.wait(1.0):
        st = agent.status()["pipelines"][0]
        with lock:
            ev = dict(last)
        infer = st["latency_ms"].get("infer", {})
        print(
            f"  {st['name']}: in {st['fps_in']:5.1f} fps out {st['fps_out']:5.1f} fps | "
            f"infer p95 {infer.get('p95', 0):6.1f} ms | frame {ev.get('frame_seq', '-')}: "
            f"{_detection_text(ev)}",
            flush=True,
        )
        print(f"  {_fleet_line(store)}", flush=True)
        print(f"  {_counts_line(store)}", flush=True)
        if clip is None and agent.cfg.pipelines[0].clips is not None:
            clip = _fetch_first_clip(agent)
        if t_end is not None and time.monotonic() >= t_end:
            break
    final = agent.status()["pipelines"][0]
    counts = store.counts()
    _step(
        f"done: {final['frames_inferred']} frames inferred, {final['frames_dropped']} dropped, "
        f"{final['errors']} errors; ingest stored {counts['telemetry']} telemetry rows and "
        f"{counts['events']} events; {_counts_line(store)}"
        + (f"; clip {clip}" if clip else "")  # "" : the fetch failed
        + (f"; everything is kept in {kept}" if kept else " (pass --workdir DIR to keep it)")
    )
    return 0
