"""Pure: the timeline of a segment recorder and the clips planned on it.

A file source is played twice, by the pipeline's reader and by ffmpeg (``-re``), each
starting when it is ready; there the offset of the first ffmpeg process is instead *anchored*
to where the reader puts the file's time 0 on the wall clock (``Timeline.anchors``, updated
with each frame: a reader that falls behind moves it), so that clips follow the pipeline's
frame times.

The recorder (``agent.pipeline.recorder``) has ffmpeg cut the source's compressed stream into
segments that each start at a keyframe, and reads ffmpeg's CSV segment list
(``name,start,end`` in stream seconds, one line per finished segment). Stream time is mapped
to the wall clock per ffmpeg process: ``wall = stream + offset`` with ``offset`` the least
``seen - end`` observed so far (a segment is listed when its last packet has arrived, so every
observation is late, never early; the least is the best). ``ClipPlan`` turns object events
(wall times) into clips ``[t - pre_s, t + post_s]``, merging an event into the clip still
waiting for its post roll (up to ``max_s``), and says which clips are due and which
segments cover them. Clip ids are ``PIPELINE.MILLISECONDS`` (the clip's first event, ms since
the epoch): topic- and path-safe by construction, checked by ``parse_clip_id`` on every
request from outside.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from agent.protocol.telemetry import CLIP_ID_PATTERN

__all__ = [
    "CLIP_ID_PATTERN",
    "ClipPlan",
    "PendingClip",
    "Segment",
    "Timeline",
    "choose_evictions",
    "covering",
    "parse_clip_id",
    "parse_segment_line",
]

_CLIP_ID_RE = re.compile(CLIP_ID_PATTERN[:-1] + r"\Z")
_SEGMENT_NAME_RE = re.compile(r"^seg-[0-9]{1,6}-[0-9]{1,9}\.ts\Z")


def parse_clip_id(clip_id: str) -> tuple[str, int]:
    """The pipeline and start (ms since the epoch) of a clip id.

    Raises:
        ValueError: not ``PIPELINE.MILLISECONDS`` (a path, ``..``, a slash: anything else).
    """
    if not isinstance(clip_id, str) or not _CLIP_ID_RE.match(clip_id):
        raise ValueError(
            f"clip id {str(clip_id)[:80]!r} is not PIPELINE.MILLISECONDS (e.g. gate.1764793537123)"
        )
    pipeline, _, ms = clip_id.partition(".")
    return pipeline, int(ms)


@dataclass(frozen=True)
class Segment:
    """One finished segment of one ffmpeg process (``gen``), in that process's stream time."""

    name: str
    gen: int
    start: float
    end: float


def parse_segment_line(line: str, gen: int) -> Segment | None:
    """One line of ffmpeg's CSV segment list (``name,start,end``); None when malformed."""
    parts = line.strip().split(",")
    if len(parts) != 3 or not _SEGMENT_NAME_RE.match(parts[0]):
        return None
    try:
        start, end = float(parts[1]), float(parts[2])
    except ValueError:
        return None
    if not (end >= start >= -1e9) or end - start > 3600:
        return None
    return Segment(parts[0], gen, start, end)


@dataclass
class Timeline:
    """Finished segments and their wall-clock times, over every ffmpeg process so far."""

    segments: list[Segment] = field(default_factory=list)
    offsets: dict[int, float] = field(default_factory=dict)  # gen → wall - stream
    anchors: dict[int, float] = field(default_factory=dict)  # gen → known wall - stream

    def add(self, seg: Segment, seen: float) -> None:
        """A segment listed at wall time ``seen``."""
        off = seen - seg.end
        self.offsets[seg.gen] = min(self.offsets.get(seg.gen, off), off)
        self.segments.append(seg)

    def wall(self, seg: Segment) -> tuple[float, float]:
        """The segment's start and end on the wall clock (seconds since the epoch)."""
        off = self.anchors.get(seg.gen, self.offsets[seg.gen])
        return seg.start + off, seg.end + off

    def end(self) -> float | None:
        """Wall time up to which the stream is on disk (None: nothing yet)."""
        return max((self.wall(s)[1] for s in self.segments), default=None)

    def prune(self, before: float) -> list[Segment]:
        """Forget (and return, to delete) the segments that ended before ``before``."""
        old = [s for s in self.segments if self.wall(s)[1] < before]
        if old:
            gone = set(id(s) for s in old)
            self.segments = [s for s in self.segments if id(s) not in gone]
        return old


def covering(timeline: Timeline, start: float, end: float) -> list[Segment]:
    """The segments overlapping ``[start, end]``, in time order."""
    hits = [s for s in timeline.segments if _overlaps(timeline.wall(s), start, end)]
    return sorted(hits, key=lambda s: timeline.wall(s)[0])


def _overlaps(span: tuple[float, float], start: float, end: float) -> bool:
    return span[1] > start and span[0] < end


@dataclass
class PendingClip:
    """A clip waiting for its post roll: events at ``first``..``last`` (wall seconds)."""

    clip_id: str
    first: float
    last: float
    kinds: list[str] = field(default_factory=list)

    def window(self, pre_s: float, post_s: float) -> tuple[float, float]:
        return self.first - pre_s, self.last + post_s


class ClipPlan:
    """Clips of one pipeline, from object events to due cuts.

    Args:
        pipeline: pipeline name (the clip ids' prefix).
        pre_s, post_s: roll before the first and after the last event of a clip.
        max_s: an event extends the pending clip while it stays this long at most; later
            events start a new clip.
        grace_s: a clip whose post roll has not reached disk this long after it was due is
            cut with what there is (the source stalled or ended).
    """

    def __init__(
        self, pipeline: str, pre_s: float, post_s: float, max_s: float, grace_s: float
    ) -> None:
        self.pipeline = pipeline
        self.pre_s, self.post_s, self.max_s, self.grace_s = pre_s, post_s, max_s, grace_s
        self.pending: list[PendingClip] = []
        self._last_ms = 0

    def mark(self, t: float, kinds: Iterable[str] = ()) -> str:
        """The clip id for an object event at wall time ``t`` (extending the open clip)."""
        cur = self.pending[-1] if self.pending else None
        if (
            cur is not None
            and t >= cur.first
            and t - cur.first + self.pre_s + self.post_s <= (self.max_s)
        ):
            cur.last = max(cur.last, t)
            cur.kinds.extend(k for k in kinds if k not in cur.kinds)
            return cur.clip_id
        ms = max(int(t * 1000), self._last_ms + 1)
        self._last_ms = ms
        clip = PendingClip(f"{self.pipeline}.{ms}", t, t, list(dict.fromkeys(kinds)))
        self.pending.append(clip)
        return clip.clip_id

    def due(self, on_disk_until: float | None, now: float) -> list[tuple[PendingClip, bool]]:
        """Remove and return the clips to cut now, each with whether its post roll is whole.

        A clip is due when the segments on disk reach its end, or ``grace_s`` after its end
        whatever is on disk.
        """
        out: list[tuple[PendingClip, bool]] = []
        keep: list[PendingClip] = []
        for c in self.pending:
            end = c.window(self.pre_s, self.post_s)[1]
            whole = on_disk_until is not None and on_disk_until >= end
            if whole or now >= end + self.grace_s:
                out.append((c, whole))
            else:
                keep.append(c)
        self.pending = keep
        return out


def choose_evictions(clips: Sequence[tuple[str, int]], budget: int) -> list[str]:
    """Oldest first: the ids of ``(clip_id, bytes)`` (any order) to delete so that the rest
    fit in ``budget`` bytes. Ids sort by time within a pipeline (same prefix, ms digits)."""
    total = sum(n for _, n in clips)
    out: list[str] = []
    for cid, n in sorted(clips, key=lambda c: parse_clip_id(c[0])[1]):
        if total <= budget:
            break
        out.append(cid)
        total -= n
    return out
