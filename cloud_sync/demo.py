"""Adapter: ``edgefleet demo`` — the whole device loop on embedded defaults, no services needed.

Builds the sample blob detector, writes a test video, starts an agent on it and prints live
results and throughput once a second. (The registry, broker and rollout steps join this demo
as those parts land; see docs/STATUS.md.)
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.config import parse_config
from agent.pipeline.sinks import CallbackSink
from agent.pipeline.synthetic import write_synthetic_video
from agent.service import Agent


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


def run_demo(*, duration_s: float | None = None, workdir: str | None = None) -> int:
    """Run the demo; returns the exit code."""
    from cloud_sync.samples import build_model

    with _workdir(workdir) as wd:
        _step(
            f"building the sample model 'blobdet' (YOLO-style detector, 640x640) in {wd / 'models'}"
        )
        model_dir = build_model("blobdet", wd / "models")
        _step("writing a 640x480 test video with a moving square")
        video = write_synthetic_video(wd / "camera.avi", frames=300, fps=30.0)
        cfg = parse_config(
            {
                "device_id": "demo-01",
                "data_dir": str(wd / "data"),
                "profile": "auto",
                "tags": {"site": "demo"},
                "pipelines": [
                    {
                        "name": "front",
                        "source": str(video),
                        "model": str(model_dir / "model.onnx"),
                        "loop": True,
                        "sink": {"jsonl": str(wd / "data" / "front.jsonl")},
                    }
                ],
            }
        )
        agent = Agent(cfg)
        _step(f"device profile {agent.profile_name} ({agent.profile_reason})")
        last: dict[str, Any] = {}
        lock = threading.Lock()

        def on_event(e: dict[str, Any]) -> None:
            with lock:
                last.clear()
                last.update(e)

        _step("starting the agent (opening the model, building its engine)")
        agent.start()
        for p in agent.pipelines:
            p.sinks.append(CallbackSink(on_event))
        stop = threading.Event()
        old = signal.signal(signal.SIGINT, lambda *a: stop.set())
        _step(
            "running; results once a second"
            + (f" for {duration_s:.0f} s" if duration_s else " (Ctrl-C stops)")
        )
        t_end = None if duration_s is None else time.monotonic() + duration_s
        try:
            while not stop.wait(1.0):
                st = agent.status()["pipelines"][0]
                with lock:
                    ev = dict(last)
                det = ev.get("detections") or []
                what = (
                    (
                        f"{det[0]['label']} {det[0]['score']:.2f} at "
                        f"({', '.join(f'{v:.0f}' for v in det[0]['box'])})"
                    )
                    if det
                    else "nothing"
                )
                infer = st["latency_ms"].get("infer", {})
                print(
                    f"  {st['name']}: {st['model']} on {st['backend']} | "
                    f"in {st['fps_in']:5.1f} fps "
                    f"out {st['fps_out']:5.1f} fps | infer p95 {infer.get('p95', 0):6.1f} ms | "
                    f"dropped {st['frames_dropped']} | frame {ev.get('frame_seq', '-')}: {what}",
                    flush=True,
                )
                if t_end is not None and time.monotonic() >= t_end:
                    break
        finally:
            signal.signal(signal.SIGINT, old)
            final = agent.status()["pipelines"][0]
            agent.stop()
        _step(
            f"done: {final['frames_inferred']} frames inferred, {final['frames_dropped']} dropped, "
            f"{final['errors']} errors; "
            + (
                f"results in {cfg.pipelines[0].sink.jsonl}"
                if workdir is not None
                else "results were in a temporary dir (pass --workdir DIR to keep them)"
            )
        )
    return 0
