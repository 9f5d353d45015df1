"""Adapter: a rolling buffer of a source's compressed stream, kept by an ffmpeg child process.

``SegmentRecorder`` runs ``ffmpeg -i SRC -map 0:v:0 -c copy -f segment …``: the packets the
camera or file already holds are cut at keyframes into MPEG-TS segments, never decoded or
encoded (a few tenths of a percent of a core per 1080p stream; ``scripts/bench_clips.py``).
It reads ffmpeg's CSV segment list into a ``segments.Timeline`` and deletes segments older
than ``keep_s``. Supervision: a child that exits or stops listing segments (stalled: no new
segment for ``stall_s``) is killed and started again after a capped exponential backoff; a
file source that is not looped ends normally. The child gets ``PR_SET_PDEATHSIG`` (SIGKILL)
so that an agent killed with SIGKILL leaves no ffmpeg behind, and ``stop`` kills it with the
pipeline. Audio is left out: clips are video evidence, and sound is another privacy question.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from agent.common.backoff import Backoff
from agent.pipeline.segments import Segment, Timeline, parse_segment_line
from agent.pipeline.sources import SourceSpec

log = logging.getLogger(__name__)

RecorderState = Literal["starting", "recording", "waiting", "ended", "stopped"]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def ffmpeg_command(
    spec: SourceSpec, folder: Path, gen: int, *, segment_s: float, loop: bool, ffmpeg: str
) -> list[str]:
    """The recorder's command line for one ffmpeg process (generation ``gen``).

    Raises:
        ValueError: a source with no compressed stream for ffmpeg (camera index, V4L2 device,
            GStreamer pipeline).
    """
    if spec.kind not in ("file", "url"):
        raise ValueError(
            f"{spec.kind} source {spec.display} has no compressed stream to record clips from"
        )
    src = str(spec.target)
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-loglevel", "error"]
    if spec.kind == "file":
        # play at the file's own rate, as the pipeline's reader does, so both share a clock
        cmd += ["-re", *(["-stream_loop", "-1"] if loop else [])]
    elif src.lower().startswith(("rtsp://", "rtsps://")):
        cmd += ["-rtsp_transport", "tcp"]
    cmd += ["-i", src, "-map", "0:v:0", "-an", "-c", "copy", "-f", "segment",
            "-segment_time", f"{segment_s:g}", "-reset_timestamps", "1",
            "-segment_format", "mpegts", "-segment_list", str(folder / f"list-{gen}.csv"),
            "-segment_list_type", "csv", str(folder / f"seg-{gen}-%06d.ts")]  # fmt: skip
    return cmd


class SegmentRecorder:
    """One pipeline's ffmpeg segment recorder, supervised, on a thread of its own.

    Args:
        spec: the pipeline's source (file or URL).
        folder: where segments and lists live; emptied at start (a previous run's segments
            have no clock to map them to).
        segment_s: target segment length; a segment ends at the first keyframe after it, so
            segments are whole GOPs.
        keep_s: segments that ended longer ago than this are deleted.
        loop: loop a file source (as the pipeline does).
        stall_s: a child that lists no new segment this long is restarted.
        wall: the wall clock (seconds since the epoch).
    """

    def __init__(
        self,
        spec: SourceSpec,
        folder: Path,
        *,
        segment_s: float = 2.0,
        keep_s: float = 120.0,
        loop: bool = False,
        stall_s: float | None = None,
        backoff: Backoff | None = None,
        ffmpeg: str = "ffmpeg",
        wall: Callable[[], float] = time.time,
        name: str = "recorder",
    ) -> None:
        self.spec, self.folder, self.segment_s, self.keep_s = spec, folder, segment_s, keep_s
        self.loop = loop
        self.stall_s = stall_s if stall_s is not None else max(10.0, 4 * segment_s)
        self.backoff = backoff or Backoff()
        self.ffmpeg = shutil.which(ffmpeg) or ffmpeg
        self.wall = wall
        self.name = name
        self.timeline = Timeline()
        self.lock = threading.Lock()  # guards timeline
        self.state: RecorderState = "starting"
        self.last_error = ""
        self.restarts = 0
        self.gen = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        self._thread = threading.Thread(target=self._run, name=f"rec-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._kill()
        if self._thread is not None:
            self._thread.join(timeout)
        self.state = "stopped"

    def anchor_first(self, stream_zero_wall: float) -> None:
        """A file source: the pipeline's reader puts stream time 0 at this wall time now; line
        the first ffmpeg process's segments up with it (a restarted one plays the file from
        its start again, out of step with the reader: it keeps its estimated offset)."""
        with self.lock:
            self.timeline.anchors[1] = stream_zero_wall

    def on_disk_until(self) -> float | None:
        with self.lock:
            return self.timeline.end()

    def segments_for(self, start: float, end: float) -> list[tuple[Path, Segment, float, float]]:
        """Segment files overlapping ``[start, end]`` (wall): path, segment, wall start, end."""
        from agent.pipeline.segments import covering

        with self.lock:
            return [
                (self.folder / s.name, s, *self.timeline.wall(s))
                for s in covering(self.timeline, start, end)
            ]

    # -- the supervising thread -------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self.gen += 1
            try:
                cmd = ffmpeg_command(self.spec, self.folder, self.gen, segment_s=self.segment_s,
                                     loop=self.loop, ffmpeg=self.ffmpeg)  # fmt: skip
                with open(self.folder / f"ffmpeg-{self.gen}.log", "wb") as errlog:
                    self.proc = subprocess.Popen(
                        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                        stderr=errlog, preexec_fn=_die_with_parent,
                    )  # fmt: skip
            except (OSError, ValueError) as e:
                self._failed(f"cannot start ffmpeg: {e}")
                continue
            self.state = "recording"
            ended = self._watch(self.proc)
            if self._stop.is_set():
                break
            if ended:
                self.state = "ended"
                log.info("pipeline=%s recorder: file source ended", self.name)
                return
        self.state = "stopped"

    def _watch(self, proc: subprocess.Popen[bytes]) -> bool:
        """Follow one child's segment list until it exits; True when a file ended cleanly."""
        listed = 0
        last_new = time.monotonic()
        list_path = self.folder / f"list-{self.gen}.csv"
        while not self._stop.wait(0.1):
            listed, new = self._read_list(list_path, listed)
            now = time.monotonic()
            if new:
                last_new = now
                self.backoff.succeeded()
            self._prune()
            rc = proc.poll()
            if rc is not None:
                self._read_list(list_path, listed, exited=True)
                err = self._error_tail()
                if rc == 0 and self.spec.kind == "file" and not self.loop:
                    return True
                self._failed(f"ffmpeg exited with {rc}: {err.strip()[-300:] or 'no message'}")
                return False
            if now - last_new > self.stall_s:
                self._kill()
                self._failed(f"ffmpeg listed no segment for {self.stall_s:g} s; restarting it")
                return False
        return False

    def _read_list(self, path: Path, listed: int, *, exited: bool = False) -> tuple[int, int]:
        """Add the lines past the first ``listed``; returns (lines now, new segments).

        ffmpeg lists a segment before it closes the file (``segment_end``: list entry, then
        ``ff_format_io_close``), so while it runs the newest entry waits for the next one; a
        clip cut from it could miss its last packets (seen here: 3 frames).
        """
        try:
            text = path.read_text(errors="replace")
        except FileNotFoundError:
            return listed, 0
        lines = text.splitlines()
        if text and not text.endswith("\n"):
            lines = lines[:-1]  # a line being written
        if not exited:
            lines = lines[:-1]
        seen = self.wall()
        new: list[Segment] = []
        for line in lines[listed:]:
            seg = parse_segment_line(line, self.gen)
            if seg is not None:
                new.append(seg)
        if new:
            with self.lock:
                for seg in new:
                    self.timeline.add(seg, seen)
        return max(listed, len(lines)), len(new)

    def _prune(self) -> None:
        with self.lock:
            old = self.timeline.prune(self.wall() - self.keep_s)
        for seg in old:
            (self.folder / seg.name).unlink(missing_ok=True)

    def _failed(self, why: str) -> None:
        self.last_error = why
        self.state = "waiting"
        self.restarts += 1
        delay = self.backoff.failed(time.monotonic())
        log.warning("pipeline=%s recorder error=%r retry_in_s=%.2f", self.name, why, delay)
        self._stop.wait(delay)

    def _kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not refused
                log.error("pipeline=%s recorder: ffmpeg pid %d outlived SIGKILL", self.name,
                          proc.pid)  # fmt: skip

    def _error_tail(self) -> str:
        try:
            with open(self.folder / f"ffmpeg-{self.gen}.log", "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""


def pid_alive(pid: int) -> bool:
    """Whether a process exists (tests: no orphan left)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
