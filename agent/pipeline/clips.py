"""Adapter: event clips of one pipeline, cut from the recorder's segments without re-encoding.

``ClipRecorder`` owns a pipeline's ``SegmentRecorder`` and a ``segments.ClipPlan``. The
pipeline calls ``mark(frame_time, kinds)`` for a frame with object events and writes the
returned id into the event (``clip``), before any sink sees it; the clip itself appears once
its post roll is on disk: ffmpeg's concat demuxer joins the segments covering
``[first event - pre_s, last event + post_s]`` with ``-c copy`` into an MP4 written under a
temp name and renamed (a reader never sees half a clip), beside a JSON sidecar with its times.
Clips live in ``ROOT/PIPELINE/ID.mp4``; past ``max_mb`` the oldest are deleted. A clip pending
when the agent stops is lost (its segments are not kept across runs).

``ClipLibrary`` is the read side, for the local API and the chunk responder: list clips and
find one by id, refusing any id that is not ``PIPELINE.MILLISECONDS`` (no path reaches outside
``ROOT``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from agent.common.fsutil import atomic_write_json, fsync_dir, remove_stale_temps
from agent.pipeline.recorder import SegmentRecorder
from agent.pipeline.segments import (
    ClipPlan,
    PendingClip,
    choose_evictions,
    parse_clip_id,
)
from agent.pipeline.sources import SourceSpec

log = logging.getLogger(__name__)

CUT_TIMEOUT_S = 120.0
# The pipeline times a frame when OpenCV has decoded it, the recorder a segment when its
# packets reached ffmpeg: the frame time is later by the decode path's latency (~60 ms
# measured on a 640x480 H.264 file). A clip starts this much earlier so that its pre roll
# is whole despite that; it adds a segment at most when t - pre_s falls just after a keyframe.
DECODE_LEAD_S = 0.2


class ClipNotFound(LookupError):
    """No clip with that id (or not yet cut)."""


class ClipLibrary:
    """The clips under one root folder (``DATA_DIR/clips``), read-only."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, clip_id: str) -> Path:
        """The MP4 of a finished clip.

        Raises:
            ValueError: a malformed id (paths, ``..``: refused before touching the disk).
            ClipNotFound: no such clip (pending, evicted or never made).
        """
        pipeline, _ = parse_clip_id(clip_id)
        p = self.root / pipeline / f"{clip_id}.mp4"
        if not p.is_file():
            raise ClipNotFound(f"no clip {clip_id} (not cut yet, evicted, or never made)")
        return p

    def info(self, clip_id: str) -> dict[str, Any]:
        """A clip's sidecar (id, pipeline, start, end, bytes, complete, kinds).

        Raises:
            ValueError, ClipNotFound: as ``path``.
        """
        mp4 = self.path(clip_id)
        return self._meta(mp4)

    def clips(self, pipeline: str | None = None) -> list[dict[str, Any]]:
        """Every finished clip, oldest first."""
        out: list[dict[str, Any]] = []
        folders = [self.root / pipeline] if pipeline else self._folders()
        for folder in folders:
            for mp4 in folder.glob("*.mp4"):
                try:
                    parse_clip_id(mp4.stem)
                    out.append(self._meta(mp4))
                except (ValueError, ClipNotFound):
                    continue
        return sorted(out, key=lambda m: (m["start"], m["id"]))

    def _folders(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir() if p.is_dir()]
        except FileNotFoundError:
            return []

    @staticmethod
    def _meta(mp4: Path) -> dict[str, Any]:
        try:
            meta: dict[str, Any] = json.loads(mp4.with_suffix(".json").read_text())
            meta["bytes"] = mp4.stat().st_size
        except (OSError, ValueError) as e:
            raise ClipNotFound(f"clip {mp4.stem} is being removed") from e
        return meta


class ClipRecorder:
    """One pipeline's rolling recorder, clip plan and cutter (a thread).

    Args:
        pipeline: pipeline name.
        spec: its source (file or URL).
        folder: ``ROOT/PIPELINE``: clips here, segments in ``segments/``.
        pre_s, post_s, max_s, max_mb, segment_s: the pipeline's ``[clips]``.
        loop: the pipeline loops its file source.
        wall: the wall clock (the same as the pipeline's frame times).
    """

    def __init__(
        self,
        pipeline: str,
        spec: SourceSpec,
        folder: Path,
        *,
        pre_s: float = 5.0,
        post_s: float = 5.0,
        max_s: float = 60.0,
        max_mb: float = 512,
        segment_s: float = 1.0,
        loop: bool = False,
        ffmpeg: str = "ffmpeg",
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.pipeline = pipeline
        self.folder = Path(folder)
        self.max_bytes = int(max_mb * (1 << 20))
        self.ffmpeg = ffmpeg
        self.wall = wall
        grace = max(10.0, 3 * segment_s)
        self.plan = ClipPlan(pipeline, pre_s, post_s, max_s, grace_s=grace)
        self.recorder = SegmentRecorder(
            spec,
            self.folder / "segments",
            segment_s=segment_s,
            keep_s=max_s + pre_s + post_s + grace + 4 * segment_s,
            loop=loop,
            ffmpeg=ffmpeg,
            wall=wall,
            name=pipeline,
        )
        self.library = ClipLibrary(self.folder.parent)
        self.drain_s = 2 * segment_s + 1.0
        self.cut = self.failed = self.evicted = 0
        self.last_error = ""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in remove_stale_temps(self.folder):
            log.info("pipeline=%s removed %s left by an interrupted cut", self.pipeline, stale)
        self.recorder.start()
        self._thread = threading.Thread(target=self._run, name=f"clips-{self.pipeline}",
                                        daemon=True)  # fmt: skip
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cut what can be cut from the segments on disk, then stop the recorder."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.recorder.stop()

    def mark(self, t: float, kinds: Iterable[str] = ()) -> str:
        """The id of the clip covering an object event at wall time ``t``."""
        with self._lock:
            return self.plan.mark(t, kinds)

    def status(self) -> dict[str, Any]:
        return {
            "recorder": self.recorder.state,
            "recorder_restarts": self.recorder.restarts,
            "clips_cut": self.cut,
            "clips_failed": self.failed,
            "clips_evicted": self.evicted,
            "clips_pending": len(self.plan.pending),
        }

    # -- the cutter thread ----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._cut_due(final=False)
        # stopping: give the post roll of pending clips a moment to reach disk (a file that
        # just ended is still being flushed), then cut whatever there is
        deadline = time.monotonic() + self.drain_s
        while self.plan.pending and time.monotonic() < deadline:
            if self.recorder.state not in ("starting", "recording"):
                break
            self._cut_due(final=False)
            time.sleep(0.1)
        self._cut_due(final=True)

    def _cut_due(self, *, final: bool) -> None:
        until = self.recorder.on_disk_until()
        with self._lock:
            now = float("inf") if final else self.wall()
            due = self.plan.due(until, now)
        for clip, whole in due:
            try:
                self._cut(clip, whole)
            except Exception as e:  # a failed cut must not stop the next ones
                self.failed += 1
                self.last_error = f"clip {clip.clip_id}: {e}"
                log.error("pipeline=%s clip=%s cut failed: %s", self.pipeline, clip.clip_id, e)
        if due:
            self._evict()

    def _cut(self, clip: PendingClip, whole: bool) -> None:
        start, end = clip.window(self.plan.pre_s, self.plan.post_s)
        segs = self.recorder.segments_for(start - DECODE_LEAD_S, end)
        if not segs:
            raise RuntimeError(
                f"no recorded segment covers {start:.3f}..{end:.3f} "
                f"(recorder {self.recorder.state}: {self.recorder.last_error or 'no error'})"
            )
        mp4 = self.folder / f"{clip.clip_id}.mp4"
        first_wall, last_wall = segs[0][2], segs[-1][3]
        meta = {
            "id": clip.clip_id,
            "pipeline": self.pipeline,
            "start": round(first_wall, 3),
            "end": round(last_wall, 3),
            # the recorder's stream clock (a file source: seconds into the file)
            "stream_start": round(segs[0][1].start, 3),
            "stream_end": round(segs[-1][1].end, 3),
            "first_event": round(clip.first, 3),
            "last_event": round(clip.last, 3),
            "pre_s": self.plan.pre_s,
            "post_s": self.plan.post_s,
            "kinds": clip.kinds,
            "complete": whole and first_wall <= start,
        }
        # sidecar first, then the rename that makes the clip visible: a listed clip has both
        atomic_write_json(mp4.with_suffix(".json"), meta)
        try:
            concat_copy([s[0] for s in segs], mp4, ffmpeg=self.ffmpeg)
        except BaseException:
            mp4.with_suffix(".json").unlink(missing_ok=True)
            raise
        self.cut += 1
        log.info("pipeline=%s clip=%s cut %.1f s from %d segments (complete=%s)",
                 self.pipeline, clip.clip_id, last_wall - first_wall, len(segs),
                 meta["complete"])  # fmt: skip

    def _evict(self) -> None:
        clips = [(m["id"], m["bytes"]) for m in self.library.clips(self.pipeline)]
        for cid in choose_evictions(clips, self.max_bytes):
            mp4 = self.folder / f"{cid}.mp4"
            mp4.unlink(missing_ok=True)
            mp4.with_suffix(".json").unlink(missing_ok=True)
            self.evicted += 1
            log.info("pipeline=%s clip=%s evicted (clips over %d MiB)", self.pipeline, cid,
                     self.max_bytes >> 20)  # fmt: skip


def concat_copy(segments: list[Path], dest: Path, *, ffmpeg: str = "ffmpeg") -> None:
    """Join MPEG-TS segments into the MP4 ``dest`` by stream copy: written under a temp name,
    fsynced, renamed into place.

    Raises:
        RuntimeError: ffmpeg failed (its message included); nothing is left behind.
    """
    folder = dest.parent
    fd, listing = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    fd2, out = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=folder)
    os.close(fd2)
    try:
        with os.fdopen(fd, "w") as fh:
            for seg in segments:
                fh.write(f"file '{seg.resolve()}'\n")  # our own names: no quote inside
        r = subprocess.run(
            [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-f", "concat",
             "-safe", "0", "-i", listing, "-c", "copy", "-movflags", "+faststart",
             "-f", "mp4", out],
            capture_output=True, timeout=CUT_TIMEOUT_S, check=False,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"ffmpeg concat exited with {r.returncode}: "
                               f"{r.stderr.decode(errors='replace').strip()[-300:]}")  # fmt: skip
        with open(out, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(out, 0o644)  # mkstemp made it 0600
        os.replace(out, dest)
        fsync_dir(folder)
    finally:
        for p in (listing, out):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
