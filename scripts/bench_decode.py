"""Benchmark: detection decode + NMS per output format, against a plain NumPy baseline.

For a YOLOv8/v11 output (1, 4+C, N) with C = 80 classes and N = 8,400 candidates (a 640x640
input), and the same candidates as YOLOv5 (1, 3N, 5+C) and YOLOX (1, N, 5+C) rows, it times the
agent's detection reader (``make_postprocessor("detection", ...)``: decode, map to the frame,
class-aware NMS) and, in the same run and on the same arrays, a baseline written the way the
exporters' NumPy examples do it (transpose, per-row ``max``/``argmax`` over every candidate,
then ``cv2.dnn.NMSBoxesBatched``). Outputs are synthetic but shaped like a real frame's: class
scores mostly near 0, ``--objects`` objects each with a cluster of ~10 overlapping candidates
above the threshold. Prints p50/p95 in milliseconds and the ratio to the baseline; the goal is
YOLOv8 p95 <= 1 ms on this machine.

    python -m scripts.bench_decode [--runs 2000] [--objects 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Any

import cv2
import numpy as np

from agent.pipeline.postprocess import make_postprocessor
from agent.pipeline.preprocess import FrameTransform
from agent.protocol.card import InputSpec, PostprocessSpec

SIZE, CLASSES, THRESHOLD, IOU = 640, 80, 0.25, 0.45


def yolov8_output(objects: int, seed: int = 0) -> np.ndarray:
    """(1, 4 + C, N) with ``objects`` clusters of candidates above the threshold."""
    rng = np.random.default_rng(seed)
    n = sum((SIZE // s) ** 2 for s in (8, 16, 32))
    out = np.empty((4 + CLASSES, n), np.float32)
    out[0:2] = rng.uniform(0, SIZE, (2, n))
    out[2:4] = rng.uniform(4, 120, (2, n))
    out[4:] = rng.beta(0.3, 30, (CLASSES, n))  # sigmoid scores: mostly ~0.01
    for _ in range(objects):
        cx, cy, w, h = rng.uniform(60, 580), rng.uniform(60, 580), *rng.uniform(20, 120, 2)
        cls = rng.integers(CLASSES)
        for j in rng.choice(n, 10, replace=False):
            out[0:4, j] = (cx + rng.normal(0, 3), cy + rng.normal(0, 3), w, h)
            out[4 + cls, j] = rng.uniform(0.4, 0.95)
    return out[None]


def baseline(pred: np.ndarray, base: int) -> list[Any]:
    """The exporters' NumPy example: rows, max/argmax over every candidate, then NMS."""
    rows = pred[0].T if base == 4 else pred[0]
    cls = rows[:, base:]
    scores = cls.max(axis=1) * (rows[:, 4] if base == 5 else 1.0)
    ids = cls.argmax(axis=1)
    keep = scores >= THRESHOLD
    b, s, c = rows[keep, :4], scores[keep], ids[keep]
    xywh = np.hstack([b[:, :2] - b[:, 2:4] / 2, b[:, 2:4]])
    return list(cv2.dnn.NMSBoxesBatched(xywh.tolist(), s.tolist(), c.tolist(), THRESHOLD, IOU))


def timed(fn: Any, runs: int) -> dict[str, float]:
    for _ in range(min(50, runs)):
        fn()
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    a = np.asarray(ts)
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2000)
    ap.add_argument("--objects", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    v8 = yolov8_output(args.objects)
    rows = np.ascontiguousarray(v8[0].T)  # (N, 4 + C)
    obj = np.clip(rows[:, 4:].max(axis=1, keepdims=True) * 1.05, 0, 1)
    cls = rows[:, 4:] / np.maximum(obj, 1e-6)
    one = np.hstack([rows[:, :4], obj, cls]).astype(np.float32)
    quiet = one.copy()
    quiet[:, 4] *= 0.05  # the two other anchors of each cell: low objectness
    v5 = np.concatenate([one, quiet, quiet])[None]  # (1, 3N, 5 + C)
    inp = InputSpec(width=SIZE, height=SIZE)
    frame = FrameTransform(1280, 720, 0.5, 0.5, 0.0, 140.0)
    labels = [str(i) for i in range(CLASSES)]
    cases = {
        "yolov8": (v8, PostprocessSpec(format="yolov8"), 4),
        "yolov5": (v5, PostprocessSpec(format="yolov5"), 5),
    }
    report: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cases": {}}
    for name, (out, spec, base) in cases.items():
        reader = make_postprocessor("detection", spec, labels, inp)
        found = len(reader([out], frame).detections)
        ours = timed(lambda r=reader, o=out: r([o], frame), args.runs)
        base_t = timed(lambda o=out, b=base: baseline(o, b), args.runs)
        report["cases"][name] = {
            "shape": list(out.shape),
            "detections": found,
            "edgefleet": ours,
            "baseline": base_t,
            "p95_ratio": ours["p95_ms"] / base_t["p95_ms"],
        }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    for name, r in report["cases"].items():
        print(
            f"{name:<7} {r['shape']}: {r['detections']} detections; edgefleet p50 "
            f"{r['edgefleet']['p50_ms']:.3f} ms p95 {r['edgefleet']['p95_ms']:.3f} ms; baseline "
            f"p50 {r['baseline']['p50_ms']:.3f} ms p95 {r['baseline']['p95_ms']:.3f} ms; "
            f"p95 ratio {r['p95_ratio']:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
