"""Benchmark: tracking quality, the cost of tracking + zones, and the CPU motion gating saves.

1. **Quality** on the scripted scene (``agent.pipeline.scene.SCENE``: nine objects that move,
   cross the counting line both ways, pass behind a pillar while crossing it, cross each
   other, stand in the zone past its dwell time and leave), with a simulated detector (pixel
   jitter, 3 % misses, partly hidden objects reported small and with a low score, mostly
   hidden ones missed, stray low-score boxes) over ``--seeds`` seeds. The same detections go
   through the agent's tracker, through no tracker (identity = position in the frame's list,
   what a consumer of raw detections has) and through a frame-to-frame IoU matcher (no motion
   model, no memory of lost objects); zones and lines count all three the same way.
   Reported: identity switches (CLEAR-MOT), extra ids, and the runs whose line and zone counts
   equal the ground truth. Then the real ``blobdet`` model on the rendered sparse scene
   (``SPARSE_SCENE``), through the same counting (``--no-detector`` skips it).
2. **Cost** per frame of tracking + one zone + one line at ``--objects`` objects (1080p,
   bouncing), against the decode baseline measured in the same run and interleaved frame by
   frame (the agent's YOLOv8 reader: decode + NMS of a (1, 84, 8400) output with as many
   objects, as in ``scripts/bench_decode.py``). Goal: p95 <= 1 ms.
3. **Motion gating** on an idle scene: a 1280x720 MJPEG camera-like video with sensor noise
   and nothing moving, through the real pipeline and ``blobdet`` in real time, for
   ``--idle-s`` seconds without and with ``[pipelines.motion]``; CPU of the whole process
   (decoding included) and of the inference thread. Goal: >= 80 % saved.

    python -m scripts.bench_tracking [--seeds 20] [--objects 50] [--idle-s 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import parse_config
from agent.pipeline.analytics import FrameAnalytics, pipeline_options
from agent.pipeline.assign import iou_matrix
from agent.pipeline.config import LineConfig, ZoneConfig
from agent.pipeline.postprocess import Detection, Result, make_postprocessor
from agent.pipeline.preprocess import FrameTransform
from agent.pipeline.scene import (
    SCENE,
    SPARSE_SCENE,
    GroundTruth,
    Scene,
    crowd,
    detections,
    ground_truth,
    id_switches,
    render,
    write_scene_video,
)
from agent.pipeline.tracking import Track, TrackParams, TrackUpdate
from agent.pipeline.zones import RegionCounter
from agent.protocol.card import InputSpec, PostprocessSpec
from scripts import bench_decode

Frames = list[list[Detection]]


# --- quality --------------------------------------------------------------------------------


def regions(scene: Scene) -> tuple[list[ZoneConfig], list[LineConfig]]:
    zone = ZoneConfig(name="zone", points=list(scene.zone), dwell_s=scene.dwell_s)
    return [zone], [LineConfig(name="line", start=scene.line[0], end=scene.line[1])]


class _Baseline:
    """Ids from a trackerless rule, fed to the same zone/line counting as the tracker."""

    def __init__(self, scene: Scene, rule: str) -> None:
        self.rule = rule
        self.counter = RegionCounter(*regions(scene))
        self.tracks: dict[int, Track] = {}
        self.next_id = 1
        self.prev: list[tuple[tuple[float, float, float, float], int]] = []

    def ids(self, dets: list[Detection]) -> list[int]:
        if self.rule == "none":  # identity = position in the frame's list
            return list(range(1, len(dets) + 1))
        out: list[int] = []  # frame-to-frame IoU >= 0.3, greedy, no motion, no memory
        if self.prev and dets:
            iou = iou_matrix(np.array([d.box for d in dets]), np.array([b for b, _ in self.prev]))
            taken: set[int] = set()
            for r in range(len(dets)):
                c = int(np.argmax(iou[r]))
                if iou[r, c] >= 0.3 and c not in taken:
                    taken.add(c)
                    out.append(self.prev[c][1])
                else:
                    out.append(0)
        else:
            out = [0] * len(dets)
        for k, i in enumerate(out):
            if i == 0:
                out[k], self.next_id = self.next_id, self.next_id + 1
        self.prev = [(d.box, i) for d, i in zip(dets, out, strict=True)]
        return out

    def update(self, dets: list[Detection], now: float, size: tuple[int, int]) -> list[int]:
        ids = self.ids(dets)
        visible = []
        for d, i in zip(dets, ids, strict=True):
            t = self.tracks.get(i)
            if t is None:
                t = self.tracks[i] = Track(0, d.label, d.box, d.score, now, now, TrackParams())
                t.track_id = i
            t.box, t.last_seen = d.box, now
            t.best_score = max(t.best_score, d.score)
            visible.append(t)
        ended = [self.tracks.pop(i) for i in set(self.tracks) - set(ids)]
        self.counter.update(TrackUpdate(list(ids), visible, [], ended), size, now)
        return ids


def counts_of(status: dict[str, Any]) -> dict[str, int]:
    [z] = status["zones"] or [{"entered": 0, "left": 0, "dwell": 0}]
    [ln] = status["lines"] or [{"crossed_in": 0, "crossed_out": 0}]
    return {"in": ln["crossed_in"], "out": ln["crossed_out"], "entered": z["entered"],
            "left": z["left"], "dwell": z["dwell"]}  # fmt: skip


def truth_counts(gt: GroundTruth) -> dict[str, int]:
    return {"in": gt.crossed["in"], "out": gt.crossed["out"], "entered": gt.entered,
            "left": gt.left, "dwell": gt.dwell}  # fmt: skip


def run_method(scene: Scene, frames: Frames, method: str) -> dict[str, Any]:
    """Ids and counts of one method over one run of detections."""
    gt = ground_truth(scene)
    tracked = []
    if method == "edgefleet":
        from agent.pipeline.tracking import Tracker

        a = FrameAnalytics(Tracker(), *regions(scene))
        for t, dets in enumerate(frames):
            event: dict[str, Any] = Result("detection", detections=dets).to_dict()
            a.apply(event, Result("detection", detections=dets), scene.size, t / scene.fps, 0.0)
            tracked.append([(d["box"], d.get("track_id")) for d in event.get("detections", [])])
        counts = counts_of(a.status())
    else:
        b = _Baseline(scene, method)
        for t, dets in enumerate(frames):
            ids = b.update(dets, t / scene.fps, scene.size)
            tracked.append([(d.box, i) for d, i in zip(dets, ids, strict=True)])
        zones, lines = b.counter.snapshot()
        counts = counts_of({"zones": zones, "lines": lines})
    switches, extra = id_switches(gt, tracked)
    truth = truth_counts(gt)
    return {
        "id_switches": switches,
        "extra_ids": extra,
        "counts": counts,
        "truth": truth,
        "lines_exact": counts["in"] == truth["in"] and counts["out"] == truth["out"],
        "zones_exact": all(counts[k] == truth[k] for k in ("entered", "left", "dwell")),
        "count_error": sum(abs(counts[k] - truth[k]) for k in truth),
    }


def quality(seeds: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    runs = [detections(SCENE, seed) for seed in range(seeds)]
    for method in ("edgefleet", "iou", "none"):
        rs = [run_method(SCENE, frames, method) for frames in runs]
        out[method] = {
            "runs": len(rs),
            "id_switches_per_run": float(np.mean([r["id_switches"] for r in rs])),
            "extra_ids_per_run": float(np.mean([r["extra_ids"] for r in rs])),
            "lines_exact": sum(r["lines_exact"] for r in rs),
            "zones_exact": sum(r["zones_exact"] for r in rs),
            "count_error_per_run": float(np.mean([r["count_error"] for r in rs])),
        }
    out["truth"] = truth_counts(ground_truth(SCENE))
    return out


def real_detector() -> dict[str, Any]:
    """blobdet (ONNX Runtime) on the rendered sparse scene, through the same counting."""
    from agent.engine.onnxrt import OnnxRuntimeBackend
    from agent.pipeline.model import RunnableModel, card_for_local_model
    from cloud_sync.samples.blobdet import build_blobdet

    with tempfile.TemporaryDirectory() as tmp:
        path = build_blobdet(Path(tmp)) / "model.onnx"
        backend = OnnxRuntimeBackend(path)
        model = RunnableModel(card_for_local_model(path, backend), backend)
        frames = [model.infer(render(SPARSE_SCENE, t))[0].detections
                  for t in range(SPARSE_SCENE.frames)]  # fmt: skip
    return {m: run_method(SPARSE_SCENE, frames, m) for m in ("edgefleet", "iou", "none")}


# --- cost -----------------------------------------------------------------------------------


def cost(objects: int, frames: int) -> dict[str, Any]:
    """Per-frame ms of tracking + 1 zone + 1 line vs decode + NMS, interleaved."""
    from agent.pipeline.tracking import Tracker

    bd = bench_decode
    out8 = bd.yolov8_output(objects)
    labels = [str(i) for i in range(bd.CLASSES)]
    spec, inp = PostprocessSpec(format="yolov8"), InputSpec(width=640, height=640)
    reader = make_postprocessor("detection", spec, labels, inp)
    transform = FrameTransform(1920, 1080, 1 / 3, 1 / 3, 0.0, 140.0)
    scene = crowd(objects, frames)
    runs = detections(scene, 0, miss=0.02)
    a = FrameAnalytics(Tracker(), *regions(scene))
    track_ms, track_cpu, decode_ms = [], [], []
    n_det = []
    for t, dets in enumerate(runs):
        t0 = time.perf_counter()
        reader([out8], transform)
        decode_ms.append((time.perf_counter() - t0) * 1e3)
        event: dict[str, Any] = Result("detection", detections=dets).to_dict()
        result = Result("detection", detections=dets)
        c0, t0 = time.thread_time(), time.perf_counter()
        a.apply(event, result, scene.size, t / scene.fps, 0.0)
        track_ms.append((time.perf_counter() - t0) * 1e3)
        track_cpu.append((time.thread_time() - c0) * 1e3)
        n_det.append(len(dets))
    warm = min(50, frames // 4)  # the first frames start tracks and fill caches

    def pct(v: list[float]) -> dict[str, float]:
        x = np.asarray(v[warm:])
        return {"p50_ms": float(np.percentile(x, 50)), "p95_ms": float(np.percentile(x, 95))}

    tr, dec = pct(track_ms), pct(decode_ms)
    return {
        "objects": objects,
        "detections_per_frame": float(np.mean(n_det)),
        "tracks_alive": a.status()["tracks_active"],
        "tracking_zones": tr,
        "tracking_zones_cpu": pct(track_cpu),
        "decode_baseline": dec,
        "p95_ratio_to_decode": tr["p95_ms"] / dec["p95_ms"],
    }


# --- motion gating --------------------------------------------------------------------------


def _thread_cpu_s(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gating(idle_s: float) -> dict[str, Any]:
    """CPU of the agent's pipeline on an idle camera, without and with motion gating."""
    from agent.engine.onnxrt import OnnxRuntimeBackend
    from agent.pipeline.model import RunnableModel, card_for_local_model
    from agent.pipeline.runner import Pipeline
    from agent.pipeline.sources import parse_source
    from cloud_sync.samples.blobdet import build_blobdet

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = build_blobdet(Path(tmp)) / "model.onnx"
        idle = Scene((), frames=250, size=(1280, 720), fps=25.0)
        video = write_scene_video(Path(tmp) / "idle.avi", idle, codec="MJPG", noise=2.0)
        for label, motion in (("off", None), ("on", {"max_skip_s": 2.0})):
            pcfg: dict[str, Any] = {"name": "idle", "source": str(video), "model": "m.onnx"}
            if motion:
                pcfg["motion"] = motion
            cfg = parse_config({"device_id": "b", "pipelines": [pcfg]}).pipelines[0]
            backend = OnnxRuntimeBackend(path)
            model = RunnableModel(card_for_local_model(path, backend), backend)
            pipe = Pipeline("idle", parse_source(str(video)), model, loop=True,
                            **pipeline_options(cfg))  # fmt: skip
            pipe.start()
            time.sleep(1.0)  # warm-up: session, first frames
            tid = next(t.native_id for t in threading.enumerate() if t.name == "infer-idle")
            if tid is None:
                raise RuntimeError("the inference thread has no native id")
            p0, i0, w0 = os.times(), _thread_cpu_s(tid), time.monotonic()
            s0 = pipe.status(0.0)
            time.sleep(idle_s)
            p1, i1, w1 = os.times(), _thread_cpu_s(tid), time.monotonic()
            s1 = pipe.status(0.0)
            pipe.stop()
            wall = w1 - w0
            out[label] = {
                "process_cores": ((p1.user - p0.user) + (p1.system - p0.system)) / wall,
                "infer_thread_cores": (i1 - i0) / wall,
                "inferred_per_s": (s1["frames_inferred"] - s0["frames_inferred"]) / wall,
                "read_per_s": (s1["frames_read"] - s0["frames_read"]) / wall,
                "skipped_no_motion": s1["frames_skipped_no_motion"],
            }
    off, on = out["off"], out["on"]
    out["process_saved"] = 1 - on["process_cores"] / off["process_cores"]
    out["infer_thread_saved"] = 1 - on["infer_thread_cores"] / max(off["infer_thread_cores"], 1e-9)
    return out


# --- report ---------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=20, help="detector runs of the scripted scene")
    ap.add_argument("--objects", type=int, default=50)
    ap.add_argument("--frames", type=int, default=1000, help="frames of the cost run")
    ap.add_argument("--idle-s", type=float, default=10.0, help="seconds of each gating run")
    ap.add_argument("--no-detector", action="store_true", help="skip the blobdet run")
    ap.add_argument("--no-gating", action="store_true", help="skip the motion-gating run")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    report: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "quality": quality(args.seeds),
        "cost": cost(args.objects, args.frames),
    }
    if not args.no_detector:
        report["blobdet"] = real_detector()
    if not args.no_gating:
        report["gating"] = gating(args.idle_s)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    q = report["quality"]
    print(f"quality: scripted scene, {q['edgefleet']['runs']} detector runs; truth {q['truth']}")
    for m in ("edgefleet", "iou", "none"):
        r = q[m]
        print(f"  {m:<9} id switches/run {r['id_switches_per_run']:6.1f}  extra ids/run "
              f"{r['extra_ids_per_run']:5.1f}  lines exact {r['lines_exact']}/{r['runs']}  "
              f"zones exact {r['zones_exact']}/{r['runs']}  count error/run "
              f"{r['count_error_per_run']:.1f}")  # fmt: skip
    if "blobdet" in report:
        print("blobdet on the rendered sparse scene:")
        for m, r in report["blobdet"].items():
            print(f"  {m:<9} id switches {r['id_switches']}  extra ids {r['extra_ids']}  "
                  f"counts {r['counts']} (truth {r['truth']})")  # fmt: skip
    c = report["cost"]
    print(f"cost at {c['objects']} objects ({c['detections_per_frame']:.1f} detections/frame, "
          f"{c['tracks_alive']} tracks): tracking + 1 zone + 1 line p50 "
          f"{c['tracking_zones']['p50_ms']:.3f} ms p95 {c['tracking_zones']['p95_ms']:.3f} ms "
          f"(thread CPU p95 {c['tracking_zones_cpu']['p95_ms']:.3f} ms); decode baseline p50 "
          f"{c['decode_baseline']['p50_ms']:.3f} ms p95 {c['decode_baseline']['p95_ms']:.3f} ms; "
          f"p95 ratio {c['p95_ratio_to_decode']:.2f}")  # fmt: skip
    if "gating" in report:
        g = report["gating"]
        for label in ("off", "on"):
            r = g[label]
            print(f"idle scene, motion gating {label:<3}: process {r['process_cores']:.3f} cores, "
                  f"inference thread {r['infer_thread_cores']:.3f} cores, {r['inferred_per_s']:.1f}"
                  f" inferences/s of {r['read_per_s']:.1f} frames/s")  # fmt: skip
        print(
            f"  saved: {g['process_saved']:.1%} of the process, "
            f"{g['infer_thread_saved']:.1%} of the inference thread"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
