"""Benchmark: what event clips cost and how well they cover their roll, on a 1080p H.264 stream.

Makes a 1080p H.264 file with ffmpeg (``testsrc2`` + libx264, one keyframe per ``--gop``
frames, no B-frames, as IP cameras stream), then runs, in the same process, the same pipeline
(the reader decoding 1080p at the file's rate, the ``blobdet`` test model) twice for
``--seconds`` each: without clips, then with clips and an object event every few seconds.
Reports the pipeline process's CPU in both phases (% of one core, from ``getrusage``) and the
recorder's: the ffmpeg child's own CPU (``/proc/PID/stat`` utime + stime) over the phase, the
goal being <= 2 % of a core per stream (no decode, no encode: packets are copied). Then checks
each clip: ffprobe says H.264 in MP4 with as many frames as its segments span, and on the
file's own clock the clip covers ``[event - pre_s, event + post_s]`` and overshoots each end by
at most one GOP (plus the reader-vs-recorder decode lead at the start).

    python -m scripts.bench_clips [--seconds 20] [--gop 25] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.pipeline.clips import DECODE_LEAD_S, ClipRecorder
from agent.pipeline.sources import parse_source

FPS = 25


def make_stream(path: Path, seconds: int, gop: int) -> Path:
    subprocess.run(
        ["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
         f"testsrc2=size=1920x1080:rate={FPS}", "-t", str(seconds), "-c:v", "libx264",
         "-preset", "veryfast", "-b:v", "4M", "-g", str(gop), "-keyint_min", str(gop),
         "-bf", "0", "-pix_fmt", "yuv420p", str(path)],
        check=True,
    )  # fmt: skip
    return path


def child_cpu_s(pid: int) -> float:
    """utime + stime of a live process (seconds)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def self_cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_phase(video: Path, model: Any, seconds: float, clips: ClipRecorder | None,
              every_s: float) -> dict[str, Any]:  # fmt: skip
    from agent.pipeline.runner import Pipeline

    pipe = Pipeline("bench", parse_source(str(video)), model, [], loop=True, clips=clips)
    marks: list[tuple[str, float]] = []  # (clip id, event time on the file's clock)
    pipe.start()
    try:
        time.sleep(3.0)  # warm up: open, first frames, first segments
        cpu0, t0 = self_cpu_s(), time.monotonic()
        read0 = pipe.metrics.snapshot(time.monotonic(), "bench0").get("frames_read") or 0
        rec_cpu0 = child_cpu_s(clips.recorder.proc.pid) if clips and clips.recorder.proc else 0.0
        next_mark = t0 + 1.0
        while time.monotonic() - t0 < seconds:
            time.sleep(0.05)
            zero = pipe.reader.stream_zero_wall
            if clips is not None and zero is not None and time.monotonic() >= next_mark:
                now = time.time()
                marks.append((clips.mark(now, ["crossed"]), now - zero))
                next_mark += every_s
        wall = time.monotonic() - t0
        cpu = self_cpu_s() - cpu0
        rec_cpu = 0.0
        if clips is not None and clips.recorder.proc is not None:
            rec_cpu = child_cpu_s(clips.recorder.proc.pid) - rec_cpu0
        frames = pipe.metrics.snapshot(time.monotonic(), "bench")
        read = (frames.get("frames_read") or 0) - read0
    finally:
        pipe.stop()
    return {"wall_s": wall, "pipeline_cpu_pct": 100 * cpu / wall,
            "recorder_cpu_pct": 100 * rec_cpu / wall, "marks": marks,
            "frames_read": read}  # fmt: skip


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
         "stream=codec_name,nb_read_packets:format=format_name", "-of", "json", str(path)],
        check=True, capture_output=True,
    ).stdout  # fmt: skip
    doc = json.loads(out)
    s = doc["streams"][0]
    return {"codec": s["codec_name"], "frames": int(s["nb_read_packets"]),
            "format": doc["format"]["format_name"]}  # fmt: skip


def check_clips(
    clips: ClipRecorder, marks: list[tuple[str, float]], gop_s: float
) -> dict[str, Any]:
    pre, post = clips.plan.pre_s, clips.plan.post_s
    rows = []
    for cid, t in marks:
        try:
            meta, probe = clips.library.info(cid), ffprobe(clips.library.path(cid))
        except Exception as e:  # reported, not fatal: the bench says what failed
            rows.append({"id": cid, "error": str(e)})
            continue
        head = (t - pre) - meta["stream_start"]  # >= 0: pre roll covered; overshoot
        tail = meta["stream_end"] - (t + post)
        span = meta["stream_end"] - meta["stream_start"]
        rows.append({
            "id": cid, "codec": probe["codec"], "mp4": "mp4" in probe["format"],
            "frames": probe["frames"], "span_frames": round(span * FPS),
            "head_s": round(head, 3), "tail_s": round(tail, 3),
            "ok": head >= -1e-6 and tail >= -1 / FPS and head <= gop_s + DECODE_LEAD_S + 1e-6
            and tail <= gop_s + 1 / FPS and abs(probe["frames"] - span * FPS) <= 1,
        })  # fmt: skip
    return {"clips": rows, "all_ok": bool(rows) and all(r.get("ok") for r in rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="per phase")
    ap.add_argument("--gop", type=int, default=25, help="frames per keyframe of the stream")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from agent.engine.onnxrt import OnnxRuntimeBackend
    from agent.pipeline.model import RunnableModel, card_for_local_model
    from tests.harness.models import build_test_models

    gop_s = args.gop / FPS
    with tempfile.TemporaryDirectory() as tmp:
        video = make_stream(Path(tmp) / "stream.mp4", 12, args.gop)
        path = build_test_models()["blobdet"] / "model.onnx"
        backend = OnnxRuntimeBackend(path)
        model = RunnableModel(card_for_local_model(path, backend), backend)
        base = run_phase(video, model, args.seconds, None, 0)
        clips = ClipRecorder("bench", parse_source(str(video)), Path(tmp) / "clips" / "bench",
                             pre_s=2.0, post_s=2.0, max_s=4.0, segment_s=gop_s * 0.9,
                             loop=True)  # fmt: skip
        with_clips = run_phase(video, model, args.seconds, clips, every_s=4.5)
        accuracy = check_clips(clips, with_clips.pop("marks"), gop_s)
        base.pop("marks")
        model.close()
    result = {
        "stream": f"1920x1080 H.264 {FPS} fps, GOP {args.gop} ({gop_s:g} s), 4 Mb/s",
        "cores": os.cpu_count(), "without_clips": base, "with_clips": with_clips,
        "recorder_cpu_pct_of_core": round(with_clips["recorder_cpu_pct"], 2),
        "pipeline_cpu_ratio": round(with_clips["pipeline_cpu_pct"] / base["pipeline_cpu_pct"], 3),
        **accuracy,
    }  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"stream: {result['stream']}, {result['cores']} cores")
        for name, ph in (("without clips", base), ("with clips   ", with_clips)):
            fps = (ph["frames_read"] or 0) / ph["wall_s"]
            print(f"pipeline {name}: {ph['pipeline_cpu_pct']:.1f} % of a core, "
                  f"{fps:.1f} frames read/s (of {FPS})")  # fmt: skip
        print(f"pipeline CPU with/without: {result['pipeline_cpu_ratio']:.3f}")
        print(f"recorder (ffmpeg -c copy): {result['recorder_cpu_pct_of_core']:.2f} % of a core"
              " (goal <= 2 %)")  # fmt: skip
        for r in accuracy["clips"]:
            print(f"clip {r['id']}: " + (r.get("error") or
                  f"{r['codec']} mp4={r['mp4']} frames={r['frames']}/{r['span_frames']} "
                  f"pre overshoot {r['head_s']:+.3f} s, post overshoot {r['tail_s']:+.3f} s "
                  f"{'ok' if r['ok'] else 'OUT OF BOUNDS'}"))  # fmt: skip
    return 0 if accuracy["all_ok"] and result["recorder_cpu_pct_of_core"] <= 2.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
